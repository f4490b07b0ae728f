//! Child processes that die with the launcher and log to files.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Builds the command that starts a component; called again when it is restarted.
pub type Recipe = Box<dyn FnMut() -> Command + Send>;

/// A started component. It can be stopped and started again on request (fault
/// injection), with the same command line, data and ports.
pub struct Proc {
    pub name: String,
    recipe: Recipe,
    /// `None` while stopped on request.
    child: Option<Child>,
    pub log: PathBuf,
    /// Signal that asks this program for a clean, prompt shutdown.
    stop_signal: i32,
}

impl Proc {
    /// Starts `cmd` with its output in `log_dir/<name>.log`. The child gets SIGTERM if the
    /// launcher dies, so a crashed or killed launcher leaves no servers behind.
    pub fn spawn(
        name: impl Into<String>,
        recipe: impl FnMut() -> Command + Send + 'static,
        log_dir: &Path,
        stop_signal: i32,
    ) -> anyhow::Result<Self> {
        let name = name.into();
        let log = log_dir.join(format!("{name}.log"));
        File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut proc = Self {
            name,
            recipe: Box::new(recipe),
            child: None,
            log,
            stop_signal,
        };
        proc.start()?;
        Ok(proc)
    }

    /// Starts the process (again), appending to its log.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let mut cmd = (self.recipe)();
        let out = OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({:?})", self.name, cmd.get_program()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Fails with the tail of the log when the process has exited (unless it was
    /// stopped on request).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Waits until `ready` returns true, failing early if the process dies.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready after {timeout:?}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the process to stop, and kills it if it has not within `grace` (at once
    /// with a zero grace: a crash). It stays stopped until [`Proc::start`].
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        if !grace.is_zero() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, self.stop_signal) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!(
                "[devenv] {} did not stop within {grace:?}; killing it",
                self.name
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a short command to completion, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}):\n{}{}",
            cmd,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

/// A plain-HTTP GET on 127.0.0.1, returning the response (status line, headers, body).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_millis(500),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}
