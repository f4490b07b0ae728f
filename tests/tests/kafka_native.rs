//! The native admin calls (ACLs, SCRAM users, cluster description, consumer groups and
//! their offsets) against the real broker, checked with Kafka's own AclCommand,
//! ConfigCommand, ClusterTool and ConsumerGroupCommand and by authenticating as the user.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use eventops_operator::config::RunConfig;
use eventops_operator::kafka::native::{
    AclBinding, AclFilter, AclOperation, AclPermission, GroupState, NativeAdmin, NativeError,
    PatternType, ResourceType, SCRAM_ITERATIONS, ScramCredential, ScramMechanism,
};
use eventops_operator::kafka::{KafkaAdmin, Reading};
use eventops_operator::telemetry::Metrics;
use eventops_tests::runtime::committed_offsets;
use eventops_tests::{TestEnv, env, eventually, unique};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;

const TIMEOUT: Duration = Duration::from_secs(30);

fn native(env: &TestEnv) -> NativeAdmin {
    let mut config = RunConfig::new(&env.info.kafka_bootstrap);
    config.kafka_username = Some(env.info.kafka_admin_user.clone());
    config.kafka_password = Some(env.info.kafka_admin_password.clone());
    config.kafka_sasl_mechanism = env.info.kafka_sasl_mechanism.clone();
    KafkaAdmin::new(&config.kafka_settings().unwrap(), Default::default())
        .unwrap()
        .native()
}

fn acl(
    resource_type: ResourceType,
    name: &str,
    pattern_type: PatternType,
    principal: &str,
    operation: AclOperation,
    permission: AclPermission,
) -> AclBinding {
    AclBinding {
        resource_type,
        resource_name: name.into(),
        pattern_type,
        principal: principal.into(),
        host: "*".into(),
        operation,
        permission,
    }
}

/// `IdempotentWrite` -> `IDEMPOTENT_WRITE`, as Kafka's tools print enum names.
fn kafka_name(v: impl std::fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn acl_line(a: &AclBinding) -> String {
    format!(
        "{} {} {} {} {} {} {}",
        kafka_name(a.resource_type),
        a.resource_name,
        kafka_name(a.pattern_type),
        a.principal,
        a.host,
        kafka_name(a.operation),
        kafka_name(a.permission)
    )
}

/// The ACLs of `principal` according to `AclCommand --list`, one line per ACL in
/// [`acl_line`]'s format.
async fn acl_command_list(env: &TestEnv, principal: &str) -> BTreeSet<String> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.AclCommand",
            &["--list", "--principal", principal],
        )
        .await
        .unwrap();
    let field = |s: &str, name: &str| {
        s.split([',', '(', ')'])
            .find_map(|f| f.trim().strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {name} in {s:?} of:\n{out}"))
    };
    let mut acls = BTreeSet::new();
    let mut resource = None;
    for line in out.lines() {
        if line.contains("ResourcePattern(") {
            resource = Some(format!(
                "{} {} {}",
                field(line, "resourceType"),
                field(line, "name"),
                field(line, "patternType")
            ));
        } else if line.contains("(principal=") {
            let resource = resource.as_ref().expect("an ACL line before any resource");
            acls.insert(format!(
                "{resource} {} {} {} {}",
                field(line, "principal"),
                field(line, "host"),
                field(line, "operation"),
                field(line, "permissionType")
            ));
        }
    }
    acls
}

