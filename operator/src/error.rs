//! Errors a reconcile returns to the controller for a retry on the object's back-off
//! (see [`crate::backoff`]). Kafka refusals that only a change can fix and invalid specs
//! are not errors here: they become status conditions.

use crate::kafka::KafkaError;
use crate::kafka::native::NativeError;

/// A failure that is worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("could not {action} {object}: {source}")]
    Kube {
        /// What was attempted.
        action: &'static str,
        /// Which object.
        object: String,
        /// The API error.
        source: kube::Error,
    },
    /// A Kafka topic request failed (Kafka unreachable, a timeout, a throttle, a leader
    /// moving): the object's Ready condition says so already.
    #[error("Kafka failed for {object}: {source}")]
    Kafka {
        /// Which object.
        object: String,
        /// Kafka's error.
        source: KafkaError,
    },
    /// A Kafka admin request about users or ACLs failed (Kafka unreachable, a timeout):
    /// the object's Ready condition says so already.
    #[error("Kafka failed for {object}: {source}")]
    KafkaAdmin {
        /// Which object.
        object: String,
        /// Kafka's error.
        source: NativeError,
    },
}

/// `<kind> <namespace>/<name>` of `obj`.
fn describe<K: kube::Resource<DynamicType = ()>>(obj: &K) -> String {
    let meta = obj.meta();
    format!(
        "{} {}/{}",
        K::kind(&()),
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

impl Error {
    /// A failed API call about `obj`, naming its kind, namespace and name.
    pub fn kube<K: kube::Resource<DynamicType = ()>>(
        action: &'static str,
        obj: &K,
        source: kube::Error,
    ) -> Self {
        Error::Kube {
            action,
            object: describe(obj),
            source,
        }
    }

    /// A failed Kafka topic request for `obj`.
    pub fn kafka<K: kube::Resource<DynamicType = ()>>(obj: &K, source: KafkaError) -> Self {
        Error::Kafka {
            object: describe(obj),
            source,
        }
    }

    /// A failed Kafka user or ACL request for `obj`.
    pub fn kafka_admin<K: kube::Resource<DynamicType = ()>>(obj: &K, source: NativeError) -> Self {
        Error::KafkaAdmin {
            object: describe(obj),
            source,
        }
    }

    /// The `reason` label of the failure counter: Kafka's own reason for a Kafka
    /// failure, as the object's Ready condition gives it.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube { .. } => "KubernetesApiError".into(),
            Error::Kafka { source, .. } => source.reason(),
            Error::KafkaAdmin { source, .. } => source.reason(),
        }
    }
}
