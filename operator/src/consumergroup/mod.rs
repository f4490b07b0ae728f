//! ConsumerGroup reconciler, once per pass: dereference (the shared caches of
//! ConsumerGroups, EventTopics and Deployments, the Secret, Kafka's user and grants) →
//! build ([`plan`] and [`build`], pure) → apply (Kafka, then server-side apply of only
//! what differs) → status. Kafka's failures that may pass by themselves fail the pass
//! once status says so, and are retried on the group's back-off ([`crate::backoff`]).

pub mod build;
pub mod outbox;
pub mod plan;
pub mod produces;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use eventops_crds::{
    ConsumerGroup, ConsumerGroupStatus, EventTopic, RELEASE_FINALIZER_ANNOTATION,
    annotation_is_true,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::conditions::{self, Observed};
use crate::context::Context;
use crate::error::Error;
use crate::kafka::Reading;
use crate::kafka::native::{AclBinding, AclFilter, NativeError, ScramMechanism};
use crate::watch::{SharedWatch, TriggerStream, spec_metadata_and, spec_or_metadata};
use build::{ROTATED_FOR_ANNOTATION, WorkerKafka};

/// Runs the ConsumerGroup controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    triggers: Triggers<
        impl TriggerStream<ConsumerGroup>,
        impl TriggerStream<EventTopic>,
        impl TriggerStream<Deployment>,
    >,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let controller = Controller::for_stream(triggers.groups, ctx.groups.clone())
        .with_config(ctx.settings.fair_controller_config());
    let groups = ctx.groups.clone();
    controller
        // A deleted or edited Deployment is put back; its replica count goes to status.
        .owns_stream(triggers.deployments)
        // A group waiting for an EventTopic goes on as soon as it appears and owns its
        // topics; a group whose EventTopic stops owning them loses its grants.
        .watches_stream(triggers.topics, move |et| {
            groups
                .state()
                .into_iter()
                .filter(|cg| cg.namespace() == et.namespace())
                .filter(|cg| names_event_topic(cg, &et.name_any()))
                .map(|cg| ObjectRef::from_obj(&*cg))
                .collect::<Vec<_>>()
        })
        // Reconciles waiting for a turn return at once (see `Turns::close`).
        .graceful_shutdown_on({
            let ctx = ctx.clone();
            async move {
                shutdown.await;
                ctx.group_turns.close();
            }
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "consumergroup reconcile failed");
            }
        })
        .await;
}

/// What starts a ConsumerGroup reconcile.
pub struct Triggers<G, T, D> {
    /// ConsumerGroups: added, deleted, or changed in spec or metadata.
    pub groups: G,
    /// EventTopics: added, deleted, or changed in spec, metadata or in whether they own
    /// their Kafka topics (status; see [`build::owns_its_topic`]), and their first status
    /// (which ends a new group's quiet wait, see [`plan::quiet_wait`]). The consumers an
    /// EventTopic lists follow from the groups and start nothing.
    pub topics: T,
    /// The groups' Deployments: added, deleted, or changed in spec, metadata or in the
    /// replica count (the one status figure the group's status shows; each pod's
    /// progress starts nothing).
    pub deployments: D,
}

/// The ConsumerGroup controller's triggers, subscribed from the shared watches.
pub fn triggers(
    groups: &mut SharedWatch<ConsumerGroup>,
    topics: &mut SharedWatch<EventTopic>,
    deployments: &mut SharedWatch<Deployment>,
) -> Triggers<
    impl TriggerStream<ConsumerGroup>,
    impl TriggerStream<EventTopic>,
    impl TriggerStream<Deployment>,
> {
    Triggers {
        groups: groups.subscribe(spec_or_metadata),
        // Its first status ends a group's quiet wait (see `plan::quiet_wait`) even when
        // it does not own its topic.
        topics: topics.subscribe(|et| {
            spec_metadata_and(et, (build::owns_its_topic(et), et.status.is_some()))
        }),
        deployments: deployments
            .subscribe(|d| spec_metadata_and(d, d.status.as_ref().and_then(|s| s.replicas))),
    }
}