#[tokio::test(flavor = "multi_thread")]
async fn acls_are_created_described_and_deleted() {
    let env = env().await;
    let admin = native(&env);
    let principal = format!("User:{}", unique("native-acl"));
    let topic = unique("native-acl-topic");
    let p = principal.as_str();
    use AclOperation::*;
    use AclPermission::*;
    use PatternType::*;
    use ResourceType::*;
    let mut wanted = vec![
        acl(Topic, &topic, Literal, p, Read, Allow),
        acl(Topic, &topic, Literal, p, Describe, Allow),
        acl(Topic, "orders.", Prefixed, p, Write, Allow),
        acl(Group, &topic, Literal, p, Read, Allow),
        acl(Cluster, "kafka-cluster", Literal, p, IdempotentWrite, Allow),
        acl(TransactionalId, "tx-", Prefixed, p, Write, Deny),
    ];
    wanted.sort();
    let filter = AclFilter::principal(p);
    assert_eq!(admin.describe_acls(&filter).await.unwrap(), []);

    admin.create_acls(&wanted).await.unwrap();
    // Creating existing ACLs again is not an error.
    admin.create_acls(&wanted[..1]).await.unwrap();

    let described = eventually(TIMEOUT, "the ACLs to be described", || async {
        let acls = admin.describe_acls(&filter).await.unwrap();
        (acls.len() == wanted.len()).then_some(acls)
    })
    .await;
    assert_eq!(described, wanted);
    let expected_lines: BTreeSet<String> = wanted.iter().map(acl_line).collect();
    assert_eq!(acl_command_list(&env, p).await, expected_lines);

    // A narrower filter: only the Allow ACLs on the literal topic.
    let on_topic = AclFilter {
        operation: None,
        ..AclFilter::from(&wanted[0])
    };
    let topic_acls = admin.describe_acls(&on_topic).await.unwrap();
    assert_eq!(topic_acls.len(), 2, "{topic_acls:?}");

    // Delete one exactly, then the rest by principal.
    let deleted = admin
        .delete_acls(&[AclFilter::from(&wanted[0])])
        .await
        .unwrap();
    assert_eq!(deleted, wanted[..1]);
    let deleted = admin
        .delete_acls(std::slice::from_ref(&filter))
        .await
        .unwrap();
    assert_eq!(deleted, wanted[1..]);

    eventually(TIMEOUT, "no ACLs left", || async {
        admin
            .describe_acls(&filter)
            .await
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(acl_command_list(&env, p).await, BTreeSet::new());
    assert_eq!(admin.delete_acls(&[filter]).await.unwrap(), []);
}

/// Asserts that authentication fails because of the credentials.
fn assert_refused(result: Result<(), Vec<RDKafkaErrorCode>>) {
    match result {
        Err(errors) => assert!(
            errors.contains(&RDKafkaErrorCode::Authentication),
            "not an authentication failure: {errors:?}"
        ),
        Ok(()) => panic!("authenticated"),
    }
}

async fn config_command_describe_user(env: &TestEnv, user: &str) -> String {
    env.kafka_tool(
        "kafka.admin.ConfigCommand",
        &[
            "--describe",
            "--entity-type",
            "users",
            "--entity-name",
            user,
        ],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_users_are_upserted_described_and_deleted() {
    let env = env().await;
    let admin = native(&env);
    let user = unique("native-user");
    let password = "correct horse battery staple";

    let unknown = admin.describe_scram_users(&[&user]).await.unwrap();
    assert_eq!(unknown.get(&user), Some(&vec![]), "{unknown:?}");
    assert!(!admin.delete_scram_user(&user).await.unwrap());
    assert_refused(env.authenticates(&user, password).await);

    admin.upsert_scram_user(&user, password).await.unwrap();
    eventually(TIMEOUT, "the new user to authenticate", || async {
        env.authenticates(&user, password).await.ok()
    })
    .await;
    assert_refused(env.authenticates(&user, "wrong password").await);
    let described = admin.describe_scram_users(&[&user, "admin"]).await.unwrap();
    assert_eq!(
        described[&user],
        [ScramCredential {
            mechanism: ScramMechanism::Sha512,
            iterations: SCRAM_ITERATIONS
        }]
    );
    assert_eq!(described["admin"].len(), 1, "{described:?}");
    let all = admin.describe_scram_users(&[]).await.unwrap();
    assert_eq!(all.get(&user), described.get(&user), "{all:?}");
    assert!(all.contains_key("admin"), "{all:?}");
    let twice = admin.describe_scram_users(&[&user, &user]).await.unwrap();
    assert_eq!(twice.len(), 1, "{twice:?}");
    assert_eq!(
        config_command_describe_user(&env, &user).await.trim(),
        format!(
            "SCRAM credential configs for user-principal '{user}' are \
             SCRAM-SHA-512=iterations={SCRAM_ITERATIONS}"
        )
    );

    // A new password replaces the old one.
    let new_password = "tr0ub4dor&3";
    admin.upsert_scram_user(&user, new_password).await.unwrap();
    eventually(TIMEOUT, "the new password to work", || async {
        env.authenticates(&user, new_password).await.ok()
    })
    .await;
    assert_refused(env.authenticates(&user, password).await);

    assert!(admin.delete_scram_user(&user).await.unwrap());
    let errors = eventually(TIMEOUT, "the deleted user to be refused", || async {
        env.authenticates(&user, new_password).await.err()
    })
    .await;
    assert_refused(Err(errors));
    assert_eq!(
        admin.describe_scram_users(&[&user]).await.unwrap()[&user],
        []
    );
    assert_eq!(config_command_describe_user(&env, &user).await.trim(), "");
    assert!(!admin.delete_scram_user(&user).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_arguments_are_clear_errors() {
    let env = env().await;
    let admin = native(&env);
    let good = acl(
        ResourceType::Topic,
        "t",
        PatternType::Literal,
        "User:x",
        AclOperation::Read,
        AclPermission::Allow,
    );

    // Caught before anything is sent.
    let nul = AclBinding {
        principal: "User:a\0b".into(),
        ..good.clone()
    };
    let err = admin.create_acls(&[nul]).await.unwrap_err();
    assert!(
        matches!(&err, NativeError::InvalidArgument(m) if m.contains("principal")),
        "{err}"
    );
    let err = admin.upsert_scram_user("a\0b", "pw").await.unwrap_err();
    assert!(matches!(err, NativeError::InvalidArgument(_)), "{err}");
    let err = admin.describe_scram_users(&["a\0b"]).await.unwrap_err();
    assert!(matches!(err, NativeError::InvalidArgument(_)), "{err}");
    let err = admin.describe_consumer_group("a\0b").await.unwrap_err();
    assert!(matches!(err, NativeError::InvalidArgument(_)), "{err}");
    let err = admin
        .list_consumer_group_offsets("g", Some(&[("a\0b".into(), 0)]))
        .await
        .unwrap_err();
    assert!(matches!(err, NativeError::InvalidArgument(_)), "{err}");
    for bad in [
        vec![("t".to_string(), 0, -1)],
        vec![("t".to_string(), 0, 1), ("t".to_string(), 0, 2)],
    ] {
        let err = admin
            .alter_consumer_group_offsets("g", &bad)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, NativeError::InvalidArgument(m) if m.contains("partition 0")),
            "{err}"
        );
    }
    // librdkafka's own validation.
    let err = admin
        .upsert_scram_user(&unique("native-empty"), "")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NativeError::InvalidArgument(m) if m.contains("password")),
        "{err}"
    );

    // Refused by Kafka: a principal without a type, and a cluster ACL not named
    // kafka-cluster.
    for bad in [
        AclBinding {
            principal: "no-type".into(),
            ..good.clone()
        },
        AclBinding {
            resource_type: ResourceType::Cluster,
            resource_name: "not-the-cluster".into(),
            ..good.clone()
        },
    ] {
        let err = admin
            .create_acls(std::slice::from_ref(&bad))
            .await
            .unwrap_err();
        match &err {
            NativeError::Kafka { code, message, .. } => {
                assert_eq!(*code, RDKafkaErrorCode::InvalidRequest, "{err}");
                assert!(message.contains(&bad.principal), "names the ACL: {err}");
            }
            other => panic!("expected Kafka's refusal, got {other}"),
        }
    }
}

/// The cluster id according to Kafka's own `ClusterTool cluster-id`. Not through
/// [`TestEnv::kafka_tool`]: ClusterTool takes the connection options after its
/// subcommand, not before it.
async fn cluster_tool_cluster_id(env: &TestEnv) -> String {
    let info = env.info.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("java")
            .arg("-Xmx256m")
            .arg("-XX:TieredStopAtLevel=1")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                info.state_dir
                    .join("kafka/tools-log4j2.properties")
                    .display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", info.kafka_lib.display()))
            .arg("org.apache.kafka.tools.ClusterTool")
            .arg("cluster-id")
            .arg("--bootstrap-server")
            .arg(&info.kafka_bootstrap)
            .arg("--command-config")
            .arg(&info.kafka_admin_properties)
            .output()
            .expect("running ClusterTool")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ClusterTool failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Cluster ID:"))
        .unwrap_or_else(|| panic!("no cluster id in ClusterTool's output:\n{stdout}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_cluster_matches_kafka() {
    let env = env().await;
    let cluster = native(&env).describe_cluster().await.unwrap();

    let port: u16 = env
        .info
        .kafka_bootstrap
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bootstrap {:?}", env.info.kafka_bootstrap));
    assert_eq!(cluster.nodes.len(), 1, "{cluster:?}");
    assert_eq!(cluster.nodes[0].port, port, "{cluster:?}");
    assert!(cluster.controller.is_some(), "{cluster:?}");
    assert!(!cluster.cluster_id.is_empty(), "{cluster:?}");
    assert_eq!(cluster.cluster_id, cluster_tool_cluster_id(&env).await);
}

/// Threads of this test process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Calls in flight wait on no thread of their own: one thread hands every result out.
/// (Each call used to block a thread of Tokio's blocking pool until its answer came:
/// 400 threads in the operator under `tools/bench-operator 1000`.)
#[tokio::test(flavor = "multi_thread")]
async fn calls_in_flight_hold_no_thread_each() {
    const CALLS: usize = 300;
    let env = env().await;
    let (admin, metrics) = operator_admin(&env).await;
    let native = admin.native();
    native.describe_cluster().await.expect("a first call");
    let before = threads();
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampler = async {
        let mut most = 0;
        let mut samples = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            most = most.max(threads());
            samples += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (most, samples)
    };
    let calls = async {
        let answers =
            futures::future::join_all((0..CALLS).map(|_| native.describe_cluster())).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        answers
    };
    let ((most, samples), answers) = tokio::join!(sampler, calls);
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(samples > 0, "the thread count was never sampled");
    // Other tests of this binary run meanwhile and start threads of their own.
    assert!(
        most < before + 100,
        "{CALLS} calls in flight took the process from {before} to {most} threads"
    );
    drop(metrics);
}

fn kafka_refusal(e: NativeError) -> (RDKafkaErrorCode, String) {
    match e {
        NativeError::Kafka { code, message, .. } => (code, message),
        other => panic!("expected Kafka's refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_alter_configs_changes_only_the_named_keys() {
    use eventops_operator::kafka::native::ConfigOp::{Delete, Set};
    let env = env().await;
    let admin = native(&env);
    let topic = unique("native.configs");
    let configs = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    admin
        .create_topic(
            &topic,
            1,
            None,
            &configs(&[("retention.ms", "3600000")]),
            false,
        )
        .await
        .unwrap();
    assert_eq!(env.topic_configs(&topic).await, ["retention.ms=3600000"]);
    // An administrator's config, which no operation below names.
    env.add_topic_configs(&topic, "cleanup.policy=compact")
        .await;

    admin
        .alter_topic_configs(
            &topic,
            &[
                Set("segment.ms".into(), "600000".into()),
                Delete("retention.ms".into()),
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "segment.ms=600000"]
    );

    // Validate-only changes nothing, and deleting a key the topic lacks is no error.
    admin
        .alter_topic_configs(&topic, &[Set("segment.ms".into(), "1200000".into())], true)
        .await
        .unwrap();
    admin
        .alter_topic_configs(&topic, &[Delete("retention.ms".into())], false)
        .await
        .unwrap();
    admin.alter_topic_configs(&topic, &[], false).await.unwrap();
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "segment.ms=600000"]
    );

    // Refusals come with Kafka's own words, naming the config.
    for (key, value) in [("cleanup.policy", "banana"), ("retention.msx", "1")] {
        for validate_only in [true, false] {
            let err = admin
                .alter_topic_configs(&topic, &[Set(key.into(), value.into())], validate_only)
                .await
                .unwrap_err();
            let (code, message) = kafka_refusal(err);
            assert!(
                message.contains(key) || message.contains(value),
                "{key}={value}: {code:?} {message}"
            );
        }
    }
    assert_eq!(
        env.topic_configs(&topic).await,
        ["cleanup.policy=compact", "segment.ms=600000"]
    );
    let (code, _) = kafka_refusal(
        admin
            .alter_topic_configs(
                &unique("native.missing"),
                &[Set("retention.ms".into(), "1".into())],
                false,
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, RDKafkaErrorCode::UnknownTopicOrPartition);
    let err = admin
        .alter_topic_configs(&topic, &[Set("a\0b".into(), "1".into())], false)
        .await
        .unwrap_err();
    assert!(matches!(err, NativeError::InvalidArgument(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_topic_validates_only_when_asked_and_says_what_kafka_refused() {
    let env = env().await;
    let admin = native(&env);
    let topic = unique("native.created");
    let bad = std::collections::BTreeMap::from([("retention.msx".to_string(), "1".to_string())]);
    let (_, message) = kafka_refusal(
        admin
            .create_topic(&topic, 1, None, &bad, true)
            .await
            .unwrap_err(),
    );
    assert!(message.contains("retention.msx"), "{message}");
    let (code, message) = kafka_refusal(
        admin
            .create_topic(&topic, 1, Some(3), &Default::default(), true)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        code,
        RDKafkaErrorCode::InvalidReplicationFactor,
        "{message}"
    );
    admin
        .create_topic(&topic, 2, None, &Default::default(), true)
        .await
        .unwrap();
    assert!(
        !env.topic_exists(&topic).await,
        "validate-only creates nothing"
    );
    admin
        .create_topic(&topic, 2, None, &Default::default(), false)
        .await
        .unwrap();
    assert_eq!(env.describe_topic(&topic).await.unwrap().partitions, 2);
    let (code, _) = kafka_refusal(
        admin
            .create_topic(&topic, 2, None, &Default::default(), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, RDKafkaErrorCode::TopicAlreadyExists);
}

/// The `kafka_admin_requests_total` count of `request` in `metrics`.
fn requests(metrics: &eventops_operator::telemetry::Metrics, request: &str) -> u64 {
    let label = format!("kafka_admin_requests_total{{request=\"{request}\"}} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.split_once(&label).map(|(_, n)| n.trim().parse().unwrap()))
        .unwrap_or(0)
}

fn admin_as(env: &TestEnv, user: &str, password: &str) -> (KafkaAdmin, Arc<Metrics>) {
    let mut config = RunConfig::new(&env.info.kafka_bootstrap);
    config.kafka_username = Some(user.to_string());
    config.kafka_password = Some(password.to_string());
    config.kafka_sasl_mechanism = env.info.kafka_sasl_mechanism.clone();
    let metrics = Arc::new(Metrics::default());
    let admin = KafkaAdmin::new(&config.kafka_settings().unwrap(), metrics.clone()).unwrap();
    (admin, metrics)
}

/// Reconciles describing topics at the same time share one DescribeTopics and one
/// DescribeConfigs request; each answer matches Kafka's own TopicCommand and
/// ConfigCommand, and describing a missing topic does not create it.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_describes_share_requests_and_match_kafkas_tools() {
    let env = env().await;
    env.time_limit(Duration::from_secs(120));
    let topics: Vec<String> = (0..3)
        .map(|i| unique(&format!("native.described{i}")))
        .collect();
    for (i, topic) in topics.iter().enumerate() {
        let partitions = (i + 1).to_string();
        let retention = format!("retention.ms={}", 3_600_000 * (i + 1));
        let mut args = vec!["--create", "--topic", topic, "--partitions", &partitions];
        if i > 0 {
            args.extend(["--config", &retention]);
        }
        env.kafka_tool("org.apache.kafka.tools.TopicCommand", &args)
            .await
            .unwrap();
    }
    let missing = unique("native.missing");
    // As the operator runs: its own user, with the documented ACLs.
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    let (admin, metrics) = admin_as(&env, &user.user, &user.password);
    let asked: Vec<&String> = topics.iter().chain([&missing]).collect();
    let answers = futures::future::join_all(
        asked
            .iter()
            .map(|t| admin.describe_topic(t, Reading::Fresh)),
    )
    .await;

    for (topic, answer) in topics.iter().zip(&answers) {
        let state = answer.as_ref().unwrap().as_ref().expect("the topic exists");
        let cli = env.describe_topic(topic).await.unwrap();
        assert_eq!(state.partitions, cli.partitions, "{topic}");
        assert_eq!(state.replication_factor, cli.replication_factor, "{topic}");
        let configs: Vec<String> = state
            .configs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(configs, env.topic_configs(topic).await, "{topic}");
    }
    assert_eq!(*answers.last().unwrap().as_ref().unwrap(), None);
    assert!(
        !env.topic_exists(&missing).await,
        "describing created {missing}"
    );
    // One request answers every ask queued before it was sent; an ask that arrives while
    // it is out (the four tasks run on two threads of a loaded machine) waits for a second.
    // Four separate requests is the old code.
    let (metadata, configs) = (
        requests(&metrics, "Metadata"),
        requests(&metrics, "DescribeConfigs"),
    );
    assert!(
        (1..=2).contains(&metadata),
        "{metadata} Metadata requests for 4 asks"
    );
    assert!(
        (1..=2).contains(&configs),
        "{configs} DescribeConfigs requests for 4 asks"
    );
}

/// A principal without Describe on a topic gets Kafka's refusal for it, whether the
/// topic exists or not, rather than "no such topic" (which would make the operator try
/// to create it).
#[tokio::test(flavor = "multi_thread")]
async fn a_describe_without_the_acl_is_refused_by_name() {
    let env = env().await;
    env.time_limit(Duration::from_secs(120));
    let topic = unique("native.hidden");
    env.kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &["--create", "--topic", &topic],
    )
    .await
    .unwrap();
    let user = env.create_operator_user().await;
    let (admin, _) = admin_as(&env, &user.user, &user.password);
    let missing = unique("native.hidden-missing");
    for name in [&topic, &missing] {
        match admin.describe_topic(name, Reading::Fresh).await {
            Err(e) => {
                assert_eq!(
                    e.code(),
                    Some(RDKafkaErrorCode::TopicAuthorizationFailed),
                    "{e}"
                );
                assert!(e.to_string().contains(name.as_str()), "{e}");
            }
            Ok(state) => panic!("described {name} without the ACL: {state:?}"),
        }
    }
}

/// `ConsumerGroupCommand --describe --state` of `group`: its state, member count,
/// assignor (empty for `-`) and coordinator id; `None` when the tool says Kafka has no
/// such group.
async fn group_command_state(
    env: &TestEnv,
    group: &str,
) -> Option<(GroupState, usize, String, Option<i32>)> {
    let out = env
        .kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", group, "--state"],
        )
        .await
        .unwrap();
    if out.contains("GroupIdNotFoundException") {
        return None;
    }
    let cols: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&group))
        .unwrap_or_else(|| panic!("no state line for {group} in:\n{out}"));
    let n = cols.len();
    let state = GroupState::ALL
        .iter()
        .copied()
        .find(|s| format!("{s:?}") == cols[n - 2])
        .unwrap_or_else(|| panic!("state {:?} in:\n{out}", cols[n - 2]));
    let members = cols[n - 1].parse().unwrap();
    let assignor = match cols[n - 3] {
        "-" => String::new(),
        a => a.to_string(),
    };
    let coordinator = cols
        .iter()
        .find_map(|c| c.strip_prefix('(')?.strip_suffix(')')?.parse().ok());
    Some((state, members, assignor, coordinator))
}

/// The operator's admin client as its own user, holding exactly the documented ACLs.
async fn operator_admin(env: &TestEnv) -> (KafkaAdmin, Arc<Metrics>) {
    let user = env.create_operator_user().await;
    env.grant_operator_acls(&user).await;
    admin_as(env, &user.user, &user.password)
}

/// A consumer (the super user: setup, not the code under test) that has joined
/// `group` on `topic` and has its assignment; it leaves the group when dropped.
async fn join_group(env: &TestEnv, group: &str, topic: &str) -> BaseConsumer {
    let (info, group, topic) = (env.info.clone(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = info
            .kafka_admin_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let deadline = std::time::Instant::now() + TIMEOUT;
        // Polling drives the join; records it returns are not looked at.
        while consumer.assignment().unwrap().count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{group} got no assignment within {TIMEOUT:?}"
            );
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(200)) {
                panic!("joining {group}: {e}");
            }
        }
        consumer
    })
    .await
    .unwrap()
}

/// Leaves the group (closing blocks until the coordinator has the LeaveGroup).
async fn leave_group(consumer: BaseConsumer) {
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .unwrap();
}

fn offsets(topic: &str, pairs: &[(i32, i64)]) -> BTreeMap<(String, i32), i64> {
    pairs
        .iter()
        .map(|(p, o)| ((topic.to_string(), *p), *o))
        .collect()
}

/// A group's life as a Replay controller sees it, through the operator's own user: a
/// group Kafka does not have is Dead, one with a member Stable, and once the member
/// leaves Empty; its committed offsets can be rewound only while Empty. Every answer
/// is checked against Kafka's own ConsumerGroupCommand.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_groups_are_described_and_rewound_as_kafkas_tool_sees_them() {
    let env = env().await;
    env.time_limit(Duration::from_secs(240));
    let topic = unique("native.group-work");
    env.kafka_tool(
        "org.apache.kafka.tools.TopicCommand",
        &["--create", "--topic", &topic, "--partitions", "2"],
    )
    .await
    .unwrap();
    {
        let (info, topic) = (env.info.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            eventops_tests::autoscale::produce_spread(&info, &topic, &[0, 1], 20)
        })
        .await
        .unwrap();
    }
    let (admin, metrics) = operator_admin(&env).await;
    let group = unique("native-group");

    // Not there yet: Dead, no members, no offsets. Kafka's Java tool (a newer
    // DescribeGroups) says "not found" for the same group.
    let described = admin.describe_consumer_group(&group).await.unwrap();
    assert_eq!(described.state, GroupState::Dead, "{described:?}");
    assert_eq!(described.members, 0, "{described:?}");
    assert_eq!(group_command_state(&env, &group).await, None);
    assert_eq!(
        admin
            .list_consumer_group_offsets(&group, None)
            .await
            .unwrap(),
        BTreeMap::new()
    );
    assert_eq!(committed_offsets(&env, &group).await, BTreeMap::new());

    // A member joins and commits: Stable, with one member.
    let member = join_group(&env, &group, &topic).await;
    let mut commit = rdkafka::TopicPartitionList::new();
    commit
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(7))
        .unwrap();
    commit
        .add_partition_offset(&topic, 1, rdkafka::Offset::Offset(9))
        .unwrap();
    member.commit(&commit, CommitMode::Sync).unwrap();
    let described = eventually(TIMEOUT, "the group to be Stable", || async {
        let d = admin.describe_consumer_group(&group).await.unwrap();
        (d.state == GroupState::Stable).then_some(d)
    })
    .await;
    assert_eq!(described.members, 1, "{described:?}");
    assert_eq!(
        group_command_state(&env, &group).await,
        Some((
            described.state,
            described.members,
            described.assignor.clone(),
            described.coordinator
        ))
    );
    assert!(!described.assignor.is_empty(), "{described:?}");
    let committed = offsets(&topic, &[(0, 7), (1, 9)]);
    assert_eq!(committed_offsets(&env, &group).await, committed);
    assert_eq!(
        admin
            .list_consumer_group_offsets(&group, None)
            .await
            .unwrap(),
        committed
    );
    // Only the partitions asked for; one without a commit is left out.
    let other = unique("native.group-other");
    let asked = [(topic.clone(), 1), (topic.clone(), 1), (other.clone(), 0)];
    assert_eq!(
        admin
            .list_consumer_group_offsets(&group, Some(&asked))
            .await
            .unwrap(),
        offsets(&topic, &[(1, 9)])
    );
    assert_eq!(
        admin
            .list_consumer_group_offsets(&group, Some(&[]))
            .await
            .unwrap(),
        BTreeMap::new()
    );

    // While it has a member, Kafka refuses to rewind it, partition by partition, and
    // nothing changes.
    let rewind = [(topic.clone(), 0, 2), (topic.clone(), 1, 0)];
    let err = admin
        .alter_consumer_group_offsets(&group, &rewind)
        .await
        .unwrap_err();
    eprintln!("rewinding a group with a member: {err}");
    let (code, message) = kafka_refusal(err);
    assert_eq!(code, RDKafkaErrorCode::UnknownMemberId, "{message}");
    for p in ["partition 0", "partition 1"] {
        assert!(message.contains(p), "names {p}: {message}");
    }
    assert_eq!(committed_offsets(&env, &group).await, committed);

    // The member leaves: Empty, and now the rewind is taken.
    leave_group(member).await;
    let described = eventually(TIMEOUT, "the group to be Empty", || async {
        let d = admin.describe_consumer_group(&group).await.unwrap();
        (d.state == GroupState::Empty).then_some(d)
    })
    .await;
    assert_eq!(described.members, 0, "{described:?}");
    assert_eq!(
        group_command_state(&env, &group).await,
        Some((GroupState::Empty, 0, String::new(), described.coordinator))
    );
    admin
        .alter_consumer_group_offsets(&group, &rewind)
        .await
        .unwrap();
    let rewound = offsets(&topic, &[(0, 2), (1, 0)]);
    assert_eq!(committed_offsets(&env, &group).await, rewound);
    assert_eq!(
        admin
            .list_consumer_group_offsets(&group, None)
            .await
            .unwrap(),
        rewound
    );
    // Naming one partition leaves the other alone; an empty request changes nothing.
    admin
        .alter_consumer_group_offsets(&group, &[(topic.clone(), 1, 5)])
        .await
        .unwrap();
    admin
        .alter_consumer_group_offsets(&group, &[])
        .await
        .unwrap();
    assert_eq!(
        committed_offsets(&env, &group).await,
        offsets(&topic, &[(0, 2), (1, 5)])
    );

    // A group Kafka does not have can be given offsets: that makes it, Empty.
    let fresh = unique("native-group-fresh");
    admin
        .alter_consumer_group_offsets(&fresh, &[(topic.clone(), 0, 4)])
        .await
        .unwrap();
    assert_eq!(
        committed_offsets(&env, &fresh).await,
        offsets(&topic, &[(0, 4)])
    );
    assert_eq!(
        admin.describe_consumer_group(&fresh).await.unwrap().state,
        GroupState::Empty
    );

    for request in ["DescribeGroups", "OffsetFetch", "OffsetCommit"] {
        assert!(requests(&metrics, request) > 0, "{request} counted");
    }
}

