//! The scaling decision, computed directly from lag (no HPA target in between), and
//! the little history it needs: when each partition's committed offset last moved, past
//! recommendations for the scale-down window, the last scale-up for the rate limit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use eventops_crds::ScalingPolicy;

use super::rate::Rates;

/// A partition, as (topic, partition).
pub type Partition = (String, i32);

/// The scaling settings, with durations resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Fewest replicas.
    pub min: i32,
    /// Most replicas, before the partition cap.
    pub max: Option<i32>,
    /// Lag one replica absorbs.
    pub lag_per_replica: i64,
    /// Lag at or below which a group at zero stays at zero.
    pub activation_lag: i64,
    /// How long the highest recent recommendation holds before scaling down.
    pub scale_down_window: Duration,
    /// Shortest time between two scale-ups.
    pub scale_up_interval: Duration,
    /// Cap replicas at the number of partitions with lag.
    pub limit_to_partitions_with_lag: bool,
    /// Only replica counts that divide the partition count.
    pub even: bool,
    /// A lagging partition whose committed offset has not moved this long is stuck.
    pub stuck_after: Duration,
    /// One-step scaling: drain the lag within this, given the measured rates.
    pub drain_within: Option<Duration>,
}

impl From<&ScalingPolicy> for Policy {
    fn from(s: &ScalingPolicy) -> Self {
        Self {
            min: s.min_replicas,
            max: s.max_replicas,
            lag_per_replica: s.lag_per_replica.max(1),
            activation_lag: s.activation_lag,
            scale_down_window: s.scale_down_stabilization.into(),
            scale_up_interval: s.scale_up_interval.into(),
            limit_to_partitions_with_lag: s.limit_to_partitions_with_lag,
            even: s.even_partition_distribution,
            stuck_after: s.stuck_after.into(),
            drain_within: s.drain_within.map(Into::into),
        }
    }
}

/// One partition as measured this cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measured {
    /// Records not yet processed.
    pub lag: i64,
    /// The group's committed offset.
    pub committed: Option<i64>,
}

/// What one cycle decided for a group.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Replicas to run now.
    pub replicas: i32,
    /// Lag over every partition.
    pub total_lag: i64,
    /// Partitions reported stuck.
    pub stuck: BTreeSet<Partition>,
    /// Why `replicas`, in words.
    pub reason: String,
    /// The rates it was decided on (with `drainWithin`).
    pub rates: Rates,
}

/// What the decision remembers about a group between cycles.
#[derive(Debug, Default)]
pub struct History {
    /// Per partition: the committed offset and since when it has not moved (or the
    /// partition has had no lag, or the group no workers).
    progress: BTreeMap<Partition, (Option<i64>, Instant)>,
    /// Recent recommendations, oldest first.
    recommendations: VecDeque<(Instant, i32)>,
    last_scale_up: Option<Instant>,
    /// Cycles in a row a scale-up has waited for rising arrivals.
    rising_waits: u32,
}

/// At most this many cycles in a row a scale-up waits for rising arrivals: arrivals that
/// keep growing faster than that are taken as they stand.
const RISING_WAITS: u32 = 2;

impl History {
    /// Somebody else set the replicas to `current` at `now` (`kubectl scale`, a
    /// rollback): that counts as a fresh recommendation, so a scale-down waits a full
    /// window instead of undoing it at once.
    pub fn external_change(&mut self, current: i32, now: Instant) {
        self.recommendations = VecDeque::from([(now, current)]);
    }

    /// Remembers that replicas were raised at `at`.
    pub fn scaled_up(&mut self, at: Instant) {
        self.last_scale_up = Some(at);
    }
}

