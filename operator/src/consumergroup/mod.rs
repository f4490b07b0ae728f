//! ConsumerGroup reconciler: dereference (EventTopics, Secret, Deployment) → build
//! ([`build`], pure) → apply (server-side apply, only what differs) → status.

pub mod build;
pub mod outbox;
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
use crate::kafka::native::{AclBinding, AclFilter, NativeError, ScramMechanism};
use crate::watch::{SharedWatch, TriggerStream, spec_metadata_and, spec_or_metadata};
use build::{ROTATE_ANNOTATION, ROTATED_FOR_ANNOTATION, WorkerKafka};

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
        .with_config(ctx.settings.controller_config());
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
        .graceful_shutdown_on(shutdown)
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
    /// their Kafka topics (status; see [`build::owns_its_topic`]). The consumers an
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
        topics: topics.subscribe(|et| spec_metadata_and(et, build::owns_its_topic(et))),
        deployments: deployments
            .subscribe(|d| spec_metadata_and(d, d.status.as_ref().and_then(|s| s.replicas))),
    }
}

/// Whether `cg` names the EventTopic `name` in a field it resolves (`spec.topics`,
/// `spec.produces`, `spec.outbox.topics`): a change of that EventTopic reconciles it.
fn names_event_topic(cg: &ConsumerGroup, name: &str) -> bool {
    (cg.spec.topics.iter())
        .chain(&cg.spec.produces)
        .chain(outbox::topic_names(cg))
        .any(|t| t == name)
}

