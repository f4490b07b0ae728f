//! Errors a reconcile returns to the controller for a retry. Kafka refusals and invalid
//! specs are not errors here: they become status conditions.

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
}

impl Error {
    /// A failed API call about `obj`, naming its kind, namespace and name.
    pub fn kube<K: kube::Resource<DynamicType = ()>>(
        action: &'static str,
        obj: &K,
        source: kube::Error,
    ) -> Self {
        let meta = obj.meta();
        Error::Kube {
            action,
            object: format!(
                "{} {}/{}",
                K::kind(&()),
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            ),
            source,
        }
    }

    /// The `reason` label of the failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubernetesApiError",
        }
    }
}