/// Decides the replicas of a group that runs `current` replicas, given its partitions
/// (all of them, `partitions.len()` being the partition count) at `now`:
///
/// 1. A partition with lag whose committed offset has not moved for `stuck_after`
///    while workers run is stuck; it needs a worker, not more of them, so it counts
///    for one replica at most.
/// 2. Of the other partitions' lag: with `drainWithin` (T) and a measured processing
///    rate per replica (r), the smallest n with `lag + arrival × T ≤ n × r × T` (drain
///    the lag within T while keeping up with arrivals); otherwise `ceil(lag /
///    lagPerReplica)`. A group at zero stays at zero while that lag is at most
///    `activationLag`.
/// 3. Capped at the partitions with lag (if asked), raised to `minReplicas`, capped at
///    `maxReplicas` and the partition count, rounded up to a divisor of the partition
///    count (if asked).
/// 4. Up: at once, to the whole need in one step, but not twice within
///    `scaleUpInterval`; with `drainWithin`, not while arrivals are rising (at most two
///    cycles: the need is measured once they stop). Down: only to the highest
///    recommendation of the last `scaleDownStabilization`.
pub fn decide(
    policy: &Policy,
    rates: &Rates,
    history: &mut History,
    partitions: &BTreeMap<Partition, Measured>,
    current: i32,
    now: Instant,
) -> Decision {
    // 1. Stuck partitions.
    history.progress.retain(|p, _| partitions.contains_key(p));
    let mut stuck = BTreeSet::new();
    for (p, m) in partitions {
        let entry = history
            .progress
            .entry(p.clone())
            .or_insert((m.committed, now));
        if entry.0 != m.committed || m.lag == 0 || current == 0 {
            *entry = (m.committed, now);
        } else if now.duration_since(entry.1) >= policy.stuck_after {
            stuck.insert(p.clone());
        }
    }
    let total_lag: i64 = partitions.values().map(|m| m.lag).sum();
    let driving: i64 = partitions
        .iter()
        .filter(|(p, _)| !stuck.contains(*p))
        .map(|(_, m)| m.lag)
        .sum();
    let lagging = partitions.values().filter(|m| m.lag > 0).count() as i32;
    let partition_count = partitions.len() as i32;

    // 2. Lag to replicas.
    let mut notes = vec![format!(
        "lag {total_lag} over {lagging}/{partition_count} partitions"
    )];
    let mut drained = false;
    let mut want = if current == 0 && driving <= policy.activation_lag {
        if driving > 0 {
            notes.push(format!(
                "at or below activationLag {}",
                policy.activation_lag
            ));
        }
        0
    } else if let Some(drain) = drain_to(policy, rates, driving, &mut notes) {
        drained = true;
        drain
    } else {
        let n = (driving + policy.lag_per_replica - 1) / policy.lag_per_replica;
        notes.push(format!(
            "{n} replica(s) at lagPerReplica {}",
            policy.lag_per_replica
        ));
        i32::try_from(n).unwrap_or(i32::MAX)
    };
    if !stuck.is_empty() {
        notes.push(format!(
            "{} stuck partition(s) count for one replica",
            stuck.len()
        ));
        want = want.max(1);
    }

    // 3. Bounds.
    if policy.limit_to_partitions_with_lag && want > lagging {
        want = lagging;
        notes.push(format!("limited to {lagging} partition(s) with lag"));
    }
    if want < policy.min {
        want = policy.min;
        notes.push(format!("raised to minReplicas {}", policy.min));
    }
    let upper = policy
        .max
        .unwrap_or(partition_count)
        .min(partition_count)
        .max(0);
    if want > upper {
        want = upper;
        notes.push(format!(
            "capped at {upper} (maxReplicas and {partition_count} partitions)"
        ));
    }
    if policy.even && want > 0 && partition_count > 0 && partition_count % want != 0 {
        let even = (want..=partition_count)
            .find(|d| partition_count % d == 0 && *d <= upper)
            .or_else(|| (1..want).rev().find(|d| partition_count % d == 0))
            .unwrap_or(want);
        notes.push(format!(
            "{even} to divide {partition_count} partitions evenly"
        ));
        want = even;
    }

    // 4. Rate limit and stabilization.
    history.recommendations.push_back((now, want));
    while history
        .recommendations
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > policy.scale_down_window)
    {
        history.recommendations.pop_front();
    }
    let mut waited = false;
    let replicas = if want > current {
        match (history.last_scale_up, rates.rising) {
            (Some(t), _) if now.duration_since(t) < policy.scale_up_interval => {
                notes.push(format!(
                    "scale-up held: last one under scaleUpInterval {:?} ago",
                    policy.scale_up_interval
                ));
                current
            }
            // The need is not measured yet: one more cycle tells a rate that stepped up
            // (then scaled to in one step) from a one-off burst (then lag only).
            (_, Some(rising)) if drained && history.rising_waits < RISING_WAITS => {
                waited = true;
                notes.push(format!(
                    "scale-up waits a cycle: arrivals rising to {rising:.1}/s"
                ));
                current
            }
            _ => want,
        }
    } else if want < current {
        let hold = history
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(want)
            .min(current);
        if hold > want {
            notes.push(format!(
                "held at {hold} for scaleDownStabilization {:?}",
                policy.scale_down_window
            ));
        }
        hold
    } else {
        current
    };
    history.rising_waits = if waited { history.rising_waits + 1 } else { 0 };
    Decision {
        replicas,
        total_lag,
        stuck,
        reason: notes.join("; "),
        rates: *rates,
    }
}

