//! Per-object retry back-off for the controllers' `error_policy`: a reconcile that
//! failed (Kafka unreachable, the API server refusing a write) is retried after
//! [`FIRST`], then after twice as long each time it fails again, up to [`CAP`]; a
//! reconcile that succeeds starts its object over. Each delay is shortened by up to a
//! tenth at random, so that objects that failed together do not all retry together.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::Resource;
use kube::runtime::reflector::ObjectRef;

/// The delay before the first retry.
pub const FIRST: Duration = Duration::from_secs(1);
/// The longest delay between two retries.
pub const CAP: Duration = Duration::from_secs(300);
/// The largest fraction of a delay taken off at random.
const JITTER: f64 = 0.1;
/// An object that has not failed for this long was deleted (one that still fails does
/// so at least every [`CAP`] and a reconcile; one that succeeded is gone already).
const FORGET_AFTER: Duration = CAP.saturating_mul(2);

/// The delay before retrying after the `failures`th failure in a row (1 for the first):
/// [`FIRST`] doubled per failure before it, at most [`CAP`], less `random` (in `[0, 1)`)
/// times [`JITTER`] of it.
pub fn delay(failures: u32, random: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let full = FIRST.saturating_mul(1 << doublings).min(CAP);
    full.mul_f64(1.0 - JITTER * random.clamp(0.0, 1.0))
}

/// Per object, its failures in a row, when it last failed and its uid: the state of its
/// back-off. Kept in a controller's context.
pub struct Backoff<K: Resource<DynamicType = ()>> {
    failing: Mutex<HashMap<ObjectRef<K>, Failing>>,
}

/// An object's failures in a row, when it last failed, and which object of that name
/// it was (an `ObjectRef` compares namespace and name only).
struct Failing {
    failures: u32,
    at: Instant,
    uid: Option<String>,
}

impl<K: Resource<DynamicType = ()>> Default for Backoff<K> {
    fn default() -> Self {
        Self {
            failing: Mutex::default(),
        }
    }
}

impl<K: Resource<DynamicType = ()>> Backoff<K> {
    /// Notes one more failure of `obj`'s reconcile; returns how long to wait before
    /// retrying it, at most `at_most` (the resync interval: a failure that may pass by
    /// itself is not retried later than an unchanged object is looked at again).
    pub fn failed(&self, obj: &K, at_most: Duration) -> Duration {
        let uid = obj.meta().uid.clone();
        self.failed_at(
            ObjectRef::from_obj(obj),
            uid,
            Instant::now(),
            fastrand::f64(),
        )
        .min(at_most)
    }

    /// Forgets `obj`'s failures: its reconcile succeeded. Also forgets objects that have
    /// not failed for a while (deleted ones, which are never reconciled again).
    pub fn succeeded(&self, obj: &K) {
        let now = Instant::now();
        let mut failing = self.failing.lock().expect("not poisoned");
        failing.remove(&ObjectRef::from_obj(obj));
        failing.retain(|_, f| now.saturating_duration_since(f.at) < FORGET_AFTER);
    }

    /// Objects whose last reconcile failed.
    pub fn len(&self) -> usize {
        self.failing.lock().expect("not poisoned").len()
    }

