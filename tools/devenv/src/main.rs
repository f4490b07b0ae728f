//! `eventops-devenv`: development and test tooling that runs the real local environment.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use eventops_devenv::launch::{Components, Environment};

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
    },
    /// Only install (fetch or build) the components into the cache.
    Install,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let repo_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    match cli.command {
        Cmd::Install => {
            let c = Components::install(&repo_root)?;
            eprintln!("[devenv] components: {c:#?}");
        }
        Cmd::Up { state_dir, keep } => {
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
            let mut env = Environment::start(&components, &state_dir, keep)
                .context("starting the environment")?;
            let env_file = env.write_env_files()?;
            eprintln!("[devenv] ready: {}", env_file.display());
            eprintln!(
                "[devenv] in a shell: source {}",
                state_dir.join("env.sh").display()
            );
            while !term.load(std::sync::atomic::Ordering::Relaxed) {
                env.check_alive()?;
                std::thread::sleep(Duration::from_millis(250));
            }
            eprintln!("[devenv] stopping");
        }
    }
    Ok(())
}