/// With `drainWithin` (T) and a usable processing rate per replica (r), the fewest
/// replicas n with `lag + arrival × T ≤ n × r × T`; `None` (the `lagPerReplica` rule
/// decides) without `drainWithin` or without a measured rate above zero. An arrival
/// rate not measured yet counts as none.
fn drain_to(policy: &Policy, rates: &Rates, lag: i64, notes: &mut Vec<String>) -> Option<i32> {
    let within = policy.drain_within?;
    let t = within.as_secs_f64();
    let per_replica = rates.per_replica.filter(|r| r.is_finite() && *r > 0.0);
    let Some(r) = per_replica.filter(|_| t > 0.0) else {
        notes.push(format!(
            "no processing rate measured yet for drainWithin {within:?}"
        ));
        return None;
    };
    let arrival = rates
        .arrival
        .filter(|a| a.is_finite())
        .unwrap_or(0.0)
        .max(0.0);
    let work = lag as f64 + arrival * t;
    // A hair under the exact multiple stays that multiple: 1000 / (100 × 10) is 1.
    let n = (work / (r * t) - 1e-9).ceil().max(0.0);
    let n = if n >= f64::from(i32::MAX) {
        i32::MAX
    } else {
        n as i32
    };
    notes.push(format!(
        "arrivals {arrival:.1}/s, {r:.1}/s per replica: {n} replica(s) drain lag {lag} \
         within drainWithin {within:?}"
    ));
    Some(n)
}

