//! Helpers for integration tests against the real environment that `tools/test` starts
//! (see `eventops-devenv`): a Kubernetes API server and a Kafka broker with SASL and ACLs.
//!
//! Tests isolate themselves by namespace and by Kafka topic names made with [`unique`].

pub mod autoscale;
pub mod bench;
pub mod chart;
pub mod e2e;
pub mod keda;
pub mod operator_user;
pub mod pg;
pub mod pods;
pub mod runtime;
pub mod spring;
pub mod watchdog;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use eventops_devenv::EnvInfo;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::{OnceCell, oneshot};

/// The running environment and a Kubernetes client for it.
pub struct TestEnv {
    /// Endpoints and credentials.
    pub info: EnvInfo,
    /// An administrator's client.
    pub client: Client,
    deadline: watchdog::Deadline,
}

/// The environment named by `$EVENTOPS_ENV`, with the CRDs installed. Panics with how
/// to start one when it is not there: these tests never skip.
///
/// The calling test gets a time limit ([`watchdog::DEFAULT_LIMIT`]) until the returned
/// value is dropped: a test still running after it fails the test binary (see
/// [`watchdog`]).
pub async fn env() -> TestEnv {
    let deadline = watchdog::Deadline::start(watchdog::DEFAULT_LIMIT);
    let info = EnvInfo::from_env().unwrap_or_else(|e| panic!("{e:#}"));
    let kubeconfig = Kubeconfig::read_from(&info.kubeconfig).expect("reading the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("loading the kubeconfig");
    let client = Client::try_from(config).expect("building a Kubernetes client");
    static CRDS: OnceCell<()> = OnceCell::const_new();
    CRDS.get_or_init(|| install_crds(client.clone())).await;
    TestEnv {
        info,
        client,
        deadline,
    }
}

/// Applies the CRDs from the code and waits until the API server serves them.
async fn install_crds(client: Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply("eventops-tests").force();
    for crd in eventops_crds::crds() {
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        eventually(Duration::from_secs(30), "CRD established", || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await.ok()?;
                let conditions = crd.status?.conditions?;
                conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
}

/// Whether `user`/`password` can authenticate at `info`'s Kafka bootstrap servers:
/// fetching metadata needs a completed SASL handshake but no ACLs. On failure, the
/// errors librdkafka reported meanwhile.
pub async fn authenticates(
    info: &EnvInfo,
    user: &str,
    password: &str,
) -> Result<(), Vec<rdkafka::error::RDKafkaErrorCode>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::RDKafkaErrorCode;
    let mut config = info.kafka_admin_config();
    config
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg);
    let consumer: BaseConsumer = config.create().expect("a consumer");
    tokio::task::spawn_blocking(move || {
        if consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .is_ok()
        {
            return Ok(());
        }
        // The metadata call only says the transport failed; why is reported as error
        // events, which a consumer's poll returns.
        let mut errors = Vec::new();
        while let Some(r) = consumer.poll(Duration::from_millis(500)) {
            if let Err(e) = r {
                errors.push(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail));
            }
        }
        Err(errors)
    })
    .await
    .expect("the metadata call")
}

