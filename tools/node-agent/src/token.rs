//! Service account stand-in: instead of a token mounted at
//! `/var/run/secrets/kubernetes.io/serviceaccount`, each pod gets a kubeconfig in its
//! directory, with a token for its service account bound to the pod (TokenRequest API),
//! and `KUBECONFIG` pointing at it. kube-rs (`Config::infer`) and kubectl read it, and
//! both re-read the token file, which the agent refreshes before the token expires.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use crate::pod::Agent;

/// How long tokens live; the agent refreshes them at 80 %, as the kubelet does.
const TOKEN_LIFETIME_SECONDS: i64 = 3600;

/// A pod's credentials on disk.
pub struct PodCredentials {
    /// The kubeconfig to hand to the pod's processes.
    pub kubeconfig: PathBuf,
    /// When to get a new token.
    pub refresh_at: Instant,
}

impl PodCredentials {
    /// Gets a token for the pod's service account and writes `dir/token` and
    /// `dir/kubeconfig`.
    pub async fn issue(agent: &Agent, pod: &Pod, dir: &Path) -> anyhow::Result<Self> {
        let creds = Self::refresh(agent, pod, dir).await?;
        let namespace = pod.namespace().unwrap_or_default();
        let config = kubeconfig(&agent.cluster, &dir.join("token"), &namespace);
        write_private(&creds.kubeconfig, &serde_json::to_vec_pretty(&config)?)?;
        Ok(creds)
    }

    /// Replaces the token file with a fresh token.
    pub async fn refresh(agent: &Agent, pod: &Pod, dir: &Path) -> anyhow::Result<Self> {
        let namespace = pod.namespace().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(agent.client.clone(), &namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                // None: the API server's own audience, which it accepts.
                audiences: None,
                expiration_seconds: Some(TOKEN_LIFETIME_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name_any()),
                    uid: pod.uid(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let issued = api
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for service account {namespace}/{sa}"))?;
        let token = issued
            .status
            .and_then(|s| s.token)
            .context("the TokenRequest has no token in its status")?;
        let file = dir.join("token");
        let tmp = dir.join("token.tmp");
        write_private(&tmp, token.as_bytes())?;
        std::fs::rename(&tmp, &file)?;
        Ok(Self {
            kubeconfig: dir.join("kubeconfig"),
            refresh_at: Instant::now()
                + Duration::from_secs((TOKEN_LIFETIME_SECONDS * 8 / 10) as u64),
        })
    }
}

/// A kubeconfig for `cluster` that reads its token from `token_file`.
pub fn kubeconfig(
    cluster: &kube::config::Cluster,
    token_file: &Path,
    namespace: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "eventops-local", "cluster": cluster}],
        "users": [{"name": "pod-service-account", "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "pod", "context": {
            "cluster": "eventops-local", "user": "pod-service-account", "namespace": namespace,
        }}],
        "current-context": "pod",
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_kubeconfig_reads_as_one() {
        let cluster = kube::config::Cluster {
            server: Some("https://127.0.0.1:6443".into()),
            certificate_authority: Some("/tmp/ca.crt".into()),
            ..Default::default()
        };
        let value = kubeconfig(&cluster, Path::new("/pods/ns_p/token"), "ns");
        let parsed: kube::config::Kubeconfig =
            serde_json::from_value(value).expect("a valid kubeconfig");
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token_file.as_deref(), Some("/pods/ns_p/token"));
        let context = parsed.contexts[0].context.as_ref().unwrap();
        assert_eq!(context.namespace.as_deref(), Some("ns"));
        assert_eq!(
            parsed.clusters[0]
                .cluster
                .as_ref()
                .unwrap()
                .server
                .as_deref(),
            Some("https://127.0.0.1:6443")
        );
    }
}