/// Whether `cg` names the EventTopic `name` in a field it resolves (`spec.topics`,
/// `spec.produces`, `spec.outbox.topics`): a change of that EventTopic reconciles it.
fn names_event_topic(cg: &ConsumerGroup, name: &str) -> bool {
    plan::named_event_topics(cg).any(|t| t == name)
}

/// Reconciles in its turn, the object as the cache has it then (see
/// [`crate::context::Turns::run`]).
async fn reconcile(cg: Arc<ConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    (ctx.group_turns)
        .run(&ctx.groups, &cg, |now| reconcile_now(now, ctx.clone()))
        .await
}

async fn reconcile_now(cg: Arc<ConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    // The cache has not seen this reconciler's last write yet (see `Superseded`): wait
    // for it, neither a success nor a failure for the back-off. Deletion goes on.
    if cg.metadata.deletion_timestamp.is_none() && ctx.written_groups.is_stale(&*cg) {
        ctx.metrics
            .reconciled("consumergroup", started.elapsed(), None);
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let result = reconcile_inner(&cg, &ctx).await;
    // Only a pass that ended Ready lets the next one read a snapshot.
    ctx.passes.ended(&*cg, matches!(&result, Ok((_, None))));
    let label = result.as_ref().err().map(Error::metric_label);
    let failure = match &result {
        // A quiet wait is neither Ready nor a failure.
        Ok((_, Some(plan::QUIET_WAIT_REASON))) => {
            ctx.metrics.waited("consumergroup", plan::QUIET_WAIT_REASON);
            None
        }
        Ok((_, failure)) => *failure,
        Err(_) => label.as_deref(),
    };
    ctx.metrics
        .reconciled("consumergroup", started.elapsed(), failure);
    let (action, _) = result?;
    ctx.group_backoff.succeeded(&cg);
    Ok(action)
}

/// One reconcile: dereference → build → apply → status. Returns what to do next and,
/// when not Ready, why; fails when the API server did, or Kafka did for a reason that
/// may pass by itself (status says so by then).
async fn reconcile_inner(
    cg: &ConsumerGroup,
    ctx: &Context,
) -> Result<(Action, Option<&'static str>), Error> {
    let ns = cg.namespace().unwrap_or_default();
    let groups: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    if cg.metadata.deletion_timestamp.is_some() {
        return Ok((finalize(cg, ctx, &groups).await?, None));
    }
    // The group's Kafka user and ACLs outlive nothing else: remove them on deletion.
    let added = crate::finalizer::set(&groups, cg, CREDENTIALS_FINALIZER, true, &ctx.metrics)
        .await
        .map_err(|e| Error::kube("add the finalizer to", cg, e))?;
    let released = crate::replay::clear_stale_hold(cg, ctx, &groups).await?;
    if added.is_some() || released {
        // Go on from the version just written (its own event starts the next pass).
        ctx.written_groups.wrote(cg, added.as_deref());
        ctx.written_groups
            .replaced(cg, cg.metadata.resource_version.as_deref());
        return Ok((Action::requeue(Duration::from_millis(200)), None));
    }
    let outcome = match dereference(cg, ctx).await? {
        Err(outcome) => outcome,
        Ok(snapshot) => {
            // Build (pure); a waiting group builds no objects.
            let desired = snapshot.objects.as_ref().map(|objects| {
                let kafka = &ctx.settings.worker_kafka;
                let secret = objects.secret.as_ref();
                plan::build(cg, &snapshot.resolved, secret, kafka, random_password())
            });
            let changed = desired.as_ref().map(|d| d.password_changed);
            let resolved = &snapshot.resolved;
            let changes =
                plan::kafka_changes(&resolved.acls, &snapshot.acls, snapshot.has_user, changed);
            apply(cg, ctx, snapshot, desired, changes).await?
        }
    };
    status(cg, ctx, outcome).await
}

/// What a pass ends with, before it becomes status.
enum Outcome {
    /// Everything matches the spec: the group's ACLs, and the Deployment's replicas.
    InSync { acls: usize, replicas: Option<i32> },
    /// Not Ready, for `reason` (also the failure counter's), until something changes.
    NotReady {
        reason: &'static str,
        message: String,
    },
    /// Kafka failed a request about the group's user or ACLs.
    Kafka(NativeError),
    /// New, and waiting for EventTopics applied with it (see [`plan::quiet_wait`]):
    /// nothing is written, and the next pass comes when they are reconciled or after
    /// `left` at the latest.
    Pending { left: Duration },
}

/// What a pass reads before it decides anything.
struct Snapshot {
    resolved: plan::Resolved,
    /// The group's stored objects; `None` while it waits for an EventTopic.
    objects: Option<Objects>,
    /// The ACLs of EventOps' shape on the group's principal, as Kafka has them.
    acls: BTreeSet<AclBinding>,
    /// Whether Kafka has the group's user (not read while it waits).
    has_user: bool,
}

/// The group's Secret and Deployment, as stored.
struct Objects {
    secret: Option<Secret>,
    deployment: Option<Deployment>,
    /// Whether `deployment` is the cached copy (rather than read live).
    from_cache: bool,
}

/// Dereference: the group is validated against the shared caches ([`plan::validate`])
/// and the EventTopics it names are resolved from them; then its Secret and Deployment
/// are read (live, or from the cache for a Deployment with the group label) and checked
/// for another owner, before anything (the Kafka user included) is derived from them;
/// last, Kafka's user and grants, through the reads concurrent reconciles share. A group
/// waiting for an EventTopic reads only its grants (to revoke). A refusal or Kafka's
/// failure is the pass's outcome.
async fn dereference(
    cg: &ConsumerGroup,
    ctx: &Context,
) -> Result<Result<Snapshot, Outcome>, Error> {
    let ns = cg.namespace().unwrap_or_default();
    let others = ctx.groups.state();
    let policy = &ctx.settings.namespace_policy;
    if let Err(refused) = plan::validate(cg, policy, others.iter().map(AsRef::as_ref)) {
        return Ok(Err(Outcome::NotReady {
            reason: refused.reason,
            message: refused.message,
        }));
    }
    let named: BTreeSet<&String> = plan::named_event_topics(cg).collect();
    let found: BTreeMap<String, Arc<EventTopic>> = named
        .into_iter()
        .filter_map(|name| {
            let et = ctx.topics.get(&ObjectRef::new(name).within(&ns))?;
            Some((name.clone(), et))
        })
        .collect();
    let find = |n: &str| found.get(n).map(AsRef::as_ref);
    if let Some(left) = plan::quiet_wait(cg, find, Timestamp::now()) {
        return Ok(Err(Outcome::Pending { left }));
    }
    let resolved = plan::resolve(cg, find);
    let objects = if resolved.waiting.is_some() {
        None
    } else {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let secret = secrets
            .get_opt(&build::secret_name(cg))
            .await
            .map_err(|e| Error::kube("read the Secret of", cg, e))?;
        // The cache holds only Deployments with the group label; one without it
        // (somebody else's under this name) is read live, so that it is never taken over.
        let cached = ctx
            .deployments
            .get(&ObjectRef::new(&cg.name_any()).within(&ns));
        let from_cache = cached.is_some();
        let deployment = match cached {
            Some(d) => Some(Deployment::clone(&d)),
            None => read_deployment(cg, ctx).await?,
        };
        // Objects somebody else made under the names this group needs are left alone.
        if let Some(message) = build::foreign_objects(
            cg,
            deployment.as_ref().map(|d| &d.metadata),
            secret.as_ref().map(|s| &s.metadata),
        ) {
            return Ok(Err(Outcome::NotReady {
                reason: "ResourceConflict",
                message,
            }));
        }
        Some(Objects {
            secret,
            deployment,
            from_cache,
        })
    };
    // Asked together, so that each shares a request with other passes' reads.
    let reading = ctx.passes.reading(cg);
    let user = build::kafka_user(cg);
    let (credentials, acls) = futures::join!(
        async {
            match &objects {
                None => Ok(Vec::new()),
                Some(_) => ctx.kafka.scram_credentials(&user, reading).await,
            }
        },
        operator_acls(cg, ctx, reading),
    );
    let has_user = match credentials {
        Ok(credentials) => credentials
            .iter()
            .any(|c| c.mechanism == ScramMechanism::Sha512),
        Err(e) => return Ok(Err(Outcome::Kafka(e))),
    };
    let acls = match acls {
        Ok(acls) => acls,
        Err(e) => return Ok(Err(Outcome::Kafka(e))),
    };
    Ok(Ok(Snapshot {
        resolved,
        objects,
        acls,
        has_user,
    }))
}

/// The group's Deployment, read live.
async fn read_deployment(cg: &ConsumerGroup, ctx: &Context) -> Result<Option<Deployment>, Error> {
    let deployments: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &cg.namespace().unwrap_or_default());
    deployments
        .get_opt(&cg.name_any())
        .await
        .map_err(|e| Error::kube("read the Deployment of", cg, e))
}