/// A name no other test or run uses: `<prefix>-<pid>-<n>`, valid for Kubernetes objects
/// and Kafka topics alike.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestEnv {
    /// Sets the calling test's time limit to `limit` from now (the default is
    /// [`watchdog::DEFAULT_LIMIT`]).
    pub fn time_limit(&self, limit: Duration) {
        self.deadline.extend(limit);
    }

    /// Creates a fresh namespace.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"eventops.dev/test": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating a test namespace");
        name
    }

    /// Starts the operator in this process, watching only `namespace`, with a short
    /// resync interval, as a tenant installs it: its own Kafka user holding exactly the
    /// documented ACLs ([`operator_user::OPERATOR_ACLS`]), never the super user. It
    /// stops when the handle is dropped.
    pub fn start_operator(&self, namespace: &str) -> OperatorHandle {
        self.start_operator_with_kafka(namespace, &self.info.kafka_bootstrap)
    }

    /// [`TestEnv::start_operator`] with a resync interval of an hour: within a test, every
    /// reconcile then comes from a watch event, none from a timer.
    pub fn start_operator_without_resync(&self, namespace: &str) -> OperatorHandle {
        let user = self.shared_operator_user();
        let bootstrap = &self.info.kafka_bootstrap;
        let hour = Duration::from_secs(3600);
        self.start_operator_resyncing(Some(namespace), bootstrap, Some(&user), hour)
    }

    /// [`TestEnv::start_operator`] with a resync interval of `resync` and at most
    /// `at_once` reconciles of each controller at a time.
    pub fn start_operator_tuned(
        &self,
        namespace: &str,
        resync: Duration,
        at_once: u16,
    ) -> OperatorHandle {
        let user = self.shared_operator_user();
        let bootstrap = &self.info.kafka_bootstrap;
        self.start_operator_adjusted(Some(namespace), bootstrap, Some(&user), |c| {
            c.resync_interval = resync.into();
            c.max_concurrent_reconciles = at_once;
        })
    }

    /// [`TestEnv::start_operator`] with another Kafka bootstrap address (for example one
    /// where nothing listens, to see how Kafka being unreachable is handled).
    pub fn start_operator_with_kafka(&self, namespace: &str, bootstrap: &str) -> OperatorHandle {
        let user = self.shared_operator_user();
        self.start_operator_config(Some(namespace), bootstrap, Some(&user))
    }

    /// The operator user this test binary's operators share, made (with
    /// [`operator_user::OPERATOR_ACLS`]) on first use.
    fn shared_operator_user(&self) -> operator_user::OperatorUser {
        static USER: OnceCell<operator_user::OperatorUser> = OnceCell::const_new();
        let make = async {
            let user = self.create_operator_user().await;
            self.grant_operator_acls(&user).await;
            user
        };
        // Called from synchronous code inside the tests' multi-threaded runtime.
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(USER.get_or_init(|| make))
        })
        .clone()
    }

    /// Starts the operator in this process against `bootstrap` as `user` (the super user
    /// when `None`), watching `namespace` (all when `None`), with a 2 s resync. Its
    /// failure fails the calling test.
    pub(crate) fn start_operator_config(
        &self,
        namespace: Option<&str>,
        bootstrap: &str,
        user: Option<&operator_user::OperatorUser>,
    ) -> OperatorHandle {
        let resync = Duration::from_secs(2);
        self.start_operator_resyncing(namespace, bootstrap, user, resync)
    }

    /// [`TestEnv::start_operator_config`] with `resync` as the resync interval.
    fn start_operator_resyncing(
        &self,
        namespace: Option<&str>,
        bootstrap: &str,
        user: Option<&operator_user::OperatorUser>,
        resync: Duration,
    ) -> OperatorHandle {
        self.start_operator_adjusted(namespace, bootstrap, user, |c| {
            c.resync_interval = resync.into();
        })
    }

    /// Starts the operator in this process against `bootstrap` as `user` (the super user
    /// when `None`), watching `namespace` (all when `None`), its configuration changed by
    /// `adjust` (which sets the resync interval: `RunConfig`'s default is a minute).
    fn start_operator_adjusted(
        &self,
        namespace: Option<&str>,
        bootstrap: &str,
        user: Option<&operator_user::OperatorUser>,
        adjust: impl FnOnce(&mut eventops_operator::config::RunConfig),
    ) -> OperatorHandle {
        let mut config = eventops_operator::config::RunConfig::new(bootstrap);
        let (name, password) = match user {
            Some(u) => (u.user.clone(), u.password.clone()),
            None => (
                self.info.kafka_admin_user.clone(),
                self.info.kafka_admin_password.clone(),
            ),
        };
        config.kafka_username = Some(name);
        config.kafka_password = Some(password);
        config.kafka_sasl_mechanism = self.info.kafka_sasl_mechanism.clone();
        config.namespace = namespace.map(String::from);
        adjust(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let client = self.client.clone();
        let metrics = std::sync::Arc::new(eventops_operator::telemetry::Metrics::default());
        let handle_metrics = metrics.clone();
        let test = watchdog::current_test();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = eventops_operator::run(client, &config, metrics, shutdown).await {
                // Not a panic lost in a detached task: the test's next `eventually`, or
                // dropping the handle, fails with it.
                watchdog::record_failure(&test, format!("the in-process operator failed: {e:#}"));
            }
        });
        OperatorHandle {
            metrics: handle_metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The operator binary, configured for this environment, watching `namespace` and
    /// serving metrics on 127.0.0.1:`metrics_port`. Add flags and spawn it.
    pub fn operator_command(&self, namespace: &str, metrics_port: u16) -> std::process::Command {
        self.operator_command_with(
            &workspace_binary("eventops-operator"),
            namespace,
            metrics_port,
        )
    }

    /// [`Self::operator_command`], running the operator binary at `binary`.
    pub fn operator_command_with(
        &self,
        binary: &std::path::Path,
        namespace: &str,
        metrics_port: u16,
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(binary);
        cmd.args(["run", "--namespace", namespace])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("KUBECONFIG", &self.info.kubeconfig)
            .env("EVENTOPS_KAFKA_BOOTSTRAP", &self.info.kafka_bootstrap)
            .env("EVENTOPS_KAFKA_USERNAME", &self.info.kafka_admin_user)
            .env("EVENTOPS_KAFKA_PASSWORD", &self.info.kafka_admin_password)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    }

    /// Runs one of Kafka's own command-line tools as the super user (an oracle that
    /// shares no code with EventOps).
    pub async fn kafka_tool(&self, main_class: &str, args: &[&str]) -> anyhow::Result<String> {
        let info = self.info.clone();
        let main_class = main_class.to_string();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            info.kafka_tool(&main_class, &args)
        })
        .await?
    }

    /// Whether `user`/`password` can authenticate; see [`authenticates`].
    pub async fn authenticates(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(), Vec<rdkafka::error::RDKafkaErrorCode>> {
        authenticates(&self.info, user, password).await
    }

    /// `TopicCommand --describe` of one topic, parsed into its summary line's fields
    /// (`PartitionCount`, `ReplicationFactor`, `Configs`).
    pub async fn describe_topic(&self, topic: &str) -> anyhow::Result<TopicSummary> {
        let out = self
            .kafka_tool(
                "org.apache.kafka.tools.TopicCommand",
                &["--describe", "--topic", topic],
            )
            .await?;
        TopicSummary::parse(&out).ok_or_else(|| anyhow::anyhow!("unexpected output: {out}"))
    }

    /// Sets `configs` (`key=value,key=value`) on `topic` as an administrator would,
    /// with Kafka's ConfigCommand as the super user.
    pub async fn add_topic_configs(&self, topic: &str, configs: &str) {
        let args = [
            "--alter",
            "--entity-type",
            "topics",
            "--entity-name",
            topic,
            "--add-config",
            configs,
        ];
        self.kafka_tool("kafka.admin.ConfigCommand", &args)
            .await
            .unwrap_or_else(|e| panic!("ConfigCommand --add-config {configs} on {topic}: {e:#}"));
    }

    /// The topic's dynamic (topic-level) configs, `key=value`, sorted, as Kafka's
    /// `ConfigCommand --describe` lists them.
    pub async fn topic_configs(&self, topic: &str) -> Vec<String> {
        let out = self
            .kafka_tool(
                "kafka.admin.ConfigCommand",
                &[
                    "--describe",
                    "--entity-type",
                    "topics",
                    "--entity-name",
                    topic,
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("ConfigCommand --describe {topic}: {e:#}"));
        // "Dynamic configs for topic t are:" then one "  key=value sensitive=...
        // synonyms=..." line per config.
        let mut configs: Vec<String> = out
            .lines()
            .filter(|l| l.starts_with("  "))
            .filter_map(|l| l.trim().split(" sensitive=").next())
            .map(String::from)
            .collect();
        configs.sort();
        configs
    }

    /// The ACLs of Kafka user `user`, as Kafka's `AclCommand --list` prints them.
    pub async fn acls_of(&self, user: &str) -> String {
        let principal = format!("User:{user}");
        let args = ["--list", "--principal", principal.as_str()];
        self.kafka_tool("org.apache.kafka.tools.AclCommand", &args)
            .await
            .unwrap_or_else(|e| panic!("AclCommand {args:?}: {e:#}"))
    }

    /// The Kafka user of ConsumerGroup `group` in `ns`, from its Secret once it exists.
    pub async fn group_user(&self, ns: &str, group: &str) -> String {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), ns);
        eventually(Duration::from_secs(60), "the group's Secret", || async {
            let data = secrets.get(&format!("{group}-kafka")).await.ok()?.data?;
            String::from_utf8(data.get("username")?.0.clone()).ok()
        })
        .await
    }

    /// Whether Kafka has `topic`, asked with `TopicCommand --list`.
    pub async fn topic_exists(&self, topic: &str) -> bool {
        let listed = self
            .kafka_tool("org.apache.kafka.tools.TopicCommand", &["--list"])
            .await
            .expect("listing topics");
        listed.lines().any(|l| l == topic)
    }

    /// Reasons of the Events about the object `name` in `namespace`.
    pub async fn event_reasons(&self, namespace: &str, name: &str) -> Vec<String> {
        self.events(namespace, name)
            .await
            .into_iter()
            .map(|(reason, _)| reason)
            .collect()
    }

    /// The Events about the object `name` in `namespace`: reason and note of each, as
    /// the API server stores them.
    pub async fn events(&self, namespace: &str, name: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), namespace);
        let events = api.list(&Default::default()).await.expect("listing Events");
        events
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| Some((e.reason?, e.note.unwrap_or_default())))
            .collect()
    }
}

