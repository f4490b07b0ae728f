//! What every reconcile shares: clients, settings, the Event recorder.

use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use tracing::warn;

use crate::kafka::KafkaAdmin;
use crate::telemetry::Metrics;

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only watch this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// How often an unchanged resource is checked against Kafka (drift correction).
    pub resync_interval: Duration,
    /// Pattern Kafka topic names are expected to follow; `None` for no policy.
    pub topic_naming: Option<regex::Regex>,
    /// Which names each namespace may own.
    pub namespace_policy: crate::policy::NamespacePolicy,
    /// How worker pods reach Kafka.
    pub worker_kafka: crate::consumergroup::build::WorkerKafka,
}

/// Shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Kafka admin client.
    pub kafka: KafkaAdmin,
    /// Settings.
    pub settings: Settings,
    /// Prometheus metrics.
    pub metrics: std::sync::Arc<Metrics>,
    /// Every ConsumerGroup the operator watches, kept current by a reflector.
    pub groups: kube::runtime::reflector::Store<eventops_crds::ConsumerGroup>,
    recorder: Recorder,
}

impl Context {
    /// A context whose Events are reported as `eventops-operator`.
    pub fn new(
        client: Client,
        kafka: KafkaAdmin,
        settings: Settings,
        metrics: std::sync::Arc<Metrics>,
        groups: kube::runtime::reflector::Store<eventops_crds::ConsumerGroup>,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            kafka,
            settings,
            metrics,
            groups,
        }
    }

    /// The API to watch `K` through: one namespace or all.
    pub fn api_for_watch<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.settings.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Publishes an Event about `obj`. A failure is logged, not returned: Events are
    /// best effort and must not fail a reconcile.
    pub async fn event<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        self.metrics.kube_write("Event");
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish Event");
        }
    }
}
