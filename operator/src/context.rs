//! What every reconcile shares: clients, settings, the Event recorder.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use eventops_crds::{ConsumerGroup, EventTopic};
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource};
use tracing::warn;

use crate::kafka::{KafkaAdmin, Reading};
use crate::telemetry::Metrics;

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only watch this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// How often an unchanged resource is checked against Kafka (drift correction).
    pub resync_interval: Duration,
    /// Pattern Kafka topic names are expected to follow; `None` for no policy.
    pub topic_naming: Option<regex::Regex>,
    /// Which names each namespace may own.
    pub namespace_policy: crate::policy::NamespacePolicy,
    /// How worker pods reach Kafka.
    pub worker_kafka: crate::consumergroup::build::WorkerKafka,
    /// Reconciles each controller runs at once.
    pub max_concurrent_reconciles: u16,
}

impl Settings {
    /// When to compare an unchanged resource with Kafka again: after
    /// `resync_interval`, rounded up to the next twelfth of it on the wall clock. The
    /// resyncs of objects reconciled at different moments then fall on shared instants,
    /// and their Kafka reads on shared requests (see [`crate::kafka::batch`]): a quiet
    /// interval's reads grow in size with the number of objects, not in number.
    pub fn next_resync(&self) -> Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        resync_after(self.resync_interval, now)
    }

    /// A step of the resync grid: a twelfth of the resync interval.
    pub fn grid_step(&self) -> Duration {
        grid_step(self.resync_interval)
    }

    /// A controller's configuration: [`Settings::max_concurrent_reconciles`] at once.
    pub fn controller_config(&self) -> kube::runtime::controller::Config {
        kube::runtime::controller::Config::default().concurrency(self.max_concurrent_reconciles)
    }

    /// The configuration of a controller that bounds its reconciles with [`Turns`]
    /// itself: kube runs every due reconcile at once, and each waits for its turn.
    pub fn fair_controller_config(&self) -> kube::runtime::controller::Config {
        kube::runtime::controller::Config::default().concurrency(0)
    }

    /// The turns of one controller's reconciles.
    pub fn turns(&self) -> Turns {
        Turns::new(self.max_concurrent_reconciles)
    }
}

/// At most so many reconciles of a controller at once, begun in the order they became
/// due.
///
/// Not kube's own bound (`Config::concurrency`): its scheduler keeps the due reconciles
/// over the bound in a `HashSet` and starts the first in the set's iteration order when
/// one ends. While more become due than finish (10,000 objects resyncing every minute on
/// two cores), the same ones come first every time, and an object late in that order is
/// never reconciled at all: `bench-operator 10000` left 1,105 EventTopics without a
/// single pass, their finalizer never set, for 20 minutes. Tokio's semaphore is fair:
/// first come, first served.
pub struct Turns(tokio::sync::Semaphore);

impl Turns {
    /// Turns for `at_once` reconciles at a time (0: no bound).
    pub fn new(at_once: u16) -> Self {
        let permits = match at_once {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => usize::from(n),
        };
        Self(tokio::sync::Semaphore::new(permits))
    }

    /// Waits for a turn, then runs `pass` on `obj` as `store` has it by then (it may have
    /// changed, or gone, meanwhile). Nothing is run, and the answer is to wait for a
    /// change, when the object is gone or was recreated, or when the controller is
    /// shutting down. The pass is boxed, so a waiting reconcile is small.
    pub async fn run<K, E, Fut>(
        &self,
        store: &Store<K>,
        obj: &K,
        pass: impl FnOnce(std::sync::Arc<K>) -> Fut,
    ) -> Result<kube::runtime::controller::Action, E>
    where
        K: Resource<DynamicType = ()> + Clone,
        Fut: std::future::Future<Output = Result<kube::runtime::controller::Action, E>>,
    {
        let wait = || Ok(kube::runtime::controller::Action::await_change());
        let Ok(_turn) = self.0.acquire().await else {
            return wait();
        };
        let current = store.get(&kube::runtime::reflector::ObjectRef::from_obj(obj));
        match current.filter(|now| now.meta().uid == obj.meta().uid) {
            Some(now) => Box::pin(pass(now)).await,
            None => wait(),
        }
    }

    /// The controller is shutting down: reconciles waiting for a turn are not run (kube
    /// waits for every reconcile it started, and an operator that lost its lease must
    /// stop acting within seconds), and none is given one any more.
    pub fn close(&self) {
        self.0.close();
    }
}

