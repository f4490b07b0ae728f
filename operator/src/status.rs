//! Writing status the same way for every resource: server-side apply with the operator's
//! field manager, and an Event when `Ready` changes.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::conditions::{self, Observed, READY};
use crate::context::Context;
use crate::error::Error;

/// Applies `status` to `obj`'s status subresource; returns the object's new
/// resourceVersion.
pub async fn apply<K>(
    ctx: &Context,
    obj: &K,
    status: &impl Serialize,
) -> Result<Option<String>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(crate::FIELD_MANAGER).force();
    ctx.metrics.kube_write("status");
    let written = api
        .patch_status(&obj.name_any(), &params, &Patch::Apply(&patch))
        .await
        .map_err(|e| Error::kube("write status of", obj, e))?;
    Ok(written.resource_version())
}

/// Publishes an Event when the `Ready` condition's status or reason differs from `old`:
/// once per transition, never per reconcile.
pub async fn announce_ready<K>(ctx: &Context, obj: &K, old: &[Condition], ready: &Observed)
where
    K: Resource<DynamicType = ()>,
{
    let was = conditions::find(old, READY).map(|c| (c.status == "True", &c.reason));
    if was == Some((ready.status, &ready.reason)) {
        return;
    }
    let type_ = if ready.status {
        EventType::Normal
    } else {
        EventType::Warning
    };
    ctx.event(
        obj,
        type_,
        &ready.reason,
        "Reconcile",
        ready.message.clone(),
    )
    .await;
}
