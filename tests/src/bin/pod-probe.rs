//! A tiny program for node-agent tests to run as a pod's container.
//!
//! Writes its environment to `$PROBE_OUT_DIR/<pod>.env` (JSON), serves `/readyz` and
//! `/healthz` on `$PROBE_ADDR`, and on SIGTERM writes `<pod>.terminated` and exits 0.
//! With `PROBE_KUBE_CHECK` set it also lists ConfigMaps and Secrets of its namespace with
//! the credentials `Config::infer` finds (the node agent's `KUBECONFIG`) and writes what
//! the API server said to `<pod>.kube` (JSON).

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("PROBE_OUT_DIR")?);
    let pod = std::env::var("HOSTNAME")?;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    std::fs::write(out.join(format!("{pod}.env")), serde_json::to_vec(&env)?)?;
    if std::env::var_os("PROBE_KUBE_CHECK").is_some() {
        let client = Client::try_default().await?;
        let ns = std::env::var("POD_NAMESPACE")?;
        let verdict = |r: kube::Result<_>| match r {
            Ok(_) => "allowed".to_string(),
            Err(kube::Error::Api(e)) if e.code == 403 => "forbidden".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let config_maps = verdict(
            Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .list(&Default::default())
                .await
                .map(|_| ()),
        );
        let secrets = verdict(
            Api::<Secret>::namespaced(client, &ns)
                .list(&Default::default())
                .await
                .map(|_| ()),
        );
        let report = serde_json::json!({"configmaps": config_maps, "secrets": secrets});
        std::fs::write(out.join(format!("{pod}.kube")), report.to_string())?;
    }
    let addr = std::env::var("PROBE_ADDR")?;
    let listener = std::net::TcpListener::bind(&addr)?;
    std::thread::spawn(move || serve(listener));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    std::fs::write(out.join(format!("{pod}.terminated")), "SIGTERM")?;
    Ok(())
}

/// `/readyz` and `/healthz` answer 200, anything else 404.
fn serve(listener: std::net::TcpListener) {
    use std::io::{Read, Write};
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Read the whole request head, however the client splits it.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let request = String::from_utf8_lossy(&head);
        let ok = request.starts_with("GET /readyz ") || request.starts_with("GET /healthz ");
        let (code, body) = if ok { (200, "ok") } else { (404, "not found") };
        let response = format!(
            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}
