//! The Replay controller: rewinds a ConsumerGroup's committed offsets while the group is
//! held at 0 replicas, then hands it back to the autoscaler.
//!
//! Kafka takes new committed offsets for a group only while it has no members, so a
//! Replay goes through these steps, each one re-entered safely after a restart (the
//! state is in the Replay's status and in the ConsumerGroup's hold annotation):
//!
//! 1. **Resolve** the group, its topics and where each restarts (offsets by time and
//!    the partitions' ranges from Kafka), and refuse, naming the field, what cannot be
//!    done: an unknown group or topic, an offset out of range, a group that would apply
//!    the replayed events again without `allowDuplicates`.
//! 2. **Hold** the group: the annotation [`REPLAY_HOLD_ANNOTATION`] on the ConsumerGroup,
//!    written with its resourceVersion as a precondition, so only one Replay holds a
//!    group; a second is refused naming the first. The autoscaler leaves held groups
//!    alone.
//! 3. **Scale to 0** and wait until Kafka describes the group as Empty.
//! 4. **Record** the committed offsets before and the ones to set in status, then set
//!    them (OffsetCommit from outside the group; Kafka refuses it if a member joined
//!    meanwhile, and the Replay waits again).
//! 5. **Release**: remove the annotation. The autoscaler scales the group up from the
//!    lag the rewind made.
//!
//! Deleting a Replay before it completes releases the group (a finalizer).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventops_crds::{
    ConsumerGroup, EventTopic, Idempotency, REPLAY_HOLD_ANNOTATION, Replay, ReplayPosition,
    ReplayStatus, ReplayedPartition,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::conditions::{self, Observed, with_permission_hint};
use crate::consumergroup::build::{controlled_by, group_conflict, owns_its_topic};
use crate::context::Context;
use crate::error::Error;
use crate::kafka::Reading;
use crate::kafka::native::{GroupState, IsolationLevel, NativeError, OffsetSpec};

/// Finalizer that releases the group when a Replay is deleted before it completes.
pub const FINALIZER: &str = "eventops.dev/replay";
/// Condition type: the spec resolved and this Replay holds the group.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: the offsets are set and the group is handed back.
pub const COMPLETE: &str = "Complete";
/// Field manager of the replicas a Replay sets.
const FIELD_MANAGER: &str = "eventops-operator-replay";

const PENDING: &str = "Pending";
const SCALING_DOWN: &str = "ScalingDown";
const COMPLETED: &str = "Completed";
const REFUSED: &str = "Refused";

/// How long the consumer runtime's inbox remembers a processed event id by default
/// (`PostgresOptions::retention`): a replay reaching further back may apply events again.
const INBOX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often a held group is looked at while it scales down.
const WHILE_HELD: Duration = Duration::from_secs(1);

/// Runs the Replay controller until `shutdown` resolves.
pub async fn run(shared: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<Replay> = shared.api_for_watch();
    Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(shared.settings.controller_config())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, shared)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "replay reconcile failed");
            }
        })
        .await;
}

fn error_policy(rp: Arc<Replay>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(replay = %rp.name_any(), %error, "reconcile failed; retrying");
    ctx.metrics
        .reconciled("replay", Duration::ZERO, Some(&error.metric_label()));
    Action::requeue(Duration::from_secs(5))
}

/// The hold annotation's value for `rp`.
fn hold_value(rp: &Replay) -> String {
    format!("{}/{}", rp.name_any(), rp.uid().unwrap_or_default())
}

/// A reconcile that stops here, with the condition it leaves.
struct Stop {
    phase: &'static str,
    observed: Observed,
    requeue: Duration,
}

impl Stop {
    fn pending(reason: &str, message: String) -> Self {
        Self {
            phase: PENDING,
            observed: Observed::new(ACCEPTED, false, reason, message),
            requeue: Duration::from_secs(30),
        }
    }
}

async fn reconcile(rp: Arc<Replay>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = step(&rp, &ctx).await;
    let label = match &result {
        Ok(_) => None,
        Err(e) => Some(e.metric_label()),
    };
    ctx.metrics
        .reconciled("replay", started.elapsed(), label.as_deref());
    result
}