/// The summary line of `TopicCommand --describe`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSummary {
    /// Partitions.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i32,
    /// Configs Kafka reports as set on the topic, `key=value` each.
    pub configs: Vec<String>,
}

impl TopicSummary {
    fn parse(out: &str) -> Option<Self> {
        let line = out.lines().find(|l| l.starts_with("Topic:"))?;
        let field = |name: &str| {
            line.split('\t')
                .find_map(|f| f.trim().strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        Some(Self {
            partitions: field("PartitionCount")?.parse().ok()?,
            replication_factor: field("ReplicationFactor")?.parse().ok()?,
            configs: field("Configs")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        })
    }
}

/// A spawned process that is killed (and reaped) when the guard is dropped, also when
/// its test panics, so no worker outlives its test.
pub struct ChildGuard(pub std::process::Child);

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the in-process operator when dropped.
pub struct OperatorHandle {
    /// The operator's metrics, writes counted among them.
    pub metrics: std::sync::Arc<eventops_operator::telemetry::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl OperatorHandle {
    /// Stops the operator and waits until it has stopped, so that nothing it does can
    /// be mistaken for the work of an operator started after it.
    pub async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the operator stops within 30 s")
                .expect("the operator task");
        }
    }
}

impl Drop for OperatorHandle {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            watchdog::check_background();
        }
    }
}

