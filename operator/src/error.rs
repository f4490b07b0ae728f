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
    /// The `reason` label of the failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubernetesApiError",
        }
    }
}
