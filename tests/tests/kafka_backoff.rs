//! With the Kafka broker down, an EventTopic's reconcile is retried on a back-off of its
//! own that grows, not at a fixed interval; it still says why in its Ready condition, and
//! once the broker is back it becomes Ready without waiting for the back-off's cap.
//!
//! The broker is stopped with the environment's `fault` command, so this test has a
//! binary of its own: no other test runs while Kafka is down.

use std::time::{Duration, Instant};

use eventops_crds::EventTopic;
use eventops_devenv::Fault;
use eventops_tests::{TestEnv, apply, env, eventually, unique};
use kube::Api;
use serde_json::json;

/// How long the broker stays down while reconcile attempts are timed.
const OUTAGE: Duration = Duration::from_secs(100);

/// Every broker of the environment, stopped until this is dropped (also when the test
/// fails): the tests after it need Kafka.
/// The environment, and whether the brokers were started again.
struct BrokersDown(eventops_devenv::EnvInfo, bool);

impl BrokersDown {
    fn names(&self) -> Vec<String> {
        let n = self.0.kafka_brokers;
        (1..=n)
            .map(|id| eventops_devenv::launch::kafka_proc_name(n, id))
            .collect()
    }

    async fn stop(env: &TestEnv) -> Self {
        let down = Self(env.info.clone(), false);
        let (info, names) = (down.0.clone(), down.names());
        tokio::task::spawn_blocking(move || {
            for name in names {
                info.fault(&name, Fault::Stop)
                    .unwrap_or_else(|e| panic!("stopping {name}: {e:#}"));
            }
        })
        .await
        .unwrap();
        down
    }

    fn start(&mut self) {
        if std::mem::replace(&mut self.1, true) {
            return;
        }
        for name in self.names() {
            if let Err(e) = self.0.fault(&name, Fault::Start) {
                eprintln!("starting {name}: {e:#}");
            }
        }
    }
}

impl Drop for BrokersDown {
    fn drop(&mut self) {
        tokio::task::block_in_place(|| self.start());
    }
}

/// The EventTopic's Ready condition: status, reason, message and generation.
async fn ready(api: &Api<EventTopic>, name: &str) -> Option<(String, String, String, i64)> {
    let et = api.get(name).await.ok()?;
    let c = et
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message, c.observed_generation?))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_broker_down_retries_back_off_and_end_soon_after_it_is_back() {
    let env = env().await;
    env.time_limit(Duration::from_secs(480));
    let ns = env.namespace("backoff").await;
    // No resync: every reconcile comes from the spec change or from a retry.
    let operator = env.start_operator_without_resync(&ns);
    let api: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let name = unique("orders.order-retried");
    apply(&api, &name, json!({"partitions": 1})).await.unwrap();
    eventually(Duration::from_secs(60), "Ready at generation 1", || async {
        let (status, ..) = ready(&api, &name).await?;
        (status == "True").then_some(())
    })
    .await;

    let mut down = BrokersDown::stop(&env).await;
    println!("broker stopped");
    // A spec change the operator must take to Kafka: one reconcile, then retries.
    apply(&api, &name, json!({"partitions": 2})).await.unwrap();
    let started = Instant::now();
    let mut seen = operator.metrics.reconciles("eventtopic");
    let mut attempts = Vec::new();
    while started.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = operator.metrics.reconciles("eventtopic");
        if now > seen {
            attempts.push(started.elapsed());
            seen = now;
        }
    }
    println!("reconcile attempts while Kafka was down, at: {attempts:?}");
    // Kafka's reason is in the condition before the error goes back for a retry.
    let (reason, message) = eventually(
        Duration::from_secs(10),
        "Ready=False at generation 2",
        || async {
            let (status, reason, message, generation) = ready(&api, &name).await?;
            (status == "False" && generation == 2).then_some((reason, message))
        },
    )
    .await;
    println!("Ready=False {reason}: {message}");
    assert!(message.contains("Kafka"), "{reason}: {message}");

    // Each attempt waits for Kafka's request timeout, then for the back-off: the gaps
    // between attempts grow, where a fixed retry interval keeps them equal.
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    println!("gaps: {gaps:?}");
    assert!(gaps.len() >= 3, "too few attempts to compare: {attempts:?}");
    let (first, last) = (gaps[0], gaps[gaps.len() - 1]);
    assert!(
        last >= first * 3 / 2 && last >= first + Duration::from_secs(8),
        "the retries do not back off: gaps {gaps:?}"
    );

    let back = Instant::now();
    tokio::task::block_in_place(|| down.start());
    println!("broker started again");
    eventually(
        Duration::from_secs(200),
        "Ready at generation 2 once Kafka is back",
        || async {
            let (status, _, _, generation) = ready(&api, &name).await?;
            (status == "True" && generation == 2).then_some(())
        },
    )
    .await;
    let recovered = back.elapsed();
    println!("Ready {recovered:?} after the broker was started again");
    assert_eq!(env.describe_topic(&name).await.unwrap().partitions, 2);
    // The back-off grows up to its cap, and was well short of it when Kafka came back.
    assert!(recovered < Duration::from_secs(180), "{recovered:?}");
}