/// Server-side applies an object of kind `K` named `name` with `spec`, as `kubectl apply
/// --server-side` would.
pub async fn apply<K>(api: &Api<K>, name: &str, spec: serde_json::Value) -> kube::Result<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let obj = serde_json::json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "metadata": {"name": name}, "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
}

/// A plain-HTTP GET on 127.0.0.1:`port`: the status code and body, `None` when nothing
/// answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .port()
}

/// The path of a binary of this workspace, built next to the test executables
/// (`tools/test` builds every target first).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is not built; run `cargo build --workspace` (tools/test does)")
        })
}

/// EventOps resources, whose status carries conditions.
pub trait HasConditions {
    /// The status conditions, empty before the first status write.
    fn conditions(&self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>;
}

impl HasConditions for eventops_crds::EventTopic {
    fn conditions(&self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default()
    }
}

impl HasConditions for eventops_crds::ConsumerGroup {
    fn conditions(&self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default()
    }
}

impl HasConditions for eventops_crds::Redrive {
    fn conditions(&self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default()
    }
}

/// Waits up to a minute until object `name`'s `Ready` condition has `status` ("True" or
/// "False"); returns its reason and message.
pub async fn wait_ready<K>(api: &Api<K>, name: &str, status: &str) -> (String, String)
where
    K: HasConditions + kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let timeout = Duration::from_secs(60);
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no Ready condition");
    loop {
        watchdog::check_background();
        let ready = match api.get(name).await {
            Ok(object) => object.conditions().into_iter().find(|c| c.type_ == "Ready"),
            Err(e) => {
                last = format!("GET failed: {e}");
                None
            }
        };
        if let Some(c) = ready {
            if c.status == status {
                return (c.reason, c.message);
            }
            last = format!("Ready={} {}: {}", c.status, c.reason, c.message);
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {name} Ready={status}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `check` until it returns `Some`, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        watchdog::check_background();
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_topic_command_describe() {
        let out = "Topic: t\tTopicId: abc\tPartitionCount: 3\tReplicationFactor: 1\tConfigs: min.insync.replicas=1,retention.ms=1000\n\tTopic: t\tPartition: 0\tLeader: 1\n";
        let s = TopicSummary::parse(out).unwrap();
        assert_eq!(s.partitions, 3);
        assert_eq!(s.replication_factor, 1);
        assert_eq!(s.configs, ["min.insync.replicas=1", "retention.ms=1000"]);
        assert_eq!(TopicSummary::parse("Error: no such topic"), None);
    }
}
