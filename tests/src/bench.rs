//! Waits shared by the benchmark programs (`src/bin/bench-*.rs`): they return errors
//! with what they waited for rather than panicking as the tests' `eventually` does.

use std::time::{Duration, Instant};

use crate::http_get;

/// Waits until the operator has run no reconcile for 5 s.
pub async fn wait_quiet(port: u16) -> anyhow::Result<()> {
    let reconciles = || -> f64 {
        http_get(port, "/metrics")
            .map(|(_, m)| {
                m.lines()
                    .filter(|l| l.starts_with("eventops_operator_reconciles_total{"))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .sum()
            })
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut last, mut since) = (reconciles(), Instant::now());
    while since.elapsed() < Duration::from_secs(5) {
        anyhow::ensure!(Instant::now() < deadline, "reconciles never stopped");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = reconciles();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    Ok(())
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