/// Without the Group ACL the documentation lists, every group call is refused with
/// Kafka's GroupAuthorizationFailed, and the operator's hint names the missing ACL.
#[tokio::test(flavor = "multi_thread")]
async fn group_calls_without_the_group_acl_are_refused_by_name() {
    use eventops_operator::conditions::with_permission_hint;
    use eventops_tests::operator_user::{AclResource, OPERATOR_ACLS};
    let env = env().await;
    env.time_limit(Duration::from_secs(120));
    let user = env.create_operator_user().await;
    for resource in [AclResource::Cluster, AclResource::AnyTopic] {
        let ops: Vec<&str> = OPERATOR_ACLS
            .iter()
            .filter(|(r, _)| *r == resource)
            .map(|(_, op)| *op)
            .collect();
        env.set_acls(true, &user.principal(), resource, &ops).await;
    }
    let (admin, _) = admin_as(&env, &user.user, &user.password);
    let group = unique("native-group-hidden");
    let topic = unique("native.group-hidden");
    let results = [
        admin.describe_consumer_group(&group).await.map(|_| ()),
        admin
            .list_consumer_group_offsets(&group, None)
            .await
            .map(|_| ()),
        admin
            .alter_consumer_group_offsets(&group, &[(topic, 0, 0)])
            .await,
    ];
    for (result, acl) in
        results
            .into_iter()
            .zip(["Describe on Group", "Describe on Group", "Read on Group"])
    {
        let err = result.expect_err("refused without the Group ACL");
        let NativeError::Kafka { op, code, message } = &err else {
            panic!("expected Kafka's refusal, got {err}");
        };
        assert_eq!(*code, RDKafkaErrorCode::GroupAuthorizationFailed, "{err}");
        assert!(message.contains(&group), "names the group: {err}");
        let hinted = with_permission_hint(message.clone(), op, *code);
        assert!(hinted.contains(acl), "{hinted}");
        eprintln!("{op}: {hinted}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_configs_are_described_as_kafkas_config_command_lists_them() {
    let env = env().await;
    let admin = native(&env);
    let (plain, tuned, missing) = (
        unique("native.describe-plain"),
        unique("native.describe-tuned"),
        unique("native.describe-missing"),
    );
    let retention = BTreeMap::from([("retention.ms".to_string(), "3600000".to_string())]);
    admin
        .create_topic(&plain, 1, None, &BTreeMap::new(), false)
        .await
        .unwrap();
    admin
        .create_topic(&tuned, 2, None, &retention, false)
        .await
        .unwrap();
    // Set by an administrator with Kafka's own tool.
    env.add_topic_configs(&tuned, "cleanup.policy=compact,max.message.bytes=2000000")
        .await;

    // ConfigCommand lists the tuned topic's three configs once the controller has them;
    // the broker answering DescribeConfigs applies them a moment later.
    let listed = eventually(
        TIMEOUT,
        "ConfigCommand to list the three configs",
        || async {
            let listed = env.topic_configs(&tuned).await;
            (listed.len() == 3).then_some(listed)
        },
    )
    .await;
    let as_lines = |configs: &BTreeMap<String, String>| -> Vec<String> {
        configs.iter().map(|(k, v)| format!("{k}={v}")).collect()
    };
    let described = eventually(TIMEOUT, "DescribeConfigs to answer them", || async {
        let described = admin
            .describe_topic_configs(&[&plain, &tuned, &missing, &tuned])
            .await
            .unwrap();
        let tuned_configs = described[tuned.as_str()].as_ref().ok()?;
        (as_lines(tuned_configs) == listed).then_some(described)
    })
    .await;
    assert_eq!(described.len(), 3, "{described:?}");
    // Only what is set on the topic itself, exactly as ConfigCommand lists it: none of
    // the broker's defaults or their synonyms.
    assert!(described[plain.as_str()].as_ref().unwrap().is_empty());
    assert!(env.topic_configs(&plain).await.is_empty());
    // A topic Kafka does not have is its own error, by Kafka's code.
    let (code, _) = kafka_refusal(described[missing.as_str()].clone().unwrap_err());
    assert_eq!(code, RDKafkaErrorCode::UnknownTopicOrPartition);
    assert!(admin.describe_topic_configs(&[]).await.unwrap().is_empty());
}