/// Apply: only what differs, so a resync that finds nothing writes nothing. Kafka
/// first: the Secret must never hand out a password Kafka does not know yet. A group
/// waiting for an EventTopic only loses the grants on what did not resolve.
async fn apply(
    cg: &ConsumerGroup,
    ctx: &Context,
    snapshot: Snapshot,
    desired: Option<plan::Desired>,
    changes: plan::KafkaChanges,
) -> Result<Outcome, Error> {
    let (Some(objects), Some(desired)) = (snapshot.objects, desired) else {
        // Grants on a topic the group has lost (its EventTopic deleted, or no longer
        // owning it) go now, not when the group is whole again: the topic may be
        // somebody else's by then.
        if let Err(e) = delete_acls(cg, ctx, &changes.delete).await {
            return Ok(Outcome::Kafka(e));
        }
        return Ok(Outcome::NotReady {
            reason: "TopicNotFound",
            message: snapshot.resolved.waiting.unwrap_or_default(),
        });
    };
    let Objects {
        secret,
        mut deployment,
        from_cache,
    } = objects;
    if from_cache && !deployment_matches(deployment.as_ref(), &desired.deployment) {
        // About to write on the strength of a cached copy, which lags when the watch
        // does: read it live, so that a Deployment deleted or replaced by somebody
        // else's meanwhile is neither recreated at the wrong size nor taken over.
        deployment = read_deployment(cg, ctx).await?;
        if let Some(message) =
            build::foreign_objects(cg, deployment.as_ref().map(|d| &d.metadata), None)
        {
            return Ok(Outcome::NotReady {
                reason: "ResourceConflict",
                message,
            });
        }
    }
    if let Err(e) = apply_kafka_access(cg, ctx, &desired.password, &changes).await {
        return Ok(Outcome::Kafka(e));
    }
    let ns = cg.namespace().unwrap_or_default();
    let params = PatchParams::apply(crate::FIELD_MANAGER).force();
    if !secret_matches(secret.as_ref(), &desired.secret) {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        ctx.metrics.kube_write("Secret");
        secrets
            .patch(
                &build::secret_name(cg),
                &params,
                &Patch::Apply(&desired.secret),
            )
            .await
            .map_err(|e| Error::kube("apply the Secret of", cg, e))?;
        if secret.is_some() && desired.password_changed {
            ctx.event(
                cg,
                EventType::Normal,
                "CredentialsRotated",
                "Reconcile",
                format!("new password for Kafka user {}", build::kafka_user(cg)),
            )
            .await;
        }
    }
    // Kubernetes omits status.replicas when it is 0.
    let current_replicas = deployment
        .as_ref()
        .map(|d| d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0));
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if deployment.is_none() {
        // Created at `minReplicas` (capped as the autoscaler caps it), not at Kubernetes'
        // default of one: a new group that
        // may scale to zero and has no lag starts no worker (the autoscaler would only
        // take it back after its scale-down window). The create owns `replicas` under
        // an Update entry, which the applies below (without it) never prune; the
        // autoscaler's scale writes take it over.
        let mut first = desired.deployment.clone();
        first.spec.replicas = Some(desired.initial_replicas);
        ctx.metrics.kube_write("Deployment");
        let post = PostParams {
            field_manager: Some(crate::FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        deployments
            .create(&post, &first)
            .await
            .map_err(|e| Error::kube("create the Deployment of", cg, e))?;
    } else if !deployment_matches(deployment.as_ref(), &desired.deployment) {
        ctx.metrics.kube_write("Deployment");
        deployments
            .patch(&cg.name_any(), &params, &Patch::Apply(&desired.deployment))
            .await
            .map_err(|e| Error::kube("apply the Deployment of", cg, e))?;
    }
    Ok(Outcome::InSync {
        acls: snapshot.resolved.acls.len(),
        replicas: current_replicas,
    })
}

/// Status: the Ready condition `outcome` gives. Kafka's failure that may pass by itself
/// then fails the pass, to be retried on the group's back-off; anything else not Ready
/// waits for a change or the resync.
async fn status(
    cg: &ConsumerGroup,
    ctx: &Context,
    outcome: Outcome,
) -> Result<(Action, Option<&'static str>), Error> {
    let (ready, replicas, failure) = match &outcome {
        Outcome::InSync { acls, replicas } => {
            let message = format!(
                "Deployment {name}, Secret {secret}, Kafka user {user} and its {acls} ACLs \
                 match the spec",
                name = cg.name_any(),
                secret = build::secret_name(cg),
                user = build::kafka_user(cg),
            );
            (Observed::ready(true, "InSync", message), *replicas, None)
        }
        Outcome::NotReady { reason, message } => {
            let ready = Observed::ready(false, *reason, message.clone());
            (ready, None, Some(*reason))
        }
        Outcome::Kafka(e) => {
            let ready = Observed::ready(false, e.reason(), native_message(e));
            (ready, None, Some("KafkaAccess"))
        }
        Outcome::Pending { left } => {
            return Ok((Action::requeue(*left), Some(plan::QUIET_WAIT_REASON)));
        }
    };
    write_status(cg, ctx, ready, replicas).await?;
    if let Outcome::Kafka(e) = outcome
        && e.is_transient()
    {
        return Err(Error::kafka_admin(cg, e));
    }
    // Counted from now, after this pass's requests, so that it stays on the grid.
    Ok((Action::requeue(ctx.settings.next_resync()), failure))
}

/// Finalizer held by every ConsumerGroup until its Kafka user and ACLs are removed.
pub const CREDENTIALS_FINALIZER: &str = "eventops.dev/delete-kafka-credentials";

/// Makes the group's SCRAM user and ACLs in Kafka what `changes` say: sets the user's
/// password, creates the missing ACLs and deletes those EventOps made for the group that
/// are no longer desired.
async fn apply_kafka_access(
    cg: &ConsumerGroup,
    ctx: &Context,
    password: &str,
    changes: &plan::KafkaChanges,
) -> Result<(), NativeError> {
    let native = ctx.kafka.native();
    let user = build::kafka_user(cg);
    if changes.set_user {
        ctx.metrics.kafka_request("AlterUserScramCredentials");
        ctx.metrics.kafka_write();
        native.upsert_scram_user(&user, password).await?;
        info!(%user, "set SCRAM credentials");
    }
    if !changes.create.is_empty() {
        ctx.metrics.kafka_request("CreateAcls");
        ctx.metrics.kafka_write();
        native.create_acls(&changes.create).await?;
        info!(%user, created = changes.create.len(), "created ACLs");
    }
    delete_acls(cg, ctx, &changes.delete).await
}

/// The ACLs on the group's principal that have the shape EventOps gives its own: Allow,
/// literal, any host. An administrator's Deny (say, to quarantine leaked credentials)
/// or prefixed grant is not EventOps' to delete.
async fn operator_acls(
    cg: &ConsumerGroup,
    ctx: &Context,
    reading: Reading,
) -> Result<BTreeSet<AclBinding>, NativeError> {
    ctx.kafka
        .literal_allow_acls(&build::principal(cg), reading)
        .await
}

/// Deletes exactly `acls`, each by a filter that matches that binding alone.
async fn delete_acls<'a>(
    cg: &ConsumerGroup,
    ctx: &Context,
    acls: impl IntoIterator<Item = &'a AclBinding>,
) -> Result<(), NativeError> {
    let filters: Vec<AclFilter> = acls.into_iter().map(AclFilter::from).collect();
    if filters.is_empty() {
        return Ok(());
    }
    ctx.metrics.kafka_request("DeleteAcls");
    ctx.metrics.kafka_write();
    let deleted = ctx.kafka.native().delete_acls(&filters).await?;
    info!(user = %build::kafka_user(cg), deleted = deleted.len(), "deleted ACLs no longer desired");
    Ok(())
}

