//! The two rates `scaling.drainWithin` scales on, measured from offsets the loop reads
//! anyway: how fast records arrive (partition end offsets over time) and how fast one
//! worker processes them (committed offsets over time, per Ready worker). Pure: the loop
//! feeds it one [`Observation`] per partition per cycle.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::decide::Partition;

/// One partition as read this cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Last stable offset.
    pub end: i64,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// Records not yet processed.
    pub lag: i64,
}

/// The rates behind a decision, in records per second. `None`: not measured (yet).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Records appended per second over the consumed partitions.
    pub arrival: Option<f64>,
    /// Records per second one worker processes.
    pub per_replica: Option<f64>,
    /// The last interval's arrivals when they rose well above `arrival` (over
    /// [`RISING`] times): a rate that has just stepped up (the interval that straddles
    /// the step counts only part of it), or a one-off burst. The next interval tells
    /// which. After a rise, also an interval well above the one before it: traffic
    /// still climbing (a ramp over several seconds) is not measured yet either.
    pub rising: Option<f64>,
}

/// How much faster than the estimate the last interval's arrivals must be to count as
/// rising: an estimate taken while rising is at most this much too low.
const RISING: f64 = 1.2;

/// How long the smoothing of the processing rate remembers: a measurement this old
/// weighs 1/e of a fresh one. Commits land every half second or so, so a one-second
/// measurement alone can be half or twice the real rate.
const SMOOTHING: Duration = Duration::from_secs(5);

/// What the rates are computed from, per group, between cycles.
#[derive(Debug, Default)]
pub struct RateTracker {
    last: Option<Sample>,
    /// The last two intervals' arrival rates, newest last.
    arrivals: Vec<f64>,
    /// Whether the arrivals of the interval before the newest were rising; and of the
    /// newest.
    rose: (bool, bool),
    per_replica: Option<f64>,
    /// Since which sample the Ready workers have been this many.
    running_since: Option<(i32, Instant)>,
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    partitions: BTreeMap<Partition, Observation>,
    running: i32,
}

impl RateTracker {
    /// Takes this cycle's offsets, read at `now` while `running` workers were Ready, and
    /// returns the rates as they now stand.
    ///
    /// - **Arrival**: the records appended between two cycles, per second, over the
    ///   partitions read both times; the lower of the last two such figures, so that a
    ///   one-off burst, which shows in one interval, counts as lag and not as a rate that
    ///   will go on (it would count twice), while a rate that goes on is known from the
    ///   second interval. The interval after a rise ([`Rates::rising`]) that is at least
    ///   as high gives the rate alone: the rise's own interval straddled the step and
    ///   counted only part of it.
    /// - **Processing per replica**: the committed offsets' advance per second divided by
    ///   the Ready workers, from intervals in which the group had a backlog the whole time
    ///   (the lag at the start was more than what was processed), the workers were the same
    ///   throughout and for the interval before (a worker that just joined is not at full
    ///   speed, and its group rebalances), and something was processed (a pause says
    ///   nothing about speed; a stuck partition has its own rule). Smoothed over
    ///   [`SMOOTHING`]; the first measurement counts as it is.
    pub fn observe(
        &mut self,
        now: Instant,
        partitions: &BTreeMap<Partition, Observation>,
        running: i32,
    ) -> Rates {
        let settled_since = match self.running_since {
            Some((n, since)) if n == running => since,
            _ => {
                self.running_since = Some((running, now));
                now
            }
        };
        if let Some(last) = &self.last {
            let elapsed = now.duration_since(last.at);
            let secs = elapsed.as_secs_f64();
            if secs > 0.0 {
                let (mut appended, mut processed, mut backlog) = (0i64, 0i64, 0i64);
                for (p, before) in &last.partitions {
                    let Some(after) = partitions.get(p) else {
                        continue;
                    };
                    appended += (after.end - before.end).max(0);
                    if let (Some(a), Some(b)) = (after.committed, before.committed) {
                        processed += (a - b).max(0);
                    }
                    backlog += before.lag;
                }
                self.arrivals.push(appended as f64 / secs);
                if self.arrivals.len() > 2 {
                    self.arrivals.remove(0);
                }
                self.rose = (self.rose.1, false);
                self.rose.1 = self.rates().rising.is_some();

                let busy = processed > 0 && backlog > processed;
                let settled = running > 0 && last.running == running && settled_since < last.at;
                if busy && settled {
                    let measured = processed as f64 / secs / f64::from(running);
                    self.per_replica = Some(match self.per_replica {
                        None => measured,
                        Some(old) => {
                            let weight = 1.0 - (-secs / SMOOTHING.as_secs_f64()).exp();
                            old + weight * (measured - old)
                        }
                    });
                }
            }
        }
        self.last = Some(Sample {
            at: now,
            partitions: partitions.clone(),
            running,
        });
        self.rates()
    }

