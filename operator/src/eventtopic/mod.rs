//! EventTopic reconciler: dereference (read Kafka) → validate and build ([`plan`], pure)
//! → apply (Kafka admin calls) → status (conditions, Events on transitions).

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use eventops_crds::{
    ConsumerGroup, DeletionPolicy, EventTopic, EventTopicStatus, RELEASE_FINALIZER_ANNOTATION,
    TOPIC_FINALIZER, annotation_is_true,
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::conditions::{self, Observed, READY};
use crate::context::Context;
use crate::error::Error;
use crate::kafka::{KafkaError, TopicState};
use plan::{DesiredTopic, Plan, Step};

/// Condition type set while the paused annotation stops reconciliation.
pub const PAUSED: &str = "Paused";
/// Condition type that says whether the topic name follows the naming policy.
pub const NAMING_POLICY: &str = "NamingPolicy";

/// What the EventTopic reconciler works with.
struct Ctx {
    shared: Arc<Context>,
    /// Every EventTopic the operator watches, for ownership conflicts.
    topics: Store<EventTopic>,
}

/// Runs the EventTopic controller until `shutdown` resolves.
pub async fn run(shared: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<EventTopic> = shared.api_for_watch();
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let ctx = Arc::new(Ctx {
        shared,
        topics: controller.store(),
    });
    controller
        // Status lists consumers: a ConsumerGroup change revisits the topics it names.
        .watches(
            ctx.shared.api_for_watch::<ConsumerGroup>(),
            watcher::Config::default(),
            |cg| {
                let ns = cg.namespace().unwrap_or_default();
                let names = cg.spec.topics.clone();
                names
                    .into_iter()
                    .map(move |t| ObjectRef::new(&t).within(&ns))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "eventtopic reconcile failed");
            }
        })
        .await;
}

/// A change made in Kafka, to be told in an Event.
struct Change {
    type_: EventType,
    reason: &'static str,
    note: String,
}

/// What one pass found and did, before it becomes status.
struct Outcome {
    /// New Ready condition; `None` leaves it as it is (while paused).
    ready: Option<Observed>,
    paused: bool,
    main: Option<TopicState>,
    changes: Vec<Change>,
    /// When to look again; `None` waits for a change of the resource.
    requeue: Option<Duration>,
}

impl Outcome {
    fn not_ready(reason: &str, message: String, requeue: Duration) -> Self {
        Self {
            ready: Some(Observed::ready(false, reason, message)),
            paused: false,
            main: None,
            changes: vec![],
            requeue: Some(requeue),
        }
    }
}

async fn reconcile(et: Arc<EventTopic>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let (action, failure) = reconcile_inner(&et, &ctx).await?;
    let metrics = &ctx.shared.metrics;
    metrics.reconciled("eventtopic", started.elapsed(), failure.as_deref());
    Ok(action)
}

/// One reconcile; returns what to do next and, when not Ready, why.
async fn reconcile_inner(
    et: &Arc<EventTopic>,
    ctx: &Ctx,
) -> Result<(Action, Option<String>), Error> {
    ctx.topics.wait_until_ready().await.ok();
    if et.metadata.deletion_timestamp.is_some() {
        return Ok((finalize(et, ctx).await?, None));
    }
    let resync = ctx.shared.settings.resync_interval;
    let outcome = if et.is_paused() {
        Outcome {
            ready: None,
            paused: true,
            main: None,
            changes: vec![],
            requeue: None,
        }
    } else {
        set_finalizer(et, &ctx.shared).await?;
        match plan::desired_topics(et) {
            Err(invalid) => Outcome::not_ready("InvalidSpec", invalid.0, resync),
            Ok(topics) => {
                let all = ctx.topics.state();
                match plan::conflict(et, all.iter().map(AsRef::as_ref)) {
                    Some(message) => Outcome::not_ready("ResourceConflict", message, resync),
                    None => sync(&topics, drifted_if_changed(et), &ctx.shared).await,
                }
            }
        }
    };
    write_status(et, &ctx.shared, &outcome).await?;
    for change in outcome.changes {
        let reason = change.reason;
        ctx.shared
            .event(&**et, change.type_, reason, "Reconcile", change.note)
            .await;
    }
    let failure = outcome.ready.filter(|r| !r.status).map(|r| r.reason);
    let action = outcome
        .requeue
        .map_or_else(Action::await_change, Action::requeue);
    Ok((action, failure))
}

