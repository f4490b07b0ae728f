//! The Redrive controller: resolves a Redrive's EventTopics, runs its redrive on a
//! blocking thread ([`runner`]), and mirrors the progress into status.
//!
//! The truth about how far a redrive got is in Kafka (its group's committed offsets,
//! with the counts in their metadata), committed in the same transaction as the records
//! it moved; status follows it. A redrive runs in the leading operator only, and
//! deleting its Redrive stops it between two batches.

pub mod runner;
pub mod select;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use eventops_crds::{EventTopic, Redrive, RedriveStatus};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::conditions::{self, Observed};
use crate::consumergroup::build::owns_its_topic;
use crate::context::Context;
use crate::error::Error;
use crate::kafka::KafkaSettings;
use runner::{Job, Progress, RunError};
use select::{Destination, Filter};

/// Condition type: the spec resolved (the EventTopics exist here and own their topics).
pub const ACCEPTED: &str = "Accepted";
/// Condition type: the redrive reached the end of every dead-letter partition.
pub const COMPLETE: &str = "Complete";
/// Prefix of every redrive's consumer group and transactional id (the operator's Kafka
/// user needs Read on groups and Write on transactional ids with this prefix).
pub const GROUP_PREFIX: &str = "eventops-redrive.";

/// Phase values.
const PENDING: &str = "Pending";
const RUNNING: &str = "Running";
const COMPLETED: &str = "Completed";

/// How often status follows the progress of a running redrive.
const STATUS_EVERY: Duration = Duration::from_secs(1);

struct Ctx {
    shared: Arc<Context>,
    kafka: KafkaSettings,
    redrives: Store<Redrive>,
    /// Running redrives by uid.
    running: std::sync::Mutex<BTreeMap<String, tokio::task::JoinHandle<()>>>,
    /// Set when the operator stops: every run stops between two batches.
    stopping: Arc<AtomicBool>,
    /// Per Redrive, the back-off of its failed reconciles.
    backoff: Backoff<Redrive>,
}

/// Runs the Redrive controller until `shutdown` resolves, then stops every redrive.
pub async fn run(
    shared: Arc<Context>,
    kafka: KafkaSettings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Redrive> = shared.api_for_watch();
    let controller = Controller::new(api, watcher::Config::default().any_semantic())
        .with_config(shared.settings.controller_config());
    let ctx = Arc::new(Ctx {
        shared,
        kafka,
        redrives: controller.store(),
        running: Default::default(),
        stopping: Default::default(),
        backoff: Default::default(),
    });
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "redrive reconcile failed");
            }
        })
        .await;
    ctx.stopping.store(true, Ordering::SeqCst);
    let running: Vec<_> = std::mem::take(&mut *ctx.running.lock().expect("not poisoned"))
        .into_values()
        .collect();
    for handle in running {
        let _ = handle.await;
    }
}

/// A failed reconcile is retried on the Redrive's own back-off.
fn error_policy(rd: Arc<Redrive>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let retry = ctx.backoff.failed(&rd, ctx.shared.settings.resync_interval);
    warn!(redrive = %rd.name_any(), %error, ?retry, "reconcile failed; retrying");
    ctx.shared
        .metrics
        .reconciled("redrive", Duration::ZERO, Some(&error.metric_label()));
    Action::requeue(retry)
}

/// The consumer group (and transactional id) of `rd`: stable for the object, new for a
/// Redrive created again under the same name.
pub fn group_id(rd: &Redrive) -> String {
    let uid = rd.uid().unwrap_or_default();
    format!(
        "{GROUP_PREFIX}{}.{}.{}",
        rd.namespace().unwrap_or_default(),
        rd.name_any(),
        &uid[..uid.len().min(8)]
    )
}

async fn reconcile(rd: Arc<Redrive>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let action = reconcile_inner(rd.clone(), ctx.clone()).await?;
    ctx.backoff.succeeded(&rd);
    Ok(action)
}

