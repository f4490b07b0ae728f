//! Helpers for tests of pods that really run: the environment's node agent (development
//! stand-in for a kubelet) binds them to its node and runs their containers as local
//! processes, each pod on its own loopback address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use crate::eventually;

/// Whether the pod's `Ready` condition is `True`.
pub fn is_ready(pod: &Pod) -> bool {
    condition(pod, "Ready") == Some("True")
}

/// The status of one of the pod's conditions.
pub fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

/// `status.podIP`, empty when there is none.
pub fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

/// Waits up to `timeout` until the pods matching `selector` satisfy `check`; returns them.
pub async fn wait_pods(
    api: &Api<Pod>,
    selector: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[Pod]) -> bool,
) -> Vec<Pod> {
    eventually(timeout, what, || async {
        let pods = api
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?
            .items;
        check(&pods).then_some(pods)
    })
    .await
}

/// A plain-HTTP GET on `ip:port`: the status code and body, `None` when nothing answers.
pub fn http_get_at(ip: &str, port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // One write: a server may answer (and close) after the first segment it reads.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// A fresh directory the `pod-probe` test program writes its reports into
/// (`PROBE_OUT_DIR`).
pub fn probe_out_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique(prefix));
    std::fs::create_dir_all(&dir).expect("creating the probe output directory");
    dir
}

/// The environment `pod-probe` ran with in `pod`, once it has written it.
pub fn probe_env(dir: &Path, pod: &str) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(dir.join(format!("{pod}.env"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// A container running the `pod-probe` test program (a binary of this crate, which the
/// node agent finds by the image's name), serving its probes on the pod's own address.
pub fn probe_container(out_dir: &Path, extra_env: serde_json::Value) -> serde_json::Value {
    let field = |path: &str| serde_json::json!({"fieldRef": {"fieldPath": path}});
    let mut env = vec![
        serde_json::json!({"name": "POD_IP", "valueFrom": field("status.podIP")}),
        serde_json::json!({"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        serde_json::json!({"name": "PROBE_ADDR", "value": "$(POD_IP):8080"}),
        serde_json::json!({"name": "PROBE_OUT_DIR", "value": out_dir}),
    ];
    env.extend(extra_env.as_array().cloned().unwrap_or_default());
    serde_json::json!({
        "name": "probe",
        "image": "ghcr.io/eventops/pod-probe:test",
        "env": env,
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
    })
}