async fn step(rp: &Replay, ctx: &Context) -> Result<Action, Error> {
    let ns = rp.namespace().unwrap_or_default();
    let replays: Api<Replay> = Api::namespaced(ctx.client.clone(), &ns);
    let groups: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    // The status is this controller's memory (the offsets before the rewind, the plan):
    // read it fresh, never from a watch event that may predate the last write.
    let Some(rp) = replays
        .get_opt(&rp.name_any())
        .await
        .map_err(|e| Error::kube("read", rp, e))?
    else {
        return Ok(Action::await_change());
    };
    let rp = &rp;
    let status = rp.status.clone().unwrap_or_default();
    let done = matches!(status.phase.as_deref(), Some(COMPLETED | REFUSED));
    if rp.metadata.deletion_timestamp.is_some() || done {
        release(rp, ctx, &groups).await?;
        crate::finalizer::set(&replays, rp, FINALIZER, false, &ctx.metrics)
            .await
            .map_err(|e| Error::kube("remove the finalizer of", rp, e))?;
        return Ok(Action::await_change());
    }
    crate::finalizer::set(&replays, rp, FINALIZER, true, &ctx.metrics)
        .await
        .map_err(|e| Error::kube("add the finalizer to", rp, e))?;

    // Every status write of the pass goes through `new`: status is applied whole (server-side
    // apply, one field manager), so writing an older copy would erase what the pass wrote.
    let mut new = status.clone();
    match hold_and_rewind(rp, ctx, &groups, &status, &mut new).await? {
        Ok(action) => Ok(action),
        Err(stop) => {
            new.phase = Some(stop.phase.into());
            new.conditions = set(rp, &new.conditions, stop.observed.clone());
            if new != status {
                crate::status::apply(ctx, rp, &new).await?;
                if stop.observed.type_ == ACCEPTED || stop.phase == REFUSED {
                    ctx.event(
                        rp,
                        EventType::Warning,
                        &stop.observed.reason,
                        "Replay",
                        stop.observed.message,
                    )
                    .await;
                }
            }
            if stop.phase == REFUSED {
                return Ok(Action::await_change());
            }
            Ok(Action::requeue(stop.requeue))
        }
    }
}