/// A fresh history for a group running `current` replicas: the scale-down window
/// starts now, as if `current` had just been recommended.
pub fn history_for(current: i32, now: Instant) -> History {
    History {
        recommendations: VecDeque::from([(now, current)]),
        ..History::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_RATES: Rates = Rates {
        arrival: None,
        per_replica: None,
        rising: None,
    };

    fn policy() -> Policy {
        Policy {
            min: 0,
            max: None,
            lag_per_replica: 100,
            activation_lag: 0,
            scale_down_window: Duration::from_secs(60),
            scale_up_interval: Duration::from_secs(5),
            limit_to_partitions_with_lag: false,
            even: false,
            stuck_after: Duration::from_secs(30),
            drain_within: None,
        }
    }

    /// Partitions of topic `t` with these lags, committed offsets 0.
    fn lags(lags: &[i64]) -> BTreeMap<Partition, Measured> {
        lags.iter()
            .enumerate()
            .map(|(i, &lag)| {
                (
                    ("t".to_string(), i as i32),
                    Measured {
                        lag,
                        committed: Some(0),
                    },
                )
            })
            .collect()
    }

    fn once(policy: &Policy, partitions: &[i64], current: i32) -> i32 {
        let now = Instant::now();
        let mut history = History::default();
        decide(
            policy,
            &NO_RATES,
            &mut history,
            &lags(partitions),
            current,
            now,
        )
        .replicas
    }

    #[test]
    fn replicas_follow_lag_within_bounds() {
        let p = policy();
        let with = |f: fn(&mut Policy)| {
            let mut p = policy();
            f(&mut p);
            p
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Policy, Vec<i64>, i32, i32)> = vec![
            // what, policy, partition lags, current, want
            ("no lag, min 0", p.clone(), vec![0, 0, 0, 0], 0, 0),
            ("ceil(lag / lagPerReplica)", p.clone(), vec![150, 0, 0, 0], 0, 2),
            ("exact multiple", p.clone(), vec![100, 100, 0, 0], 0, 2),
            ("one record is one replica", p.clone(), vec![1, 0, 0, 0], 0, 1),
            ("capped at the partition count", p.clone(), vec![1000, 1000, 0, 0], 1, 4),
            ("capped at maxReplicas", with(|p| p.max = Some(2)), vec![900, 0, 0, 0], 1, 2),
            ("maxReplicas above partitions", with(|p| p.max = Some(9)), vec![900, 0, 0, 0], 1, 4),
            ("minReplicas", with(|p| p.min = 2), vec![0, 0, 0, 0], 2, 2),
            ("only partitions with lag", with(|p| p.limit_to_partitions_with_lag = true), vec![900, 0, 0, 0], 0, 1),
            ("only partitions with lag, but min", with(|p| { p.limit_to_partitions_with_lag = true; p.min = 2 }), vec![900, 0, 0, 0], 2, 2),
            ("activation: stays at zero", with(|p| p.activation_lag = 50), vec![30, 20, 0, 0], 0, 0),
            ("activation: wakes above it", with(|p| p.activation_lag = 50), vec![30, 21, 0, 0], 0, 1),
            ("activation does not stop a running group", with(|p| p.activation_lag = 50), vec![10, 0, 0, 0], 1, 1),
            ("even: 3 of 4 becomes 4", with(|p| p.even = true), vec![250, 0, 0, 0], 0, 4),
            ("even: 2 of 4 stays", with(|p| p.even = true), vec![200, 0, 0, 0], 0, 2),
            ("even: max 3 of 4 becomes 2", with(|p| { p.even = true; p.max = Some(3) }), vec![900, 0, 0, 0], 0, 2),
            ("no partitions", p.clone(), vec![], 0, 0),
        ];
        for (what, policy, partitions, current, want) in cases {
            assert_eq!(once(&policy, &partitions, current), want, "{what}");
        }
    }

    #[test]
    fn scale_up_is_immediate_then_rate_limited() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = history_for(1, t0);
        let d = decide(&p, &NO_RATES, &mut h, &lags(&[250, 0, 0, 0]), 1, t0);
        assert_eq!(d.replicas, 3);
        h.scaled_up(t0);
        let later = t0 + Duration::from_secs(2);
        let d = decide(&p, &NO_RATES, &mut h, &lags(&[400, 0, 0, 0]), 3, later);
        assert_eq!(d.replicas, 3, "{}", d.reason);
        assert!(d.reason.contains("scale-up held"), "{}", d.reason);
        let d = decide(
            &p,
            &NO_RATES,
            &mut h,
            &lags(&[400, 0, 0, 0]),
            3,
            t0 + Duration::from_secs(5),
        );
        assert_eq!(d.replicas, 4);
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = history_for(4, t0);
        let at = |s| t0 + Duration::from_secs(s);
        let d = decide(&p, &NO_RATES, &mut h, &lags(&[0, 0, 0, 0]), 4, at(1));
        assert_eq!(d.replicas, 4, "{}", d.reason);
        assert!(d.reason.contains("scaleDownStabilization"), "{}", d.reason);
        // A short spike inside the window keeps the high mark.
        let d = decide(&p, &NO_RATES, &mut h, &lags(&[150, 0, 0, 0]), 4, at(30));
        assert_eq!(d.replicas, 4);
        let d = decide(&p, &NO_RATES, &mut h, &lags(&[0, 0, 0, 0]), 4, at(62));
        assert_eq!(d.replicas, 2, "the spike's 2 holds: {}", d.reason);
        let d = decide(&p, &NO_RATES, &mut h, &lags(&[0, 0, 0, 0]), 2, at(91));
        assert_eq!(d.replicas, 0, "{}", d.reason);
    }

    #[test]
    fn a_stuck_partition_is_reported_and_needs_one_replica() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = history_for(4, t0);
        let stuck_lag = lags(&[5000, 0, 0, 0]);
        let d = decide(&p, &NO_RATES, &mut h, &stuck_lag, 4, t0);
        assert!(d.stuck.is_empty());
        let d = decide(
            &p,
            &NO_RATES,
            &mut h,
            &stuck_lag,
            4,
            t0 + Duration::from_secs(29),
        );
        assert!(d.stuck.is_empty());
        let later = t0 + Duration::from_secs(100);
        let d = decide(&p, &NO_RATES, &mut h, &stuck_lag, 4, later);
        assert_eq!(d.stuck, BTreeSet::from([("t".to_string(), 0)]));
        assert_eq!(d.total_lag, 5000);
        // Stabilization still holds 4 for its window; after it, one replica.
        let d = decide(
            &p,
            &NO_RATES,
            &mut h,
            &stuck_lag,
            4,
            later + Duration::from_secs(61),
        );
        assert_eq!(d.replicas, 1, "{}", d.reason);
        // Progress clears it.
        let mut moved = stuck_lag.clone();
        moved.get_mut(&("t".to_string(), 0)).unwrap().committed = Some(10);
        let d = decide(
            &p,
            &NO_RATES,
            &mut h,
            &moved,
            1,
            later + Duration::from_secs(62),
        );
        assert!(d.stuck.is_empty());
        assert_eq!(d.replicas, 4);
    }

    #[test]
    fn a_replica_count_set_by_hand_holds_for_the_window() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = history_for(1, t0);
        let idle = lags(&[0, 0, 0, 0]);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(decide(&p, &NO_RATES, &mut h, &idle, 1, at(100)).replicas, 0);
        h.external_change(3, at(101));
        assert_eq!(decide(&p, &NO_RATES, &mut h, &idle, 3, at(102)).replicas, 3);
        assert_eq!(decide(&p, &NO_RATES, &mut h, &idle, 3, at(162)).replicas, 0);
    }

    #[test]
    fn no_workers_is_not_stuck() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = History::default();
        let l = lags(&[10, 0, 0, 0]);
        decide(&p, &NO_RATES, &mut h, &l, 0, t0);
        let d = decide(&p, &NO_RATES, &mut h, &l, 0, t0 + Duration::from_secs(100));
        assert!(d.stuck.is_empty());
        assert_eq!(d.replicas, 1);
    }

    fn rates(arrival: Option<f64>, per_replica: Option<f64>) -> Rates {
        Rates {
            arrival,
            per_replica,
            rising: None,
        }
    }

    /// What, policy, partition lags, rates, current replicas, wanted replicas.
    type Case = (&'static str, Policy, Vec<i64>, Rates, i32, i32);

    #[test]
    fn drain_within_reaches_the_need_in_one_step() {
        // 8 partitions, drainWithin 10 s, lagPerReplica 100 (the fallback).
        let draining = |f: fn(&mut Policy)| {
            let mut p = policy();
            p.drain_within = Some(Duration::from_secs(10));
            f(&mut p);
            p
        };
        let p = draining(|_| {});
        let spread = |total: i64| vec![total / 8; 8];
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // what, policy, partition lags, rates, current, want
            ("backlog spike: one step to what drains it (3200 / (100/s × 10 s))",
                p.clone(), spread(3200), rates(Some(0.0), Some(100.0)), 1, 4),
            ("the same spike by lagPerReplica alone would want 32, capped at 8",
                policy(), spread(3200), rates(Some(0.0), Some(100.0)), 1, 8),
            ("arrivals only: keeps up (250/s at 100/s per replica)",
                p.clone(), spread(0), rates(Some(250.0), Some(100.0)), 1, 3),
            ("backlog and arrivals: (1000 + 150 × 10) / (100 × 10) = 2.5",
                p.clone(), spread(1000), rates(Some(150.0), Some(100.0)), 1, 3),
            ("an exact multiple is not rounded up", p.clone(), spread(2000), rates(Some(0.0), Some(100.0)), 1, 2),
            ("one record needs one replica", p.clone(), vec![1, 0, 0, 0, 0, 0, 0, 0], rates(Some(0.0), Some(100.0)), 1, 1),
            ("arrivals not measured yet count as none", p.clone(), spread(800), rates(None, Some(100.0)), 1, 1),
            ("no processing rate yet: lagPerReplica", p.clone(), spread(320), rates(Some(10.0), None), 1, 4),
            ("a processing rate of 0: lagPerReplica", p.clone(), spread(320), rates(Some(10.0), Some(0.0)), 1, 4),
            ("a processing rate that is not a number: lagPerReplica", p.clone(), spread(320), rates(None, Some(f64::NAN)), 1, 4),
            ("arrivals of 0 and no lag: minReplicas", draining(|p| p.min = 1), spread(0), rates(Some(0.0), Some(100.0)), 3, 1),
            ("nothing to do at min 0", p.clone(), spread(0), rates(Some(0.0), Some(100.0)), 1, 0),
            ("an unusable arrival rate counts as none", p.clone(), spread(800), rates(Some(f64::NAN), Some(100.0)), 1, 1),
            ("capped at maxReplicas", draining(|p| p.max = Some(3)), spread(8000), rates(Some(0.0), Some(100.0)), 1, 3),
            ("capped at the partitions", p.clone(), spread(0), rates(Some(1e12), Some(1.0)), 1, 8),
            ("an arrival rate beyond i32 does not overflow", p.clone(), spread(0), rates(Some(1e300), Some(1e-300)), 1, 8),
            ("capped at partitions with lag", draining(|p| p.limit_to_partitions_with_lag = true),
                vec![3000, 3000, 0, 0, 0, 0, 0, 0], rates(Some(0.0), Some(100.0)), 1, 2),
            ("even: 3 of 8 becomes 4", draining(|p| p.even = true), spread(2400), rates(Some(0.0), Some(100.0)), 1, 4),
            ("a group at zero stays there at activationLag, whatever the rates",
                draining(|p| p.activation_lag = 100), spread(80), rates(Some(50.0), Some(100.0)), 0, 0),
            ("without drainWithin, rates decide nothing", policy(), spread(320), rates(Some(1000.0), Some(1.0)), 1, 4),
        ];
        for (what, policy, partitions, rates, current, want) in cases {
            let mut h = History::default();
            let d = decide(
                &policy,
                &rates,
                &mut h,
                &lags(&partitions),
                current,
                Instant::now(),
            );
            assert_eq!(d.replicas, want, "{what}: {}", d.reason);
        }
    }

    #[test]
    fn the_reason_names_the_rates_or_the_fallback() {
        let mut p = policy();
        p.drain_within = Some(Duration::from_secs(60));
        let now = Instant::now();
        let measured = rates(Some(500.0), Some(50.0));
        let d = decide(
            &p,
            &measured,
            &mut History::default(),
            &lags(&[900, 0, 0, 0]),
            1,
            now,
        );
        assert!(
            d.reason.contains("arrivals 500.0/s, 50.0/s per replica")
                && d.reason.contains("drain lag 900 within drainWithin 60s"),
            "{}",
            d.reason
        );
        let d = decide(
            &p,
            &NO_RATES,
            &mut History::default(),
            &lags(&[900, 0, 0, 0]),
            1,
            now,
        );
        assert!(
            d.reason.contains("no processing rate measured yet")
                && d.reason.contains("9 replica(s) at lagPerReplica 100"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_scale_up_waits_for_rising_arrivals_two_cycles_at_most() {
        let mut p = policy();
        p.drain_within = Some(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut h = history_for(1, t0);
        let rising = |arrival: f64, newest: f64| Rates {
            arrival: Some(arrival),
            per_replica: Some(100.0),
            rising: Some(newest),
        };
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut step = |r: &Rates, s: u64| decide(&p, r, &mut h, &lags(&[500, 0, 0, 0]), 1, at(s));
        let d = step(&rising(100.0, 300.0), 1);
        assert_eq!(d.replicas, 1, "{}", d.reason);
        assert!(
            d.reason
                .contains("waits a cycle: arrivals rising to 300.0/s"),
            "{}",
            d.reason
        );
        assert_eq!(step(&rising(150.0, 400.0), 2).replicas, 1);
        // Still rising after two cycles: taken as it stands, (500 + 200 × 10) / 1000.
        let d = step(&rising(200.0, 800.0), 3);
        assert_eq!(d.replicas, 3, "{}", d.reason);
        // Without drainWithin the lagPerReplica rule never waits.
        p.drain_within = None;
        let mut h = history_for(1, t0);
        let d = decide(
            &p,
            &rising(100.0, 300.0),
            &mut h,
            &lags(&[500, 0, 0, 0]),
            1,
            at(1),
        );
        assert_eq!(d.replicas, 4, "{}", d.reason);
    }

    #[test]
    fn a_measured_need_is_not_held_back_by_scale_up_interval_steps() {
        // Up to 6 in one go; scaleUpInterval then holds a further step, and the one after
        // it goes straight to the new need.
        let mut p = policy();
        p.drain_within = Some(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut h = history_for(1, t0);
        let r = rates(Some(0.0), Some(100.0));
        let d = decide(
            &p,
            &r,
            &mut h,
            &lags(&[3000, 3000, 0, 0, 0, 0, 0, 0]),
            1,
            t0,
        );
        assert_eq!(d.replicas, 6, "{}", d.reason);
        h.scaled_up(t0);
        let more = lags(&[4000, 4000, 0, 0, 0, 0, 0, 0]);
        let d = decide(&p, &r, &mut h, &more, 6, t0 + Duration::from_secs(2));
        assert_eq!(d.replicas, 6, "{}", d.reason);
        assert!(d.reason.contains("scale-up held"), "{}", d.reason);
        let d = decide(&p, &r, &mut h, &more, 6, t0 + Duration::from_secs(5));
        assert_eq!(d.replicas, 8, "{}", d.reason);
    }

    /// The demo's spike, simulated second by second through the rate tracker and the
    /// decision: 6 partitions, 50 records/s rising to 500/s, 50/s per worker (as the
    /// order-processing inventory service), workers Ready 3 s after a scale-up. With
    /// `drainWithin: 60s` the group goes 1 → 6 in one step, within 3 s of its lag
    /// crossing one replica's worth (lagPerReplica 500); by lag alone it takes steps.
    #[test]
    fn the_demo_spike_takes_one_step_with_drain_within() {
        use crate::autoscaler::rate::{Observation, RateTracker};

        /// `ramp`: seconds over which the traffic climbs from 20/s to 300/s (0: a step).
        fn run(drain_within: Option<Duration>, ramp: f64) -> (Vec<(f64, i32, i32)>, Option<f64>) {
            let policy = Policy {
                min: 1,
                max: None,
                lag_per_replica: 500,
                activation_lag: 0,
                scale_down_window: Duration::from_secs(30),
                scale_up_interval: Duration::from_secs(5),
                limit_to_partitions_with_lag: false,
                even: false,
                stuck_after: Duration::from_secs(120),
                drain_within,
            };
            const PARTITIONS: usize = 6;
            let t0 = Instant::now();
            let (mut ends, mut committed) = ([0f64; PARTITIONS], [0f64; PARTITIONS]);
            let (mut current, mut ready) = (1, 1);
            let mut pending: Option<(f64, i32)> = None;
            let mut tracker = RateTracker::default();
            let mut history = history_for(1, t0);
            let (mut steps, mut crossed) = (vec![], None);
            let dt = 0.1;
            for tick in 1..=400 {
                let t = f64::from(tick) * dt;
                // The demo's traffic (`tools/sandbox`): 20 orders/s, ×15 from 10 s for
                // 30 s; one inventory worker reserves 50 a second.
                let arrival = if (10.3..40.3).contains(&t) {
                    20.0 + 280.0 * ((t - 10.3) / ramp).min(1.0)
                } else {
                    20.0
                };
                let capacity = f64::from(ready) * 50.0 * dt / PARTITIONS as f64;
                for (end, c) in ends.iter_mut().zip(committed.iter_mut()) {
                    *end += arrival * dt / PARTITIONS as f64;
                    *c = (*c + capacity).min(end.floor());
                }
                if let Some((at, n)) = pending
                    && t >= at
                {
                    ready = n;
                    pending = None;
                }
                if tick % 10 != 0 {
                    continue;
                }
                let now = t0 + Duration::from_secs_f64(t);
                let observed: BTreeMap<Partition, Observation> = (0..PARTITIONS)
                    .map(|p| {
                        let (end, c) = (ends[p].floor() as i64, committed[p].floor() as i64);
                        let o = Observation {
                            end,
                            committed: Some(c),
                            lag: end - c,
                        };
                        (("t".to_string(), p as i32), o)
                    })
                    .collect();
                let measured = observed
                    .iter()
                    .map(|(p, o)| {
                        let m = Measured {
                            lag: o.lag,
                            committed: o.committed,
                        };
                        (p.clone(), m)
                    })
                    .collect();
                let lag: i64 = observed.values().map(|o| o.lag).sum();
                if crossed.is_none() && lag >= policy.lag_per_replica {
                    crossed = Some(t);
                }
                let rates = tracker.observe(now, &observed, ready);
                let d = decide(&policy, &rates, &mut history, &measured, current, now);
                if d.replicas > current {
                    steps.push((t, current, d.replicas));
                    history.scaled_up(now);
                    pending = Some((t + 3.0, d.replicas));
                }
                current = d.replicas;
            }
            (steps, crossed)
        }

        // A step, and traffic that climbs over 1.5 s and 2.5 s (as the demo's producer
        // showed on a busy machine: 190/s in the second interval of the spike).
        for ramp in [0.0, 1.5, 2.5, 3.5, 5.0] {
            let (steps, crossed) = run(Some(Duration::from_secs(60)), ramp);
            let crossed = crossed.expect("the lag crosses 500");
            assert_eq!(steps.len(), 1, "ramp {ramp}s: {steps:?}");
            let (at, from, to) = steps[0];
            assert_eq!((from, to), (1, 6), "ramp {ramp}s: {steps:?}");
            assert!(
                at - crossed <= 3.0,
                "ramp {ramp}s: {steps:?}, lag crossed 500 at {crossed}"
            );
        }
        let (steps, _) = run(None, 0.0);
        assert!(steps.len() > 1, "lagPerReplica alone: {steps:?}");
    }
}
