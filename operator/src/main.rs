//! `eventops-operator`: `run` the controllers, or print the CRDs (`crd`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use eventops_operator::config::RunConfig;
use eventops_operator::telemetry::{self, Metrics};
use kube_lease_manager::LeaseManagerBuilder;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "EventOps: Kafka topics, consumer groups and lag-based autoscaling on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controllers against the cluster of the current kubeconfig or service account.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD.
    Crd {
        /// Write `<crd name>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: RunConfig,

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "EVENTOPS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Namespace of the Lease that elects one active replica.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,

    /// Run without leader election (only safe with a single replica).
    #[arg(long)]
    no_leader_election: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Crd { out_dir } => {
            for (file, yaml) in eventops_crds::crd_manifests() {
                match &out_dir {
                    Some(dir) => {
                        std::fs::create_dir_all(dir)?;
                        std::fs::write(dir.join(&file), yaml)
                            .with_context(|| format!("writing {file}"))?;
                    }
                    None => print!("---\n{yaml}"),
                }
            }
        }
        Cmd::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (kubeconfig or in-cluster service account)")?;
            let metrics = Arc::new(Metrics::default());
            let server = telemetry::serve(args.metrics_addr, metrics.clone());
            let server = tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            });

            // Two replicas are safe: only the Lease holder reconciles; the other waits.
            let mut leader = None;
            if !args.no_leader_election {
                let identity = std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("eventops-operator-{}", std::process::id()));
                let manager = LeaseManagerBuilder::new(client.clone(), "eventops-operator")
                    .with_namespace(&args.lease_namespace)
                    .with_identity(&identity)
                    .with_duration(LEASE_SECONDS)
                    .with_grace(LEASE_GRACE_SECONDS)
                    .with_field_manager(eventops_operator::FIELD_MANAGER)
                    .build()
                    .await
                    .context("setting up leader election")?;
                let (mut is_leader, _task) = manager.watch().await;
                tracing::info!(%identity, "waiting to lead");
                tokio::select! {
                    r = is_leader.wait_for(|leads| *leads) => { r.context("leader election stopped")?; }
                    _ = signals() => return Ok(()),
                }
                tracing::info!(%identity, "leading");
                let watchdog =
                    lease_watchdog(client.clone(), args.lease_namespace.clone(), identity);
                leader = Some((is_leader, watchdog));
            }
            let stopped_by_signal = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let by_signal = stopped_by_signal.clone();
            let lost = leader.as_ref().map(|(l, w)| (l.clone(), w.clone()));
            let shutdown = async move {
                let lost = async {
                    match lost {
                        Some((mut l, w)) => tokio::select! {
                            _ = l.wait_for(|leads| !*leads) => {},
                            _ = w.notified() => {},
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = signals() => {
                        tracing::info!("shutting down");
                        by_signal.store(true, Ordering::Relaxed);
                    }
                    _ = lost => tracing::warn!("lost leadership; stopping"),
                }
            };
            metrics.ready.store(true, Ordering::Relaxed);
            eventops_operator::run(client, &args.config, metrics, shutdown).await?;
            server.abort();
            if leader.is_some() && !stopped_by_signal.load(Ordering::Relaxed) {
                // Exit non-zero so the replica restarts and queues for the Lease again.
                anyhow::bail!("lost leadership");
            }
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn signals() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Lease timing: held for `LEASE_SECONDS`, renewed `LEASE_GRACE_SECONDS` before expiry.
const LEASE_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;

/// Notifies when this replica can no longer be sure it leads: the Lease names another
/// holder, or no renewal could be confirmed for longer than the Lease minus its grace
/// (the API server is unreachable). The lease manager alone keeps saying "leader" while
/// its renewals fail, and a cut-off replica must stop before another one takes over.
fn lease_watchdog(
    client: kube::Client,
    namespace: String,
    identity: String,
) -> Arc<tokio::sync::Notify> {
    use k8s_openapi::api::coordination::v1::Lease;
    let lost = Arc::new(tokio::sync::Notify::new());
    let notify = lost.clone();
    tokio::spawn(async move {
        let leases: kube::Api<Lease> = kube::Api::namespaced(client, &namespace);
        let limit = std::time::Duration::from_secs(LEASE_SECONDS - LEASE_GRACE_SECONDS);
        let mut confirmed = std::time::Instant::now();
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            match leases.get("eventops-operator").await {
                Ok(lease) => {
                    let holder = lease.spec.and_then(|s| s.holder_identity);
                    if holder.as_deref() != Some(identity.as_str()) {
                        tracing::warn!(?holder, "the Lease names another holder");
                        break;
                    }
                    confirmed = std::time::Instant::now();
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
