//! End to end (issue 4): a burst of events on a topic with N partitions; the
//! ConsumerGroup's workers really run (pods run by the node agent, with the group's own
//! SCRAM credentials and ACLs from the operator), the autoscaler scales them out to at
//! most N, the lag drains, the group scales back in after the stabilization window, and
//! every event produced was processed: none lost, each effect exactly once.

use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic};
use eventops_operator::consumergroup::build::GROUP_LABEL;
use eventops_tests::e2e::{Database, Sample, Sampler, kafka_group_lag, produce_burst, timeline};
use eventops_tests::pods::{is_ready, wait_pods};
use eventops_tests::{apply, env, eventually, unique, wait_ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;

const PARTITIONS: i32 = 4;
const BURST: usize = 2000;
/// Events produced while the group scales in: their partitions move from stopping
/// workers to the one that stays.
const DURING_SCALE_IN: usize = 100;
const LAG_PER_REPLICA: i64 = 100;
const WINDOW: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_scales_the_workers_out_to_the_partitions_and_back_in_losing_nothing() {
    let started = Instant::now();
    let env = env().await;
    let ns = env.namespace("e2e-autoscale").await;
    let operator = env.start_operator(&ns);
    let db = Database::create(&env.info, &unique("e2e_autoscale").replace('-', "_")).await;

    let topics: Api<EventTopic> = Api::namespaced(env.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(env.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let topic = unique("e2e.work.queued");
    apply(
        &topics,
        "work",
        json!({"partitions": PARTITIONS, "topicName": topic}),
    )
    .await
    .unwrap();
    wait_ready(&topics, "work", "True").await;
    let group_id = unique("e2e-workers");
    apply(
        &groups,
        "workers",
        json!({
            "groupId": group_id,
            "topics": ["work"],
            "template": {
                "image": "ghcr.io/eventops/e2e-worker:test",
                "env": [
                    {"name": "E2E_DATABASE_URL", "value": db.url},
                    {"name": "E2E_WORK_MS", "value": "10"},
                ],
            },
            // maxReplicas above the partition count: the partitions are the cap.
            "scaling": {"minReplicas": 1, "maxReplicas": 10, "lagPerReplica": LAG_PER_REPLICA,
                        "scaleDownStabilization": "10s", "scaleUpInterval": "2s"},
        }),
    )
    .await
    .unwrap();
    wait_ready(&groups, "workers", "True").await;
    let selector = format!("{GROUP_LABEL}=workers");
    wait_pods(
        &pods,
        &selector,
        Duration::from_secs(60),
        "1 worker Ready",
        |p| p.len() == 1 && p.iter().all(is_ready),
    )
    .await;
    let setup = started.elapsed();

    let sampler = Sampler::start(&env, &operator, &ns, "workers", &selector);
    let burst_start = sampler.now();
    let mut produced = produce_burst(&env.info, &topic, PARTITIONS, "burst", BURST).await;
    let burst_end = sampler.now();

    // The first sample after `after` that passes `check`.
    let wait_samples =
        |what: &'static str, timeout: Duration, after: Duration, check: fn(&Sample) -> bool| {
            let sampler = &sampler;
            async move {
                eventually(timeout, what, || async {
                    sampler
                        .samples()
                        .into_iter()
                        .find(|s| s.at > after && check(s))
                })
                .await
            }
        };
    // Out: replicas above 1 as soon as the operator sees the lag.
    let scaled_out = wait_samples(
        "replicas above 1",
        Duration::from_secs(30),
        burst_end,
        |s| s.replicas > Some(1),
    )
    .await;
    wait_samples(
        "more than one worker Ready",
        Duration::from_secs(30),
        burst_end,
        |s| s.ready > 1,
    )
    .await;

    // Drained: every event's effect is in the database and the operator sees lag 0.
    let expected: std::collections::BTreeSet<String> = produced.iter().cloned().collect();
    eventually(
        Duration::from_secs(60),
        "every burst event processed",
        || async { (db.processed().await == expected).then_some(()) },
    )
    .await;
    let drained = wait_samples(
        "the operator measuring lag 0",
        Duration::from_secs(30),
        scaled_out.at,
        |s| s.lag == Some(0),
    )
    .await;

    // In: replicas go down only after the window. Events produced meanwhile are handed
    // over from the stopping workers.
    let (max_replicas, first_down) =
        eventually(Duration::from_secs(40), "replicas going down", || async {
            let samples = sampler.samples();
            let max = samples.iter().filter_map(|s| s.replicas).max()?;
            samples
                .iter()
                .skip_while(|s| s.replicas != Some(max))
                .find(|s| s.replicas.is_some_and(|r| r < max))
                .map(|s| (max, s.at))
        })
        .await;
    produced.extend(produce_burst(&env.info, &topic, PARTITIONS, "late", DURING_SCALE_IN).await);
    let scaled_in = eventually(Duration::from_secs(60), "back to 1 worker", || async {
        sampler
            .samples()
            .into_iter()
            .find(|s| s.at > first_down && s.replicas == Some(1) && s.pods == 1 && s.ready == 1)
    })
    .await;
    let expected: std::collections::BTreeSet<String> = produced.iter().cloned().collect();
    eventually(Duration::from_secs(30), "every event processed", || async {
        (db.processed().await == expected).then_some(())
    })
    .await;
    // Kafka's own view: everything committed, lag 0 on every partition.
    let per_partition = (produced.len() / PARTITIONS as usize) as i64;
    let offsets = eventually(Duration::from_secs(30), "Kafka reports lag 0", || async {
        let offsets = kafka_group_lag(&env, &group_id, &topic).await;
        (offsets.len() == PARTITIONS as usize
            && offsets
                .values()
                .all(|p| p.committed == Some(p.log_end) && p.log_end == per_partition))
        .then_some(offsets)
    })
    .await;
    // The status records the decision back to minReplicas (its lag figures are
    // refreshed with decisions or every 30 s; the live figure is the metric sampled).
    eventually(Duration::from_secs(20), "status: desired 1", || async {
        let status = groups.get("workers").await.ok()?.status?;
        let last = status.last_scale?;
        (status.desired_replicas == Some(1) && last.to == 1 && last.from > 1).then_some(())
    })
    .await;
    let samples = sampler.stop();
    let total = started.elapsed();

    println!(
        "timeline (burst {burst_start:.1?}..{burst_end:.1?}):\n{}",
        timeline(&samples)
    );
    let all_ready = samples
        .iter()
        .find(|s| s.at > burst_end && s.ready == PARTITIONS as usize)
        .map(|s| s.at - burst_end);
    let runs = db.runs_per_pod().await;
    let handler_runs: i64 = runs.values().sum();
    println!(
        "figures: setup {setup:.1?}; burst of {BURST} produced in {:.1?}; burst end -> \
         replicas {:?} in {:.1?}; max replicas {max_replicas}, all Ready after {all_ready:.1?}; burst end -> lag 0 in {:.1?}; \
         lag 0 -> first scale-in {:.1?}; back to 1 worker at {:.1?}; {} events, {handler_runs} \
         handler runs ({} repeated, rolled back), runs per pod {runs:?}; Kafka {offsets:?}; \
         test {total:.1?}",
        burst_end - burst_start,
        scaled_out.replicas.unwrap(),
        scaled_out.at - burst_end,
        drained.at - burst_end,
        first_down.saturating_sub(drained.at),
        scaled_in.at,
        produced.len(),
        handler_runs - produced.len() as i64,
    );

    // Out to the partition count and never beyond it, though maxReplicas is 10.
    let most = samples.iter().filter_map(|s| s.replicas).max().unwrap();
    assert_eq!(
        most,
        PARTITIONS,
        "replicas peaked at {most}:\n{}",
        timeline(&samples)
    );
    let most_ready = samples.iter().map(|s| s.ready).max().unwrap();
    assert!(
        most_ready > 1,
        "ready pods never followed:\n{}",
        timeline(&samples)
    );
    assert!(
        samples.iter().all(|s| s.pods <= PARTITIONS as usize),
        "more pods than partitions:\n{}",
        timeline(&samples)
    );
    // In only after the window: the last cycle that wanted the peak saw lag above
    // (peak - 1) × lagPerReplica; the first step down comes a window later.
    let last_peak_lag = samples
        .iter()
        .filter(|s| {
            s.lag
                .is_some_and(|l| l > (most as i64 - 1) * LAG_PER_REPLICA)
        })
        .map(|s| s.at)
        .max()
        .expect("a sample with the peak's lag");
    assert!(
        first_down >= last_peak_lag + WINDOW - Duration::from_secs(2),
        "scaled in at {first_down:.1?}, inside the {WINDOW:?} window after lag seen at \
         {last_peak_lag:.1?}:\n{}",
        timeline(&samples)
    );
    // None lost (checked above), each effect exactly once.
    let repeated = db.repeated_effects().await;
    assert!(repeated.is_empty(), "effects applied twice: {repeated:?}");
    assert!(handler_runs >= produced.len() as i64);
    let reasons = env.event_reasons(&ns, "workers").await;
    assert!(reasons.iter().any(|r| r == "ScaledUp"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "ScaledDown"), "{reasons:?}");

    // Every worker scaled in stopped cleanly on SIGTERM (finished and committed).
    let remaining: Vec<String> = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let stopped: Vec<&String> = runs.keys().filter(|p| !remaining.contains(p)).collect();
    assert!(
        !stopped.is_empty(),
        "no worker that processed events was scaled in: {runs:?}"
    );
    for pod in stopped {
        let log = env
            .info
            .state_dir
            .join("pods")
            .join(format!("{ns}_{pod}"))
            .join("worker.log");
        let text = std::fs::read_to_string(&log)
            .unwrap_or_else(|e| panic!("reading {}: {e}", log.display()));
        assert!(
            text.contains("e2e worker stopped cleanly"),
            "{pod} did not stop cleanly:\n{text}"
        );
    }

    // The pods connected as the group's own Kafka user, from the operator's Secret.
    let deployment = deployments.get("workers").await.unwrap();
    let container = &deployment.spec.template.spec.unwrap().containers[0];
    let user = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "EVENTOPS_KAFKA_USERNAME")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .expect("the Kafka user comes from a Secret");
    assert_eq!(user.name, "workers-kafka");

    // Clean up while the operator runs: the group's Deployment and pods go with it.
    groups.delete("workers", &Default::default()).await.unwrap();
    wait_pods(
        &pods,
        &selector,
        Duration::from_secs(60),
        "no pods left",
        |p| p.is_empty(),
    )
    .await;
}