/// The API of a namespaced kind in `namespace`, or in all namespaces.
pub fn watched_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// [`Settings::next_resync`] at `now` (since the Unix epoch).
fn resync_after(interval: Duration, now: Duration) -> Duration {
    let grid = grid_step(interval).as_millis().max(1);
    let Some(due) = now.checked_add(interval) else {
        return interval;
    };
    let due = due.as_millis();
    let aligned = due.div_ceil(grid) * grid;
    interval + Duration::from_millis((aligned - due) as u64)
}

/// A twelfth of `interval`.
fn grid_step(interval: Duration) -> Duration {
    interval / 12
}

/// When each object's last pass ended, and what it was then, so that its next pass can
/// accept a Kafka reading taken after that (see [`crate::kafka::batch`]).
pub struct Passes {
    /// The oldest reading a pass accepts.
    age: Duration,
    ended: Mutex<Ended>,
}

#[derive(Default)]
struct Ended {
    /// Per uid: when its last pass ended, and the hash of what its triggers look at
    /// ([`crate::watch::spec_or_metadata`]) then.
    at: HashMap<String, (Instant, u64)>,
    /// The size at which entries of objects gone are swept out next.
    sweep_at: usize,
}

impl Passes {
    /// Passes that accept readings up to `age` old, and never older than their object's
    /// last pass.
    pub fn new(age: Duration) -> Self {
        Self {
            age,
            ended: Mutex::default(),
        }
    }

    /// How recent a Kafka reading a pass of `obj` needs: taken after its last pass ended
    /// (so it shows that pass's writes) and at most the age old, when that pass ended
    /// Ready on the object as it is now. A fresh one otherwise: no pass yet, the last one
    /// failed or was not Ready (a write that timed out may take effect later; a refusal
    /// may depend on other objects, such as a topic another EventTopic is deleting), or
    /// the object changed in what its triggers look at (an edited spec, the adopt
    /// annotation).
    pub fn reading(&self, obj: &impl Resource) -> Reading {
        let ended = self.ended.lock().expect("not poisoned");
        let last = obj.meta().uid.as_deref().and_then(|uid| ended.at.get(uid));
        match last {
            Some(&(end, hash)) if hash == crate::watch::spec_or_metadata(obj) => {
                let oldest = Instant::now().checked_sub(self.age).unwrap_or(end);
                Reading::Since(end.max(oldest))
            }
            _ => Reading::Fresh,
        }
    }

    /// A pass of `obj` ended: Ready (what it wrote, Kafka has), or not (its next pass
    /// reads fresh).
    pub fn ended(&self, obj: &impl Resource, done: bool) {
        let Some(uid) = obj.meta().uid.as_deref() else {
            return;
        };
        let mut ended = self.ended.lock().expect("not poisoned");
        if !done {
            ended.at.remove(uid);
            return;
        }
        let now = Instant::now();
        let hash = crate::watch::spec_or_metadata(obj);
        ended.at.insert(uid.to_string(), (now, hash));
        // An object with no pass for two resync intervals is gone (a pass that finds no
        // entry just reads fresh). Swept when the map has doubled since the last sweep.
        if ended.at.len() >= ended.sweep_at {
            let keep = self.age * 24;
            ended.at.retain(|_, (at, _)| now.duration_since(*at) < keep);
            ended.sweep_at = (2 * ended.at.len()).max(1024);
        }
    }
}

/// Shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Kafka admin client.
    pub kafka: KafkaAdmin,
    /// Settings.
    pub settings: Settings,
    /// Prometheus metrics.
    pub metrics: std::sync::Arc<Metrics>,
    /// Every EventTopic the operator watches (the one shared cache).
    pub topics: Store<EventTopic>,
    /// Every ConsumerGroup the operator watches (the one shared cache).
    pub groups: Store<ConsumerGroup>,
    /// Every ConsumerGroup's Deployment (those with the group label; the one shared
    /// cache).
    pub deployments: Store<Deployment>,
    /// The ConsumerGroup versions the ConsumerGroup reconciler's writes replaced.
    pub written_groups: crate::watch::Superseded,
    /// Per ConsumerGroup, the back-off of its failed reconciles.
    pub group_backoff: crate::backoff::Backoff<ConsumerGroup>,
    /// The ConsumerGroup reconciles' turns.
    pub group_turns: Turns,
    /// When each EventTopic's and ConsumerGroup's last pass ended.
    pub passes: Passes,
    recorder: Recorder,
}

/// The shared caches, one per kind (see [`crate::watch`]).
pub struct Caches {
    /// EventTopics.
    pub topics: Store<EventTopic>,
    /// ConsumerGroups.
    pub groups: Store<ConsumerGroup>,
    /// The groups' Deployments.
    pub deployments: Store<Deployment>,
}