/// One reconcile: resolve the spec, then start the run (or say why it cannot start).
async fn reconcile_inner(rd: Arc<Redrive>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let status = rd.status.clone().unwrap_or_default();
    if status.phase.as_deref() == Some(COMPLETED) {
        return Ok(Action::await_change());
    }
    let uid = rd.uid().unwrap_or_default();
    if ctx
        .running
        .lock()
        .expect("not poisoned")
        .get(&uid)
        .is_some_and(|h| !h.is_finished())
    {
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let ns = rd.namespace().unwrap_or_default();
    let topics: Api<EventTopic> = Api::namespaced(ctx.shared.client.clone(), &ns);
    let all = topics
        .list(&Default::default())
        .await
        .map_err(|e| Error::kube("list the EventTopics of the namespace of", &*rd, e))?
        .items;
    let job = match resolve(&rd, &ns, &all) {
        Ok((source_topic, destination)) => Job {
            properties: ctx.kafka.properties.clone(),
            group_id: group_id(&rd),
            source_topic,
            ends: (!status.partitions.is_empty()).then(|| {
                status
                    .partitions
                    .iter()
                    .map(|p| (p.partition, p.end))
                    .collect()
            }),
            filter: Filter::from(&rd.spec.filter),
            destination,
            dry_run: rd.spec.dry_run,
            max_per_second: rd.spec.max_records_per_second.map(|r| r.max(1) as u32),
        },
        Err(refusal) => {
            let mut new = status.clone();
            new.phase = Some(PENDING.into());
            new.conditions = set(&rd, &new.conditions, refusal.clone());
            if new != status {
                crate::status::apply(&ctx.shared, &*rd, &new).await?;
                ctx.shared
                    .event(
                        &*rd,
                        EventType::Warning,
                        &refusal.reason,
                        "Resolve",
                        refusal.message,
                    )
                    .await;
            }
            ctx.shared
                .metrics
                .reconciled("redrive", started.elapsed(), Some(&refusal.reason));
            return Ok(Action::requeue(ctx.shared.settings.next_resync()));
        }
    };
    if status.started_at.is_none() {
        let note = format!(
            "{} {} from {}",
            if rd.spec.dry_run {
                "counting"
            } else {
                "moving"
            },
            "dead-letter records",
            job.source_topic
        );
        ctx.shared
            .event(&*rd, EventType::Normal, "Started", "Redrive", note)
            .await;
    }
    info!(redrive = %rd.name_any(), namespace = %ns, topic = %job.source_topic, "redrive starting");
    let handle = spawn(rd.clone(), ctx.clone(), job);
    ctx.running
        .lock()
        .expect("not poisoned")
        .insert(uid, handle);
    ctx.shared
        .metrics
        .reconciled("redrive", started.elapsed(), None);
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// The dead-letter topic to read and where its records go, or the refusal that names
/// the field to fix.
fn resolve(rd: &Redrive, ns: &str, all: &[EventTopic]) -> Result<(String, Destination), Observed> {
    let find = |name: &str| all.iter().find(|et| et.name_any() == name);
    let Some(source) = find(&rd.spec.source) else {
        return Err(Observed::new(
            ACCEPTED,
            false,
            "EventTopicNotFound",
            format!(
                "spec.source names EventTopic {} that does not exist in namespace {ns}: \
                 name an EventTopic of this namespace",
                rd.spec.source
            ),
        ));
    };
    let dlt = source.dead_letter_topic_name();
    let Some(dlt) = dlt.filter(|_| owns_its_topic(source)) else {
        return Err(Observed::new(
            ACCEPTED,
            false,
            "DeadLetterTopicNotOwned",
            format!(
                "spec.source: EventTopic {} has no dead-letter topic it owns (it needs \
                 spec.deadLetter.enabled and Ready=True, see its conditions)",
                rd.spec.source
            ),
        ));
    };
    let partitions = |et: &EventTopic| {
        et.status
            .as_ref()
            .and_then(|s| s.partitions)
            .unwrap_or(et.spec.partitions)
    };
    let destination = match &rd.spec.destination {
        Some(name) => match find(name).filter(|et| owns_its_topic(et)) {
            Some(et) => Destination::Fixed {
                topic: et.kafka_topic_name().to_string(),
                partitions: partitions(et),
            },
            None => {
                return Err(Observed::new(
                    ACCEPTED,
                    false,
                    "DestinationNotOwned",
                    format!(
                        "spec.destination names EventTopic {name} that does not exist in \
                         namespace {ns} or does not own its Kafka topic (see its Ready \
                         condition): name an EventTopic of this namespace, or leave \
                         spec.destination out to send each record back to its original topic"
                    ),
                ));
            }
        },
        None => Destination::Original(
            all.iter()
                .filter(|et| owns_its_topic(et))
                .map(|et| (et.kafka_topic_name().to_string(), partitions(et)))
                .collect(),
        ),
    };
    Ok((dlt, destination))
}

fn set(
    rd: &Redrive,
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    observed: Observed,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions::set(
        conditions,
        observed,
        rd.metadata.generation,
        Timestamp::now(),
    )
}

/// Runs `job` on a blocking thread, writing its progress to `rd`'s status.
fn spawn(rd: Arc<Redrive>, ctx: Arc<Ctx>, job: Job) -> tokio::task::JoinHandle<()> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut status = rd.status.clone().unwrap_or_default();
        status.source_topic = Some(job.source_topic.clone());
        status
            .started_at
            .get_or_insert_with(|| Time(Timestamp::now()));
        status.phase = Some(RUNNING.into());
        status.conditions = set(
            &rd,
            &status.conditions,
            Observed::new(
                ACCEPTED,
                true,
                "Resolved",
                format!("reading {}", job.source_topic),
            ),
        );
        let me = ObjectRef::from_obj(&*rd);
        let uid = rd.uid();
        let mut last_write: Option<Instant> = None;
        let mut report = |progress: &Progress| -> bool {
            if ctx.stopping.load(Ordering::SeqCst)
                || ctx.redrives.get(&me).is_none_or(|now| now.uid() != uid)
            {
                return false;
            }
            // The first report (the start and end of each partition) is written before
            // anything moves; later ones once a second.
            if last_write.is_some_and(|t| t.elapsed() < STATUS_EVERY) && !progress.done {
                return true;
            }
            follow(&mut status, &rd, progress);
            let written = runtime.block_on(crate::status::apply(&ctx.shared, &*rd, &status));
            match written {
                Ok(_) => {
                    last_write = Some(Instant::now());
                    true
                }
                Err(e) => {
                    warn!(redrive = %rd.name_any(), error = %e, "could not write a redrive's progress");
                    last_write.is_some()
                }
            }
        };
        let outcome = runner::run(&job, &mut report);
        match outcome {
            Ok(progress) => {
                follow(&mut status, &rd, &progress);
                status.phase = Some(COMPLETED.into());
                status.completed_at = Some(Time(Timestamp::now()));
                let t = progress.totals;
                let message = if rd.spec.dry_run {
                    format!(
                        "dry run: {} records match, {} would move, {} would be skipped",
                        t.matched, t.moved, t.skipped
                    )
                } else {
                    format!(
                        "moved {} of {} matching records, skipped {}",
                        t.moved, t.matched, t.skipped
                    )
                };
                status.conditions = set(
                    &rd,
                    &status.conditions,
                    Observed::new(COMPLETE, true, COMPLETED, message.clone()),
                );
                runtime.block_on(async {
                    if let Err(e) = crate::status::apply(&ctx.shared, &*rd, &status).await {
                        warn!(redrive = %rd.name_any(), error = %e, "could not write a redrive's completion");
                    }
                    ctx.shared
                        .event(&*rd, EventType::Normal, COMPLETED, "Redrive", message)
                        .await;
                });
                info!(redrive = %rd.name_any(), moved = t.moved, matched = t.matched, "redrive completed");
            }
            Err(RunError::Cancelled) => {
                info!(redrive = %rd.name_any(), "redrive stopped");
            }
            Err(e) => {
                let message = format!(
                    "{}; starting again from the committed position",
                    explain(&e)
                );
                status.conditions = set(
                    &rd,
                    &status.conditions,
                    Observed::new(COMPLETE, false, "KafkaError", message.clone()),
                );
                runtime.block_on(async {
                    let _ = crate::status::apply(&ctx.shared, &*rd, &status).await;
                    ctx.shared
                        .event(&*rd, EventType::Warning, "KafkaError", "Redrive", message)
                        .await;
                });
                warn!(redrive = %rd.name_any(), error = %e, "redrive failed; it starts again");
            }
        }
    })
}

