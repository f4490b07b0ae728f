//! Leader election: one replica reconciles, the others wait for the Lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};

/// Name of the Lease the replicas compete for.
pub const LEASE_NAME: &str = "eventops-operator";
/// The Lease is held for this long without a renewal.
pub const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before the Lease would expire.
pub const LEASE_GRACE_SECONDS: u64 = 5;

/// The lease manager of the replica `identity`.
///
/// Each replica writes the Lease under a field manager of its own. The lease manager
/// takes a free Lease with a server-side apply that does not force: only a field
/// manager that differs from the holder's gets the conflict that tells a replica it
/// lost the race. Under one shared field manager the second apply silently overwrote
/// the first, and both replicas led.
pub async fn lease_manager(
    client: kube::Client,
    namespace: &str,
    identity: &str,
) -> kube_lease_manager::Result<LeaseManager> {
    LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .with_field_manager(format!("{}-lease-{identity}", crate::FIELD_MANAGER))
        .build()
        .await
}

/// Notifies when this replica can no longer be sure it leads: the Lease names another
/// holder, or no renewal could be confirmed for longer than the Lease minus its grace
/// (the API server is unreachable). The lease manager alone keeps saying "leader" while
/// its renewals fail, and a cut-off replica must stop before another one takes over.
pub fn watchdog(
    client: kube::Client,
    namespace: String,
    identity: String,
) -> Arc<tokio::sync::Notify> {
    let lost = Arc::new(tokio::sync::Notify::new());
    let notify = lost.clone();
    tokio::spawn(async move {
        let leases: kube::Api<Lease> = kube::Api::namespaced(client, &namespace);
        let limit = Duration::from_secs(LEASE_SECONDS - LEASE_GRACE_SECONDS);
        let mut confirmed = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            match leases.get(LEASE_NAME).await {
                Ok(lease) => {
                    let holder = lease.spec.and_then(|s| s.holder_identity);
                    if holder.as_deref() != Some(identity.as_str()) {
                        tracing::warn!(?holder, "the Lease names another holder");
                        break;
                    }
                    confirmed = Instant::now();
                }
                Err(e) if confirmed.elapsed() > limit => {
                    tracing::warn!(error = %e, "could not confirm the Lease in time");
                    break;
                }
                Err(_) => {}
            }
        }
        notify.notify_one();
    });
    lost
}
