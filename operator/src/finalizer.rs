//! Adding and removing this operator's finalizers.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// Makes `obj` hold `finalizer` exactly when `want`. Replaces `metadata.finalizers` with
/// the resourceVersion as a precondition, so another controller's finalizer added
/// meanwhile is never dropped (the patch fails and the reconcile is retried). Returns the
/// object's new resourceVersion when it wrote.
pub async fn set<K>(
    api: &Api<K>,
    obj: &K,
    finalizer: &str,
    want: bool,
    metrics: &crate::telemetry::Metrics,
) -> kube::Result<Option<String>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let has = obj.finalizers().iter().any(|f| f == finalizer);
    if has == want {
        return Ok(None);
    }
    let mut finalizers: Vec<&str> = obj
        .finalizers()
        .iter()
        .map(String::as_str)
        .filter(|f| *f != finalizer)
        .collect();
    if want {
        finalizers.push(finalizer);
    }
    metrics.kube_write("finalizers");
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}
    });
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|written| written.resource_version())
}
