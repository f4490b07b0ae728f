//! Development and test tooling, not part of what EventOps ships.
//!
//! Starts the real components EventOps runs against (etcd, kube-apiserver,
//! kube-controller-manager, an Apache Kafka broker in KRaft mode with SASL/SCRAM and the
//! StandardAuthorizer, PostgreSQL) as plain local processes on free ports of 127.0.0.1,
//! plus the EventOps node agent, a stand-in for a kubelet that runs pods as local processes,
//! and describes the running environment in an [`EnvInfo`] file that tests, the sandbox
//! and humans read.

pub mod launch;
mod proc;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Environment variable that points tests at a running environment's `env.json`.
pub const ENV_FILE_VAR: &str = "EVENTOPS_ENV";

/// Everything a client needs to use a running environment. Written to `env.json`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EnvInfo {
    /// Directory holding the environment's data, logs and credentials.
    pub state_dir: PathBuf,
    /// Kubeconfig of a cluster administrator (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>` of kube-apiserver.
    pub kube_api_url: String,
    /// Kafka `bootstrap.servers` of the SASL listener.
    pub kafka_bootstrap: String,
    /// SASL mechanism of the Kafka listener.
    pub kafka_sasl_mechanism: String,
    /// Kafka super user.
    pub kafka_admin_user: String,
    /// Password of the Kafka super user.
    pub kafka_admin_password: String,
    /// Client properties for Kafka's own command-line tools, as the super user.
    pub kafka_admin_properties: PathBuf,
    /// Kafka's jars (broker, tools), for running its command-line tools.
    pub kafka_lib: PathBuf,
    /// `postgres://` URL of the PostgreSQL superuser.
    pub postgres_url: String,
    /// The kubectl built with the environment.
    pub kubectl: PathBuf,
    /// The helm binary built with the environment.
    pub helm: PathBuf,
    /// The Node the EventOps node agent registers and runs pods on (as local processes;
    /// development and test tooling, see `tools/node-agent`).
    #[serde(default)]
    pub node_name: String,
    /// How many Kafka brokers run (each also a KRaft controller). Their processes are
    /// named `kafka` (one) or `kafka-1` … `kafka-N` after their `node.id`.
    #[serde(default = "one")]
    pub kafka_brokers: usize,
}

fn one() -> usize {
    1
}

/// Folder of the state directory where fault requests are left for the running
/// environment (see [`EnvInfo::fault`]).
pub const FAULTS_DIR: &str = "faults";

/// What [`EnvInfo::fault`] does to a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A clean stop (the component's own stop signal, SIGKILL after 20 s).
    Stop,
    /// SIGKILL: a crash.
    Kill,
    /// Start it again with the same command line, data and ports.
    Start,
}

impl Fault {
    /// `stop`, `kill` or `start`.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "stop" => Some(Self::Stop),
            "kill" => Some(Self::Kill),
            "start" => Some(Self::Start),
            _ => None,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Kill => "kill",
            Self::Start => "start",
        }
    }
}

impl EnvInfo {
    /// Reads the environment described by the file `$EVENTOPS_ENV` names.
    ///
    /// Fails, rather than skipping, when it is not set: integration tests need the real
    /// components.
    pub fn from_env() -> anyhow::Result<Self> {
        let Some(path) = std::env::var_os(ENV_FILE_VAR) else {
            bail!(
                "{ENV_FILE_VAR} is not set: integration tests run against a real Kafka and \
                 Kubernetes API server. Run them with `tools/test`, or start an environment with \
                 `cargo run -p eventops-devenv -- up --state-dir DIR` and set \
                 {ENV_FILE_VAR}=DIR/env.json"
            );
        };
        Self::load(Path::new(&path))
    }

    /// Reads an `env.json`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// rdkafka client settings for the super user.
    pub fn kafka_admin_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", &self.kafka_bootstrap)
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", &self.kafka_sasl_mechanism)
            .set("sasl.username", &self.kafka_admin_user)
            .set("sasl.password", &self.kafka_admin_password);
        config
    }

    /// Runs one of Kafka's own command-line tools (`main_class`, e.g.
    /// `org.apache.kafka.tools.TopicCommand`) against the broker as the super user and
    /// returns its standard output. An independent oracle for tests.
    pub fn kafka_tool(&self, main_class: &str, args: &[&str]) -> anyhow::Result<String> {
        let log_config = self.state_dir.join("kafka/tools-log4j2.properties");
        let output = Command::new("java")
            .arg("-Xmx256m")
            .arg("-XX:TieredStopAtLevel=1")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                log_config.display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.kafka_lib.display()))
            .arg(main_class)
            .arg("--bootstrap-server")
            .arg(&self.kafka_bootstrap)
            .arg("--command-config")
            .arg(&self.kafka_admin_properties)
            .args(args)
            .output()
            .with_context(|| format!("running {main_class}"))?;
        if !output.status.success() {
            bail!(
                "{main_class} {args:?} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Asks the running environment to stop, kill or start one of its components
    /// (`etcd`, `kube-apiserver`, `kube-controller-manager`, `node-agent`, `postgres`,
    /// `kafka` or `kafka-N`) and waits until it has. A deliberately stopped component does
    /// not end the environment; starting it again does not wait for it to be ready.
    pub fn fault(&self, component: &str, fault: Fault) -> anyhow::Result<()> {
        let dir = self.state_dir.join(FAULTS_DIR);
        std::fs::create_dir_all(&dir)?;
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        );
        let done = dir.join(format!("{component}.done"));
        let _ = std::fs::remove_file(&done);
        let tmp = dir.join(format!("{component}.tmp"));
        std::fs::write(&tmp, format!("{} {nonce}", fault.word()))?;
        std::fs::rename(&tmp, dir.join(component))?;
        // A stop waits up to 20 s for a clean exit before it kills.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Ok(answer) = std::fs::read_to_string(&done)
                && let Some(outcome) = answer.strip_prefix(&format!("{nonce} "))
            {
                if outcome == "ok" {
                    return Ok(());
                }
                bail!("{} {component}: {outcome}", fault.word());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the environment in {} did not carry out '{} {component}' within 60 s: is \
                     it running?",
                    self.state_dir.display(),
                    fault.word()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Runs the environment's kubectl with its admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")
    }
}
