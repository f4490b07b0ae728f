//! Lag-based autoscaler: one loop that, every cycle, measures every ConsumerGroup's lag
//! together and sets each group's Deployment replicas through its scale subresource.
//!
//! Kafka cost per cycle does not depend on the number of groups: one Metadata request
//! (partition counts, so added partitions count at once), one ListOffsets request per
//! partition leader for log-start offsets and one for last stable offsets, and the
//! committed offsets of all groups from one consumer of `__consumer_offsets`
//! ([`offsets`]). Lag ([`lag`]) and decision ([`decide`]) are pure.
//!
//! Status is written only when the decision or the `LagStuck` condition changes, or at
//! most every [`LAG_STATUS_INTERVAL`] while lag figures move: a quiet group causes no
//! writes. Live lag is in the Prometheus metrics.

pub mod decide;
pub mod lag;
pub mod offsets;
pub mod rate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventops_crds::{
    ConsumerGroup, ConsumerGroupStatus, EventTopic, PartitionLag, REPLAY_HOLD_ANNOTATION,
    ScaleRecord,
};
use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::conditions::{self, Observed};
use crate::consumergroup::build;
use crate::context::Context;
use crate::kafka::KafkaSettings;
use crate::kafka::native::{IsolationLevel, OffsetSpec};
use crate::telemetry::{GroupLabels, PartitionLabels};
use decide::{Decision, History, Measured, Partition, Policy};
use lag::{OffsetReset, Offsets};
use rate::{Observation, RateTracker, Rates};

/// Condition type set while partitions have lag that is not being processed.
pub const STUCK: &str = "LagStuck";

/// Condition type that says whether the group's lag could be measured. False (with
/// Kafka's error) while committed offsets cannot be read: then no scaling decision is
/// made, and the lag is neither zero nor everything, but unknown.
pub const LAG_MEASURED: &str = "LagMeasured";

/// The condition types this loop owns in a ConsumerGroup's status.
pub const CONDITIONS: [&str; 2] = [LAG_MEASURED, STUCK];

/// Field manager of the autoscaler's status fields and of the replicas it sets: the
/// reconciler's status apply leaves these alone, so the two writers never fight.
pub const FIELD_MANAGER: &str = "eventops-operator-autoscaler";

/// Longest time lag figures in status may lag behind, while they change.
pub const LAG_STATUS_INTERVAL: Duration = Duration::from_secs(30);

/// Partitions listed in `status.partitionLag`.
const STATUS_PARTITIONS: usize = 32;

/// Lag up to which an unmoving partition is checked for being only transaction
/// markers or compacted-away records.
const PROBE_MAX_LAG: i64 = 16;

/// Probes per cycle at most, so a cycle stays short.
const PROBES_PER_CYCLE: usize = 8;

/// Where workers without a committed offset start. EventOps workers never skip records
/// ("nothing is lost"), so a new group has everything still stored to process.
const RESET: OffsetReset = OffsetReset::Earliest;

/// Everything the loop remembers about one group.
struct GroupState {
    history: History,
    /// Last cycle's (committed, end) per partition, to see what did not move.
    last: BTreeMap<Partition, (Option<i64>, i64)>,
    /// The status this loop last wrote (the watch cache may not show it yet) and when.
    written: Option<(ConsumerGroupStatus, Instant)>,
    /// Replicas this loop last set, and when: trusted over a Deployment watch that has
    /// not caught up yet.
    applied: Option<(i32, Instant)>,
    /// The Deployment's replicas as last seen, to notice changes made by others.
    seen: i32,
    partition_labels: BTreeSet<PartitionLabels>,
    /// Arrival and processing rates, for `scaling.drainWithin`.
    rates: RateTracker,
}

