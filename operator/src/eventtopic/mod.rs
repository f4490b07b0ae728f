//! EventTopic reconciler, once per pass: dereference (the shared cache of EventTopics,
//! then Kafka's state of the topics a valid spec asks for) → build ([`plan`], pure) →
//! apply (the claim in status, then Kafka admin calls) → status (conditions, Events on
//! transitions). Kafka's failures that may pass by themselves fail the pass once status
//! says so, and are retried on the object's back-off ([`crate::backoff`]).

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use eventops_crds::{
    ConsumerGroup, DeletionPolicy, EventTopic, EventTopicStatus, ManagedTopic,
    RELEASE_FINALIZER_ANNOTATION, TOPIC_FINALIZER, annotation_is_true,
};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::conditions::{self, Observed};
use crate::context::{Context, Turns};
use crate::error::Error;
use crate::kafka::native::ConfigOp;
use crate::kafka::{KafkaError, NewTopicSpec, Reading, TopicState};
use crate::watch::{SharedWatch, Superseded, TriggerStream, spec_or_metadata};
use plan::{DesiredTopic, Plan, Step, managed};

/// Condition type set while the paused annotation stops reconciliation.
pub const PAUSED: &str = "Paused";
/// Condition type that says whether the topic name follows the naming policy.
pub const NAMING_POLICY: &str = "NamingPolicy";

/// What the EventTopic reconciler works with.
struct Ctx {
    shared: Arc<Context>,
    /// Per EventTopic (uid), the resource versions its writes replaced.
    written: Superseded,
    /// Per EventTopic, the back-off of its failed reconciles.
    backoff: Backoff<EventTopic>,
    /// Reconciles run in the order they became due (see [`Turns`]).
    turns: Turns,
}

/// Runs the EventTopic controller until `shutdown` resolves.
pub async fn run(
    shared: Arc<Context>,
    triggers: Triggers<impl TriggerStream<EventTopic>, impl TriggerStream<ConsumerGroup>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::for_stream(triggers.topics, shared.topics.clone())
        .with_config(shared.settings.fair_controller_config());
    let ctx = Arc::new(Ctx {
        turns: shared.settings.turns(),
        shared,
        written: Default::default(),
        backoff: Default::default(),
    });
    controller
        // Status lists consumers: a ConsumerGroup change revisits the topics it names.
        .watches_stream(triggers.groups, |cg| {
            let ns = cg.namespace().unwrap_or_default();
            let names = cg.spec.topics.clone();
            names
                .into_iter()
                .map(move |t| ObjectRef::new(&t).within(&ns))
        })
        // Reconciles waiting for a turn return at once (see `Turns::close`).
        .graceful_shutdown_on({
            let ctx = ctx.clone();
            async move {
                shutdown.await;
                ctx.turns.close();
            }
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "eventtopic reconcile failed");
            }
        })
        .await;
}

/// What starts an EventTopic reconcile.
pub struct Triggers<T, G> {
    /// EventTopics: added, deleted, or changed in spec or metadata (not status).
    pub topics: T,
    /// ConsumerGroups (their spec names the topics whose status lists them): added,
    /// deleted, or changed in spec or metadata.
    pub groups: G,
}

/// The EventTopic controller's triggers, subscribed from the shared watches.
pub fn triggers(
    topics: &mut SharedWatch<EventTopic>,
    groups: &mut SharedWatch<ConsumerGroup>,
) -> Triggers<impl TriggerStream<EventTopic>, impl TriggerStream<ConsumerGroup>> {
    Triggers {
        topics: topics.subscribe(spec_or_metadata),
        groups: groups.subscribe(spec_or_metadata),
    }
}

/// A change made in Kafka, to be told in an Event.
struct Change {
    type_: EventType,
    reason: &'static str,
    note: String,
}

/// Longest note an Event may have (the API server refuses longer ones).
const EVENT_NOTE_BYTES: usize = 1024;

