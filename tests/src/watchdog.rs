//! Time limits for integration tests, and failures of what a test runs in the background.
//!
//! [`crate::env`] registers the calling test (libtest runs each test on a thread named
//! after it) with a deadline; the registration ends when its [`crate::TestEnv`] is
//! dropped, also on panic. A test still running past its deadline is a hang: the watchdog
//! names it, kills every process this test binary started (operators, workers, Kafka's
//! tools) and exits the binary with a failure, so CI fails at once instead of stalling.
//!
//! An in-process operator that fails records its error under its test's name;
//! [`crate::eventually`] and dropping the operator's handle turn it into that test's
//! failure instead of losing it in a detached task.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a test may run unless it sets its own limit
/// ([`crate::TestEnv::time_limit`]); `EVENTOPS_TEST_TIME_LIMIT` (seconds) overrides it.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(600);

struct Running {
    test: String,
    deadline: Instant,
    limit: Duration,
}

static RUNNING: Mutex<BTreeMap<u64, Running>> = Mutex::new(BTreeMap::new());
static FAILURES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static WATCHING: std::sync::Once = std::sync::Once::new();

/// A test's registration with the watchdog; dropping it ends the registration.
#[derive(Debug)]
pub struct Deadline {
    id: u64,
}

impl Deadline {
    /// Registers the current test with `limit` from now (or the environment's override).
    pub fn start(limit: Duration) -> Self {
        WATCHING.call_once(|| {
            std::thread::Builder::new()
                .name("eventops-test-watchdog".into())
                .spawn(watch)
                .expect("starting the test watchdog");
        });
        let limit = std::env::var("EVENTOPS_TEST_TIME_LIMIT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(limit);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        RUNNING.lock().unwrap().insert(
            id,
            Running {
                test: current_test(),
                deadline: Instant::now() + limit,
                limit,
            },
        );
        Self { id }
    }

    /// Moves the deadline to `limit` from now.
    pub fn extend(&self, limit: Duration) {
        if let Some(r) = RUNNING.lock().unwrap().get_mut(&self.id) {
            r.deadline = Instant::now() + limit;
            r.limit = limit;
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        RUNNING.lock().unwrap().remove(&self.id);
    }
}

/// The running test's name (libtest's thread name).
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string()
}

/// Records that something `test` runs in the background failed.
pub fn record_failure(test: &str, error: String) {
    FAILURES.lock().unwrap().insert(test.to_string(), error);
}

/// Panics with the failure recorded for the current test, if any.
pub fn check_background() {
    let test = current_test();
    let failure = FAILURES.lock().unwrap().remove(&test);
    if let Some(error) = failure {
        panic!("{error}");
    }
}

fn watch() {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = Instant::now();
        let expired = RUNNING
            .lock()
            .unwrap()
            .values()
            .find(|r| r.deadline <= now)
            .map(|r| (r.test.clone(), r.limit));
        if let Some((test, limit)) = expired {
            eprintln!(
                "\n[watchdog] test {test} is still running after its time limit of {limit:?}: \
                 a hang. Killing the processes this test binary started and failing."
            );
            kill_children();
            std::process::exit(101);
        }
    }
}

/// SIGKILLs every child process of this process (of any of its threads).
fn kill_children() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
    }
}