/// Runs the autoscaler until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    kafka: KafkaSettings,
    interval: Duration,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let metrics = ctx.metrics.clone();
    let committed = match offsets::CommittedOffsets::start(&kafka, metrics.clone()) {
        Ok(c) => c,
        Err(error) => {
            warn!(%error, "cannot start the offsets reader; autoscaling is off");
            return;
        }
    };
    let probe = match offsets::Probe::new(&kafka, metrics.clone()) {
        Ok(p) => Arc::new(p),
        Err(error) => {
            warn!(%error, "cannot start the lag probe; autoscaling is off");
            committed.stop();
            return;
        }
    };
    let (topics, deployments) = (ctx.topics.clone(), ctx.deployments.clone());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut states: HashMap<ObjectRef<ConsumerGroup>, GroupState> = HashMap::new();
    let mut probed: HashMap<(Partition, i64, i64), bool> = HashMap::new();
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    let mut waiting_logged = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        if committed.failure().is_none() && !committed.caught_up() {
            if !waiting_logged {
                info!("autoscaler waits until every committed offset is read");
                waiting_logged = true;
            }
            continue;
        }
        let started = Instant::now();
        let cycle = Cycle {
            ctx: &ctx,
            topics: &topics,
            deployments: &deployments,
            committed: &committed,
            probe: &probe,
        };
        if let Err(error) = cycle.run(&mut states, &mut probed).await {
            warn!(%error, "autoscaler cycle failed");
        }
        metrics.autoscaler_cycle(started.elapsed());
    }
    committed.stop();
}

struct Cycle<'a> {
    ctx: &'a Context,
    topics: &'a Store<EventTopic>,
    deployments: &'a Store<Deployment>,
    committed: &'a offsets::CommittedOffsets,
    probe: &'a Arc<offsets::Probe>,
}

/// A group ready to be measured: its Kafka topics and current replicas.
struct Target {
    cg: Arc<ConsumerGroup>,
    topics: Vec<String>,
    replicas: i32,
    /// Workers Ready now, as the Deployment reports them: the ones processing.
    ready: i32,
}