/// `changes` with those of the same type and reason made one, their notes joined, in
/// the order each kind first came, each note cut to [`EVENT_NOTE_BYTES`].
///
/// One Event per kind, not one per change: kube's `Recorder` takes an Event of the same
/// type, reason and object within minutes for a repeat, raises the first one's count
/// and keeps the first note (a dead-letter topic created after its main topic went
/// untold).
fn merged(changes: Vec<Change>) -> Vec<Change> {
    let mut kinds: Vec<Change> = Vec::new();
    for change in changes {
        match kinds
            .iter_mut()
            .find(|k| (k.type_, k.reason) == (change.type_, change.reason))
        {
            Some(kind) => {
                kind.note.push_str("; ");
                kind.note.push_str(&change.note);
            }
            None => kinds.push(change),
        }
    }
    for kind in &mut kinds {
        if kind.note.len() > EVENT_NOTE_BYTES {
            let mut end = EVENT_NOTE_BYTES - '…'.len_utf8();
            while !kind.note.is_char_boundary(end) {
                end -= 1;
            }
            kind.note.truncate(end);
            kind.note.push('…');
        }
    }
    kinds
}

/// What one pass found and did, before it becomes status.
struct Outcome {
    /// New Ready condition; `None` leaves it as it is (while paused).
    ready: Option<Observed>,
    paused: bool,
    main: Option<TopicState>,
    changes: Vec<Change>,
    /// The topics this EventTopic manages now; `None` leaves the record as it is.
    managed: Option<BTreeMap<String, BTreeSet<String>>>,
    /// Set when this pass wrote a claim to status, to the resourceVersion it got: the
    /// resource in hand no longer shows what is stored, so status is written even when
    /// it looks unchanged.
    claimed: Option<Option<String>>,
    /// Kafka's failure that may pass by itself: once status says so, the pass fails
    /// with it, to be retried on the object's back-off.
    retry: Option<KafkaError>,
}

impl Outcome {
    fn not_ready(reason: &str, message: String) -> Self {
        Self {
            ready: Some(Observed::ready(false, reason, message)),
            paused: false,
            main: None,
            changes: vec![],
            managed: None,
            claimed: None,
            retry: None,
        }
    }

    fn paused() -> Self {
        Self {
            ready: None,
            paused: true,
            main: None,
            changes: vec![],
            managed: None,
            claimed: None,
            retry: None,
        }
    }
}

impl From<plan::Refused> for Outcome {
    fn from(refused: plan::Refused) -> Self {
        Self::not_ready(refused.reason, refused.message)
    }
}

/// Reconciles in its turn, the object as the cache has it then (see [`Turns::run`]).
async fn reconcile(et: Arc<EventTopic>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    (ctx.turns)
        .run(&ctx.shared.topics, &et, |now| {
            reconcile_now(now, ctx.clone())
        })
        .await
}

