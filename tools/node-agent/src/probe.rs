//! Probes as the kubelet runs them: an HTTP GET succeeds with a status from 200 to 399,
//! a TCP probe when the connection opens.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Runs `probe` against the container at `ip`: `Ok` when it passes, else why not.
pub async fn run(probe: &Probe, container: &Container, ip: IpAddr) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(http) = &probe.http_get {
        let port = port(&http.port, container)?;
        let host = http
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(ip);
        let path = http.path.as_deref().unwrap_or("/");
        let uri = format!("http://{}{path}", SocketAddr::new(host, port));
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let uri: hyper::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
        let response = tokio::time::timeout(timeout, client.get(uri.clone()))
            .await
            .map_err(|_| format!("GET {uri}: timed out after {timeout:?}"))?
            .map_err(|e| format!("GET {uri}: {e}"))?;
        let code = response.status().as_u16();
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("GET {uri}: HTTP {code}"))
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let addr = SocketAddr::new(ip, port(&tcp.port, container)?);
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connecting to {addr}: {e}")),
            Err(_) => Err(format!("connecting to {addr}: timed out")),
        };
    }
    // exec and gRPC probes are not run by the stand-in; they count as passing.
    Ok(())
}

/// A probe's port: a number, or the name of one of the container's ports.
pub fn port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid probe port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("container has no port named {name:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    #[test]
    fn named_ports_resolve_through_the_container() {
        let c = Container {
            name: "c".into(),
            ports: Some(vec![ContainerPort {
                name: Some("health".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(port(&IntOrString::String("health".into()), &c), Ok(8080));
        assert_eq!(port(&IntOrString::Int(9), &c), Ok(9));
        assert!(port(&IntOrString::String("nope".into()), &c).is_err());
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_only() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if req.starts_with("GET /ok ") {
                    200
                } else {
                    503
                };
                let _ = s.write_all(
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                );
            }
        });
        let probe = |path: &str| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::Int(port.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Container::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(run(&probe("/ok"), &c, ip).await, Ok(()));
        let err = run(&probe("/bad"), &c, ip).await.unwrap_err();
        assert!(err.contains("HTTP 503"), "{err}");
        let closed = crate::probe::tests::closed_port();
        let mut p = probe("/ok");
        p.http_get.as_mut().unwrap().port = IntOrString::Int(closed.into());
        assert!(run(&p, &c, ip).await.is_err());
    }

    pub(crate) fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }
}