    /// Whether every object's last reconcile succeeded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn failed_at(
        &self,
        obj: ObjectRef<K>,
        uid: Option<String>,
        now: Instant,
        random: f64,
    ) -> Duration {
        let mut failing = self.failing.lock().expect("not poisoned");
        failing.retain(|_, f| now.saturating_duration_since(f.at) < FORGET_AFTER);
        let entry = failing.entry(obj).or_insert(Failing {
            failures: 0,
            at: now,
            uid: uid.clone(),
        });
        if entry.uid != uid {
            // Deleted and created again under the same name: a new object starts over.
            *entry = Failing {
                failures: 0,
                at: now,
                uid,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.at = now;
        delay(entry.failures, random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventops_crds::EventTopic;

    fn topic(name: &str) -> EventTopic {
        let mut et = EventTopic::new(name, Default::default());
        et.metadata.namespace = Some("shop".into());
        et
    }

    #[test]
    fn delays_double_from_a_second_up_to_the_cap() {
        let delays: Vec<u64> = (1..=11).map(|n| delay(n, 0.0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(delay(u32::MAX, 0.0), CAP);
        assert_eq!(delay(0, 0.0), FIRST, "never sooner than the first delay");
    }

    #[test]
    fn jitter_only_shortens_a_delay_and_by_at_most_a_tenth() {
        for n in [1, 5, 20] {
            let full = delay(n, 0.0);
            for random in [0.0, 0.3, 0.999, 1.0] {
                let d = delay(n, random);
                assert!(d <= full && d >= full.mul_f64(0.9), "{n} {random}: {d:?}");
            }
        }
        assert!(delay(3, 0.5) < delay(3, 0.0));
    }

    #[test]
    fn each_object_backs_off_on_its_own_and_starts_over_when_it_succeeds() {
        let backoff = Backoff::<EventTopic>::default();
        let (a, b) = (topic("a"), topic("b"));
        let now = Instant::now();
        let fail = |et: &EventTopic| {
            let uid = et.metadata.uid.clone();
            backoff.failed_at(ObjectRef::from_obj(et), uid, now, 0.0)
        };
        assert_eq!(fail(&a), Duration::from_secs(1));
        assert_eq!(fail(&a), Duration::from_secs(2));
        assert_eq!(fail(&a), Duration::from_secs(4));
        assert_eq!(fail(&b), Duration::from_secs(1), "another object");
        assert_eq!(backoff.len(), 2);
        backoff.succeeded(&a);
        assert_eq!(backoff.len(), 1);
        assert_eq!(fail(&a), Duration::from_secs(1), "started over");
        assert_eq!(fail(&b), Duration::from_secs(2), "unaffected");
    }

    #[test]
    fn an_object_created_again_under_the_same_name_starts_over() {
        let backoff = Backoff::<EventTopic>::default();
        let mut old = topic("a");
        old.metadata.uid = Some("uid-1".into());
        let mut new = topic("a");
        new.metadata.uid = Some("uid-2".into());
        let now = Instant::now();
        let fail = |et: &EventTopic| {
            let uid = et.metadata.uid.clone();
            backoff.failed_at(ObjectRef::from_obj(et), uid, now, 0.0)
        };
        for _ in 0..8 {
            fail(&old);
        }
        assert_eq!(fail(&old), Duration::from_secs(256));
        assert_eq!(fail(&new), Duration::from_secs(1), "another object");
        assert_eq!(backoff.len(), 1);
    }

    #[test]
    fn a_delay_is_at_most_what_the_caller_allows() {
        let backoff = Backoff::<EventTopic>::default();
        let a = topic("a");
        let resync = Duration::from_secs(60);
        let delays: Vec<u64> = (0..9)
            .map(|_| backoff.failed(&a, resync).as_secs())
            .collect();
        assert_eq!(delays[8], 60, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= 60), "{delays:?}");
    }

    #[test]
    fn objects_that_stopped_failing_long_ago_are_forgotten() {
        let backoff = Backoff::<EventTopic>::default();
        let start = Instant::now();
        let fail = |name: &str, at: Duration| {
            backoff.failed_at(ObjectRef::from_obj(&topic(name)), None, start + at, 0.0)
        };
        fail("deleted", Duration::ZERO);
        // One that fails on and on, at the cap, is kept.
        fail("failing", Duration::ZERO);
        fail("failing", CAP);
        assert_eq!(backoff.len(), 2, "not yet");
        fail("failing", CAP * 2);
        assert_eq!(backoff.len(), 1, "the deleted object's entry is gone");
        assert_eq!(
            fail("failing", CAP * 3),
            Duration::from_secs(8),
            "the one still failing goes on backing off"
        );
    }
}
