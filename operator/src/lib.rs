//! EventOps operator: reconciles `EventTopic`s into Kafka topics (and, in later stages,
//! `ConsumerGroup`s into workers, credentials and ACLs).
//!
//! Each reconciler follows the same pipeline: dereference (read Kubernetes and Kafka) →
//! validate and build the desired state (pure, unit-tested) → apply → status.

pub mod autoscaler;
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

use std::sync::Arc;

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
    // One ConsumerGroup cache for every reader (EventTopic status lists consumers).
    let (groups, writer) = kube::runtime::reflector::store();
    let groups_api = match &settings.namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    };
    let reflector = kube::runtime::reflector(
        writer,
        kube::runtime::watcher(groups_api, Default::default()),
    );
    let reflector = tokio::spawn(futures::StreamExt::for_each(
        kube::runtime::WatchStreamExt::default_backoff(reflector),
        |_| async {},
    ));
    let ctx = Arc::new(Context::new(client, kafka, settings, metrics, groups));
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    tokio::join!(
        eventtopic::run(ctx.clone(), shutdown.clone()),
        consumergroup::run(ctx.clone(), shutdown.clone()),
        redrive::run(ctx.clone(), config.kafka_settings()?, shutdown.clone()),
        replay::run(ctx.clone(), shutdown.clone()),
        autoscaler::run(
            ctx,
            config.kafka_settings()?,
            config.autoscale_interval.into(),
            shutdown
        ),
    );
    reflector.abort();
    Ok(())
}
