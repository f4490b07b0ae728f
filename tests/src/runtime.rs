//! Helpers for the consumer-runtime tests: worker configuration for the test broker,
//! topics, producing envelopes, reading topics back, the committed offsets as Kafka's own
//! `ConsumerGroupCommand` reports them, and PostgreSQL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use eventops_consumer_runtime::contract::{self, TopicRoute, WorkerConfig};
use eventops_consumer_runtime::{CORRELATION_HEADER, Envelope};
use eventops_devenv::EnvInfo;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::TestEnv;

/// The contract variables a worker of `group` reading `routes` gets, with the test
/// broker's super-user credentials (as `(name, value)` pairs, to pass to a process too).
pub fn contract_vars(info: &EnvInfo, group: &str, routes: &[TopicRoute]) -> Vec<(String, String)> {
    [
        (contract::KAFKA_BOOTSTRAP, info.kafka_bootstrap.clone()),
        (contract::KAFKA_SECURITY_PROTOCOL, "SASL_PLAINTEXT".into()),
        (
            contract::KAFKA_SASL_MECHANISM,
            info.kafka_sasl_mechanism.clone(),
        ),
        (contract::KAFKA_USERNAME, info.kafka_admin_user.clone()),
        (contract::KAFKA_PASSWORD, info.kafka_admin_password.clone()),
        (contract::GROUP_ID, group.to_string()),
        (contract::TOPICS, serde_json::to_string(routes).unwrap()),
        (contract::MAX_ATTEMPTS, "4".into()),
        (contract::BACKOFF_INITIAL_MS, "50".into()),
        (contract::BACKOFF_MAX_MS, "500".into()),
        (contract::DATABASE_URL, info.postgres_url.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A [`WorkerConfig`] read through the contract from [`contract_vars`].
pub fn worker_config(info: &EnvInfo, group: &str, routes: &[TopicRoute]) -> WorkerConfig {
    let vars: BTreeMap<String, String> = contract_vars(info, group, routes).into_iter().collect();
    WorkerConfig::from_lookup(|k| vars.get(k).cloned()).expect("test contract is valid")
}

/// A route for `topic` with dead-letter topic `<topic>.DLT`.
pub fn route(topic: &str) -> TopicRoute {
    TopicRoute {
        topic: topic.to_string(),
        dead_letter_topic: Some(format!("{topic}.DLT")),
        retry_topics: Vec::new(),
    }
}

/// Creates `topics` with their partition counts (replication 1).
pub async fn create_topics(info: &EnvInfo, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> =
        info.kafka_admin_config().create().expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("CreateTopics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// A producer with the super user's credentials.
pub fn producer(info: &EnvInfo) -> FutureProducer {
    info.kafka_admin_config()
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// An envelope's bytes: event `id` of type `Test`, schema `version`, `data`.
pub fn event(id: &str, version: u32, data: serde_json::Value) -> Vec<u8> {
    let mut e = Envelope::new("Test", version, data).with_correlation_id(format!("corr-{id}"));
    e.id = id.to_string();
    e.to_bytes()
}

/// Produces `payload` with `key` to `partition` of `topic`, with a correlation header
/// `corr-<key>`; returns the offset.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
) -> i64 {
    let correlation = format!("corr-{key}");
    let headers = OwnedHeaders::new().insert(Header {
        key: CORRELATION_HEADER,
        value: Some(correlation.as_str()),
    });
    let delivery = producer
        .send(
            FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    delivery.offset
}

/// Reads `topic` from the beginning (no consumer group) until `count` records arrived;
/// panics after `timeout`.
pub async fn read_topic(
    info: &EnvInfo,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let info = info.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = info
            .kafka_admin_config()
            .set("group.id", "unused-by-assign")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(&topic, p.id(), rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count {
            assert!(
                Instant::now() < deadline,
                "{topic}: {} of {count} records after {timeout:?}",
                out.len()
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out
    })
    .await
    .unwrap()
}

/// The last value of header `name` of `m`.
pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

/// Committed offsets of `group` per `(topic, partition)`, as Kafka's
/// `ConsumerGroupCommand --describe` prints them (partitions without a commit are left
/// out).
pub async fn committed_offsets(env: &TestEnv, group: &str) -> BTreeMap<(String, i32), i64> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group],
        )
        .await
        .expect("ConsumerGroupCommand --describe");
    let mut offsets = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 4
            && cols[0] == group
            && let (Ok(p), Ok(o)) = (cols[2].parse::<i32>(), cols[3].parse::<i64>())
        {
            offsets.insert((cols[1].to_string(), p), o);
        }
    }
    offsets
}

/// The state (`Stable`, `Empty`, ...) and member count of `group`, from
/// `ConsumerGroupCommand --describe --state`.
pub async fn group_state(env: &TestEnv, group: &str) -> (String, usize) {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group, "--state"],
        )
        .await
        .expect("ConsumerGroupCommand --describe --state");
    out.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&group) && cols.len() >= 3).then(|| {
                let n = cols[cols.len() - 1].parse().expect("#MEMBERS is a number");
                (cols[cols.len() - 2].to_string(), n)
            })
        })
        .next()
        .unwrap_or_else(|| panic!("no state line for {group} in:\n{out}"))
}

