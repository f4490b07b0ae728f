//! Helpers for testing the Helm chart (`charts/eventops`) with the environment's helm and
//! kubectl, and for running the operator exactly as the chart's Deployment configures it,
//! authenticated as the chart's ServiceAccount (so the chart's RBAC is what it gets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::config::Kubeconfig;

use crate::TestEnv;

/// The chart's directory in this workspace.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/eventops")
}

/// The output of a finished command, with what it printed.
#[derive(Debug)]
pub struct Ran {
    /// Whether it exited with 0.
    pub ok: bool,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }
}

impl Ran {
    /// Panics with the output unless the command succeeded; returns stdout.
    pub fn expect_ok(self, what: &str) -> String {
        assert!(self.ok, "{what} failed:\n{}\n{}", self.stdout, self.stderr);
        self.stdout
    }
}

impl TestEnv {
    /// Runs the environment's `helm` with the administrator's kubeconfig.
    pub fn helm(&self, args: &[&str]) -> Ran {
        self.tool(&self.info.helm, args, None)
    }

    /// Runs the environment's `kubectl` with the administrator's kubeconfig, `stdin` fed
    /// to it when given.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Ran {
        self.tool(&self.info.kubectl, args, stdin)
    }

    fn tool(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Ran {
        use std::io::Write;
        let mut child = Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.info.kubeconfig)
            // Helm keeps its caches and repository lists out of the user's home.
            .env("HELM_CACHE_HOME", self.info.state_dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.info.state_dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.info.state_dir.join("helm/data"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).expect("writing stdin");
        }
        drop(pipe);
        child.wait_with_output().expect("waiting for a tool").into()
    }

    /// A kubeconfig for this cluster that authenticates as ServiceAccount `sa` of
    /// `namespace` with a fresh token (TokenRequest), written into the state directory.
    pub fn service_account_kubeconfig(&self, namespace: &str, sa: &str) -> PathBuf {
        let token = self
            .kubectl(
                &["create", "token", sa, "-n", namespace, "--duration=2h"],
                None,
            )
            .expect_ok("kubectl create token");
        let admin = Kubeconfig::read_from(&self.info.kubeconfig).expect("reading the kubeconfig");
        let cluster = admin.clusters[0].cluster.clone().expect("a cluster entry");
        let mut server = serde_json::json!({"server": cluster.server});
        if let Some(ca) = &cluster.certificate_authority {
            server["certificate-authority"] = ca.clone().into();
        }
        if let Some(ca) = &cluster.certificate_authority_data {
            server["certificate-authority-data"] = ca.clone().into();
        }
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "env", "cluster": server}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": "sa", "context": {"cluster": "env", "user": sa, "namespace": namespace}}],
            "current-context": "sa",
        });
        let path = self
            .info
            .state_dir
            .join(format!("kubeconfig-{namespace}-{sa}"));
        std::fs::write(&path, serde_json::to_string(&config).unwrap()).expect("writing");
        path
    }

    /// Starts the operator binary the way the chart's Deployment `name` in `namespace`
    /// runs it: the container's arguments, and its environment with Secret and field
    /// references resolved; authenticated as the pod's ServiceAccount. The metrics
    /// address is moved to 127.0.0.1:`metrics_port`. Output goes to `log`.
    pub async fn run_chart_deployment(
        &self,
        namespace: &str,
        name: &str,
        metrics_port: u16,
        log: &Path,
    ) -> ChartOperator {
        let deployment = Api::<Deployment>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .expect("reading the chart's Deployment");
        let pod = deployment.spec.template.spec.expect("a pod template");
        let sa = pod.service_account_name.clone().expect("a ServiceAccount");
        let container = &pod.containers[0];
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let mut env = BTreeMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    if let Some(key_ref) = &from.secret_key_ref {
                        let secret = secrets.get(&key_ref.name).await.unwrap_or_else(|e| {
                            panic!("Secret {} of {}: {e}", key_ref.name, var.name)
                        });
                        let bytes = secret.data.unwrap_or_default()[&key_ref.key].0.clone();
                        String::from_utf8(bytes).unwrap()
                    } else if let Some(field) = &from.field_ref {
                        match field.field_path.as_str() {
                            "metadata.namespace" => namespace.to_string(),
                            "metadata.name" => format!("{name}-local"),
                            "status.podIP" => "127.0.0.1".to_string(),
                            other => panic!("field reference {other} is not resolved here"),
                        }
                    } else {
                        panic!("env {} has a source this test does not resolve", var.name)
                    }
                }
                (None, None) => String::new(),
            };
            env.insert(var.name.clone(), value);
        }
        env.insert(
            "EVENTOPS_METRICS_ADDR".into(),
            format!("127.0.0.1:{metrics_port}"),
        );
        let kubeconfig = self.service_account_kubeconfig(namespace, &sa);
        let out = std::fs::File::create(log).expect("creating the operator's log");
        let child = Command::new(crate::workspace_binary("eventops-operator"))
            .args(container.args.iter().flatten())
            .env_clear()
            .envs(&env)
            .env("KUBECONFIG", kubeconfig)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting the operator");
        ChartOperator {
            child,
            metrics_port,
            log: log.to_path_buf(),
            env,
        }
    }
}

/// The operator process started by [`TestEnv::run_chart_deployment`]; killed on drop.
pub struct ChartOperator {
    child: std::process::Child,
    /// Port of its `/metrics`.
    pub metrics_port: u16,
    /// Its output.
    pub log: PathBuf,
    /// The environment it was given (Secrets resolved).
    pub env: BTreeMap<String, String>,
}

impl ChartOperator {
    /// Sum of the counter samples of metric `name` (every label set), `None` while the
    /// endpoint does not answer.
    pub fn metric_sum(&self, name: &str) -> Option<f64> {
        let (_, body) = crate::http_get(self.metrics_port, "/metrics")?;
        Some(
            body.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// What it has printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
