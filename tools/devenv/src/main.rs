//! `eventops-devenv`: development and test tooling that runs the real local environment.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use eventops_devenv::launch::{Components, Environment};
use eventops_devenv::{EnvInfo, Fault};

#[derive(Parser)]
#[command(about = "Development and test tooling: the real local EventOps environment")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, start etcd, kube-apiserver, kube-controller-manager,
    /// the EventOps node agent (built next to this executable), Kafka and PostgreSQL,
    /// write DIR/env.json and DIR/env.sh, and run until SIGINT or
    /// SIGTERM.
    Up {
        /// Directory for data, logs and credentials (default: a new one under /tmp).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Keep the state directory after stopping (for reading logs).
        #[arg(long)]
        keep: bool,
        /// Kafka brokers to run (each also a KRaft controller). Three or more run
        /// topics at replication factor 3 with `min.insync.replicas=2`.
        #[arg(long, default_value_t = 1)]
        brokers: usize,
    },
    /// Stop, kill (SIGKILL) or start again a component of a running environment:
    /// `etcd`, `kube-apiserver`, `kube-controller-manager`, `node-agent`, `postgres`,
    /// `kafka` (one broker) or `kafka-N` (broker with node.id N).
    Fault {
        /// The running environment's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// `stop`, `kill` or `start`.
        action: String,
        /// The component.
        component: String,
    },
    /// Only install (fetch or build) the components into the cache.
    Install,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The scripts say where the checkout is: a binary built in another checkout that
    // shares the cargo target directory (CI's, a worktree) would otherwise run that
    // checkout's install scripts, or scripts that no longer exist.
    let repo_root = std::env::var_os("EVENTOPS_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    match cli.command {
        Cmd::Install => {
            let c = Components::install(&repo_root)?;
            eprintln!("[devenv] components: {c:#?}");
        }
        Cmd::Fault {
            state_dir,
            action,
            component,
        } => {
            let fault = Fault::parse(&action)
                .with_context(|| format!("unknown action {action:?}: stop, kill or start"))?;
            EnvInfo::load(&state_dir.join("env.json"))?.fault(&component, fault)?;
        }
        Cmd::Up {
            state_dir,
            keep,
            brokers,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("eventops-env-{}", std::process::id()))
            });
            // Register before starting anything, so a signal during start-up still stops
            // every process that was started.
            let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
            ] {
                signal_hook::flag::register(sig, term.clone())?;
            }
            let components = Components::install(&repo_root)?;
            let mut env = Environment::start(&components, &state_dir, keep, brokers)
                .context("starting the environment")?;
            let env_file = env.write_env_files()?;
            eprintln!("[devenv] ready: {}", env_file.display());
            eprintln!(
                "[devenv] in a shell: source {}",
                state_dir.join("env.sh").display()
            );
            while !term.load(std::sync::atomic::Ordering::Relaxed) {
                env.handle_faults()?;
                env.check_alive()?;
                std::thread::sleep(Duration::from_millis(250));
            }
            eprintln!("[devenv] stopping");
        }
    }
    Ok(())
}