    /// The rates as they stand.
    pub fn rates(&self) -> Rates {
        let arrival = match self.arrivals[..] {
            // Rising, then at least as high again: a rate that stepped up, known from the
            // first interval it filled (the one before straddled the step).
            [older, newest] if self.rose.0 && newest >= older => Some(newest),
            [older, newest] => Some(older.min(newest)),
            _ => None,
        };
        let above = |n: f64, base: f64| n > base * RISING && n - base >= 1.0;
        let rising = match self.arrivals[..] {
            // After a rise, still climbing well above the interval before: traffic that
            // ramps up over several seconds is not measured yet either.
            [older, newest] if self.rose.0 && newest >= older => {
                above(newest, older).then_some(newest)
            }
            [.., newest] => arrival.filter(|e| above(newest, *e)).map(|_| newest),
            [] => None,
        };
        Rates {
            arrival,
            per_replica: self.per_replica,
            rising,
        }
    }

    /// Forgets the offsets last seen (they cannot be trusted across a gap in the
    /// measurements): the next interval starts at the next observation. The processing
    /// rate measured so far is kept: a gap does not make workers slower.
    pub fn gap(&mut self) {
        self.last = None;
        self.arrivals.clear();
        self.rose = (false, false);
        self.running_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One partition `t/0` with this end, committed offset and lag.
    fn one(end: i64, committed: i64) -> BTreeMap<Partition, Observation> {
        BTreeMap::from([(
            ("t".to_string(), 0),
            Observation {
                end,
                committed: Some(committed),
                lag: end - committed,
            },
        )])
    }

    #[test]
    fn arrivals_are_the_lower_of_the_last_two_intervals() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        assert_eq!(r.observe(at(0), &one(0, 0), 1).arrival, None);
        assert_eq!(
            r.observe(at(1), &one(100, 0), 1).arrival,
            None,
            "one interval"
        );
        assert_eq!(r.observe(at(2), &one(200, 0), 1).arrival, Some(100.0));
        // A burst of 5000 in one interval: lag, not a rate.
        assert_eq!(r.observe(at(3), &one(5200, 0), 1).arrival, Some(100.0));
        assert_eq!(r.observe(at(4), &one(5200, 0), 1).arrival, Some(0.0));
        // A rate that goes on is the rate from its second interval.
        r.observe(at(5), &one(6200, 0), 1);
        assert_eq!(r.observe(at(6), &one(7200, 0), 1).arrival, Some(1000.0));
    }

