//! `eventops-operator`: `run` the controllers, or print the CRDs (`crd`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use eventops_operator::config::RunConfig;
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
    Run(Box<RunConfig>),
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD.
    Crd {
        /// Write `<crd name>.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
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
        Cmd::Run(config) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (kubeconfig or in-cluster service account)")?;
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing a SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
                tracing::info!("shutting down");
            };
            eventops_operator::run(client, &config, shutdown).await?;
        }
    }
    Ok(())
}