/// The condition message for a failed Kafka call: Kafka's words, and the ACL the
/// operator's own user lacks when that is why.
fn native_message(e: &NativeError) -> String {
    match e {
        NativeError::Kafka { op, code, .. } => {
            conditions::with_permission_hint(e.to_string(), op, *code)
        }
        _ => e.to_string(),
    }
}

/// Deletion: remove the group's ACLs and SCRAM user from Kafka, then let it go. The
/// Deployment and Secret go with it through their owner references.
async fn finalize(
    cg: &ConsumerGroup,
    ctx: &Context,
    groups: &Api<ConsumerGroup>,
) -> Result<Action, Error> {
    if !cg.finalizers().iter().any(|f| f == CREDENTIALS_FINALIZER) {
        return Ok(Action::await_change());
    }
    let released = annotation_is_true(&cg.metadata, RELEASE_FINALIZER_ANNOTATION);
    if !released {
        let native = ctx.kafka.native();
        let user = build::kafka_user(cg);
        // Only the bindings EventOps made: an administrator's Deny on the principal
        // outlives the group (a group of the same name may come back).
        let deleted = match operator_acls(cg, ctx, Reading::Fresh).await {
            Ok(acls) => delete_acls(cg, ctx, &acls).await,
            Err(e) => Err(e),
        };
        let result = match deleted {
            Ok(()) => {
                ctx.metrics.kafka_request("AlterUserScramCredentials");
                native.delete_scram_user(&user).await.map(drop)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let message = format!(
                "{}; the resource stays until its Kafka user and ACLs are removed. If Kafka \
                 is gone for good, annotate it {RELEASE_FINALIZER_ANNOTATION}=true to let it go",
                native_message(&e)
            );
            write_status(cg, ctx, Observed::ready(false, e.reason(), message), None).await?;
            return Err(Error::kafka_admin(cg, e));
        }
        info!(%user, "removed Kafka user and ACLs");
    }
    crate::finalizer::set(groups, cg, CREDENTIALS_FINALIZER, false, &ctx.metrics)
        .await
        .map_err(|e| Error::kube("remove the finalizer of", cg, e))?;
    ctx.written_groups.forget(cg);
    Ok(Action::await_change())
}

/// Whether the stored Secret already holds the desired keys, annotation and owner.
/// Keys somebody else added are not ours to judge.
fn secret_matches(current: Option<&Secret>, desired: &Secret) -> bool {
    let Some(current) = current else { return false };
    let have = current.data.clone().unwrap_or_default();
    let keys_match = desired
        .string_data
        .iter()
        .flatten()
        .all(|(k, v)| have.get(k).is_some_and(|b| b.0 == v.as_bytes()));
    let annotation = |s: &Secret| s.annotations().get(ROTATED_FOR_ANNOTATION).cloned();
    keys_match
        && annotation(current) == annotation(desired)
        && current.metadata.owner_references == desired.metadata.owner_references
}

/// Whether the stored Deployment already has every field the operator sets, as desired.
fn deployment_matches(current: Option<&Deployment>, desired: &Deployment) -> bool {
    let Some(current) = current else { return false };
    let (c, d) = (&current.spec, &desired.spec);
    let container = |spec: &k8s_openapi::api::apps::v1::DeploymentSpec| {
        let pod = spec.template.spec.as_ref()?;
        let c = pod.containers.first()?;
        Some((
            c.image.clone(),
            c.command.clone(),
            c.args.clone(),
            c.env.clone(),
            // The API server returns `resources: {}` for none.
            c.resources.clone().unwrap_or_default(),
            pod.termination_grace_period_seconds,
            // The builder sets every field the API server defaults in these.
            (
                c.ports.clone(),
                c.readiness_probe.clone(),
                c.liveness_probe.clone(),
            ),
        ))
    };
    // Only the annotation EventOps sets: `kubectl rollout restart` adds its own.
    let annotations = |spec: &k8s_openapi::api::apps::v1::DeploymentSpec| {
        let m = spec.template.metadata.as_ref()?.annotations.as_ref()?;
        m.get(build::CREDENTIALS_VERSION_ANNOTATION).cloned()
    };
    // The operator's labels (the cache and the autoscaler find the Deployment by them);
    // others may add their own.
    let labels = current.labels();
    let has_labels = desired
        .labels()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    container(c) == container(d)
        && annotations(c) == annotations(d)
        && c.selector == d.selector
        && current.metadata.owner_references == desired.metadata.owner_references
        && has_labels
}

/// 32 random bytes as hex, from the kernel's CSPRNG.
fn random_password() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn write_status(
    cg: &ConsumerGroup,
    ctx: &Context,
    ready: Observed,
    replicas: Option<i32>,
) -> Result<(), Error> {
    let old = cg.status.clone().unwrap_or_default();
    // The autoscaler writes its own fields (lag, desired replicas, its conditions) under its
    // own field manager; this writer owns, compares and applies only the rest.
    let old = ConsumerGroupStatus {
        observed_generation: old.observed_generation,
        conditions: crate::autoscaler::CONDITIONS
            .iter()
            .fold(old.conditions, |c, type_| conditions::remove(&c, type_)),
        group_id: old.group_id,
        replicas: old.replicas,
        ..Default::default()
    };
    let generation = cg.metadata.generation;
    let new = ConsumerGroupStatus {
        observed_generation: generation,
        conditions: conditions::set(&old.conditions, ready.clone(), generation, Timestamp::now()),
        group_id: Some(cg.kafka_group_id().to_string()),
        replicas: replicas.or(old.replicas),
        ..Default::default()
    };
    if new == old {
        return Ok(());
    }
    let written = crate::status::apply(ctx, cg, &new).await?;
    ctx.written_groups.wrote(cg, written.as_deref());
    crate::status::announce_ready(ctx, cg, &old.conditions, &ready).await;
    Ok(())
}

/// A failed reconcile is retried on the ConsumerGroup's own back-off.
fn error_policy(cg: Arc<ConsumerGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    let retry = ctx.group_backoff.failed(&cg, ctx.settings.resync_interval);
    warn!(consumergroup = %cg.name_any(), %error, ?retry, "reconcile failed; retrying");
    Action::requeue(retry)
}

/// The Kafka settings workers get, derived from the operator's.
pub fn worker_kafka(config: &crate::config::RunConfig) -> WorkerKafka {
    WorkerKafka {
        bootstrap: config
            .worker_kafka_bootstrap
            .clone()
            .unwrap_or_else(|| config.kafka_bootstrap.clone()),
        security_protocol: config
            .kafka_security_protocol
            .clone()
            .unwrap_or_else(|| "SASL_PLAINTEXT".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn a_change_of_any_eventtopic_the_group_names_reconciles_it() {
        let cg: ConsumerGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "ConsumerGroup",
            "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"topics": ["orders"], "produces": ["captured"],
                     "outbox": {"topics": ["refunded"]}, "template": {"image": "p:1"}},
        }))
        .unwrap();
        // (EventTopic, whether it reconciles the group)
        let cases = [
            ("orders", true),
            ("captured", true),
            ("refunded", true),
            ("voided", false),
        ];
        for (name, expected) in cases {
            assert_eq!(names_event_topic(&cg, name), expected, "{name}");
        }
    }

    #[test]
    fn only_refusals_that_may_pass_by_themselves_are_retried_on_the_backoff() {
        let kafka = |code| NativeError::Kafka {
            op: "DescribeUserScramCredentials",
            code,
            message: String::new(),
        };
        // Somebody must act first: a condition, and the resync.
        assert!(!kafka(C::ClusterAuthorizationFailed).is_transient());
        assert!(!kafka(C::TopicAuthorizationFailed).is_transient());
        assert!(!NativeError::InvalidArgument("nul".into()).is_transient());
        // May pass by itself: an error, and the back-off.
        assert!(kafka(C::RequestTimedOut).is_transient());
        assert!(kafka(C::BrokerTransportFailure).is_transient());
        assert!(NativeError::Timeout { op: "x" }.is_transient());
        assert_eq!(
            NativeError::Timeout { op: "x" }.reason(),
            "KafkaUnavailable"
        );
        assert_eq!(kafka(C::RequestTimedOut).reason(), "RequestTimedOut");
    }
}
