//! Custom resource types of EventOps, API group `eventops.dev`, version `v1alpha1`.
//!
//! - [`EventTopic`]: a Kafka topic with its configs and dead-letter topic.
//! - [`ConsumerGroup`]: a Kafka consumer group, the workers that form it, and how they
//!   process records and scale.
//! - [`Redrive`]: moves dead-lettered records back to their topic, each exactly once.
//! - [`Replay`]: rewinds a ConsumerGroup's committed offsets while it is held at 0.
//!
//! The CRD manifests in `crds/generated/` are produced by [`crd_manifests`] (through
//! `eventops-operator crd --out-dir crds/generated`); a test fails when they drift.

mod consumer_group;
mod event_topic;
mod redrive;
mod replay;

pub use consumer_group::*;
pub use event_topic::*;
pub use redrive::*;
pub use replay::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every EventOps resource.
pub const GROUP: &str = "eventops.dev";

/// Every EventOps CustomResourceDefinition.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        EventTopic::crd(),
        ConsumerGroup::crd(),
        Redrive::crd(),
        Replay::crd(),
    ]
}

/// `(file name, YAML)` for each CRD, as committed in `crds/generated/`.
pub fn crd_manifests() -> Vec<(String, String)> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml_ng::to_string(&crd).expect("a CRD always serializes to YAML");
            (format!("{name}.yaml"), yaml)
        })
        .collect()
}