/// Whether a change needed now was made outside EventOps: Kafka matched this very
/// generation of the spec before.
fn drifted_if_changed(et: &EventTopic) -> bool {
    let Some(status) = &et.status else {
        return false;
    };
    status.observed_generation == et.metadata.generation
        && conditions::find(&status.conditions, READY).is_some_and(|c| c.status == "True")
}

/// Brings each desired topic in Kafka to its spec, stopping at the first that cannot be.
async fn sync(topics: &[DesiredTopic], drift: bool, ctx: &Context) -> Outcome {
    let resync = ctx.settings.resync_interval;
    let mut changes = Vec::new();
    let mut main = None;
    for (i, desired) in topics.iter().enumerate() {
        match sync_one(desired, drift, ctx, &mut changes).await {
            Ok(state) if i == 0 => main = state,
            Ok(_) => {}
            Err(refusal) => {
                let (reason, message, requeue) = match refusal {
                    Refusal::NotSupported(message) => ("NotSupported".into(), message, resync),
                    Refusal::Kafka(e) => {
                        let requeue = if e.is_transient() {
                            Duration::from_secs(5)
                        } else {
                            resync
                        };
                        (e.reason(), kafka_message(&e), requeue)
                    }
                };
                return Outcome {
                    ready: Some(Observed::ready(false, reason, message)),
                    paused: false,
                    main,
                    changes,
                    requeue: Some(requeue),
                };
            }
        }
    }
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    Outcome {
        ready: Some(Observed::ready(
            true,
            "InSync",
            format!("Kafka topics {} match the spec", names.join(", ")),
        )),
        paused: false,
        main,
        changes,
        requeue: Some(resync),
    }
}

enum Refusal {
    NotSupported(String),
    Kafka(KafkaError),
}

/// Dereference, diff and apply one topic. Returns the topic's state after the changes.
async fn sync_one(
    desired: &DesiredTopic,
    drift: bool,
    ctx: &Context,
    changes: &mut Vec<Change>,
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
    let mut record = |reason: &'static str, note: String| {
        // A change to a spec that Kafka already matched was undone behind our back.
        let (type_, reason, note) = if drift {
            let note = format!("Kafka differed from the spec (changed outside EventOps): {note}");
            (EventType::Warning, "DriftCorrected", note)
        } else {
            (EventType::Normal, reason, note)
        };
        changes.push(Change {
            type_,
            reason,
            note,
        });
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
                record(
                    "TopicCreated",
                    format!(
                        "created Kafka topic {} with {} partitions",
                        spec.name, spec.partitions
                    ),
                );
                // Ask again: the broker may have chosen the replication factor.
                let created = ctx.kafka.describe_topic(&spec.name).await.ok().flatten();
                state = created.or(Some(TopicState {
                    partitions: spec.partitions,
                    replication_factor: spec.replication_factor.unwrap_or(0),
                    configs: spec.configs,
                }));
            }
            Step::AddPartitions { topic, to } => {
                ctx.kafka
                    .create_partitions(&topic, to)
                    .await
                    .map_err(Refusal::Kafka)?;
                info!(%topic, to, "added partitions");
                record(
                    "PartitionsAdded",
                    format!("raised {topic} to {to} partitions"),
                );
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
                info!(%topic, ?changed, "set topic configs");
                record(
                    "ConfigsUpdated",
                    format!("set configs of {topic}: {}", changed.join(", ")),
                );
                if let Some(s) = state.as_mut() {
                    s.configs = configs;
                }
            }
        }
    }
    Ok(state)
}

/// Holds the finalizer exactly while `deletionPolicy: Delete` asks for it, so retained
/// topics never make deletion wait for the operator.
async fn set_finalizer(et: &EventTopic, ctx: &Context) -> Result<(), Error> {
    let want = et.spec.deletion_policy == DeletionPolicy::Delete;
    crate::finalizer::set(&api(et, ctx), et, TOPIC_FINALIZER, want, &ctx.metrics)
        .await
        .map_err(|source| Error::kube("update finalizers of", et, source))
}

/// Kafka's refusal, with the ACL the operator's own user lacks when that is why.
fn kafka_message(e: &crate::kafka::KafkaError) -> String {
    match e {
        crate::kafka::KafkaError::Refused { op, code, .. }
        | crate::kafka::KafkaError::Busy { op, code, .. } => {
            crate::conditions::with_permission_hint(e.to_string(), op, *code)
        }
        crate::kafka::KafkaError::Unavailable { .. } => e.to_string(),
    }
}

