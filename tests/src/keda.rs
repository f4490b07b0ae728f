//! Real KEDA (the operator and its metrics adapter, built by `tools/install-keda.sh`) run
//! as local processes against the development environment, for `tools/bench-keda`.
//! Development and test tooling.
//!
//! What a Helm install of KEDA does, done by hand: its CRDs; namespace `keda`; one
//! certificate (its own CA) for the adapter's HTTPS server and both ends of the
//! operator ↔ adapter gRPC metrics service (KEDA's cert rotation, which would write them
//! to a Secret and patch the APIService, is off); the APIService
//! `v1beta1.external.metrics.k8s.io` served by the adapter through an ExternalName
//! Service `localhost` (the aggregator resolves it to `https://localhost:<port>`: no
//! kube-proxy or cluster DNS is needed); and the RBAC KEDA's chart gives the HPA
//! controller to read external metrics. Both processes use the administrator's
//! kubeconfig (the chart's service accounts are not modelled).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{ChildGuard, TestEnv, free_port, http_get};

/// Where KEDA's Service and cluster-wide objects live, as in KEDA's install.
pub const NAMESPACE: &str = "keda";
/// KEDA's external metrics APIService.
pub const APISERVICE: &str = "v1beta1.external.metrics.k8s.io";

/// The running KEDA operator and metrics adapter; both are killed on drop.
pub struct Keda {
    operator: ChildGuard,
    adapter: ChildGuard,
    /// Directory with the certificates and the two logs.
    pub dir: PathBuf,
}