/// `e`, with the ACL the operator's Kafka user lacks when Kafka refused for want of one.
pub(crate) fn explain(e: &RunError) -> String {
    match permission_hint(e) {
        Some(acl) => format!(
            "{e}; the operator's Kafka user lacks the ACL \"{acl}\" (see the Kafka \
             permissions in the EventOps chart README)"
        ),
        None => e.to_string(),
    }
}

/// The ACL the operator's Kafka user lacks, when Kafka refused `e` for want of one.
fn permission_hint(e: &RunError) -> Option<&'static str> {
    use rdkafka::types::RDKafkaErrorCode as C;
    let RunError::Kafka { what, error, .. } = e else {
        return None;
    };
    let text = e.to_string();
    let code = error.rdkafka_error_code();
    let topic = code == Some(C::TopicAuthorizationFailed)
        || text.contains("TopicAuthorizationFailed")
        || text.contains("Topic authorization failed");
    if code == Some(C::TransactionalIdAuthorizationFailed)
        || text.contains("TransactionalIdAuthorizationFailed")
    {
        Some("Write on TransactionalId prefix eventops-redrive.")
    } else if code == Some(C::GroupAuthorizationFailed)
        || text.contains("GroupAuthorizationFailed")
        || text.contains("Group authorization failed")
    {
        Some("Read on Group prefix eventops-redrive.")
    } else if topic && matches!(*what, "send a redriven record" | "commit the transaction") {
        Some("Write on Topic")
    } else if topic {
        Some("Read on Topic")
    } else {
        None
    }
}

/// `status` following `progress`.
fn follow(status: &mut RedriveStatus, rd: &Redrive, progress: &Progress) {
    status.matched = progress.totals.matched;
    status.moved = progress.totals.moved;
    status.skipped = progress.totals.skipped;
    status.partitions = progress.partitions.clone();
    if !progress.samples.is_empty() {
        status.samples = progress.samples.clone();
    }
    let (reason, message) = match &progress.retrying {
        Some(error) => ("KafkaError", format!("{error}; retrying the batch")),
        None => (
            RUNNING,
            format!(
                "{} matching records so far, {} moved, {} skipped",
                progress.totals.matched, progress.totals.moved, progress.totals.skipped
            ),
        ),
    };
    status.conditions = set(
        rd,
        &status.conditions,
        Observed::new(COMPLETE, false, reason, message),
    );
}