/// Deletion: with `deletionPolicy: Delete`, delete the Kafka topics this EventTopic alone
/// asks for, then let the resource go.
async fn finalize(et: &EventTopic, ctx: &Ctx) -> Result<Action, Error> {
    if !et.finalizers().iter().any(|f| f == TOPIC_FINALIZER) {
        return Ok(Action::await_change());
    }
    let released = annotation_is_true(&et.metadata, RELEASE_FINALIZER_ANNOTATION);
    if et.spec.deletion_policy == DeletionPolicy::Delete && !released {
        let all = ctx.topics.state();
        let topics = plan::exclusively_owned(et, all.iter().map(AsRef::as_ref));
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = ctx.shared.kafka.delete_topics(&names).await {
            let message = format!(
                "{}; the resource stays until its topics are deleted. If Kafka is gone for \
                 good, annotate it {RELEASE_FINALIZER_ANNOTATION}=true to let it go",
                kafka_message(&e)
            );
            let outcome = Outcome::not_ready(&e.reason(), message, Duration::from_secs(5));
            write_status(et, &ctx.shared, &outcome).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        info!(topics = ?names, "deleted Kafka topics");
        let note = format!("deleted Kafka topics {}", names.join(", "));
        ctx.shared
            .event(et, EventType::Normal, "TopicsDeleted", "Delete", note)
            .await;
    }
    crate::finalizer::set(
        &api(et, &ctx.shared),
        et,
        TOPIC_FINALIZER,
        false,
        &ctx.shared.metrics,
    )
    .await
    .map_err(|source| Error::kube("remove the finalizer of", et, source))?;
    Ok(Action::await_change())
}

/// Writes status when it differs from what is stored, and an Event when Ready changes.
async fn write_status(et: &EventTopic, ctx: &Context, outcome: &Outcome) -> Result<(), Error> {
    let old = et.status.clone().unwrap_or_default();
    let generation = et.metadata.generation;
    let now = Timestamp::now();
    let mut conds = old.conditions.clone();
    if let Some(ready) = &outcome.ready {
        conds = conditions::set(&conds, ready.clone(), generation, now);
    }
    conds = if outcome.paused {
        let message = format!(
            "reconciliation is paused by the {} annotation; remove it to resume",
            eventops_crds::PAUSED_ANNOTATION
        );
        conditions::set(
            &conds,
            Observed::new(PAUSED, true, "Paused", message),
            generation,
            now,
        )
    } else {
        conditions::remove(&conds, PAUSED)
    };
    conds = match plan::naming(et.kafka_topic_name(), ctx.settings.topic_naming.as_ref()) {
        Some(observed) => conditions::set(&conds, observed, generation, now),
        None => conditions::remove(&conds, NAMING_POLICY),
    };
    let main = outcome.main.as_ref();
    let new = EventTopicStatus {
        // While paused, the spec has not been acted on: keep the generation last acted on.
        observed_generation: if outcome.paused {
            old.observed_generation
        } else {
            generation
        },
        conditions: conds,
        topic_name: Some(et.kafka_topic_name().to_string()),
        partitions: main.map(|s| s.partitions).or(old.partitions),
        replication_factor: main
            .map(|s| s.replication_factor)
            .filter(|rf| *rf > 0)
            .or(old.replication_factor),
        dead_letter_topic: et.dead_letter_topic_name(),
        retry_topics: et.retry_topic_names(),
        consumers: consumers(et, ctx),
    };
    if new == old {
        return Ok(());
    }
    crate::status::apply(ctx, et, &new).await?;
    if let Some(ready) = &outcome.ready {
        crate::status::announce_ready(ctx, et, &old.conditions, ready).await;
    }
    Ok(())
}

/// Names of the ConsumerGroups in `et`'s namespace that name it in `spec.topics`.
fn consumers(et: &EventTopic, ctx: &Context) -> Vec<String> {
    let name = et.name_any();
    let mut names: Vec<String> = ctx
        .groups
        .state()
        .iter()
        .filter(|cg| cg.namespace() == et.namespace() && cg.spec.topics.contains(&name))
        .map(|cg| cg.name_any())
        .collect();
    names.sort();
    names
}

fn api(et: &EventTopic, ctx: &Context) -> Api<EventTopic> {
    Api::namespaced(ctx.client.clone(), &et.namespace().unwrap_or_default())
}

fn error_policy(et: Arc<EventTopic>, error: &Error, ctx: Arc<Ctx>) -> Action {
    warn!(eventtopic = %et.name_any(), %error, "reconcile failed; retrying");
    let metrics = &ctx.shared.metrics;
    metrics.reconciled("eventtopic", Duration::ZERO, Some(error.metric_label()));
    Action::requeue(Duration::from_secs(5))
}
