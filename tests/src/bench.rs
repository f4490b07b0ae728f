//! Waits shared by the benchmark programs (`src/bin/bench-*.rs`): they return errors
//! with what they waited for rather than panicking as the tests' `eventually` does.

use std::time::{Duration, Instant};

use crate::http_get;

/// Waits until the operator has run no reconcile for 5 s.
pub async fn wait_quiet(port: u16) -> anyhow::Result<()> {
    anyhow::ensure!(
        settle(port, Duration::from_secs(600)).await,
        "reconciles never stopped"
    );
    Ok(())
}

/// Waits until the operator has run no reconcile for 5 s, or for `at_most`; whether
/// it was quiet.
pub async fn settle(port: u16, at_most: Duration) -> bool {
    let deadline = Instant::now() + at_most;
    let (mut last, mut since) = (reconciles(port), Instant::now());
    while since.elapsed() < Duration::from_secs(5) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = reconciles(port);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    true
}

/// The reconciles the operator at `port` has run, all controllers.
pub fn reconciles(port: u16) -> f64 {
    http_get(port, "/metrics")
        .map(|(_, m)| {
            m.lines()
                .filter(|l| l.starts_with("eventops_operator_reconciles_total{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

/// Polls `check` every 100 ms until it answers, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {} s waiting for {what}",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU time (user + system, ms) and resident memory (KiB) of process `pid`.
pub fn process_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    Ok((cpu_ms(&stat)?, rss))
}

/// User + system CPU time in `/proc/<pid>/stat`'s text, in ms.
fn cpu_ms(stat: &str) -> anyhow::Result<f64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    anyhow::ensure!(fields.len() > 12, "a short /proc stat line: {stat}");
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks * 1000.0 / clock_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU time (ms) used so far by each part of the machine: the environment's components
/// by their command lines, `operator` (the process `operator`), and `other` (the rest,
/// this benchmark included); `busy` is the whole machine's (`/proc/stat`: user, nice,
/// system, irq, softirq). Processes that ended are not counted: compare two samples of
/// long-running processes.
pub fn cpu_by_component(
    operator: u32,
) -> anyhow::Result<std::collections::BTreeMap<&'static str, f64>> {
    let mut by = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A process may end between the listing and the reads.
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
            std::fs::read(format!("/proc/{pid}/cmdline")),
        ) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let part = if pid == operator {
            "operator"
        } else {
            component(&cmdline)
        };
        *by.entry(part).or_insert(0.0) += cpu_ms(&stat).unwrap_or(0.0);
    }
    let machine = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<f64> = machine
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    anyhow::ensure!(ticks.len() >= 7, "an unexpected /proc/stat: {machine}");
    // user nice system idle iowait irq softirq steal guest guest_nice: this machine's
    // own work (steal is another guest's; guest time is already in user).
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    by.insert("busy", busy * 1000.0 / clock_ticks());
    Ok(by)
}

/// Which part of the environment a command line is.
fn component(cmdline: &str) -> &'static str {
    let program = cmdline.split_whitespace().next().unwrap_or_default();
    let name = program.rsplit('/').next().unwrap_or_default();
    match name {
        "kube-apiserver" => "kube-apiserver",
        "etcd" => "etcd",
        "kube-controller-manager" => "kube-controller-manager",
        "eventops-node-agent" => "node agent",
        _ if name.starts_with("postgres") => "postgres",
        "java" if cmdline.contains("kafka.Kafka") => "kafka",
        _ => "other",
    }
}

/// The CPU each part used between two [`cpu_by_component`] samples, largest first, as
/// `name seconds (share of the machine's busy time)`.
pub fn cpu_breakdown(
    before: &std::collections::BTreeMap<&'static str, f64>,
    after: &std::collections::BTreeMap<&'static str, f64>,
) -> String {
    let used =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let busy = used("busy");
    let mut parts: Vec<(&str, f64)> = after
        .keys()
        .filter(|k| **k != "busy")
        .map(|k| (*k, used(k)))
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    parts
        .iter()
        .map(|(k, ms)| format!("{k} {:.1} s ({:.0}%)", ms / 1000.0, ms / busy * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The API server's `apiserver_request_total` (its own `/metrics`, read as the
/// administrator) summed by `VERB resource[/subresource]`.
pub async fn api_requests(
    client: &kube::Client,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut by = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split("\",")
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let subresource = label("subresource");
        let key = if subresource.is_empty() {
            format!("{} {}", label("verb"), label("resource"))
        } else {
            format!("{} {}/{subresource}", label("verb"), label("resource"))
        };
        *by.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(by)
}

/// The `top` largest differences between two [`api_requests`] readings, largest first, as
/// `VERB resource count`, and their total.
pub fn api_request_breakdown(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    top: usize,
) -> (f64, String) {
    let mut deltas: Vec<(&String, f64)> = after
        .iter()
        .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    deltas.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = deltas.iter().map(|(_, d)| d).sum();
    let list = deltas
        .iter()
        .take(top)
        .map(|(k, d)| format!("{k} {d}"))
        .collect::<Vec<_>>()
        .join(", ");
    (total, list)
}