impl Cycle<'_> {
    async fn run(
        &self,
        states: &mut HashMap<ObjectRef<ConsumerGroup>, GroupState>,
        probed: &mut HashMap<(Partition, i64, i64), bool>,
    ) -> anyhow::Result<()> {
        let targets = self.targets(states);
        // Forget groups that went away, and their metrics.
        let live: std::collections::HashSet<_> = targets
            .iter()
            .map(|t| ObjectRef::from_obj(&*t.cg))
            .collect();
        states.retain(|key, state| {
            let keep = live.contains(key);
            if !keep {
                self.forget_metrics(key, state);
            }
            keep
        });
        if targets.is_empty() {
            return Ok(());
        }

        // Measure: the same requests for one group or a thousand. What cannot be
        // measured is reported, per group, and decides nothing.
        let kafka = &self.ctx.kafka;
        let leaders = match kafka.partition_leaders().await {
            Ok(leaders) => leaders,
            Err(error) => {
                let why = error.to_string();
                for target in &targets {
                    let state = states.get_mut(&ObjectRef::from_obj(&*target.cg));
                    let state = state.expect("a state for every target");
                    self.unmeasured(target, state, &why).await;
                }
                return Err(error.into());
            }
        };
        let reader_failure = self.committed.failure();
        let offsets_leaders = leaders.get(offsets::OFFSETS_TOPIC);
        let unreadable = |group: &str| -> Option<String> {
            if let Some(why) = &reader_failure {
                return Some(why.clone());
            }
            let leaders = offsets_leaders?;
            let p = offsets::offsets_partition(group, leaders.len());
            leaders.get(p as usize).is_some_and(|l| *l < 0).then(|| {
                format!(
                    "partition {p} of {}, where group {group}'s commits are kept, has no \
                     leader",
                    offsets::OFFSETS_TOPIC
                )
            })
        };
        let (targets, blind): (Vec<Target>, Vec<(Target, String)>) =
            targets
                .into_iter()
                .fold((vec![], vec![]), |(mut ok, mut blind), t| {
                    match unreadable(t.cg.kafka_group_id()) {
                        Some(why) => blind.push((t, why)),
                        None => ok.push(t),
                    }
                    (ok, blind)
                });
        for (target, why) in &blind {
            let state = states.get_mut(&ObjectRef::from_obj(&*target.cg));
            self.unmeasured(target, state.expect("a state for every target"), why)
                .await;
        }
        if targets.is_empty() {
            return Ok(());
        }
        let wanted: BTreeSet<&String> = targets.iter().flat_map(|t| &t.topics).collect();
        let mut partitions = Vec::new();
        let mut brokers = BTreeSet::new();
        for topic in wanted {
            for (p, leader) in leaders.get(topic).into_iter().flatten().enumerate() {
                partitions.push((topic.clone(), p as i32));
                if *leader >= 0 {
                    brokers.insert(*leader);
                }
            }
        }
        let native = kafka.native();
        for _ in 0..2 * brokers.len() {
            kafka.metrics().kafka_request("ListOffsets");
        }
        let listed = tokio::try_join!(
            native.list_offsets(
                &partitions,
                OffsetSpec::Earliest,
                IsolationLevel::ReadUncommitted
            ),
            native.list_offsets(
                &partitions,
                OffsetSpec::Latest,
                IsolationLevel::ReadCommitted
            ),
        );
        // The rates' intervals run from one read of the offsets to the next, not from
        // whenever this cycle reaches a group (after others' probes and writes).
        let read_at = Instant::now();
        let (start, end) = match listed {
            Ok(offsets) => offsets,
            Err(error) => {
                let why = match &error {
                    crate::kafka::native::NativeError::Kafka { op, code, .. } => {
                        conditions::with_permission_hint(error.to_string(), op, *code)
                    }
                    _ => error.to_string(),
                };
                for target in &targets {
                    let state = states.get_mut(&ObjectRef::from_obj(&*target.cg));
                    self.unmeasured(target, state.expect("a state for every target"), &why)
                        .await;
                }
                return Err(error.into());
            }
        };

        let mut seen_probes = BTreeSet::new();
        let mut probes_left = PROBES_PER_CYCLE;
        for target in targets {
            let key = ObjectRef::from_obj(&*target.cg);
            let state = states.get_mut(&key).expect("a state for every target");
            let committed = self.committed.group(target.cg.kafka_group_id());
            let mut measured = BTreeMap::new();
            // Kept only for groups that scale on rates: a copy per partition per cycle.
            let track_rates = target.cg.spec.scaling.drain_within.is_some();
            let mut observed = BTreeMap::new();
            let mut complete = true;
            for topic in &target.topics {
                // Not in the metadata (just created, or deleted behind our back): no
                // partitions is not zero lag, so no decision this cycle.
                let Some(count) = leaders.get(topic).map(|l| l.len() as i32) else {
                    complete = false;
                    continue;
                };
                for p in 0..count {
                    let tp = (topic.clone(), p);
                    let (Some(&s), Some(&e)) = (start.get(&tp), end.get(&tp)) else {
                        complete = false;
                        continue;
                    };
                    let c = committed.get(&tp).copied();
                    let mut lag = lag::lag(
                        Offsets {
                            start: s,
                            end: e,
                            committed: c,
                        },
                        RESET,
                    );
                    // Only markers or compacted-away records left? A consumer would
                    // receive nothing, so it has nothing to do.
                    let unmoved = state.last.get(&tp) == Some(&(c, e));
                    if let Some(c) = c
                        && lag > 0
                        && lag <= PROBE_MAX_LAG
                        && unmoved
                    {
                        let probe_key = (tp.clone(), c, e);
                        seen_probes.insert(probe_key.clone());
                        let has_record = match probed.get(&probe_key) {
                            Some(known) => Some(*known),
                            None if probes_left > 0 => {
                                probes_left -= 1;
                                self.ctx.metrics.kafka_request("Fetch");
                                let probe = self.probe.clone();
                                let (t, p2) = (tp.0.clone(), tp.1);
                                let answer = tokio::task::spawn_blocking(move || {
                                    probe.has_record(&t, p2, c, e, Duration::from_secs(2))
                                })
                                .await
                                .ok()
                                .flatten();
                                if let Some(a) = answer {
                                    probed.insert(probe_key, a);
                                }
                                answer
                            }
                            None => None,
                        };
                        if has_record == Some(false) {
                            lag = 0;
                        }
                    }
                    state.last.insert(tp.clone(), (c, e));
                    if track_rates {
                        let o = Observation {
                            end: e,
                            committed: c,
                            lag,
                        };
                        observed.insert(tp.clone(), o);
                    }
                    measured.insert(tp, Measured { lag, committed: c });
                }
            }
            if !complete {
                // A partition without offsets (leader moving): decide next cycle rather
                // than on part of the lag.
                continue;
            }
            state.last.retain(|tp, _| measured.contains_key(tp));
            let rates = if track_rates {
                state.rates.observe(read_at, &observed, target.ready)
            } else {
                state.rates = RateTracker::default();
                Rates::default()
            };
            self.evaluate(&target, state, &measured, &rates).await;
        }
        probed.retain(|k, _| seen_probes.contains(k));
        Ok(())
    }

    /// The groups to measure: not being deleted, topics resolved, Deployment present.
    fn targets(&self, states: &mut HashMap<ObjectRef<ConsumerGroup>, GroupState>) -> Vec<Target> {
        let now = Instant::now();
        let topics = self.topics.state();
        let topics: HashMap<(String, String), &EventTopic> = topics
            .iter()
            .map(|et| ((et.namespace().unwrap_or_default(), et.name_any()), &**et))
            .collect();
        self.ctx
            .groups
            .state()
            .into_iter()
            .filter(|cg| cg.metadata.deletion_timestamp.is_none())
            // A Replay holds the group at 0 replicas until its offsets are set.
            .filter(|cg| !cg.annotations().contains_key(REPLAY_HOLD_ANNOTATION))
            .filter_map(|cg| {
                let ns = cg.namespace().unwrap_or_default();
                let routes = build::resolve_topics(&cg, |name| {
                    topics.get(&(ns.clone(), name.to_string())).copied()
                })
                .ok()?;
                let deployment = self
                    .deployments
                    .get(&ObjectRef::new(&cg.name_any()).within(&ns))?;
                let observed = deployment.spec.replicas.unwrap_or(1);
                let key = ObjectRef::from_obj(&*cg);
                let state = states.entry(key).or_insert_with(|| GroupState {
                    history: decide::history_for(observed, now),
                    last: BTreeMap::new(),
                    written: None,
                    applied: None,
                    seen: observed,
                    partition_labels: BTreeSet::new(),
                    rates: RateTracker::default(),
                });
                let ours = state.applied.is_some_and(|(n, _)| n == observed);
                if observed != state.seen && !ours {
                    state.history.external_change(observed, now);
                }
                state.seen = observed;
                let replicas = match state.applied {
                    Some((n, at))
                        if n != observed && now.duration_since(at) < Duration::from_secs(10) =>
                    {
                        n
                    }
                    _ => observed,
                };
                let ready = deployment
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                Some(Target {
                    topics: routes.into_iter().map(|r| r.topic).collect(),
                    cg,
                    replicas,
                    ready,
                })
            })
            .collect()
    }

    /// Decides, applies, reports.
    async fn evaluate(
        &self,
        target: &Target,
        state: &mut GroupState,
        measured: &BTreeMap<Partition, Measured>,
        rates: &Rates,
    ) {
        let cg = &target.cg;
        let now = Instant::now();
        let policy = Policy::from(&cg.spec.scaling);
        let decision = decide::decide(
            &policy,
            rates,
            &mut state.history,
            measured,
            target.replicas,
            now,
        );
        self.record_metrics(cg, state, measured, &decision);

        let old = state
            .written
            .as_ref()
            .map(|(s, _)| s.clone())
            .or_else(|| cg.status.clone())
            .unwrap_or_default();
        let mut last_scale = old.last_scale.clone();
        if decision.replicas == target.replicas && decision.total_lag > 0 {
            // Why a group with lag stays as it is (held, waiting, enough): for an operator
            // asking why a spike was met late.
            debug!(consumergroup = %cg.name_any(), replicas = decision.replicas, reason = %decision.reason, "unchanged");
        }
        if decision.replicas != target.replicas {
            match self.scale(cg, target.replicas, &decision).await {
                Ok(record) => {
                    if decision.replicas > target.replicas {
                        state.history.scaled_up(now);
                    }
                    state.applied = Some((decision.replicas, now));
                    last_scale = Some(record);
                }
                Err(error) => {
                    warn!(consumergroup = %cg.name_any(), %error, "cannot scale");
                }
            }
        }
        self.write_status(cg, state, &decision, &old, last_scale, measured)
            .await;
    }

    async fn scale(
        &self,
        cg: &ConsumerGroup,
        from: i32,
        decision: &Decision,
    ) -> Result<ScaleRecord, kube::Error> {
        let ns = cg.namespace().unwrap_or_default();
        let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &ns);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let to = decision.replicas;
        self.ctx.metrics.kube_write("scale");
        api.patch_scale(
            &cg.name_any(),
            &params,
            &Patch::Merge(serde_json::json!({"spec": {"replicas": to}})),
        )
        .await?;
        let (reason, direction) = if to > from {
            ("ScaledUp", "up")
        } else {
            ("ScaledDown", "down")
        };
        self.ctx.metrics.scaled(direction);
        info!(consumergroup = %cg.name_any(), from, to, reason = %decision.reason, "scaled");
        self.scale_event(
            cg,
            reason,
            format!("{from} → {to} replicas: {}", decision.reason),
        )
        .await;
        Ok(ScaleRecord {
            time: Time(Timestamp::now()),
            from,
            to,
            reason: decision.reason.clone(),
        })
    }

    /// Publishes a scale Event as an Event of its own. kube-runtime's Recorder keys its
    /// series by reason and action, not by note, and only bumps the first Event's count
    /// for a repeat within its cache lifetime: the second `ScaledUp` would show the
    /// first one's from → to. Each scale is a separate fact with its own numbers.
    async fn scale_event(&self, cg: &ConsumerGroup, reason: &str, note: String) {
        use k8s_openapi::api::events::v1::Event;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
        let ns = cg.namespace().unwrap_or_default();
        let now = Timestamp::now();
        let instance = std::env::var("POD_NAME").unwrap_or_else(|_| crate::FIELD_MANAGER.into());
        let event = Event {
            metadata: ObjectMeta {
                // Unique per Event, like the Recorder's names: `<object>.<nanoseconds>`.
                name: Some(format!("{}.{:x}", cg.name_any(), now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            action: Some("Scale".into()),
            reason: Some(reason.into()),
            note: Some(note),
            type_: Some("Normal".into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(cg.object_ref(&())),
            reporting_controller: Some(crate::FIELD_MANAGER.into()),
            reporting_instance: Some(instance),
            ..Default::default()
        };
        self.ctx.metrics.kube_write("Event");
        let api: Api<Event> = Api::namespaced(self.ctx.client.clone(), &ns);
        if let Err(error) = api.create(&Default::default(), &event).await {
            warn!(%error, reason, "could not publish Event");
        }
    }

    async fn write_status(
        &self,
        cg: &ConsumerGroup,
        state: &mut GroupState,
        decision: &Decision,
        old: &ConsumerGroupStatus,
        last_scale: Option<ScaleRecord>,
        measured: &BTreeMap<Partition, Measured>,
    ) {
        let stuck = !decision.stuck.is_empty();
        let rates = &decision.rates;
        // Which partitions, not how much lag: the lag moves every cycle, and a condition
        // that changed with it would be a status write every cycle. The figures are in
        // status.partitionLag and the metrics.
        let message = if stuck {
            let list: Vec<String> = decision
                .stuck
                .iter()
                .map(|(t, p)| format!("{t}/{p}"))
                .collect();
            format!(
                "committed offset not moving for scaling.stuckAfter while lag remains: {}; \
                 they count for one replica, not more",
                list.join(", ")
            )
        } else {
            "every partition with lag is being processed".to_string()
        };
        let observed = Observed::new(
            STUCK,
            stuck,
            if stuck {
                "PartitionsStuck"
            } else {
                "Progressing"
            },
            message,
        );
        let old_own = own_conditions(&old.conditions);
        let generation = cg.metadata.generation;
        let measured_ok = Observed::new(
            LAG_MEASURED,
            true,
            "Measured",
            "committed offsets and partition ends were read",
        );
        let own = conditions::set(&old_own, measured_ok, generation, Timestamp::now());
        let mut partition_lag: Vec<PartitionLag> = measured
            .iter()
            .filter(|(_, m)| m.lag > 0)
            .map(|((topic, partition), m)| PartitionLag {
                topic: topic.clone(),
                partition: *partition,
                lag: m.lag,
            })
            .collect();
        partition_lag.sort_by_key(|p| std::cmp::Reverse(p.lag));
        partition_lag.truncate(STATUS_PARTITIONS);
        let new = ConsumerGroupStatus {
            conditions: conditions::set(&own, observed.clone(), generation, Timestamp::now()),
            desired_replicas: Some(decision.replicas),
            total_lag: Some(decision.total_lag),
            partition_lag,
            last_scale,
            arrival_rate: rates.arrival.map(status_rate),
            processing_rate_per_replica: rates.per_replica.map(status_rate),
            ..Default::default()
        };
        let decision_changed = new.desired_replicas != old.desired_replicas
            || new.last_scale != old.last_scale
            || new.conditions != old_own
            // The first processing rate changes what decides: worth saying at once.
            || new.processing_rate_per_replica.is_some() != old.processing_rate_per_replica.is_some();
        let figures_changed = new.total_lag != old.total_lag
            || new.partition_lag != old.partition_lag
            || new.arrival_rate != old.arrival_rate
            || new.processing_rate_per_replica != old.processing_rate_per_replica;
        let due = state
            .written
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= LAG_STATUS_INTERVAL);
        if !(decision_changed || (figures_changed && due)) {
            return;
        }
        if stuck && conditions::find(&old_own, STUCK).is_none_or(|c| c.status != "True") {
            self.ctx
                .event(
                    cg,
                    EventType::Warning,
                    "LagStuck",
                    "Scale",
                    observed.message.clone(),
                )
                .await;
        }
        self.apply_status(cg, state, new).await;
    }

    /// Applies the fields this loop owns in `cg`'s status.
    async fn apply_status(
        &self,
        cg: &ConsumerGroup,
        state: &mut GroupState,
        new: ConsumerGroupStatus,
    ) {
        let ns = cg.namespace().unwrap_or_default();
        let api: Api<ConsumerGroup> = Api::namespaced(self.ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": "eventops.dev/v1alpha1",
            "kind": "ConsumerGroup",
            "status": new,
        });
        self.ctx.metrics.kube_write("status");
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&cg.name_any(), &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => state.written = Some((new, Instant::now())),
            Err(error) => warn!(consumergroup = %cg.name_any(), %error, "cannot write status"),
        }
    }

    /// A group whose lag cannot be measured this cycle (`why`, in Kafka's words): no
    /// decision, replicas left as they are, lag figures withdrawn rather than shown as
    /// zero or stale, and `LagMeasured=False` written once, when that becomes so.
    async fn unmeasured(&self, target: &Target, state: &mut GroupState, why: &str) {
        let cg = &target.cg;
        let m = &self.ctx.metrics;
        let group = GroupLabels {
            namespace: cg.namespace().unwrap_or_default(),
            consumergroup: cg.name_any(),
        };
        m.lag_measured.get_or_create(&group).set(0);
        m.group_lag.remove(&group);
        for l in &state.partition_labels {
            m.partition_lag.remove(l);
        }
        state.partition_labels.clear();
        // Offsets seen before the gap say nothing about progress across it.
        state.last.clear();
        state.rates.gap();
        m.arrival_rate.remove(&group);
        let old = state
            .written
            .as_ref()
            .map(|(s, _)| s.clone())
            .or_else(|| cg.status.clone())
            .unwrap_or_default();
        let old_own = own_conditions(&old.conditions);
        let observed = Observed::new(
            LAG_MEASURED,
            false,
            "OffsetsUnreadable",
            format!(
                "lag is unknown, so replicas stay at {} until it can be measured again: {why}",
                target.replicas
            ),
        );
        let was_measured =
            conditions::find(&old_own, LAG_MEASURED).is_none_or(|c| c.status == "True");
        let new = ConsumerGroupStatus {
            conditions: conditions::set(
                &old_own,
                observed.clone(),
                cg.metadata.generation,
                Timestamp::now(),
            ),
            desired_replicas: old.desired_replicas,
            last_scale: old.last_scale.clone(),
            ..Default::default()
        };
        if new.conditions == old_own && old.total_lag.is_none() && old.partition_lag.is_empty() {
            return;
        }
        if was_measured {
            warn!(consumergroup = %cg.name_any(), error = %why, "lag cannot be measured");
            self.ctx
                .event(
                    &**cg,
                    EventType::Warning,
                    "LagUnmeasured",
                    "Scale",
                    observed.message.clone(),
                )
                .await;
        }
        self.apply_status(cg, state, new).await;
    }

    fn record_metrics(
        &self,
        cg: &ConsumerGroup,
        state: &mut GroupState,
        measured: &BTreeMap<Partition, Measured>,
        decision: &Decision,
    ) {
        let m = &self.ctx.metrics;
        let rates = &decision.rates;
        let group = GroupLabels {
            namespace: cg.namespace().unwrap_or_default(),
            consumergroup: cg.name_any(),
        };
        m.lag_measured.get_or_create(&group).set(1);
        for (family, rate) in [
            (&m.arrival_rate, rates.arrival),
            (&m.processing_rate, rates.per_replica),
        ] {
            match rate {
                Some(r) => {
                    family.get_or_create(&group).set(r);
                }
                None => {
                    family.remove(&group);
                }
            }
        }
        m.group_lag.get_or_create(&group).set(decision.total_lag);
        m.desired_replicas
            .get_or_create(&group)
            .set(decision.replicas.into());
        let mut labels = BTreeSet::new();
        for ((topic, partition), p) in measured {
            let l = PartitionLabels {
                namespace: group.namespace.clone(),
                consumergroup: group.consumergroup.clone(),
                topic: topic.clone(),
                partition: partition.to_string(),
            };
            m.partition_lag.get_or_create(&l).set(p.lag);
            labels.insert(l);
        }
        for gone in state.partition_labels.difference(&labels) {
            m.partition_lag.remove(gone);
        }
        state.partition_labels = labels;
    }

    fn forget_metrics(&self, key: &ObjectRef<ConsumerGroup>, state: &GroupState) {
        let m = &self.ctx.metrics;
        let group = GroupLabels {
            namespace: key.namespace.clone().unwrap_or_default(),
            consumergroup: key.name.clone(),
        };
        m.group_lag.remove(&group);
        m.desired_replicas.remove(&group);
        m.lag_measured.remove(&group);
        m.arrival_rate.remove(&group);
        m.processing_rate.remove(&group);
        for l in &state.partition_labels {
            m.partition_lag.remove(l);
        }
    }
}

/// A rate as status shows it: to a tenth of a record per second, so that noise in the
/// last digits does not count as a change.
fn status_rate(r: f64) -> f64 {
    (r * 10.0).round() / 10.0
}

/// The conditions among `all` that this loop owns.
fn own_conditions(
    all: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    all.iter()
        .filter(|c| CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect()
}