impl Keda {
    /// Installs KEDA's CRDs and API registration into the environment and starts the
    /// operator and the adapter from `install_dir` (what `tools/install-keda.sh` printed),
    /// with certificates and logs in `dir`. Returns once the APIService is Available,
    /// failing with the end of both logs otherwise.
    pub async fn start(env: &TestEnv, install_dir: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let certs = dir.join("certs");
        make_certs(&certs)?;
        let crds = install_dir.join("src/config/crd/bases");
        kubectl(
            env,
            &["apply", "--server-side", "--force-conflicts", "-f"],
            Some(&crds.display().to_string()),
            None,
        )?;
        // Not `kubectl wait`: it fails on a CRD whose status is not written yet.
        let deadline = Instant::now() + Duration::from_secs(60);
        for crd in ["scaledobjects.keda.sh", "triggerauthentications.keda.sh"] {
            let jsonpath = "jsonpath={.status.conditions[?(@.type==\"Established\")].status}";
            while !kubectl(env, &["get", "crd", crd, "-o", jsonpath], None, None)
                .is_ok_and(|s| s == "True")
            {
                if Instant::now() > deadline {
                    bail!("CRD {crd} not Established within 60 s");
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        let adapter_port = free_port();
        let ca = std::fs::read(certs.join("ca.crt"))?;
        apply_json(env, &registration(adapter_port, &ca))?;

        let (metrics_port, probe_port, grpc_port) = (free_port(), free_port(), free_port());
        let kubeconfig = env.info.kubeconfig.display().to_string();
        let cert_dir = certs.display().to_string();
        let spawn = |name: &str, args: Vec<String>| -> anyhow::Result<ChildGuard> {
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = Command::new(install_dir.join("bin").join(name))
                .args(args)
                .env("KUBECONFIG", &kubeconfig)
                // All namespaces, as KEDA's default install watches.
                .env("WATCH_NAMESPACE", "")
                .env("POD_NAMESPACE", NAMESPACE)
                .env("KEDA_CLUSTER_OBJECT_NAMESPACE", NAMESPACE)
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            Ok(ChildGuard(child))
        };
        let operator = spawn(
            "keda-operator",
            vec![
                "--leader-elect=false".into(),
                format!("--metrics-bind-address=127.0.0.1:{metrics_port}"),
                format!("--health-probe-bind-address=127.0.0.1:{probe_port}"),
                format!("--metrics-service-bind-address=127.0.0.1:{grpc_port}"),
                "--enable-cert-rotation=false".into(),
                format!("--cert-dir={cert_dir}"),
                format!("--ca-dir={cert_dir}"),
                "--zap-log-level=info".into(),
            ],
        )?;
        let adapter = spawn(
            "keda-adapter",
            vec![
                format!("--secure-port={adapter_port}"),
                "--bind-address=127.0.0.1".into(),
                format!("--cert-dir={cert_dir}"),
                format!("--tls-cert-file={cert_dir}/tls.crt"),
                format!("--tls-private-key-file={cert_dir}/tls.key"),
                format!("--lister-kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                format!("--metrics-service-address=127.0.0.1:{grpc_port}"),
                format!("--port={}", free_port()),
                "--zap-log-level=info".into(),
            ],
        )?;
        let mut keda = Keda {
            operator,
            adapter,
            dir: dir.to_path_buf(),
        };
        keda.wait(Duration::from_secs(120), "the KEDA operator ready", || {
            http_get(probe_port, "/readyz").is_some_and(|(c, _)| c == 200)
        })?;
        keda.wait(Duration::from_secs(120), "the APIService Available", || {
            kubectl(
                env,
                &[
                    "get",
                    "apiservice",
                    APISERVICE,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
                ],
                None,
                None,
            )
            .is_ok_and(|s| s == "True")
        })?;
        Ok(keda)
    }

    /// Process ids of the operator and the adapter.
    pub fn pids(&self) -> (u32, u32) {
        (self.operator.id(), self.adapter.id())
    }

    /// Waits up to `timeout` for `ready`, failing early (with the logs) if a process died.
    fn wait(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            let exited = [
                ("keda-operator", self.operator.try_wait()?),
                ("keda-adapter", self.adapter.try_wait()?),
            ];
            if let Some((name, Some(status))) = exited.iter().find(|(_, s)| s.is_some()) {
                bail!("{name} exited ({status}):\n{}", self.log_tails());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}:\n{}", self.log_tails());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The last lines of both logs.
    pub fn log_tails(&self) -> String {
        ["keda-operator", "keda-adapter"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("----- {name}.log (last lines) -----\n{tail}\n")
            })
            .collect()
    }
}

/// A TriggerAuthentication `name` reading a Kafka user's credentials from the Secret
/// `secret` (keys `username`, `password`: the ConsumerGroup's own Secret).
pub fn trigger_authentication(namespace: &str, name: &str, secret: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"secretTargetRef": [
            {"parameter": "username", "name": secret, "key": "username"},
            {"parameter": "password", "name": secret, "key": "password"},
        ]},
    })
}

/// What a ScaledObject's Kafka trigger reads.
pub struct KafkaTrigger<'a> {
    /// `bootstrapServers`.
    pub bootstrap: &'a str,
    /// The consumer group id.
    pub group_id: &'a str,
    /// The Kafka topic.
    pub topic: &'a str,
    /// `lagThreshold`: the lag one replica is meant for.
    pub lag_threshold: i64,
    /// The TriggerAuthentication with the credentials.
    pub authentication: &'a str,
}

