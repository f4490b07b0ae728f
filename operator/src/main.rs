//! `eventops-operator`: `run` the controllers, or print the CRDs (`crd`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use eventops_operator::config::RunConfig;
use eventops_operator::leader;
use eventops_operator::telemetry::{self, Metrics};
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
    /// Dead letters: list or show an EventTopic's dead-letter records, or redrive them.
    #[command(subcommand)]
    Dlt(Box<eventops_operator::cli::DltCommand>),
    /// Rewind a ConsumerGroup: create a Replay from flags (to earliest, a time, or given
    /// offsets), and with `--wait` follow it to the offsets it set.
    Replay(Box<eventops_operator::cli::ReplayArgs>),
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
        Cmd::Dlt(command) => eventops_operator::cli::run(*command).await?,
        Cmd::Replay(args) => eventops_operator::cli::replay(*args).await?,
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
                let manager =
                    leader::lease_manager(client.clone(), &args.lease_namespace, &identity)
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
                    leader::watchdog(client.clone(), args.lease_namespace.clone(), identity);
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own checks of every subcommand (duplicate flags, for one), which it would
    /// otherwise only make when that subcommand is run.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
