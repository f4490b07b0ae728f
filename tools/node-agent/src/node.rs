//! The Node this agent stands for: registered with labels that mark it as the EventOps
//! development node, and kept Ready by heartbeats (its Lease in `kube-node-lease` and its
//! status), so the node lifecycle controller neither taints it nor evicts its pods.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tracing::warn;

/// Field manager of everything the agent writes.
pub const MANAGER: &str = "eventops-node-agent";
/// Label on the node marking it as the EventOps development node.
pub const DEV_NODE_LABEL: &str = "eventops.dev/dev-node";
/// How often the agent renews its Lease and status.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// The node's labels: the well-known ones a kubelet sets, and [`DEV_NODE_LABEL`].
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    BTreeMap::from([
        ("kubernetes.io/hostname".into(), name.into()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), arch.into()),
        (DEV_NODE_LABEL.into(), "true".into()),
    ])
}

/// Creates or updates the Node and reports it Ready.
pub async fn register(client: &Client, name: &str, host_ip: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels(name),
            "annotations": {
                "eventops.dev/node-agent": "development and test stand-in for a kubelet: runs \
                    pods as local processes built from the EventOps workspace, without \
                    containers or isolation; not for production",
            },
        },
    });
    nodes
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&node),
        )
        .await
        .with_context(|| format!("registering node {name}"))?;
    heartbeat(client, name, host_ip).await
}

/// Renews the Lease and the Ready condition.
pub async fn heartbeat(client: &Client, name: &str, host_ip: &str) -> anyhow::Result<()> {
    let now = Timestamp::now();
    let nodes: Api<Node> = Api::all(client.clone());
    let version = client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_else(|_| "v0.0.0".into());
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        serde_json::json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": Time(now), "lastTransitionTime": Time(now),
        })
    };
    let current = nodes.get_status(name).await?;
    // Keep transition times of conditions that did not change.
    let transitions: BTreeMap<String, Option<Time>> = current
        .status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .map(|c| (c.type_, c.last_transition_time))
        .collect();
    let mut conditions = vec![
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "not checked by the node agent",
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "not checked by the node agent",
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "not checked by the node agent",
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "the EventOps node agent (a development stand-in for a kubelet) is running",
        ),
    ];
    for c in &mut conditions {
        if let Some(Some(t)) = transitions.get(c["type"].as_str().unwrap_or_default()) {
            c["lastTransitionTime"] = serde_json::to_value(t)?;
        }
    }
    let status = serde_json::json!({"status": {
        "conditions": conditions,
        "addresses": [
            {"type": "InternalIP", "address": host_ip},
            {"type": "Hostname", "address": name},
        ],
        "capacity": {"cpu": cpus(), "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": cpus(), "memory": "8Gi", "pods": "110"},
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "architecture": labels(name)["kubernetes.io/arch"],
            "operatingSystem": "linux",
            "osImage": "local processes (EventOps node agent)",
            "kernelVersion": "",
            "kubeletVersion": version,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "eventops-local://0.1.0",
            "machineID": "", "systemUUID": "", "bootID": "",
        },
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("writing the status of node {name}"))?;

    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(now),
        },
    });
    leases
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| format!("renewing the lease of node {name}"))?;
    Ok(())
}

/// Keeps the node Ready until the task is dropped.
pub async fn keep_ready(client: Client, name: String, host_ip: String) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = heartbeat(&client, &name, &host_ip).await {
            warn!("node heartbeat failed: {e:#}");
        }
    }
}

fn cpus() -> String {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string()
}