async fn reconcile_now(et: Arc<EventTopic>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let metrics = &ctx.shared.metrics;
    // The cache has not seen this reconciler's last write yet (see `Superseded`): wait
    // for it, neither a success nor a failure for the back-off.
    if ctx.written.is_stale(&*et) {
        metrics.reconciled("eventtopic", started.elapsed(), None);
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let result = reconcile_inner(&et, &ctx).await;
    // Only a pass that ended Ready lets the next one read a snapshot.
    ctx.shared
        .passes
        .ended(&*et, matches!(&result, Ok((_, None))));
    let failure = match &result {
        Ok((_, failure)) => failure.clone(),
        Err(error) => Some(error.metric_label()),
    };
    metrics.reconciled("eventtopic", started.elapsed(), failure.as_deref());
    let (action, _) = result?;
    ctx.backoff.succeeded(&et);
    Ok(action)
}

/// One reconcile: dereference → build → apply → status. Returns what to do next and,
/// when not Ready, why; fails when Kafka or the API server did (Kafka's reason is in
/// status by then).
async fn reconcile_inner(
    et: &Arc<EventTopic>,
    ctx: &Ctx,
) -> Result<(Action, Option<String>), Error> {
    // Each write's new resourceVersion: the cache must show it before a pass acts again.
    // A write that changed nothing answers with the stored version, which is no newer.
    let wrote = |new: Option<String>| ctx.written.wrote(&**et, new.as_deref());
    if et.metadata.deletion_timestamp.is_some() {
        return Ok((finalize(et, ctx, wrote).await?, None));
    }
    let outcome = if et.is_paused() {
        Outcome::paused()
    } else {
        wrote(set_finalizer(et, &ctx.shared).await?);
        match dereference(et, &ctx.shared).await {
            Err(outcome) => outcome,
            Ok(Snapshot { topics, actual }) => match plan::build(et, topics, actual) {
                Err(refused) => refused.into(),
                Ok(build) => apply(et, build, &ctx.shared).await?,
            },
        }
    };
    if let Some(claimed) = &outcome.claimed {
        wrote(claimed.clone());
    }
    wrote(write_status(et, &ctx.shared, &outcome).await?);
    // One Event per kind of change, each an API write of its own: an EventTopic's main
    // and dead-letter topics created in one pass are told together.
    let events = merged(outcome.changes).into_iter().map(|change| {
        (ctx.shared).event(&**et, change.type_, change.reason, "Reconcile", change.note)
    });
    futures::future::join_all(events).await;
    if let Some(e) = outcome.retry {
        return Err(Error::kafka(&**et, e));
    }
    let failure = outcome.ready.filter(|r| !r.status).map(|r| r.reason);
    // The resync is counted from now, after this pass's requests, so that it stays on
    // the grid.
    let action = if outcome.paused {
        Action::await_change()
    } else {
        Action::requeue(ctx.shared.settings.next_resync())
    };
    Ok((action, failure))
}

/// What a pass reads before it decides anything.
struct Snapshot {
    /// The topics the spec asks for, validated.
    topics: Vec<DesiredTopic>,
    /// Kafka's state of each, in the same order (`None`: no such topic).
    actual: Vec<Option<TopicState>>,
}

/// Dereference: the spec is validated against the shared cache of EventTopics and the
/// namespace policy ([`plan::validate`]); only then are its topics read from Kafka,
/// through the reads concurrent reconciles share ([`crate::kafka::batch`]). A refusal or
/// a failed read is the pass's outcome.
async fn dereference(et: &EventTopic, ctx: &Context) -> Result<Snapshot, Outcome> {
    let all = ctx.topics.state();
    let policy = &ctx.settings.namespace_policy;
    let topics = plan::validate(et, all.iter().map(AsRef::as_ref), policy)?;
    // Asked together, so the main, dead-letter and retry topics share one request.
    let reading = ctx.passes.reading(et);
    let described = futures::future::join_all(
        topics
            .iter()
            .map(|desired| ctx.kafka.describe_topic(&desired.name, reading)),
    )
    .await;
    let actual = described
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(Refusal::Kafka(e), None, vec![], None))?;
    Ok(Snapshot { topics, actual })
}

fn to_status(managed: &BTreeMap<String, BTreeSet<String>>) -> Vec<ManagedTopic> {
    managed
        .iter()
        .map(|(name, keys)| ManagedTopic {
            name: name.clone(),
            configs: keys.iter().cloned().collect(),
        })
        .collect()
}

