//! The scheduler's part: there is no kube-scheduler and this is the only node, so every
//! pod for the default scheduler whose node selector the node satisfies is bound to it
//! through the `pods/binding` subresource.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

/// Why the node does not take `pod`, or `None` when it does.
pub fn unschedulable(pod: &Pod, node_labels: &BTreeMap<String, String>) -> Option<String> {
    let selector = pod.spec.as_ref()?.node_selector.as_ref()?;
    let unmet: Vec<String> = selector
        .iter()
        .filter(|(k, v)| node_labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    (!unmet.is_empty()).then(|| {
        format!(
            "0/1 nodes are available: the EventOps development node does not have the \
             node selector's labels {}",
            unmet.join(", ")
        )
    })
}

/// Whether `pod` is for the default scheduler (the one this agent stands in for).
pub fn for_default_scheduler(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n == "default-scheduler")
}

/// Binds unscheduled pods to `node` as they appear, and retries every few seconds.
pub async fn run(client: Client, node: String, node_labels: BTreeMap<String, String>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().fields("spec.nodeName=");
    let stream = reflector(writer, watcher(pods, config))
        .default_backoff()
        .touched_objects();
    let mut stream = std::pin::pin!(stream);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut reported = HashSet::new();
    // When each pod was last sent a binding, by uid: the store still holds a pod for a
    // moment after its binding, and every event walks the whole store, so without this a
    // burst of N pods sends on the order of N² bindings (all but N refused as conflicts).
    let mut attempted: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(_)) => {}
                Some(Err(e)) => { warn!("watching unscheduled pods: {e}"); continue; }
                None => return,
            },
            _ = tick.tick() => {}
        }
        let pods = store.state();
        attempted.retain(|uid, at| {
            at.elapsed() < RETRY_BINDING && pods.iter().any(|p| p.uid().as_ref() == Some(uid))
        });
        for pod in pods {
            if pod.metadata.deletion_timestamp.is_some() || !for_default_scheduler(&pod) {
                continue;
            }
            match unschedulable(&pod, &node_labels) {
                Some(reason) => {
                    if reported.insert(pod.uid().unwrap_or_default()) {
                        mark_unschedulable(&client, &pod, &reason).await;
                    }
                }
                None => {
                    let uid = pod.uid().unwrap_or_default();
                    if let std::collections::hash_map::Entry::Vacant(e) = attempted.entry(uid) {
                        e.insert(Instant::now());
                        bind(&client, &pod, &node).await;
                    }
                }
            }
        }
    }
}

/// How long a pod that was sent a binding and is still unbound waits for the next.
const RETRY_BINDING: Duration = Duration::from_secs(5);

async fn bind(client: &Client, pod: &Pod, node: &str) {
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(pod.name_any()),
            namespace: Some(ns.clone()),
            uid: pod.uid(),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    match api
        .create_subresource::<Binding, serde_json::Value>(
            "binding",
            &pod.name_any(),
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => info!(pod = %format!("{ns}/{}", pod.name_any()), node, "bound pod"),
        // Already bound, or gone: the watch will say so.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
        Err(e) => warn!(pod = %format!("{ns}/{}", pod.name_any()), "binding: {e}"),
    }
}

async fn mark_unschedulable(client: &Client, pod: &Pod, reason: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": reason, "lastTransitionTime": Time(Timestamp::now()),
    }]}});
    let params = PatchParams::default();
    if let Err(e) = api
        .patch_status(&pod.name_any(), &params, &Patch::Strategic(&patch))
        .await
    {
        warn!("marking {} unschedulable: {e}", pod.name_any());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(selector: &[(&str, &str)], scheduler: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [],
                "nodeSelector": selector.iter().cloned().collect::<BTreeMap<_, _>>(),
                "schedulerName": scheduler,
            },
        }))
        .unwrap()
    }

    #[test]
    fn node_selectors_must_match_the_node_labels() {
        let labels = crate::node::labels("eventops-local");
        assert_eq!(unschedulable(&pod(&[], None), &labels), None);
        assert_eq!(
            unschedulable(&pod(&[("kubernetes.io/os", "linux")], None), &labels),
            None
        );
        let why = unschedulable(&pod(&[("disktype", "ssd")], None), &labels).unwrap();
        assert!(why.contains("disktype=ssd"), "{why}");
    }

    #[test]
    fn only_default_scheduler_pods_are_bound() {
        assert!(for_default_scheduler(&pod(&[], None)));
        assert!(for_default_scheduler(&pod(&[], Some("default-scheduler"))));
        assert!(!for_default_scheduler(&pod(&[], Some("custom"))));
    }
}