/// A PostgreSQL client on the test database.
pub async fn postgres(info: &EnvInfo) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&info.postgres_url, tokio_postgres::NoTls)
        .await
        .expect("connecting to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Creates the effects table the test worker writes: one row per handler run.
pub async fn create_effects_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (event_id text NOT NULL, topic text NOT NULL, \
             partition int NOT NULL, \"offset\" bigint NOT NULL)"
        ))
        .await
        .expect("creating the effects table");
}

/// Handler runs per `(partition, offset)` recorded in `table`.
pub async fn effects(client: &tokio_postgres::Client, table: &str) -> BTreeMap<(i32, i64), i64> {
    client
        .query(
            &format!("SELECT partition, \"offset\", count(*) FROM {table} GROUP BY 1, 2"),
            &[],
        )
        .await
        .expect("reading effects")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// `(committed offset, log end offset)` of `group` per `(topic, partition)`, as Kafka's
/// `ConsumerGroupCommand --describe` prints them (partitions without a commit are left
/// out). Lag is the difference.
pub async fn group_positions(env: &TestEnv, group: &str) -> BTreeMap<(String, i32), (i64, i64)> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group],
        )
        .await
        .expect("ConsumerGroupCommand --describe");
    let mut positions = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 5
            && cols[0] == group
            && let (Ok(p), Ok(c), Ok(e)) = (
                cols[2].parse::<i32>(),
                cols[3].parse::<i64>(),
                cols[4].parse::<i64>(),
            )
        {
            positions.insert((cols[1].to_string(), p), (c, e));
        }
    }
    positions
}

/// Records in `topic` (the sum of its partitions' end offsets), from Kafka's own
/// `GetOffsetShell`.
pub async fn topic_record_count(env: &TestEnv, topic: &str) -> i64 {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.GetOffsetShell",
            &["--topic", topic, "--time", "-1"],
        )
        .await
        .expect("GetOffsetShell");
    out.lines()
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<i64>().ok())
        .sum()
}

/// A PostgreSQL server of the test's own (initdb in a fresh directory, a free port), so
/// a test can stop and restart it without disturbing other tests. Stopped and removed
/// when dropped.
pub struct PrivatePostgres {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    server: Option<std::process::Child>,
}

impl PrivatePostgres {
    /// Creates the cluster and starts the server.
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries under /usr/lib/postgresql (tools/install-postgres.sh)")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = std::env::temp_dir().join(crate::unique("eventops-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        // PostgreSQL refuses to run as root: as root, run it as the `postgres` user.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let owner = root.then(|| {
            let id = |flag: &str| -> u32 {
                let o = std::process::Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id postgres");
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse()
                    .expect("the postgres user")
            };
            let (uid, gid) = (id("-u"), id("-g"));
            let status = std::process::Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown {}", dir.display());
            (uid, gid)
        });
        let mut pg = Self {
            dir,
            bin,
            port: crate::free_port(),
            owner,
            server: None,
        };
        let status = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        pg.resume();
        pg
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Its `postgres://` URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) on the same port and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "already running");
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server with PostgreSQL's fast shutdown (SIGINT: open transactions are
    /// rolled back, connections closed) and waits until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates SCRAM user `user` with `password` with Kafka's own `ConfigCommand`, for the
/// broker's SASL mechanism.
pub async fn create_scram_user(env: &TestEnv, user: &str, password: &str) {
    let config = format!("{}=[password={password}]", env.info.kafka_sasl_mechanism);
    env.kafka_tool(
        "kafka.admin.ConfigCommand",
        &[
            "--alter",
            "--add-config",
            &config,
            "--entity-type",
            "users",
            "--entity-name",
            user,
        ],
    )
    .await
    .expect("ConfigCommand --alter users");
}

/// Adds (`add`) or removes an ACL allowing `user` `operation` on `resource` (for
/// example `["--topic", "t"]` or `["--group", "g"]`), with Kafka's own `AclCommand`.
pub async fn set_acl(env: &TestEnv, add: bool, user: &str, operation: &str, resource: &[&str]) {
    let principal = format!("User:{user}");
    let mut args = vec![
        if add { "--add" } else { "--remove" },
        "--force",
        "--allow-principal",
        &principal,
        "--operation",
        operation,
    ];
    args.extend_from_slice(resource);
    env.kafka_tool("org.apache.kafka.tools.AclCommand", &args)
        .await
        .expect("AclCommand");
}