/// Steps 1 to 5 (see the module docs). `Ok(Err(stop))` is a reconcile that cannot go
/// on yet, or ever, with the condition to show.
async fn hold_and_rewind(
    rp: &Replay,
    ctx: &Context,
    groups: &Api<ConsumerGroup>,
    status: &ReplayStatus,
    new: &mut ReplayStatus,
) -> Result<Result<Action, Stop>, Error> {
    let ns = rp.namespace().unwrap_or_default();
    let spec = &rp.spec;
    let Some(cg) = groups
        .get_opt(&spec.consumer_group)
        .await
        .map_err(|e| Error::kube("read the ConsumerGroup of", rp, e))?
    else {
        return Ok(Err(Stop::pending(
            "ConsumerGroupNotFound",
            format!(
                "spec.consumerGroup names ConsumerGroup {} that does not exist in namespace \
                 {ns}: waiting for it (or delete this Replay and create it again naming a \
                 ConsumerGroup of this namespace)",
                spec.consumer_group
            ),
        )));
    };
    let ours = hold_value(rp);
    let held = cg.annotations().get(REPLAY_HOLD_ANNOTATION) == Some(&ours);
    // A reconcile that stops while the group is held says so.
    let stop = |mut stop: Stop| {
        if held {
            stop.phase = SCALING_DOWN;
            stop.observed.message.push_str(&format!(
                "; ConsumerGroup {} is held at 0 replicas meanwhile: delete this Replay to \
                 release it",
                cg.name_any()
            ));
        }
        Ok(Err(stop))
    };
    let idempotency = cg.spec.processing.idempotency;
    if idempotency != Idempotency::Postgres && !spec.allow_duplicates {
        return stop(Stop::pending(
            "DuplicatesNotAllowed",
            format!(
                "ConsumerGroup {} has spec.processing.idempotency {idempotency:?}, so its \
                 workers would apply the replayed events again: delete this Replay and \
                 create it again with spec.allowDuplicates: true to replay anyway, or give \
                 the group idempotency Postgres (its inbox skips what it already applied)",
                cg.name_any()
            ),
        ));
    }
    // B: only a group this namespace may own, and that no older ConsumerGroup shares.
    let group_id = cg.kafka_group_id().to_string();
    if let Err(message) = ctx
        .settings
        .namespace_policy
        .check(&ns, "spec.groupId", &group_id)
    {
        return stop(Stop::pending(
            "NotPermitted",
            format!("ConsumerGroup {}: {message}", cg.name_any()),
        ));
    }
    if let Some(message) = group_conflict(&cg, ctx.groups.state().iter().map(AsRef::as_ref)) {
        return stop(Stop::pending(
            "ResourceConflict",
            format!("ConsumerGroup {}: {message}", cg.name_any()),
        ));
    }

    // Where each topic restarts, from Kafka's offsets now: checked before the group is
    // held (so an impossible plan never holds it), then made again once the group is
    // empty and kept in status. Not while a held group waits for its members to leave.
    let planned = if status.offsets.is_empty() && (!held || group_is_empty(ctx, &cg).await) {
        let topics: Api<EventTopic> = Api::namespaced(ctx.client.clone(), &ns);
        let all = topics
            .list(&Default::default())
            .await
            .map_err(|e| Error::kube("list the EventTopics of the namespace of", rp, e))?
            .items;
        let targets = match targets(rp, &cg, &all) {
            Ok(t) => t,
            Err(s) => return stop(s),
        };
        let inbox_guards = idempotency == Idempotency::Postgres && !spec.allow_duplicates;
        match plan_offsets(ctx, &targets, inbox_guards).await {
            Ok(Ok(plan)) => Some(plan),
            Ok(Err(s)) => return stop(s),
            Err(e) => return stop(kafka_stop("resolve the offsets to rewind to", &e)),
        }
    } else {
        None
    };

    // Hold the group.
    let held_by = cg.annotations().get(REPLAY_HOLD_ANNOTATION).cloned();
    if !held {
        if let Some(other) = held_by.as_deref()
            && let Some(name) = live_holder(ctx, &ns, other).await?
        {
            return Ok(Err(Stop {
                phase: REFUSED,
                observed: Observed::new(
                    ACCEPTED,
                    false,
                    "ReplayInProgress",
                    format!(
                        "Replay {name} is already replaying ConsumerGroup {}: only one Replay \
                         per group runs at a time; delete this one and create it again once \
                         {name} has completed",
                        cg.name_any()
                    ),
                ),
                requeue: Duration::ZERO,
            }));
        }
        match write_hold(ctx, groups, &cg, Some(&ours)).await {
            Ok(_) => {}
            // Someone wrote the group meanwhile: look again.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(Ok(Action::requeue(WHILE_HELD)));
            }
            Err(e) => return Err(Error::kube("hold", &cg, e)),
        }
        info!(replay = %rp.name_any(), namespace = %ns, group = %group_id, "holding the group");
        ctx.event(
            rp,
            EventType::Normal,
            "Started",
            "Replay",
            format!(
                "holding ConsumerGroup {} at 0 replicas to rewind Kafka group {group_id}",
                cg.name_any()
            ),
        )
        .await;
    }

    // Scale to 0 and wait for Kafka to see the group empty.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let deployment = deployments
        .get_opt(&cg.name_any())
        .await
        .map_err(|e| Error::kube("read the Deployment of", &cg, e))?;
    // Only the group's own Deployment: one under its name that the group does not
    // control is somebody else's (and the ConsumerGroup says so).
    let replicas = deployment
        .as_ref()
        .filter(|d| controlled_by(&cg, &d.metadata))
        .and_then(|d| d.spec.replicas);
    let after_hold = |mut s: Stop| {
        s.phase = SCALING_DOWN;
        Ok(Err(s))
    };
    new.group_id = Some(group_id.clone());
    if new.started_at.is_none() {
        new.started_at = Some(Time(Timestamp::now()));
        new.replicas_before = replicas;
        // Written before the replicas change, so a retry never records the 0 it set.
        crate::status::apply(ctx, rp, &*new).await?;
    }
    if replicas.is_some_and(|r| r != 0) {
        ctx.metrics.kube_write("scale");
        deployments
            .patch_scale(
                &cg.name_any(),
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
            )
            .await
            .map_err(|e| Error::kube("scale to 0", &cg, e))?;
    }
    let described = match ctx.kafka.describe_consumer_group(&group_id).await {
        Ok(d) => d,
        Err(e) => return after_hold(kafka_stop("describe the group", &e)),
    };
    new.phase = Some(SCALING_DOWN.into());
    new.conditions = set(
        rp,
        &new.conditions,
        Observed::new(
            ACCEPTED,
            true,
            "Holding",
            format!(
                "holding ConsumerGroup {} at 0 replicas; Kafka group {group_id} is {:?} with \
                 {} members",
                cg.name_any(),
                described.state,
                described.members
            ),
        ),
    );
    if !matches!(described.state, GroupState::Empty | GroupState::Dead) {
        new.conditions = set(
            rp,
            &new.conditions,
            Observed::new(
                COMPLETE,
                false,
                "WaitingForEmptyGroup",
                format!(
                    "Kafka takes new offsets only for a group without members: waiting for \
                     the {} members of {group_id} to leave",
                    described.members
                ),
            ),
        );
        if *new != *status {
            crate::status::apply(ctx, rp, &*new).await?;
        }
        return Ok(Ok(Action::requeue(WHILE_HELD)));
    }

    // Record the plan with the offsets before, then set it.
    if planned.is_none() && new.offsets.is_empty() {
        // The group emptied between the plan's check and the describe: plan next pass.
        return Ok(Ok(Action::requeue(WHILE_HELD)));
    }
    if let Some(plan) = planned {
        let before = match ctx.kafka.list_consumer_group_offsets(&group_id, None).await {
            Ok(b) => b,
            Err(e) => return after_hold(kafka_stop("read the group's committed offsets", &e)),
        };
        new.offsets = plan
            .into_iter()
            .map(|((topic, partition), after)| ReplayedPartition {
                before: before.get(&(topic.clone(), partition)).copied(),
                topic,
                partition,
                after,
            })
            .collect();
        new.rewound = Some(rewound(&new.offsets));
        new.skipped = Some(skipped(&new.offsets));
        crate::status::apply(ctx, rp, &*new).await?;
    }
    let offsets: Vec<(String, i32, i64)> = new
        .offsets
        .iter()
        .map(|p| (p.topic.clone(), p.partition, p.after))
        .collect();
    match ctx
        .kafka
        .alter_consumer_group_offsets(&group_id, &offsets)
        .await
    {
        Ok(()) => {}
        // A member joined between the describe and the commit: wait again.
        Err(NativeError::Kafka {
            code: RDKafkaErrorCode::UnknownMemberId,
            ..
        }) => {
            return Ok(Ok(Action::requeue(WHILE_HELD)));
        }
        Err(e) => return after_hold(kafka_stop("set the group's offsets", &e)),
    }
    new.phase = Some(COMPLETED.into());
    new.completed_at = Some(Time(Timestamp::now()));
    let skipped = match new.skipped.unwrap_or_default() {
        0 => String::new(),
        n => format!(", {n} records skipped"),
    };
    let summary = format!(
        "set {} partitions of Kafka group {group_id} ({} records to read again{skipped}); \
         ConsumerGroup {} handed back to the autoscaler",
        new.offsets.len(),
        new.rewound.unwrap_or_default(),
        cg.name_any()
    );
    new.conditions = set(
        rp,
        &new.conditions,
        Observed::new(COMPLETE, true, "Rewound", summary.clone()),
    );
    crate::status::apply(ctx, rp, &*new).await?;
    info!(replay = %rp.name_any(), namespace = %ns, group = %group_id, "{summary}");
    ctx.event(rp, EventType::Normal, "Completed", "Replay", summary)
        .await;
    release(rp, ctx, groups).await?;
    Ok(Ok(Action::await_change()))
}

