//! A broker restart keeps every SCRAM credential, also after one was deleted.
//!
//! Kafka 4.3.1 rebuilds a broker's credentials at start by replaying the metadata log
//! into one delta. `ScramDelta.apply` walks that delta's changes in hash order and, when
//! a removal empties a mechanism's map, drops the map from the image it builds while it
//! goes on filling it. So with no metadata snapshot to start from, one deleted user that
//! comes first in hash order loses every SCRAM credential of the broker, the super
//! user's included: nobody authenticates until the credentials are written again. The
//! operator deletes a ConsumerGroup's user when the group goes, so this is the normal
//! life of an EventOps cluster. It failed CI's chaos test (broker fault, 2026-12-01):
//! after the restart every client, the test's own producer too, was refused for 5
//! minutes.
//!
//! The development environment (`tools/devenv`) has the broker take metadata snapshots
//! and waits for the first before it reports ready, so every restart starts from a
//! snapshot that holds the super user. This test fails on an environment without that.

use std::time::Duration;

use eventops_devenv::Fault;
use eventops_tests::{env, eventually, unique};

/// A user whose name Java's `HashMap` puts in bucket 0 for any table up to 4,096
/// entries (its `String.hashCode`, spread as `HashMap` does, ends in 12 zero bits): the
/// replay meets its removal before any other user's record.
const FIRST_IN_HASH_ORDER: &str = "restart-probe-22290";

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_keeps_every_scram_credential_after_a_user_is_deleted() {
    let env = env().await;
    env.time_limit(Duration::from_secs(240));
    let kept = unique("restart-kept");
    let kept_password = format!("pw-{kept}");
    let scram = |name: &str, password: &str| {
        vec![
            "--alter".to_string(),
            "--entity-type".into(),
            "users".into(),
            "--entity-name".into(),
            name.into(),
            "--add-config".into(),
            format!("SCRAM-SHA-512=[iterations=4096,password={password}]"),
        ]
    };
    for (name, password) in [
        (kept.as_str(), kept_password.as_str()),
        (FIRST_IN_HASH_ORDER, "gone"),
    ] {
        let args = scram(name, password);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.kafka_tool("kafka.admin.ConfigCommand", &args)
            .await
            .unwrap_or_else(|e| panic!("creating user {name}: {e:#}"));
    }
    env.kafka_tool(
        "kafka.admin.ConfigCommand",
        &[
            "--alter",
            "--entity-type",
            "users",
            "--entity-name",
            FIRST_IN_HASH_ORDER,
            "--delete-config",
            "SCRAM-SHA-512",
        ],
    )
    .await
    .expect("deleting the probe user");
    // Both checks pass before the restart: what follows can only fail by the restart.
    eventually(
        Duration::from_secs(30),
        "the kept user authenticates",
        || {
            let env = &env;
            let (kept, kept_password) = (kept.clone(), kept_password.clone());
            async move { env.authenticates(&kept, &kept_password).await.ok() }
        },
    )
    .await;
    assert!(
        env.authenticates(FIRST_IN_HASH_ORDER, "gone")
            .await
            .is_err(),
        "the deleted user still authenticates"
    );

    // Every broker in turn, so each one replays its own log.
    for id in 1..=env.info.kafka_brokers {
        let name = eventops_devenv::launch::kafka_proc_name(env.info.kafka_brokers, id);
        let info = env.info.clone();
        tokio::task::spawn_blocking(move || {
            info.fault(&name, Fault::Stop)
                .unwrap_or_else(|e| panic!("stopping {name}: {e:#}"));
            info.fault(&name, Fault::Start)
                .unwrap_or_else(|e| panic!("starting {name}: {e:#}"));
        })
        .await
        .unwrap();
        println!("broker {id} restarted");
        // Kafka's own client as the super user, then the kept user through librdkafka.
        eventually(
            Duration::from_secs(90),
            "the super user authenticates",
            || {
                let env = &env;
                async move {
                    env.kafka_tool("org.apache.kafka.tools.TopicCommand", &["--list"])
                        .await
                        .map_err(|e| println!("after restarting broker {id}: {e:#}"))
                        .ok()
                }
            },
        )
        .await;
        assert_eq!(
            env.authenticates(&kept, &kept_password).await,
            Ok(()),
            "the kept user after restarting broker {id}"
        );
    }
}