/// Records in status, before Kafka is touched, the topics about to be created or
/// adopted and the config keys about to be set: a restart between the Kafka call and
/// the final status write then still knows them as this EventTopic's.
async fn record_claim(
    et: &EventTopic,
    ctx: &Context,
    claim: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Option<String>, Error> {
    let mut status = et.status.clone().unwrap_or_default();
    status.managed_topics = Some(to_status(claim));
    crate::status::apply(ctx, et, &status).await
}

/// Apply: records the claim, then brings each topic in Kafka to its plan, in order,
/// stopping at the first that cannot be.
async fn apply(et: &EventTopic, build: plan::Build, ctx: &Context) -> Result<Outcome, Error> {
    let plan::Build {
        before,
        mut claim,
        drift,
        topics,
    } = build;
    let claimed = if claim != before {
        Some(record_claim(et, ctx, &claim).await?)
    } else {
        None
    };
    let names: Vec<String> = topics.iter().map(|t| t.desired.name.clone()).collect();
    let mut changes = Vec::new();
    let mut main = None;
    // What is known to be this EventTopic's once this pass is over.
    let mut managed = before;
    for (i, topic) in topics.into_iter().enumerate() {
        let desired = &topic.desired;
        let changed_before = changes.len();
        let applied = match topic.plan {
            Plan::NotSupported(message) => Err(Refusal::NotSupported(message)),
            Plan::Apply(steps) => {
                apply_topic(desired, topic.actual, steps, drift, ctx, &mut changes).await
            }
        };
        match applied {
            Ok(state) => {
                if i == 0 {
                    main = state;
                }
                managed.insert(desired.name.clone(), topic.keys);
            }
            Err(refusal) => {
                // What Kafka may have done stays recorded as this EventTopic's. A topic
                // Kafka did not create for it (refused, or somebody else's by then) is
                // not: the claim written before asking goes.
                if changes.len() > changed_before || refusal.may_have_applied() {
                    let claimed = claim.remove(&desired.name).unwrap_or_default();
                    managed.insert(desired.name.clone(), claimed);
                }
                let mut outcome = refused(refusal, main, changes, Some(managed));
                outcome.claimed = claimed;
                return Ok(outcome);
            }
        }
    }
    // Everything matches the spec. Topics an earlier spec named (a dead-letter topic
    // renamed, a retry delay changed) stay this EventTopic's: it created or adopted
    // them, going back to them needs no adoption, and deleting it with
    // `deletionPolicy: Delete` deletes them too unless another EventTopic asks for them.
    Ok(Outcome {
        ready: Some(Observed::ready(
            true,
            "InSync",
            format!("Kafka topics {} match the spec", names.join(", ")),
        )),
        paused: false,
        main,
        changes,
        managed: Some(managed),
        claimed,
        retry: None,
    })
}

/// The outcome of a pass that stopped at `refusal`. Kafka's failure that may pass by
/// itself is retried on the object's back-off; any other refusal waits for the resync.
fn refused(
    refusal: Refusal,
    main: Option<TopicState>,
    changes: Vec<Change>,
    managed: Option<BTreeMap<String, BTreeSet<String>>>,
) -> Outcome {
    let (reason, message, retry) = match refusal {
        Refusal::NotSupported(message) => ("NotSupported".into(), message, None),
        Refusal::Config { reason, message } => (reason, message, None),
        Refusal::Kafka(e) => {
            let retry = e.is_transient().then(|| e.clone());
            (e.reason(), kafka_message(&e), retry)
        }
    };
    Outcome {
        ready: Some(Observed::ready(false, reason, message)),
        paused: false,
        main,
        changes,
        managed,
        claimed: None,
        retry,
    }
}

enum Refusal {
    NotSupported(String),
    /// Kafka refused one config of the spec; the message names it.
    Config {
        reason: String,
        message: String,
    },
    Kafka(KafkaError),
}

impl Refusal {
    /// Whether the refused request may still have taken effect (no answer in time);
    /// otherwise Kafka did nothing ("topic already exists" included: the topic is
    /// somebody else's).
    fn may_have_applied(&self) -> bool {
        match self {
            Refusal::Kafka(e) => e.may_have_taken_effect(),
            Refusal::NotSupported(_) | Refusal::Config { .. } => false,
        }
    }
}

/// Whether Kafka's refusal may be about a config value, so that asking config by config
/// can tell which one.
fn about_a_config(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    !e.is_transient()
        && matches!(
            e.code(),
            Some(C::InvalidConfig | C::InvalidRequest | C::PolicyViolation)
        )
}

/// The refusal for `key: value` of `desired`, naming the spec field, in Kafka's words.
fn config_refusal(desired: &DesiredTopic, key: &str, value: &str, e: &KafkaError) -> Refusal {
    let said = match e.kafka_message() {
        "" => e.to_string(),
        m => m.to_string(),
    };
    Refusal::Config {
        reason: e.reason(),
        message: format!(
            "{}[{key:?}]: {key}: {value} is refused by Kafka for topic {}: {said}",
            plan::config_field(desired),
            desired.name
        ),
    }
}

/// After Kafka refused to create `spec`: which config, asked one by one (nothing is
/// created), Kafka refuses; the original refusal when none alone is refused.
async fn blame_create(
    desired: &DesiredTopic,
    spec: &NewTopicSpec,
    e: KafkaError,
    ctx: &Context,
) -> Refusal {
    if !about_a_config(&e) {
        return Refusal::Kafka(e);
    }
    for (k, v) in &spec.configs {
        let one = NewTopicSpec {
            configs: BTreeMap::from([(k.clone(), v.clone())]),
            ..spec.clone()
        };
        if let Err(refusal) = ctx.kafka.validate_new_topic(&one).await
            && about_a_config(&refusal)
        {
            return config_refusal(desired, k, v, &refusal);
        }
    }
    Refusal::Kafka(e)
}

/// After Kafka refused `ops` on `topic`: which set, asked one by one (validate only),
/// Kafka refuses; the original refusal when none alone is refused.
async fn blame_alter(
    desired: &DesiredTopic,
    ops: &[ConfigOp],
    e: KafkaError,
    ctx: &Context,
) -> Refusal {
    if !about_a_config(&e) {
        return Refusal::Kafka(e);
    }
    for op in ops {
        let ConfigOp::Set(k, v) = op else { continue };
        if let Err(refusal) = ctx
            .kafka
            .alter_configs(&desired.name, std::slice::from_ref(op), true)
            .await
            && about_a_config(&refusal)
        {
            return config_refusal(desired, k, v, &refusal);
        }
    }
    Refusal::Kafka(e)
}

/// Applies `steps` to one topic whose Kafka state is `actual`. Returns the topic's
/// state after the changes.
async fn apply_topic(
    desired: &DesiredTopic,
    actual: Option<TopicState>,
    steps: Vec<Step>,
    drift: bool,
    ctx: &Context,
    changes: &mut Vec<Change>,
) -> Result<Option<TopicState>, Refusal> {
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
                if let Err(e) = ctx.kafka.create_topic(&spec).await {
                    return Err(blame_create(desired, &spec, e, ctx).await);
                }
                info!(topic = %spec.name, partitions = spec.partitions, "created Kafka topic");
                record(
                    "TopicCreated",
                    format!(
                        "created Kafka topic {} with {} partitions",
                        spec.name, spec.partitions
                    ),
                );
                // Ask again: the broker may have chosen the replication factor.
                let created = ctx
                    .kafka
                    .describe_topic(&spec.name, Reading::Fresh)
                    .await
                    .ok()
                    .flatten();
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
            Step::AlterConfigs {
                topic,
                ops,
                changed,
            } => {
                if let Err(e) = ctx.kafka.alter_configs(&topic, &ops, false).await {
                    return Err(blame_alter(desired, &ops, e, ctx).await);
                }
                info!(%topic, ?changed, "changed topic configs");
                record(
                    "ConfigsUpdated",
                    format!("changed configs of {topic}: {}", changed.join(", ")),
                );
                if let Some(s) = state.as_mut() {
                    for op in ops {
                        match op {
                            ConfigOp::Set(k, v) => s.configs.insert(k, v),
                            ConfigOp::Delete(k) => s.configs.remove(&k),
                        };
                    }
                }
            }
        }
    }
    Ok(state)
}