async fn reconcile(cg: Arc<ConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    // The cache has not seen this reconciler's last write yet (see `Superseded`): wait
    // for it, neither a success nor a failure for the back-off. Deletion goes on.
    if cg.metadata.deletion_timestamp.is_none() && ctx.written_groups.is_stale(&*cg) {
        ctx.metrics
            .reconciled("consumergroup", started.elapsed(), None);
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let (action, failure) = reconcile_inner(cg.clone(), &ctx).await?;
    ctx.metrics
        .reconciled("consumergroup", started.elapsed(), failure);
    ctx.group_backoff.succeeded(&cg);
    Ok(action)
}

/// One reconcile; returns what to do next and, when not Ready, why. Fails when the API
/// server did, or Kafka did for a reason that may pass by itself (status says so by
/// then).
async fn reconcile_inner(
    cg: Arc<ConsumerGroup>,
    ctx: &Context,
) -> Result<(Action, Option<&'static str>), Error> {
    let ns = cg.namespace().unwrap_or_default();
    let resync = ctx.settings.next_resync();
    let groups: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    if cg.metadata.deletion_timestamp.is_some() {
        return Ok((finalize(&cg, ctx, &groups).await?, None));
    }
    // The group's Kafka user and ACLs outlive nothing else: remove them on deletion.
    let added = crate::finalizer::set(&groups, &*cg, CREDENTIALS_FINALIZER, true, &ctx.metrics)
        .await
        .map_err(|e| Error::kube("add the finalizer to", &*cg, e))?;
    let released = crate::replay::clear_stale_hold(&cg, ctx, &groups).await?;
    if added.is_some() || released {
        // Go on from the version just written (its own event starts the next pass).
        ctx.written_groups.wrote(&*cg, added.as_deref());
        ctx.written_groups
            .replaced(&*cg, cg.metadata.resource_version.as_deref());
        return Ok((Action::requeue(Duration::from_millis(200)), None));
    }

    // Dereference, from the shared caches: the EventTopics the group names.
    let named: BTreeSet<&String> = (cg.spec.topics.iter())
        .chain(&cg.spec.produces)
        .chain(outbox::topic_names(&cg))
        .collect();
    let found: BTreeMap<String, Arc<EventTopic>> = named
        .into_iter()
        .filter_map(|name| {
            let et = ctx.topics.get(&ObjectRef::new(name).within(&ns))?;
            Some((name.clone(), et))
        })
        .collect();
    // Validate: the namespace may own the group id (issue 10's ownership policy).
    let policy = &ctx.settings.namespace_policy;
    if let Err(message) = policy.check(&ns, "spec.groupId", cg.kafka_group_id()) {
        write_status(
            &cg,
            ctx,
            Observed::ready(false, "NotPermitted", message),
            None,
        )
        .await?;
        return Ok((Action::requeue(resync), Some("NotPermitted")));
    }
    let others = ctx.groups.state();
    if let Some(message) = build::group_conflict(&cg, others.iter().map(AsRef::as_ref)) {
        let ready = Observed::ready(false, "ResourceConflict", message);
        write_status(&cg, ctx, ready, None).await?;
        return Ok((Action::requeue(resync), Some("ResourceConflict")));
    }
    let (routes, missing) = build::resolve_some_topics(&cg, |n| found.get(n).map(AsRef::as_ref));
    let (produced, missing_produced) =
        produces::resolve_some(&cg, |n| found.get(n).map(AsRef::as_ref));
    let (outbox_topics, missing_outbox) =
        outbox::resolve_some(&cg, |n| found.get(n).map(AsRef::as_ref));
    let mut desired_acls = build::acls(&cg, &routes);
    desired_acls.extend(produces::acls(&cg, &produced));
    desired_acls.extend(outbox::acls(&cg, &outbox_topics));
    // Every field that names a missing EventTopic, so one fix is not followed by another.
    let waiting: Vec<String> = [
        (!missing.0.is_empty()).then(|| missing.message(&ns)),
        produces::missing_message(&missing_produced, &ns),
        outbox::missing_message(&missing_outbox, &ns),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !waiting.is_empty() {
        let message = waiting.join("; ");
        // Grants on a topic the group has lost (its EventTopic deleted, or no longer
        // owning it) go now, not when the group is whole again: the topic may be
        // somebody else's by then.
        if let Err(e) = revoke_acls(&cg, ctx, &desired_acls).await {
            return kafka_failed(&cg, ctx, e, resync).await;
        }
        let ready = Observed::ready(false, "TopicNotFound", message);
        write_status(&cg, ctx, ready, None).await?;
        return Ok((Action::requeue(resync), Some("TopicNotFound")));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets
        .get_opt(&build::secret_name(&cg))
        .await
        .map_err(|e| Error::kube("read the Secret of", &*cg, e))?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    // The cache holds only Deployments with the group label; one without it (somebody
    // else's under this name) is read live, so that it is never taken over.
    let cached = ctx
        .deployments
        .get(&ObjectRef::new(&cg.name_any()).within(&ns));
    let read_live = || async {
        deployments
            .get_opt(&cg.name_any())
            .await
            .map_err(|e| Error::kube("read the Deployment of", &*cg, e))
    };
    let from_cache = cached.is_some();
    let mut deployment = match cached {
        Some(d) => Some(Deployment::clone(&d)),
        None => read_live().await?,
    };

    // Objects somebody else made under the names this group needs are left alone,
    // before anything (the Kafka user included) is derived from them.
    if let Some(message) = build::foreign_objects(
        &cg,
        deployment.as_ref().map(|d| &d.metadata),
        secret.as_ref().map(|s| &s.metadata),
    ) {
        let ready = Observed::ready(false, "ResourceConflict", message);
        write_status(&cg, ctx, ready, None).await?;
        return Ok((Action::requeue(resync), Some("ResourceConflict")));
    }

    // Build.
    let kafka = ctx.settings.worker_kafka.clone();
    let requested_rotation = cg.annotations().get(ROTATE_ANNOTATION).map(String::as_str);
    let current = secret.as_ref().and_then(|s| {
        let password = secret_value(s, "password")?;
        let answered = s.annotations().get(ROTATED_FOR_ANNOTATION).cloned();
        Some((password, answered))
    });
    let (password, rotation) = match current {
        Some((password, answered))
            if requested_rotation.is_none_or(|r| answered.as_deref() == Some(r)) =>
        {
            (password, answered)
        }
        _ => (random_password(), requested_rotation.map(String::from)),
    };
    let credentials_version = build::credentials_version(&password);
    let desired_secret = build::secret(&cg, &kafka, &password, rotation.as_deref());
    let desired_deployment =
        build::deployment(&cg, &routes, &outbox_topics, &kafka, &credentials_version);
    if from_cache && !deployment_matches(deployment.as_ref(), &desired_deployment) {
        // About to write on the strength of a cached copy, which lags when the watch
        // does: read it live, so that a Deployment deleted or replaced by somebody
        // else's meanwhile is neither recreated at the wrong size nor taken over.
        deployment = read_live().await?;
        if let Some(message) =
            build::foreign_objects(&cg, deployment.as_ref().map(|d| &d.metadata), None)
        {
            let ready = Observed::ready(false, "ResourceConflict", message);
            write_status(&cg, ctx, ready, None).await?;
            return Ok((Action::requeue(resync), Some("ResourceConflict")));
        }
    }

    // Apply: only what differs, so a resync that finds nothing writes nothing. Kafka
    // first: the Secret must never hand out a password Kafka does not know yet.
    let password_changed =
        secret_value_of(secret.as_ref(), "password").as_deref() != Some(&password);
    if let Err(e) = sync_kafka_access(&cg, ctx, &password, password_changed, &desired_acls).await {
        return kafka_failed(&cg, ctx, e, resync).await;
    }
    let params = PatchParams::apply(crate::FIELD_MANAGER).force();
    if !secret_matches(secret.as_ref(), &desired_secret) {
        ctx.metrics.kube_write("Secret");
        secrets
            .patch(
                &build::secret_name(&cg),
                &params,
                &Patch::Apply(&desired_secret),
            )
            .await
            .map_err(|e| Error::kube("apply the Secret of", &*cg, e))?;
        if secret.is_some() && password_changed {
            ctx.event(
                &*cg,
                EventType::Normal,
                "CredentialsRotated",
                "Reconcile",
                format!("new password for Kafka user {}", build::kafka_user(&cg)),
            )
            .await;
        }
    }
    // Kubernetes omits status.replicas when it is 0.
    let current_replicas = deployment
        .as_ref()
        .map(|d| d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0));
    if deployment.is_none() {
        // Created at `minReplicas` (capped as the autoscaler caps it), not at Kubernetes'
        // default of one: a new group that
        // may scale to zero and has no lag starts no worker (the autoscaler would only
        // take it back after its scale-down window). The create owns `replicas` under
        // an Update entry, which the applies below (without it) never prune; the
        // autoscaler's scale writes take it over.
        let partitions = cg
            .spec
            .topics
            .iter()
            .filter_map(|name| found.get(name))
            .map(|et| et.spec.partitions)
            .sum();
        let mut first = desired_deployment.clone();
        first.spec.replicas = Some(build::initial_replicas(&cg, partitions));
        ctx.metrics.kube_write("Deployment");
        let post = PostParams {
            field_manager: Some(crate::FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        deployments
            .create(&post, &first)
            .await
            .map_err(|e| Error::kube("create the Deployment of", &*cg, e))?;
    } else if !deployment_matches(deployment.as_ref(), &desired_deployment) {
        ctx.metrics.kube_write("Deployment");
        deployments
            .patch(&cg.name_any(), &params, &Patch::Apply(&desired_deployment))
            .await
            .map_err(|e| Error::kube("apply the Deployment of", &*cg, e))?;
    }

    let ready = Observed::ready(
        true,
        "InSync",
        format!(
            "Deployment {name}, Secret {secret}, Kafka user {user} and its {n} ACLs match the spec",
            name = cg.name_any(),
            secret = build::secret_name(&cg),
            user = build::kafka_user(&cg),
            n = desired_acls.len(),
        ),
    );
    write_status(&cg, ctx, ready, current_replicas).await?;
    // Counted from now, after this pass's requests, so that it stays on the grid.
    Ok((Action::requeue(ctx.settings.next_resync()), None))
}

/// Finalizer held by every ConsumerGroup until its Kafka user and ACLs are removed.
pub const CREDENTIALS_FINALIZER: &str = "eventops.dev/delete-kafka-credentials";

/// Makes the group's SCRAM user and ACLs in Kafka what the spec asks for: creates the
/// user when Kafka lacks it or the password changed, creates missing ACLs and deletes
/// the ACLs EventOps made for the group that are no longer desired.
async fn sync_kafka_access(
    cg: &ConsumerGroup,
    ctx: &Context,
    password: &str,
    password_changed: bool,
    desired: &BTreeSet<AclBinding>,
) -> Result<(), NativeError> {
    let native = ctx.kafka.native();
    let user = build::kafka_user(cg);
    let exists = ctx
        .kafka
        .scram_credentials(&user)
        .await?
        .iter()
        .any(|c| c.mechanism == ScramMechanism::Sha512);
    if !exists || password_changed {
        ctx.metrics.kafka_request("AlterUserScramCredentials");
        ctx.metrics.kafka_write();
        native.upsert_scram_user(&user, password).await?;
        info!(%user, "set SCRAM credentials");
    }

    let current = operator_acls(cg, ctx).await?;
    let missing: Vec<AclBinding> = desired.difference(&current).cloned().collect();
    if !missing.is_empty() {
        ctx.metrics.kafka_request("CreateAcls");
        ctx.metrics.kafka_write();
        native.create_acls(&missing).await?;
        info!(%user, created = missing.len(), "created ACLs");
    }
    delete_acls(cg, ctx, current.difference(desired)).await
}

/// Deletes the ACLs EventOps made for the group that `keep` does not hold, creating
/// none: what a group waiting for a topic may still do.
async fn revoke_acls(
    cg: &ConsumerGroup,
    ctx: &Context,
    keep: &BTreeSet<AclBinding>,
) -> Result<(), NativeError> {
    let current = operator_acls(cg, ctx).await?;
    delete_acls(cg, ctx, current.difference(keep)).await
}

/// The ACLs on the group's principal that have the shape EventOps gives its own: Allow,
/// literal, any host. An administrator's Deny (say, to quarantine leaked credentials)
/// or prefixed grant is not EventOps' to delete.
async fn operator_acls(
    cg: &ConsumerGroup,
    ctx: &Context,
) -> Result<BTreeSet<AclBinding>, NativeError> {
    ctx.kafka.literal_allow_acls(&build::principal(cg)).await
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

/// After Kafka failed the group's user or ACLs: status says so, then a failure that may
/// pass by itself (a timeout, a leader moving) is retried on the group's back-off, and
/// one somebody must act on first (the operator's own ACL missing, a bad request) at the
/// resync interval. Asking every few seconds changes nothing then, and costs Kafka a
/// request (and, for librdkafka's DescribeUserScramCredentials error path, a leaked
/// event) each time.
async fn kafka_failed(
    cg: &ConsumerGroup,
    ctx: &Context,
    e: NativeError,
    resync: Duration,
) -> Result<(Action, Option<&'static str>), Error> {
    let ready = Observed::ready(false, e.reason(), native_message(&e));
    write_status(cg, ctx, ready, None).await?;
    if e.is_transient() {
        return Err(Error::kafka_admin(cg, e));
    }
    Ok((Action::requeue(resync), Some("KafkaAccess")))
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
        let deleted = match operator_acls(cg, ctx).await {
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

fn secret_value_of(secret: Option<&Secret>, key: &str) -> Option<String> {
    secret_value(secret?, key)
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

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
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
    let retry = ctx.group_backoff.failed(&cg);
    warn!(consumergroup = %cg.name_any(), %error, ?retry, "reconcile failed; retrying");
    ctx.metrics
        .reconciled("consumergroup", Duration::ZERO, Some(&error.metric_label()));
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
