//! `eventops-node-agent`: development and test tooling, NOT for production.
//!
//! A stand-in for a kubelet so that worker pods really run in the local environment
//! (which has an API server and controller-manager but no kubelet and no scheduler). It
//! registers one Node, binds every unscheduled pod to it, and runs each pod's containers
//! as plain local processes built from this workspace: no container images, no
//! isolation, no resource limits, no volumes. Each pod gets its own loopback address,
//! a kubeconfig for its service account, probes, restarts and graceful deletion, so
//! scale-out and scale-in are real.

mod env;
mod image;
mod ip;
mod node;
mod pod;
mod probe;
mod process;
mod schedule;
mod status;
mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};

/// Development and test tooling: a stand-in for a kubelet that runs pods as local
/// processes. Not for production: it runs no containers and isolates nothing.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Kubeconfig with the agent's credentials (it needs to manage nodes, leases, pods,
    /// pod bindings and service account tokens).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Directory for the pods' logs, kubeconfigs and working directories
    /// (`<state-dir>/pods/<namespace>_<pod>/`).
    #[arg(long)]
    state_dir: PathBuf,
    /// Where the binaries that stand in for images are (default: the directory of this
    /// executable, i.e. the workspace's target/debug).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Name of the Node to register.
    #[arg(long, default_value = "eventops-local")]
    node_name: String,
    /// First delay before restarting a container that exited again (the kubelet's is 10s).
    #[arg(long, default_value = "10s")]
    restart_backoff_initial: kube::core::Duration,
    /// Longest delay before restarting a container (the kubelet's is 5m).
    #[arg(long, default_value = "5m")]
    restart_backoff_max: kube::core::Duration,
    /// Directory of the lock files that keep pod addresses unique across every agent on
    /// this machine.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("eventops-pod-ips"))]
    pod_ip_lock_dir: PathBuf,
}

const HOST_IP: &str = "127.0.0.1";

// One thread on purpose: the kernel sends PR_SET_PDEATHSIG when the *thread* that forked
// a child exits, so every child is spawned from the main thread, which lives as long as
// the agent.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let kubeconfig = Kubeconfig::read_from(&cli.kubeconfig)
        .with_context(|| format!("reading --kubeconfig {}", cli.kubeconfig.display()))?;
    let cluster = current_cluster(&kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("the agent's executable has no directory")?
            .to_path_buf(),
    };
    let pods_dir = cli.state_dir.join("pods");
    std::fs::create_dir_all(&pods_dir)?;
    let pods_dir = pods_dir.canonicalize()?;
    let agent = Arc::new(pod::Agent {
        client: client.clone(),
        node_name: cli.node_name.clone(),
        host_ip: HOST_IP.into(),
        bin_dir,
        pods_dir,
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        cluster,
        ips: Mutex::new(ip::Allocator::new(&cli.pod_ip_lock_dir)?),
        backoff_initial: cli.restart_backoff_initial.into(),
        backoff_max: cli.restart_backoff_max.into(),
    });

    node::register(&client, &cli.node_name, HOST_IP).await?;
    info!(
        node = %cli.node_name,
        bin_dir = %agent.bin_dir.display(),
        "EventOps node agent (development stand-in for a kubelet) is running"
    );
    let heartbeat = tokio::spawn(node::keep_ready(
        client.clone(),
        cli.node_name.clone(),
        HOST_IP.into(),
    ));
    let scheduler = tokio::spawn(schedule::run(
        client.clone(),
        cli.node_name.clone(),
        node::labels(&cli.node_name),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let result = tokio::select! {
        r = run_pods(agent, stop_rx) => r,
        _ = shutdown_signal() => Ok(()),
    };
    info!("stopping: SIGTERM to every pod's processes");
    heartbeat.abort();
    scheduler.abort();
    let _ = stop_tx.send(true);
    // Wait until the workers have stopped their processes (they hold a receiver each).
    stop_tx.closed().await;
    result
}

/// Starts a worker for each pod bound to this node and passes it every new version.
async fn run_pods(agent: Arc<pod::Agent>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(agent.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", agent.node_name));
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut relisted = std::collections::HashSet::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!("watching this node's pods: {e}");
                continue;
            }
        };
        // Workers end on their own once their pod is deleted.
        workers.retain(|_, tx| !tx.is_closed());
        match event {
            watcher::Event::Init => relisted.clear(),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let uid = pod.uid().unwrap_or_default();
                relisted.insert(uid.clone());
                match workers.get(&uid) {
                    Some(tx) => {
                        let _ = tx.send(Some(pod));
                    }
                    None => {
                        let (tx, rx) = watch::channel(Some(pod));
                        tokio::spawn(pod::run(agent.clone(), rx, stop.clone()));
                        workers.insert(uid, tx);
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(tx) = workers.get(&pod.uid().unwrap_or_default()) {
                    let _ = tx.send(None);
                }
            }
            watcher::Event::InitDone => {
                for (uid, tx) in &workers {
                    if !relisted.contains(uid) {
                        let _ = tx.send(None);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The cluster (server and CA) of the kubeconfig's current context, for pods'
/// kubeconfigs.
fn current_cluster(kubeconfig: &Kubeconfig) -> anyhow::Result<kube::config::Cluster> {
    let context_name = kubeconfig
        .current_context
        .clone()
        .context("the kubeconfig has no current-context")?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.clone())
        .with_context(|| format!("the kubeconfig has no context {context_name:?}"))?;
    kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.clone())
        .with_context(|| format!("the kubeconfig has no cluster {:?}", context.cluster))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
