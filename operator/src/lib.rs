//! EventOps operator: reconciles `EventTopic`s into Kafka topics (and, in later stages,
//! `ConsumerGroup`s into workers, credentials and ACLs).
//!
//! Each reconciler follows the same pipeline: dereference (read Kubernetes and Kafka) →
//! validate and build the desired state (pure, unit-tested) → apply → status.

pub mod autoscaler;
pub mod backoff;
pub mod cli;
pub mod conditions;
pub mod config;
pub mod consumergroup;
pub mod context;
pub mod error;
pub mod eventtopic;
pub mod finalizer;
pub mod kafka;
pub mod leader;
pub mod policy;
pub mod redrive;
pub mod replay;
pub mod status;
pub mod telemetry;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use context::{Context, Settings};
use kafka::KafkaAdmin;

/// The one field manager for every server-side apply and the Event reporter name.
pub const FIELD_MANAGER: &str = "eventops-operator";

/// Runs every controller with `client` until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    config: &config::RunConfig,
    metrics: Arc<telemetry::Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let kafka = KafkaAdmin::new(&config.kafka_settings()?, metrics.clone())?;
    // Say which cluster this is, without holding up the controllers when Kafka is down:
    // they retry it on their own.
    metrics.kafka_request("DescribeCluster");
    let native = kafka.native();
    tokio::spawn(async move {
        match native.describe_cluster().await {
            Ok(c) => tracing::info!(
                cluster_id = c.cluster_id,
                controller = c.controller,
                brokers = c.nodes.len(),
                "connected to Kafka"
            ),
            Err(error) => tracing::warn!(%error, "cannot describe the Kafka cluster"),
        }
    });
    let settings = Settings {
        namespace: config.namespace.clone(),
        resync_interval: config.resync_interval.into(),
        topic_naming: config.topic_naming()?,
        namespace_policy: config.namespace_policy()?,
        worker_kafka: consumergroup::worker_kafka(config),
        max_concurrent_reconciles: config.max_concurrent_reconciles,
    };
    // A resync may act on a reading up to a grid step old: the resyncs of one grid step
    // share one snapshot of Kafka's state.
    let kafka = kafka.with_snapshot_age(settings.grid_step());
    let ns = settings.namespace.as_deref();
    // One watch and one cache per kind, shared by every controller and the autoscaler.
    let mut topics = watch::SharedWatch::new(context::watched_api(&client, ns), Default::default());
    let mut groups = watch::SharedWatch::new(context::watched_api(&client, ns), Default::default());
    let mut deployments = watch::SharedWatch::new(
        context::watched_api(&client, ns),
        kube::runtime::watcher::Config::default().labels(consumergroup::build::GROUP_LABEL),
    );
    let eventtopic_triggers = eventtopic::triggers(&mut topics, &mut groups);
    let consumergroup_triggers =
        consumergroup::triggers(&mut groups, &mut topics, &mut deployments);
    let caches = context::Caches {
        topics: topics.store(),
        groups: groups.store(),
        deployments: deployments.store(),
    };
    let watches = [topics.spawn(), groups.spawn(), deployments.spawn()];
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    // Every reconcile reads the caches; until they have listed everything, an
    // EventTopic not yet in them would look missing and its groups' grants would be
    // revoked. Waited for here, once: kube's `Store::wait_until_ready` wakes only the
    // last of several tasks waiting at once, so reconciles must not wait on it.
    let ready = async {
        listed(&caches.topics, "eventtopics.eventops.dev").await;
        listed(&caches.groups, "consumergroups.eventops.dev").await;
        listed(&caches.deployments, "deployments.apps").await;
        // Ready (`/readyz`) once the controllers run, not before.
        metrics
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::select! {
        () = ready => {}
        () = shutdown.clone() => {
            for watch in watches {
                watch.abort();
            }
            return Ok(());
        }
    }
    let ctx = Arc::new(Context::new(client, kafka, settings, metrics, caches));
    tokio::join!(
        eventtopic::run(ctx.clone(), eventtopic_triggers, shutdown.clone()),
        consumergroup::run(ctx.clone(), consumergroup_triggers, shutdown.clone()),
        redrive::run(ctx.clone(), config.kafka_settings()?, shutdown.clone()),
        replay::run(ctx.clone(), shutdown.clone()),
        autoscaler::run(
            ctx,
            config.kafka_settings()?,
            config.autoscale_interval.into(),
            shutdown
        ),
    );
    for watch in watches {
        watch.abort();
    }
    Ok(())
}

/// Waits until `store` has listed its kind, saying every 30 s while it has not: until
/// then no controller runs, and the usual cause is a missing CRD or a missing `list` or
/// `watch` permission, which the watch only logs as it retries.
async fn listed<K>(store: &kube::runtime::reflector::Store<K>, kind: &str)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut waited = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), store.wait_until_ready()).await {
            Ok(_) => return,
            Err(_) => {
                waited += 30;
                tracing::error!(
                    "{kind} not listed after {waited} s: no controller runs until it is; check \
                     that the CRD is installed and that the operator may list and watch {kind} \
                     (the chart's ClusterRole)"
                );
            }
        }
    }
}