/// Holds the finalizer exactly while `deletionPolicy: Delete` asks for it, so retained
/// topics never make deletion wait for the operator.
async fn set_finalizer(et: &EventTopic, ctx: &Context) -> Result<Option<String>, Error> {
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
async fn finalize(
    et: &EventTopic,
    ctx: &Ctx,
    wrote: impl Fn(Option<String>),
) -> Result<Action, Error> {
    if !et.finalizers().iter().any(|f| f == TOPIC_FINALIZER) {
        return Ok(Action::await_change());
    }
    let released = annotation_is_true(&et.metadata, RELEASE_FINALIZER_ANNOTATION);
    if et.spec.deletion_policy == DeletionPolicy::Delete && !released {
        let all = ctx.shared.topics.state();
        // Only topics this EventTopic created or adopted: never one it was refused.
        let mut topics = plan::deletable(et, all.iter().map(AsRef::as_ref));
        // Never outside what the namespace may own, whatever its status lists.
        let policy = &ctx.shared.settings.namespace_policy;
        let ns = et.namespace().unwrap_or_default();
        topics.retain(|t| policy.check(&ns, "spec.topicName", t).is_ok());
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = ctx.shared.kafka.delete_topics(&names).await {
            let message = format!(
                "{}; the resource stays until its topics are deleted. If Kafka is gone for \
                 good, annotate it {RELEASE_FINALIZER_ANNOTATION}=true to let it go",
                kafka_message(&e)
            );
            let outcome = Outcome::not_ready(&e.reason(), message);
            wrote(write_status(et, &ctx.shared, &outcome).await?);
            return Err(Error::kafka(et, e));
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
    ctx.written.forget(et);
    Ok(Action::await_change())
}

/// Writes status when it differs from what is stored, and an Event when Ready changes.
/// Returns the new resourceVersion when it wrote.
async fn write_status(
    et: &EventTopic,
    ctx: &Context,
    outcome: &Outcome,
) -> Result<Option<String>, Error> {
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
        // While paused, the names stay those last acted on: an edit made meanwhile has
        // not reached Kafka (and a status from before managedTopics derives ownership
        // from them).
        topic_name: if outcome.paused {
            old.topic_name.clone()
        } else {
            Some(et.kafka_topic_name().to_string())
        },
        partitions: main.map(|s| s.partitions).or(old.partitions),
        replication_factor: main
            .map(|s| s.replication_factor)
            .filter(|rf| *rf > 0)
            .or(old.replication_factor),
        dead_letter_topic: if outcome.paused {
            old.dead_letter_topic.clone()
        } else {
            et.dead_letter_topic_name()
        },
        retry_topics: if outcome.paused {
            old.retry_topics.clone()
        } else {
            et.retry_topic_names()
        },
        consumers: consumers(et, ctx),
        // A status from before managedTopics gets the record on the first write, whatever
        // the pass found: what it managed must not depend on the next Ready condition.
        managed_topics: Some(to_status(
            &outcome.managed.clone().unwrap_or_else(|| managed(et)),
        )),
    };
    if new == old && outcome.claimed.is_none() {
        return Ok(None);
    }
    let written = crate::status::apply(ctx, et, &new).await?;
    if let Some(ready) = &outcome.ready {
        crate::status::announce_ready(ctx, et, &old.conditions, ready).await;
    }
    Ok(written)
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

/// A failed reconcile is retried on the EventTopic's own back-off.
fn error_policy(et: Arc<EventTopic>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let retry = ctx.backoff.failed(&et, ctx.shared.settings.resync_interval);
    warn!(eventtopic = %et.name_any(), %error, ?retry, "reconcile failed; retrying");
    Action::requeue(retry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(type_: EventType, reason: &'static str, note: &str) -> Change {
        Change {
            type_,
            reason,
            note: note.into(),
        }
    }

    #[test]
    fn changes_of_one_kind_make_one_event() {
        let merged = merged(vec![
            change(EventType::Normal, "TopicCreated", "created a"),
            change(EventType::Warning, "DriftCorrected", "fixed b"),
            change(EventType::Normal, "TopicCreated", "created a.dlt"),
            change(EventType::Normal, "ConfigsUpdated", "changed c"),
        ]);
        let got: Vec<_> = merged
            .iter()
            .map(|c| (c.type_, c.reason, c.note.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    EventType::Normal,
                    "TopicCreated",
                    "created a; created a.dlt"
                ),
                (EventType::Warning, "DriftCorrected", "fixed b"),
                (EventType::Normal, "ConfigsUpdated", "changed c"),
            ]
        );
    }

    #[test]
    fn a_note_is_cut_at_the_api_servers_limit() {
        let long = "é".repeat(300);
        let merged = merged(vec![
            change(EventType::Normal, "TopicCreated", &long),
            change(EventType::Normal, "TopicCreated", &long),
            change(EventType::Normal, "TopicCreated", "short"),
        ]);
        assert_eq!(merged.len(), 1);
        let note = &merged[0].note;
        assert!(note.len() <= EVENT_NOTE_BYTES, "{}", note.len());
        assert!(note.len() > EVENT_NOTE_BYTES - 4, "{}", note.len());
        assert!(note.starts_with(&long) && note.ends_with('…'), "{note}");
    }
}
