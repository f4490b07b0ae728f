//! The scaling decision, computed directly from lag (no HPA target in between), and
//! the little history it needs: when each partition's committed offset last moved, past
//! recommendations for the scale-down window, the last scale-up for the rate limit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use eventops_crds::ScalingPolicy;

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to run now.
    pub replicas: i32,
    /// Lag over every partition.
    pub total_lag: i64,
    /// Partitions reported stuck.
    pub stuck: BTreeSet<Partition>,
    /// Why `replicas`, in words.
    pub reason: String,
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
}

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
/// 2. `ceil(lag / lagPerReplica)` of the other partitions' lag; a group at zero stays
///    at zero while that lag is at most `activationLag`.
/// 3. Capped at the partitions with lag (if asked), raised to `minReplicas`, capped at
///    `maxReplicas` and the partition count, rounded up to a divisor of the partition
///    count (if asked).
/// 4. Up: at once, but not twice within `scaleUpInterval`. Down: only to the highest
///    recommendation of the last `scaleDownStabilization`.
pub fn decide(
    policy: &Policy,
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
    let mut want = if current == 0 && driving <= policy.activation_lag {
        if driving > 0 {
            notes.push(format!(
                "at or below activationLag {}",
                policy.activation_lag
            ));
        }
        0
    } else {
        let n = (driving + policy.lag_per_replica - 1) / policy.lag_per_replica;
        i32::try_from(n).unwrap_or(i32::MAX)
    };
    if !stuck.is_empty() {
        notes.push(format!(
            "{} stuck partition(s) count for one replica",
            stuck.len()
        ));
        want = want.max(1);
    }
    notes.push(format!(
        "{want} replica(s) at lagPerReplica {}",
        policy.lag_per_replica
    ));

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
    let replicas = if want > current {
        match history.last_scale_up {
            Some(t) if now.duration_since(t) < policy.scale_up_interval => {
                notes.push(format!(
                    "scale-up held: last one under scaleUpInterval {:?} ago",
                    policy.scale_up_interval
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
    Decision {
        replicas,
        total_lag,
        stuck,
        reason: notes.join("; "),
    }
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
        decide(policy, &mut history, &lags(partitions), current, now).replicas
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
        let d = decide(&p, &mut h, &lags(&[250, 0, 0, 0]), 1, t0);
        assert_eq!(d.replicas, 3);
        h.scaled_up(t0);
        let later = t0 + Duration::from_secs(2);
        let d = decide(&p, &mut h, &lags(&[400, 0, 0, 0]), 3, later);
        assert_eq!(d.replicas, 3, "{}", d.reason);
        assert!(d.reason.contains("scale-up held"), "{}", d.reason);
        let d = decide(
            &p,
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
        let d = decide(&p, &mut h, &lags(&[0, 0, 0, 0]), 4, at(1));
        assert_eq!(d.replicas, 4, "{}", d.reason);
        assert!(d.reason.contains("scaleDownStabilization"), "{}", d.reason);
        // A short spike inside the window keeps the high mark.
        let d = decide(&p, &mut h, &lags(&[150, 0, 0, 0]), 4, at(30));
        assert_eq!(d.replicas, 4);
        let d = decide(&p, &mut h, &lags(&[0, 0, 0, 0]), 4, at(62));
        assert_eq!(d.replicas, 2, "the spike's 2 holds: {}", d.reason);
        let d = decide(&p, &mut h, &lags(&[0, 0, 0, 0]), 2, at(91));
        assert_eq!(d.replicas, 0, "{}", d.reason);
    }

    #[test]
    fn a_stuck_partition_is_reported_and_needs_one_replica() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = history_for(4, t0);
        let stuck_lag = lags(&[5000, 0, 0, 0]);
        let d = decide(&p, &mut h, &stuck_lag, 4, t0);
        assert!(d.stuck.is_empty());
        let d = decide(&p, &mut h, &stuck_lag, 4, t0 + Duration::from_secs(29));
        assert!(d.stuck.is_empty());
        let later = t0 + Duration::from_secs(100);
        let d = decide(&p, &mut h, &stuck_lag, 4, later);
        assert_eq!(d.stuck, BTreeSet::from([("t".to_string(), 0)]));
        assert_eq!(d.total_lag, 5000);
        // Stabilization still holds 4 for its window; after it, one replica.
        let d = decide(&p, &mut h, &stuck_lag, 4, later + Duration::from_secs(61));
        assert_eq!(d.replicas, 1, "{}", d.reason);
        // Progress clears it.
        let mut moved = stuck_lag.clone();
        moved.get_mut(&("t".to_string(), 0)).unwrap().committed = Some(10);
        let d = decide(&p, &mut h, &moved, 1, later + Duration::from_secs(62));
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
        assert_eq!(decide(&p, &mut h, &idle, 1, at(100)).replicas, 0);
        h.external_change(3, at(101));
        assert_eq!(decide(&p, &mut h, &idle, 3, at(102)).replicas, 3);
        assert_eq!(decide(&p, &mut h, &idle, 3, at(162)).replicas, 0);
    }

    #[test]
    fn no_workers_is_not_stuck() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = History::default();
        let l = lags(&[10, 0, 0, 0]);
        decide(&p, &mut h, &l, 0, t0);
        let d = decide(&p, &mut h, &l, 0, t0 + Duration::from_secs(100));
        assert!(d.stuck.is_empty());
        assert_eq!(d.replicas, 1);
    }
}