/// Whether Kafka describes `cg`'s group as without members (an error counts as not: the
/// pass that needs it reports the error).
async fn group_is_empty(ctx: &Context, cg: &ConsumerGroup) -> bool {
    ctx.kafka
        .describe_consumer_group(cg.kafka_group_id())
        .await
        .is_ok_and(|d| matches!(d.state, GroupState::Empty | GroupState::Dead))
}

/// The Kafka topics to rewind, with their partition counts and where each restarts.
struct Target {
    topic: String,
    field: String,
    position: ReplayPosition,
}

/// Which topics a Replay rewinds, or the refusal naming the field.
fn targets(rp: &Replay, cg: &ConsumerGroup, all: &[EventTopic]) -> Result<Vec<Target>, Stop> {
    let ns = rp.namespace().unwrap_or_default();
    for (i, t) in rp.spec.topics.iter().enumerate() {
        if !cg.spec.topics.contains(&t.topic) {
            return Err(Stop::pending(
                "TopicNotInGroup",
                format!(
                    "spec.topics[{i}].topic names {}, which is not one of ConsumerGroup {}'s \
                     topics ({}): delete this Replay and create it again naming one of them",
                    t.topic,
                    cg.name_any(),
                    cg.spec.topics.join(", ")
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for name in &cg.spec.topics {
        let (position, field) = match rp.spec.topics.iter().position(|t| &t.topic == name) {
            Some(i) => (
                rp.spec.topics[i].position.clone(),
                format!("spec.topics[{i}]"),
            ),
            None => match &rp.spec.from {
                Some(from) => (from.clone(), "spec.from".to_string()),
                None => continue,
            },
        };
        let Some(et) = all
            .iter()
            .find(|et| &et.name_any() == name)
            .filter(|et| owns_its_topic(et))
        else {
            return Err(Stop::pending(
                "TopicNotReady",
                format!(
                    "ConsumerGroup {}'s topic {name} is not an EventTopic of namespace {ns} \
                     that owns its Kafka topic (see its Ready condition): waiting for it",
                    cg.name_any()
                ),
            ));
        };
        out.push(Target {
            topic: et.kafka_topic_name().to_string(),
            field,
            position,
        });
    }
    Ok(out)
}

/// The offset to set on each partition of `targets`, from Kafka's offsets now. With
/// `inbox_guards`, a plan reaching records older than [`INBOX_WINDOW`] is refused: the
/// inbox may have forgotten them.
async fn plan_offsets(
    ctx: &Context,
    targets: &[Target],
    inbox_guards: bool,
) -> Result<Result<BTreeMap<(String, i32), i64>, Stop>, NativeError> {
    let native = ctx.kafka.native();
    let now = Timestamp::now();
    let mut plan = BTreeMap::new();
    for target in targets {
        if let Some(t) = &target.position.timestamp
            && t.0 > now
        {
            return Ok(Err(Stop::pending(
                "TimestampInFuture",
                format!(
                    "{}.timestamp is {}, in the future: a replay from it would skip the \
                     records up to then; delete this Replay and create it again with a time \
                     in the past",
                    target.field, t.0
                ),
            )));
        }
        let partitions = match ctx
            .kafka
            .describe_topic(&target.topic, Reading::Fresh)
            .await
        {
            Ok(Some(t)) => t.partitions,
            Ok(None) => {
                return Ok(Err(Stop::pending(
                    "TopicNotFound",
                    format!("Kafka has no topic {}: waiting for it", target.topic),
                )));
            }
            Err(e) => {
                return Ok(Err(Stop::pending(
                    "KafkaError",
                    format!("cannot describe topic {}: {e}", target.topic),
                )));
            }
        };
        let all: Vec<(String, i32)> = (0..partitions).map(|p| (target.topic.clone(), p)).collect();
        let at = |spec| native.list_offsets(&all, spec, IsolationLevel::ReadUncommitted);
        let earliest = at(OffsetSpec::Earliest).await?;
        // The last stable offset: never past a transaction still open.
        let latest = native
            .list_offsets(&all, OffsetSpec::Latest, IsolationLevel::ReadCommitted)
            .await?;
        let by_time = match &target.position.timestamp {
            Some(t) => Some(at(OffsetSpec::Timestamp(t.0.as_millisecond())).await?),
            None => None,
        };
        let ranges = Ranges {
            partitions,
            earliest: &earliest,
            latest: &latest,
            by_time: by_time.as_ref(),
        };
        let positions = match positions(&target.topic, &target.field, &target.position, &ranges) {
            Ok(p) => p,
            Err(stop) => return Ok(Err(stop)),
        };
        if inbox_guards {
            let since = now - INBOX_WINDOW;
            let window = at(OffsetSpec::Timestamp(since.as_millisecond())).await?;
            if let Some(((topic, p), offset, first)) = beyond_window(&positions, &window, &latest) {
                return Ok(Err(Stop::pending(
                    "DuplicatesNotAllowed",
                    format!(
                        "{} goes back to {topic} partition {p} offset {offset}, before offset \
                         {first}, its first record of the last 7 days: the workers' inbox \
                         forgets event ids 7 days after processing them (the runtime's \
                         default retention), so older events would be applied again; \
                         delete this Replay and create it again from a later point, or with \
                         spec.allowDuplicates: true",
                        target.field
                    ),
                )));
            }
        }
        plan.extend(positions);
    }
    Ok(Ok(plan))
}

/// The first partition of `plan` that restarts before `window`'s offset (the first
/// record of the inbox's window; `-1`: none, so the partition's end), with both offsets.
/// Pure.
fn beyond_window(
    plan: &BTreeMap<(String, i32), i64>,
    window: &BTreeMap<(String, i32), i64>,
    latest: &BTreeMap<(String, i32), i64>,
) -> Option<((String, i32), i64, i64)> {
    plan.iter().find_map(|(key, &offset)| {
        let first = match window.get(key) {
            Some(-1) | None => *latest.get(key)?,
            Some(&w) => w,
        };
        (offset < first).then(|| (key.clone(), offset, first))
    })
}

/// What Kafka says of a topic's partitions.
struct Ranges<'a> {
    partitions: i32,
    earliest: &'a BTreeMap<(String, i32), i64>,
    latest: &'a BTreeMap<(String, i32), i64>,
    by_time: Option<&'a BTreeMap<(String, i32), i64>>,
}

/// Where each partition of `topic` restarts at `position` (`field` names it in the
/// spec), or the refusal naming it. Pure.
fn positions(
    topic: &str,
    field: &str,
    position: &ReplayPosition,
    r: &Ranges<'_>,
) -> Result<BTreeMap<(String, i32), i64>, Stop> {
    let key = |p: i32| (topic.to_string(), p);
    let unknown = |p: i32| {
        Stop::pending(
            "KafkaError",
            format!("Kafka gave no offsets for {topic} partition {p}: retrying"),
        )
    };
    let mut out = BTreeMap::new();
    if let Some(offsets) = &position.offsets {
        for (i, po) in offsets.iter().enumerate() {
            let field = format!("{field}.offsets[{i}]");
            if po.partition >= r.partitions {
                return Err(Stop::pending(
                    "OffsetOutOfRange",
                    format!(
                        "{field}.partition is {}, but {topic} has {} partitions: delete this \
                         Replay and create it again naming one of them",
                        po.partition, r.partitions
                    ),
                ));
            }
            let (Some(&lo), Some(&hi)) = (
                r.earliest.get(&key(po.partition)),
                r.latest.get(&key(po.partition)),
            ) else {
                return Err(unknown(po.partition));
            };
            if po.offset < lo || po.offset > hi {
                return Err(Stop::pending(
                    "OffsetOutOfRange",
                    format!(
                        "{field}.offset is {}, but {topic} partition {} holds offsets {lo} to \
                         {hi}: delete this Replay and create it again with one in that range",
                        po.offset, po.partition
                    ),
                ));
            }
            out.insert(key(po.partition), po.offset);
        }
        return Ok(out);
    }
    for p in 0..r.partitions {
        let offset = match r.by_time {
            // No record that late: restart at the end.
            Some(by_time) => match by_time.get(&key(p)) {
                Some(-1) => r.latest.get(&key(p)).copied(),
                other => other.copied(),
            },
            None => r.earliest.get(&key(p)).copied(),
        };
        out.insert(key(p), offset.ok_or_else(|| unknown(p))?);
    }
    Ok(out)
}

/// Records between an old committed offset and a later new one, summed: passed over,
/// never read.
fn skipped(offsets: &[ReplayedPartition]) -> i64 {
    offsets
        .iter()
        .filter_map(|p| p.before.map(|b| (p.after - b).max(0)))
        .sum()
}

/// Records between the new and the old committed offsets, summed.
fn rewound(offsets: &[ReplayedPartition]) -> i64 {
    offsets
        .iter()
        .filter_map(|p| p.before.map(|b| (b - p.after).max(0)))
        .sum()
}

/// The name of the Replay that `value` (a hold annotation) names, if it exists and has
/// not finished: a hold left by a Replay that is gone or done is stale.
async fn live_holder(ctx: &Context, ns: &str, value: &str) -> Result<Option<String>, Error> {
    let (name, uid) = value.split_once('/').unwrap_or((value, ""));
    let api: Api<Replay> = Api::namespaced(ctx.client.clone(), ns);
    let other = api.get_opt(name).await.map_err(|source| Error::Kube {
        action: "read the Replay holding a group",
        object: format!("Replay {ns}/{name}"),
        source,
    })?;
    Ok(other
        .filter(|o| o.uid().as_deref() == Some(uid))
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| {
            !matches!(
                o.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some(COMPLETED | REFUSED)
            )
        })
        .map(|o| o.name_any()))
}

/// Removes a hold from `cg` that no live Replay has (its Replay was deleted without its
/// finalizer running, or finished without releasing), so the autoscaler takes the group
/// back. A hold written meanwhile is left alone (resourceVersion precondition). Returns
/// whether `cg` is outdated now (this wrote, or somebody else had).
pub(crate) async fn clear_stale_hold(
    cg: &ConsumerGroup,
    ctx: &Context,
    groups: &Api<ConsumerGroup>,
) -> Result<bool, Error> {
    let Some(value) = cg.annotations().get(REPLAY_HOLD_ANNOTATION) else {
        return Ok(false);
    };
    let ns = cg.namespace().unwrap_or_default();
    if live_holder(ctx, &ns, value).await?.is_some() {
        return Ok(false);
    }
    match write_hold(ctx, groups, cg, None).await {
        Ok(()) => {
            warn!(consumergroup = %cg.name_any(), hold = %value, "removed a hold no live Replay has");
            Ok(true)
        }
        // Written meanwhile: the group changed; the next reconcile, soon, looks again.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(true),
        Err(e) => Err(Error::kube("release", cg, e)),
    }
}

/// Sets (`Some`) or removes (`None`) the hold annotation on `cg`, with `cg`'s
/// resourceVersion as a precondition: a write another made meanwhile fails with 409.
async fn write_hold(
    ctx: &Context,
    groups: &Api<ConsumerGroup>,
    cg: &ConsumerGroup,
    value: Option<&str>,
) -> kube::Result<()> {
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": cg.resource_version(),
        "annotations": {REPLAY_HOLD_ANNOTATION: value},
    }});
    ctx.metrics.kube_write("replay-hold");
    groups
        .patch(
            &cg.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(drop)
}

/// Removes `rp`'s hold from its ConsumerGroup, if it holds it.
async fn release(rp: &Replay, ctx: &Context, groups: &Api<ConsumerGroup>) -> Result<(), Error> {
    let Some(cg) = groups
        .get_opt(&rp.spec.consumer_group)
        .await
        .map_err(|e| Error::kube("read the ConsumerGroup of", rp, e))?
    else {
        return Ok(());
    };
    if cg.annotations().get(REPLAY_HOLD_ANNOTATION) != Some(&hold_value(rp)) {
        return Ok(());
    }
    write_hold(ctx, groups, &cg, None)
        .await
        .map_err(|e| Error::kube("release", &cg, e))?;
    info!(replay = %rp.name_any(), group = %cg.name_any(), "released the group");
    Ok(())
}

/// A Kafka failure while holding the group: shown in `Complete`, retried.
fn kafka_stop(what: &str, e: &NativeError) -> Stop {
    let message = match e {
        NativeError::Kafka { op, code, .. } => with_permission_hint(e.to_string(), op, *code),
        _ => e.to_string(),
    };
    Stop {
        phase: PENDING,
        observed: Observed::new(
            COMPLETE,
            false,
            "KafkaError",
            format!("cannot {what}: {message}"),
        ),
        requeue: Duration::from_secs(5),
    }
}

fn set(rp: &Replay, conditions: &[Condition], observed: Observed) -> Vec<Condition> {
    conditions::set(
        conditions,
        observed,
        rp.metadata.generation,
        Timestamp::now(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventops_crds::PartitionOffset;

    fn map(topic: &str, v: &[i64]) -> BTreeMap<(String, i32), i64> {
        v.iter()
            .enumerate()
            .map(|(p, o)| ((topic.to_string(), p as i32), *o))
            .collect()
    }

    fn run(position: ReplayPosition, by_time: Option<&[i64]>) -> Result<Vec<i64>, String> {
        let (earliest, latest) = (map("t", &[0, 5, 10]), map("t", &[100, 50, 10]));
        let by_time = by_time.map(|b| map("t", b));
        let ranges = Ranges {
            partitions: 3,
            earliest: &earliest,
            latest: &latest,
            by_time: by_time.as_ref(),
        };
        positions("t", "spec.from", &position, &ranges)
            .map(|m| m.into_values().collect())
            .map_err(|s| s.observed.message)
    }

    #[test]
    fn earliest_restarts_every_partition_at_its_log_start() {
        let from = ReplayPosition {
            earliest: Some(true),
            ..Default::default()
        };
        assert_eq!(run(from, None), Ok(vec![0, 5, 10]));
    }

    #[test]
    fn by_time_a_partition_without_a_later_record_restarts_at_its_end() {
        let from = ReplayPosition {
            timestamp: Some(Time(Timestamp::from_second(1_000).unwrap())),
            ..Default::default()
        };
        assert_eq!(run(from, Some(&[40, -1, 10])), Ok(vec![40, 50, 10]));
    }

    #[test]
    fn explicit_offsets_move_only_the_partitions_named_and_are_checked_against_kafka() {
        let at = |partition, offset| ReplayPosition {
            offsets: Some(vec![PartitionOffset { partition, offset }]),
            ..Default::default()
        };
        assert_eq!(run(at(1, 7), None), Ok(vec![7]));
        assert_eq!(run(at(1, 50), None), Ok(vec![50]), "the end is allowed");
        let e = run(at(1, 4), None).unwrap_err();
        assert!(
            e.contains("spec.from.offsets[0].offset is 4") && e.contains("offsets 5 to 50"),
            "{e}"
        );
        let e = run(at(3, 0), None).unwrap_err();
        assert!(
            e.contains("spec.from.offsets[0].partition is 3") && e.contains("3 partitions"),
            "{e}"
        );
    }

    #[test]
    fn a_plan_reaching_before_the_inbox_window_is_found() {
        let (latest, plan) = (map("t", &[100, 50]), map("t", &[30, 50]));
        // The window starts at offset 30 of partition 0: a restart there is inside it.
        assert_eq!(beyond_window(&plan, &map("t", &[30, -1]), &latest), None);
        assert_eq!(
            beyond_window(&plan, &map("t", &[31, -1]), &latest),
            Some((("t".to_string(), 0), 30, 31))
        );
        // No record in the window: every record of partition 1 is older than it; a
        // restart at its end reads none of them.
        assert_eq!(
            beyond_window(&map("t", &[30, 49]), &map("t", &[30, -1]), &latest),
            Some((("t".to_string(), 1), 49, 50))
        );
    }

    #[test]
    fn skipped_counts_what_a_move_ahead_passes_over() {
        let p = |before, after| ReplayedPartition {
            topic: "t".into(),
            partition: 0,
            before,
            after,
        };
        assert_eq!(skipped(&[p(Some(10), 4), p(Some(3), 8), p(None, 9)]), 5);
    }

    #[test]
    fn rewound_counts_what_is_read_again_and_never_a_skip_ahead() {
        let p = |before, after| ReplayedPartition {
            topic: "t".into(),
            partition: 0,
            before,
            after,
        };
        assert_eq!(rewound(&[p(Some(10), 4), p(Some(3), 8), p(None, 0)]), 6);
    }
}
