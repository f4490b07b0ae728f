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
use eventops_tests::{authenticates, env, eventually, unique};

/// A user name starting with `prefix` that Java's `HashMap` puts in bucket 0 of any
/// table up to 4,096 entries (its `String.hashCode`, spread as `HashMap` spreads it,
/// ends in 12 zero bits): a replay meets its removal before the records of users in
/// other buckets (on a shared environment, an older user in bucket 0 may come first).
fn first_in_hash_order(prefix: &str) -> String {
    let java_hash = |s: &str| {
        s.encode_utf16()
            .fold(0u32, |h, c| h.wrapping_mul(31).wrapping_add(u32::from(c)))
    };
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|name| {
            let h = java_hash(name);
            (h ^ (h >> 16)) & 0xfff == 0
        })
        .expect("some suffix")
}

/// Kafka's ConfigCommand as the super user: `args` after `--alter --entity-type users
/// --entity-name <user>`.
async fn config_user(env: &eventops_tests::TestEnv, user: &str, args: &[&str]) {
    let mut all = vec!["--alter", "--entity-type", "users", "--entity-name", user];
    all.extend_from_slice(args);
    env.kafka_tool("kafka.admin.ConfigCommand", &all)
        .await
        .unwrap_or_else(|e| panic!("ConfigCommand {all:?}: {e:#}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_keeps_every_scram_credential_after_a_user_is_deleted() {
    let env = env().await;
    env.time_limit(Duration::from_secs(300));
    let kept = unique("restart-kept");
    let kept_password = format!("pw-{kept}");
    let probe = first_in_hash_order(&unique("restart-probe"));
    for (user, password) in [(&kept, kept_password.as_str()), (&probe, "gone")] {
        let credential = format!("SCRAM-SHA-512=[iterations=4096,password={password}]");
        config_user(&env, user, &["--add-config", &credential]).await;
    }
    config_user(&env, &probe, &["--delete-config", "SCRAM-SHA-512"]).await;
    // Both checks pass before the restart: what follows can only fail by the restart.
    eventually(
        Duration::from_secs(30),
        "the kept user authenticates",
        || {
            let (env, kept, kept_password) = (&env, &kept, &kept_password);
            async move { env.authenticates(kept, kept_password).await.ok() }
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the deleted user is refused",
        || {
            let (env, probe) = (&env, &probe);
            async move { env.authenticates(probe, "gone").await.err() }
        },
    )
    .await;

    // Every broker in turn, so each one replays its own log, checked at that broker
    // alone (the bootstrap list names the brokers in node id order): another broker
    // would answer for one that lost its credentials.
    let brokers: Vec<&str> = env.info.kafka_bootstrap.split(',').collect();
    assert_eq!(brokers.len(), env.info.kafka_brokers, "{brokers:?}");
    for (id, broker) in (1..).zip(brokers) {
        let mut at_broker = env.info.clone();
        at_broker.kafka_bootstrap = broker.to_string();
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
                let at_broker = at_broker.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        at_broker.kafka_tool("org.apache.kafka.tools.TopicCommand", &["--list"])
                    })
                    .await
                    .unwrap()
                    .map_err(|e| println!("after restarting broker {id}: {e:#}"))
                    .ok()
                }
            },
        )
        .await;
        assert_eq!(
            authenticates(&at_broker, &kept, &kept_password).await,
            Ok(()),
            "the kept user after restarting broker {id}"
        );
    }
}