/// A ScaledObject `name` for the Deployment `deployment`, scaling on `trigger`, with
/// `extra` merged into its spec (pollingInterval, advanced, ...).
pub fn scaled_object(
    namespace: &str,
    name: &str,
    deployment: &str,
    (min, max): (i32, i32),
    trigger: &KafkaTrigger<'_>,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "scaleTargetRef": {"name": deployment},
        "minReplicaCount": min,
        "maxReplicaCount": max,
        "triggers": [{
            "type": "kafka",
            "metadata": {
                "bootstrapServers": trigger.bootstrap,
                "consumerGroup": trigger.group_id,
                "topic": trigger.topic,
                "lagThreshold": trigger.lag_threshold.to_string(),
                // EventOps workers start from the earliest record when the group has no
                // commit; KEDA then counts lag the same way.
                "offsetResetPolicy": "earliest",
                "sasl": "scram_sha512",
                "tls": "disable",
            },
            "authenticationRef": {"name": trigger.authentication},
        }],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// Runs kubectl against the environment (`file` as `-f`'s argument, or `stdin` piped
/// as `-f -`), returning its standard output; fails with its standard error.
pub fn kubectl(
    env: &TestEnv,
    args: &[&str],
    file: Option<&str>,
    stdin: Option<&[u8]>,
) -> anyhow::Result<String> {
    use std::io::Write;
    let mut cmd = Command::new(&env.info.kubectl);
    cmd.arg("--kubeconfig")
        .arg(&env.info.kubeconfig)
        .arg("--request-timeout=60s")
        .args(args);
    if let Some(file) = file {
        cmd.arg(file);
    }
    if stdin.is_some() {
        cmd.args(["-f", "-"]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    let mut input = child.stdin.take().expect("piped");
    if let Some(data) = stdin {
        input.write_all(data)?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `kubectl apply --server-side` of a JSON object or a `List` of them.
pub fn apply_json(env: &TestEnv, object: &serde_json::Value) -> anyhow::Result<()> {
    kubectl(
        env,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=bench-keda",
        ],
        None,
        Some(&serde_json::to_vec(object)?),
    )
    .map(drop)
}

/// Namespace `keda`, the ExternalName Service and APIService routing
/// `external.metrics.k8s.io` to the adapter on 127.0.0.1:`port` (its serving certificate
/// signed by `ca`), and the HPA controller's permission to read external metrics.
fn registration(port: u16, ca: &[u8]) -> serde_json::Value {
    // A ByteString serializes as standard base64, as the API server reads `caBundle`.
    let b64 = serde_json::json!(k8s_openapi::ByteString(ca.to_vec()));
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "keda-metrics-apiserver", "namespace": NAMESPACE},
         "spec": {"type": "ExternalName", "externalName": "localhost",
                  "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": APISERVICE},
         "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1",
                  "service": {"namespace": NAMESPACE, "name": "keda-metrics-apiserver", "port": port},
                  "caBundle": b64, "groupPriorityMinimum": 100, "versionPriority": 100}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "keda-external-metrics-reader"},
         "rules": [{"apiGroups": ["external.metrics.k8s.io"], "resources": ["*"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "keda-hpa-controller-external-metrics"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "keda-external-metrics-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler",
                       "namespace": "kube-system"}]},
    ]})
}

/// A CA and one certificate (server and client use) for every name KEDA's endpoints are
/// reached by here, as `ca.crt`, `tls.crt`, `tls.key` in `dir` (the file names KEDA's
/// gRPC metrics service reads from `--cert-dir`).
fn make_certs(dir: &Path) -> anyhow::Result<()> {
    use eventops_devenv::launch::{new_ca, sign};
    std::fs::create_dir_all(dir)?;
    let f = |n: &str| dir.join(n);
    new_ca(&f("ca.key"), &f("ca.crt"), "eventops-bench-keda-ca")?;
    sign(
        (&f("ca.crt"), &f("ca.key")),
        "keda",
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,\
         DNS:keda-metrics-apiserver.keda.svc,DNS:keda-metrics-apiserver.keda.svc.cluster.local,\
         DNS:keda-operator.keda.svc,DNS:keda-operator.keda.svc.cluster.local\n",
        (&f("tls.key"), &f("tls.crt")),
    )
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

#[cfg(test)]
mod tests {
    /// `caBundle` is standard base64 with padding, which k8s-openapi's ByteString writes.
    #[test]
    fn a_byte_string_is_padded_base64() {
        let b64 = |b: &[u8]| serde_json::json!(k8s_openapi::ByteString(b.to_vec()));
        assert_eq!(
            (b64(b"f"), b64(b"foobar")),
            ("Zg==".into(), "Zm9vYmFy".into())
        );
    }

    /// The certificate KEDA's endpoints serve verifies against its CA for the names they
    /// are reached by (openssl, not this code, is the judge).
    #[test]
    fn keda_certificates_verify_for_localhost() {
        let dir = std::env::temp_dir().join(format!("keda-certs-{}", std::process::id()));
        super::make_certs(&dir).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["verify", "-verify_hostname", "localhost", "-CAfile"])
            .arg(dir.join("ca.crt"))
            .arg(dir.join("tls.crt"))
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