    #[test]
    fn arrivals_that_step_up_count_as_rising_until_an_interval_confirms_them() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        r.observe(at(0), &one(0, 0), 1);
        r.observe(at(1), &one(20, 0), 1);
        assert_eq!(r.observe(at(2), &one(40, 0), 1).rising, None, "steady");
        // 20/s steps up to 300/s a third into the next second: 207 that second.
        let straddle = r.observe(at(3), &one(247, 0), 1);
        assert_eq!(
            (straddle.arrival, straddle.rising),
            (Some(20.0), Some(207.0))
        );
        // The next interval is higher: the rate it shows goes on, and it is still
        // climbing (well above the straddling one), so it may not be all of it.
        let full = r.observe(at(4), &one(547, 0), 1);
        assert_eq!((full.arrival, full.rising), (Some(300.0), Some(300.0)));
        // As high again: measured.
        let steady = r.observe(at(5), &one(847, 0), 1);
        assert_eq!((steady.arrival, steady.rising), (Some(300.0), None));
        // A one-off burst rises for one interval, then is only lag.
        let burst = r.observe(at(6), &one(5847, 0), 1);
        assert_eq!((burst.arrival, burst.rising), (Some(300.0), Some(5000.0)));
        let after = r.observe(at(7), &one(5847, 0), 1);
        assert_eq!((after.arrival, after.rising), (Some(0.0), None));
    }

    #[test]
    fn traffic_that_ramps_up_is_rising_until_it_stops_climbing() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        let mut end = 0;
        let mut step = |s, rate| {
            end += rate;
            let rates = r.observe(at(s), &one(end, 0), 1);
            (rates.arrival, rates.rising)
        };
        step(0, 0);
        step(1, 20);
        assert_eq!(step(2, 20), (Some(20.0), None));
        // 20/s climbing to 300/s over three seconds: 100, 190, 280, then 300.
        assert_eq!(step(3, 100), (Some(20.0), Some(100.0)));
        assert_eq!(step(4, 190), (Some(190.0), Some(190.0)));
        assert_eq!(step(5, 280), (Some(280.0), Some(280.0)));
        // Under 1.2 times the interval before: it has stopped climbing.
        assert_eq!(step(6, 300), (Some(300.0), None));
        // Falling back: the lower of the two again.
        assert_eq!(step(7, 20), (Some(20.0), None));
    }

    #[test]
    fn processing_is_measured_per_ready_worker_while_there_is_a_backlog() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        r.observe(at(0), &one(1000, 0), 2);
        // The workers were not yet settled for an interval before this one.
        assert_eq!(r.observe(at(1), &one(1000, 100), 2).per_replica, None);
        // 100 records/s by 2 workers, backlog all along.
        assert_eq!(r.observe(at(2), &one(1000, 200), 2).per_replica, Some(50.0));
        // Smoothed: a 100/s interval moves it part of the way.
        let p = r.observe(at(3), &one(1000, 400), 2).per_replica.unwrap();
        assert!(50.0 < p && p < 60.0, "{p}");
        // As much processed (600) as the backlog at the start: the workers may have
        // idled once it was done, so it is not a measurement.
        assert_eq!(r.observe(at(4), &one(1500, 1000), 2).per_replica, Some(p));
        // Nothing processed: a pause, not a speed.
        assert_eq!(r.observe(at(5), &one(2000, 1000), 2).per_replica, Some(p));
    }

    #[test]
    fn a_change_of_workers_is_not_measured_until_it_has_settled() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        r.observe(at(0), &one(10_000, 0), 1);
        r.observe(at(1), &one(10_000, 50), 1);
        assert_eq!(
            r.observe(at(2), &one(10_000, 100), 1).per_replica,
            Some(50.0)
        );
        // Four more workers become Ready: the interval in which they did, and the one
        // after (the group rebalances), are not measured.
        assert_eq!(
            r.observe(at(3), &one(10_000, 110), 5).per_replica,
            Some(50.0)
        );
        assert_eq!(
            r.observe(at(4), &one(10_000, 120), 5).per_replica,
            Some(50.0)
        );
        let p = r.observe(at(5), &one(10_000, 370), 5).per_replica.unwrap();
        assert!((p - 50.0).abs() < 1e-9, "{p}");
        // No Ready worker: nothing to divide by.
        r.observe(at(6), &one(10_000, 400), 0);
        assert_eq!(r.observe(at(7), &one(10_000, 500), 0).per_replica, Some(p));
    }

    #[test]
    fn a_gap_starts_the_intervals_again_but_keeps_the_processing_rate() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        for (s, c) in [(0, 0), (1, 50), (2, 100), (3, 150)] {
            r.observe(at(s), &one(10_000 + 10 * s as i64, c), 1);
        }
        assert_eq!(
            r.rates(),
            Rates {
                arrival: Some(10.0),
                per_replica: Some(50.0),
                rising: None,
            }
        );
        r.gap();
        // 60 s later the committed offset and end are far ahead: not one interval.
        let rates = r.observe(at(63), &one(90_000, 3_000), 1);
        assert_eq!(rates.arrival, None);
        assert_eq!(rates.per_replica, Some(50.0));
    }

    #[test]
    fn partitions_that_come_or_go_do_not_count_as_arrivals() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut r = RateTracker::default();
        r.observe(at(0), &one(100, 100), 1);
        let mut two = one(110, 110);
        two.insert(
            ("t".to_string(), 1),
            Observation {
                end: 5000,
                committed: None,
                lag: 5000,
            },
        );
        r.observe(at(1), &two, 1);
        let mut later = one(120, 120);
        later.insert(
            ("t".to_string(), 1),
            Observation {
                end: 5010,
                committed: None,
                lag: 5010,
            },
        );
        // 10 then 20 records a second; the new partition's 5000 stored records are lag,
        // not a first interval of 5010 a second.
        assert_eq!(r.observe(at(2), &later, 1).arrival, Some(10.0));
    }
}
