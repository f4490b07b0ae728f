//! Container processes: each in its own process group, with its output appended to a log
//! file, killed by the kernel if the agent dies (`PR_SET_PDEATHSIG`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::sync::mpsc;

/// How a process ended.
#[derive(Debug)]
pub struct Exit {
    /// Index of the container in the pod spec.
    pub container: usize,
    /// Which start of that container it was.
    pub run: u64,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if one killed it.
    pub signal: Option<i32>,
}

/// What to run.
pub struct Launch<'a> {
    /// The executable.
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [String],
    /// Its entire environment.
    pub env: &'a [(String, String)],
    /// Working directory.
    pub dir: &'a Path,
    /// File that gets standard output and error (appended).
    pub log: PathBuf,
}

/// Starts the process and reports its end on `exits`. Returns its pid, which is also its
/// process group id.
///
/// Must be called from a thread that lives as long as the agent: the kernel sends the
/// death signal when the thread that forked the child exits.
pub fn spawn(
    launch: Launch<'_>,
    container: usize,
    run: u64,
    exits: mpsc::UnboundedSender<Exit>,
) -> anyhow::Result<u32> {
    use std::os::unix::process::ExitStatusExt;
    let log = File::options()
        .create(true)
        .append(true)
        .open(&launch.log)
        .with_context(|| format!("opening {}", launch.log.display()))?;
    let mut cmd = tokio::process::Command::new(launch.program);
    cmd.args(launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(launch.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setpgid and prctl are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", launch.program.display()))?;
    let pid = child.id().context("the process has no pid")?;
    tokio::spawn(async move {
        let status = child.wait().await;
        let (code, signal) = match status {
            Ok(s) => (s.code(), s.signal()),
            Err(_) => (None, Some(libc::SIGKILL)),
        };
        // Like a container runtime: when the main process ends, so does everything it
        // started.
        signal_group(pid, libc::SIGKILL);
        let _ = exits.send(Exit {
            container,
            run,
            code,
            signal,
        });
    });
    Ok(pid)
}

/// Sends `signal` to the process `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, signal) };
}

/// Sends `signal` to every process in the group `pgid`.
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: plain kill(2) on a process group.
    unsafe { libc::kill(-(pgid as i32), signal) };
}
