//! EventTopic reconciler: dereference (read Kafka) → validate and build ([`plan`], pure)
//! → apply (Kafka admin calls) → status (conditions, Events on transitions).

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use eventops_crds::{EventTopic, EventTopicStatus};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use crate::conditions::{self, Observed, READY};
use crate::context::Context;
use crate::error::Error;
use crate::kafka::{KafkaError, TopicState};
use plan::{DesiredTopic, Plan, Step};

/// Runs the EventTopic controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<EventTopic> = ctx.api_for_watch();
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "eventtopic reconcile failed");
            }
        })
        .await;
}

/// What one pass found and did, before it becomes status.
struct Outcome {
    ready: Observed,
    main: Option<TopicState>,
    /// Changes made in Kafka, each becoming a Normal Event: (reason, note).
    changes: Vec<(&'static str, String)>,
    /// When to look again.
    requeue: Duration,
}

async fn reconcile(et: Arc<EventTopic>, ctx: Arc<Context>) -> Result<Action, Error> {
    let outcome = match plan::desired_topics(&et) {
        Err(invalid) => Outcome {
            ready: Observed::ready(false, "InvalidSpec", invalid.0),
            main: None,
            changes: vec![],
            requeue: ctx.settings.resync_interval,
        },
        Ok(topics) => sync(&topics, &ctx).await,
    };
    write_status(&et, &ctx, &outcome).await?;
    for (reason, note) in &outcome.changes {
        ctx.event(&*et, EventType::Normal, reason, "Reconcile", note.clone())
            .await;
    }
    Ok(Action::requeue(outcome.requeue))
}

/// Brings each desired topic in Kafka to its spec, stopping at the first that cannot be.
async fn sync(topics: &[DesiredTopic], ctx: &Context) -> Outcome {
    let mut changes = Vec::new();
    let mut main = None;
    for (i, desired) in topics.iter().enumerate() {
        let result = sync_one(desired, ctx, &mut changes).await;
        match result {
            Ok(state) if i == 0 => main = state,
            Ok(_) => {}
            Err(Refusal::NotSupported(message)) => {
                return Outcome {
                    ready: Observed::ready(false, "NotSupported", message),
                    main,
                    changes,
                    requeue: ctx.settings.resync_interval,
                };
            }
            Err(Refusal::Kafka(e)) => {
                let requeue = match e {
                    KafkaError::Unavailable { .. } => Duration::from_secs(5),
                    KafkaError::Refused { .. } => ctx.settings.resync_interval,
                };
                return Outcome {
                    ready: Observed::ready(false, e.reason(), e.to_string()),
                    main,
                    changes,
                    requeue,
                };
            }
        }
    }
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    Outcome {
        ready: Observed::ready(
            true,
            "InSync",
            format!("Kafka topics {} match the spec", names.join(", ")),
        ),
        main,
        changes,
        requeue: ctx.settings.resync_interval,
    }
}

enum Refusal {
    NotSupported(String),
    Kafka(KafkaError),
}

/// Dereference, diff and apply one topic. Returns the topic's state after the changes.
async fn sync_one(
    desired: &DesiredTopic,
    ctx: &Context,
    changes: &mut Vec<(&'static str, String)>,
) -> Result<Option<TopicState>, Refusal> {
    let actual = ctx
        .kafka
        .describe_topic(&desired.name)
        .await
        .map_err(Refusal::Kafka)?;
    let steps = match plan::plan(desired, actual.as_ref()) {
        Plan::NotSupported(message) => return Err(Refusal::NotSupported(message)),
        Plan::Apply(steps) => steps,
    };
    let mut state = actual;
    for step in steps {
        match step {
            Step::Create(spec) => {
                ctx.kafka
                    .create_topic(&spec)
                    .await
                    .map_err(Refusal::Kafka)?;
                info!(topic = %spec.name, partitions = spec.partitions, "created Kafka topic");
                changes.push((
                    "TopicCreated",
                    format!(
                        "created Kafka topic {} with {} partitions",
                        spec.name, spec.partitions
                    ),
                ));
                state = Some(TopicState {
                    partitions: spec.partitions,
                    // Unknown until Kafka is asked again when the broker picked it.
                    replication_factor: spec.replication_factor.unwrap_or(0),
                    configs: spec.configs,
                });
            }
            Step::AddPartitions { topic, to } => {
                ctx.kafka
                    .create_partitions(&topic, to)
                    .await
                    .map_err(Refusal::Kafka)?;
                info!(%topic, to, "added partitions");
                changes.push((
                    "PartitionsAdded",
                    format!("raised {topic} to {to} partitions"),
                ));
                if let Some(s) = state.as_mut() {
                    s.partitions = to;
                }
            }
            Step::ReplaceConfigs {
                topic,
                configs,
                changed,
            } => {
                ctx.kafka
                    .replace_configs(&topic, &configs)
                    .await
                    .map_err(Refusal::Kafka)?;
                info!(%topic, ?changed, "corrected topic configs");
                changes.push((
                    "ConfigsUpdated",
                    format!("set configs of {topic} to the spec: {}", changed.join(", ")),
                ));
                if let Some(s) = state.as_mut() {
                    s.configs = configs;
                }
            }
        }
    }
    Ok(state)
}

/// Writes status when it differs from what is stored, and an Event when Ready changes.
async fn write_status(et: &EventTopic, ctx: &Context, outcome: &Outcome) -> Result<(), Error> {
    let old = et.status.clone().unwrap_or_default();
    let generation = et.metadata.generation;
    let conditions = conditions::set(
        &old.conditions,
        outcome.ready.clone(),
        generation,
        Timestamp::now(),
    );
    let new = EventTopicStatus {
        observed_generation: generation,
        conditions,
        topic_name: Some(et.kafka_topic_name().to_string()),
        partitions: outcome
            .main
            .as_ref()
            .map(|s| s.partitions)
            .or(old.partitions),
        replication_factor: outcome
            .main
            .as_ref()
            .map(|s| s.replication_factor)
            .filter(|rf| *rf > 0)
            .or(old.replication_factor),
    };
    if new == old {
        return Ok(());
    }
    let api: Api<EventTopic> =
        Api::namespaced(ctx.client.clone(), &et.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": EventTopic::api_version(&()),
        "kind": EventTopic::kind(&()),
        "status": new,
    });
    api.patch_status(
        &et.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Kube {
        action: "write status of",
        object: format!(
            "EventTopic {}/{}",
            et.namespace().unwrap_or_default(),
            et.name_any()
        ),
        source,
    })?;

    let was =
        conditions::find(&old.conditions, READY).map(|c| (c.status.as_str(), c.reason.as_str()));
    let now = (
        if outcome.ready.status {
            "True"
        } else {
            "False"
        },
        outcome.ready.reason.as_str(),
    );
    if was != Some(now) {
        let type_ = if outcome.ready.status {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(
            et,
            type_,
            &outcome.ready.reason,
            "Reconcile",
            outcome.ready.message.clone(),
        )
        .await;
    }
    Ok(())
}

fn error_policy(et: Arc<EventTopic>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(eventtopic = %et.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