impl Context {
    /// A context whose Events are reported as `eventops-operator`.
    pub fn new(
        client: Client,
        kafka: KafkaAdmin,
        settings: Settings,
        metrics: std::sync::Arc<Metrics>,
        caches: Caches,
    ) -> Self {
        let passes = Passes::new(settings.grid_step());
        let group_turns = settings.turns();
        let reporter = Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            kafka,
            settings,
            metrics,
            topics: caches.topics,
            groups: caches.groups,
            deployments: caches.deployments,
            written_groups: Default::default(),
            group_backoff: Default::default(),
            group_turns,
            passes,
        }
    }

    /// The API to watch `K` through: one namespace or all.
    pub fn api_for_watch<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        watched_api(&self.client, self.settings.namespace.as_deref())
    }

    /// Publishes an Event about `obj`. A failure is logged, not returned: Events are
    /// best effort and must not fail a reconcile.
    pub async fn event<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        self.metrics.kube_write("Event");
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_fall_on_a_grid_of_a_twelfth_of_the_interval() {
        let minute = Duration::from_secs(60);
        // Objects reconciled 0.1 s, 2.3 s and 4.999 s after a grid instant resync together.
        let at = |s: f64| Duration::from_secs(1_000_000_000) + Duration::from_secs_f64(s);
        let due: Vec<Duration> = [0.1, 2.3, 4.999]
            .iter()
            .map(|s| at(*s) + resync_after(minute, at(*s)))
            .collect();
        assert!(due.iter().all(|d| *d == due[0]), "{due:?}");
        assert_eq!(due[0], at(65.0));
        // Never sooner than the interval, never later than one grid step after it.
        for s in [0.0, 0.1, 2.3, 4.999] {
            let after = resync_after(minute, at(s));
            assert!(
                after >= minute && after <= minute + Duration::from_secs(5),
                "{after:?}"
            );
        }
        // A short interval gets a fine grid: 2 s resyncs stay within 2.17 s.
        let two = Duration::from_secs(2);
        assert!(resync_after(two, at(0.05)) <= two + Duration::from_millis(167));
    }

    /// An EventTopic with `uid` and the adopt annotation when `adopt`.
    fn topic(uid: &str, adopt: bool) -> EventTopic {
        let mut et: EventTopic = serde_json::from_value(serde_json::json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": "t", "namespace": "n", "uid": uid, "generation": 1},
            "spec": {"partitions": 1, "topicName": "t"}}))
        .unwrap();
        if adopt {
            et.metadata.annotations =
                Some([(eventops_crds::ADOPT_ANNOTATION.into(), "true".into())].into());
        }
        et
    }

    #[test]
    fn a_pass_reads_after_its_objects_last_pass_and_at_most_the_age_old() {
        let passes = Passes::new(Duration::from_millis(200));
        let a = topic("a", false);
        assert_eq!(passes.reading(&a), Reading::Fresh, "no pass yet");
        passes.ended(&a, true);
        let after_a = Instant::now();
        // Just after its last pass: a reading taken after that pass ended.
        match passes.reading(&a) {
            Reading::Since(since) => {
                assert!(since <= after_a && after_a - since < Duration::from_millis(100))
            }
            fresh => panic!("{fresh:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
        // Long after it: a reading at most the age old.
        let before = Instant::now();
        match passes.reading(&a) {
            Reading::Since(since) => {
                assert!(since > after_a, "newer than the pass");
                let age = Instant::now() - since;
                assert!(
                    age >= Duration::from_millis(200)
                        && age <= before.elapsed() + Duration::from_millis(200),
                    "{age:?}"
                );
            }
            fresh => panic!("{fresh:?}"),
        }
        assert_eq!(
            passes.reading(&topic("b", false)),
            Reading::Fresh,
            "another object"
        );
    }

    #[test]
    fn a_changed_object_or_a_failed_pass_reads_fresh() {
        let passes = Passes::new(Duration::from_secs(5));
        let a = topic("a", false);
        passes.ended(&a, true);
        assert!(matches!(passes.reading(&a), Reading::Since(_)));
        // Annotated for adoption since: whose the topic is is decided on a fresh reading.
        assert_eq!(passes.reading(&topic("a", true)), Reading::Fresh);
        // A new spec.
        let mut edited = a.clone();
        edited.metadata.generation = Some(2);
        assert_eq!(passes.reading(&edited), Reading::Fresh);
        // A failed pass: its writes may still take effect.
        passes.ended(&a, false);
        assert_eq!(passes.reading(&a), Reading::Fresh);
    }
}
