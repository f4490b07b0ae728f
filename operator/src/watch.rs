//! One watch per kind, shared: a cache every reader uses and a trigger stream for each
//! controller that reacts to the kind. Without it every controller and the autoscaler
//! ran a watch and a full cache of its own (three of EventTopics, three of
//! ConsumerGroups, two of Deployments), each object decoded and held once per copy.
//!
//! `managedFields` are dropped before an object is cached: no reader uses them, and on
//! an object written by several field managers they are often its largest part.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::warn;

/// A watch of `K` whose cache and events are shared. Subscribe first, then [`spawn`]
/// it: a subscriber taken later misses what came before.
///
/// [`spawn`]: SharedWatch::spawn
pub struct SharedWatch<K: Resource<DynamicType = ()> + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    store: Store<K>,
    writer: reflector::store::Writer<K>,
    subscribers: Vec<mpsc::UnboundedSender<Seen<K>>>,
}

/// What a subscriber is told of an object, once the cache has it.
enum Seen<K> {
    Applied(K),
    Deleted(K),
}

impl<K> SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
{
    /// A watch of `api` with `config`, not started.
    pub fn new(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        Self {
            api,
            config,
            store,
            writer,
            subscribers: Vec::new(),
        }
    }

    /// The shared cache; current once [`Store::wait_until_ready`] returns.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// A controller's trigger stream: every object deleted, and every object added or
    /// changed in what `trigger` hashes (see [`spec_or_metadata`]), each after the
    /// cache has it. Unbounded, so a slow subscriber never holds up the cache or the
    /// others (a controller drains its triggers even while at its concurrency bound).
    pub fn subscribe<P>(
        &mut self,
        trigger: P,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + use<K, P>
    where
        P: Fn(&K) -> u64 + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(tx);
        // The hash each object last passed with, by uid.
        let mut last: HashMap<String, u64> = HashMap::new();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|seen| (seen, rx))
        })
        .filter_map(move |seen| {
            let pass = match seen {
                Seen::Deleted(obj) => {
                    last.remove(&obj.uid().unwrap_or_default());
                    Some(obj)
                }
                Seen::Applied(obj) => {
                    let hash = trigger(&obj);
                    let uid = obj.uid().unwrap_or_default();
                    (last.insert(uid, hash) != Some(hash)).then_some(obj)
                }
            };
            std::future::ready(pass.map(Ok))
        })
    }

    /// Starts the watch; it runs until the task is aborted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        let Self {
            api,
            config,
            store,
            writer,
            mut subscribers,
        } = self;
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|obj: &mut K| obj.managed_fields_mut().clear())
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let tell = |seen: Seen<K>, subscribers: &mut Vec<mpsc::UnboundedSender<Seen<K>>>| {
                subscribers.retain(|tx| {
                    let copy = match &seen {
                        Seen::Applied(o) => Seen::Applied(o.clone()),
                        Seen::Deleted(o) => Seen::Deleted(o.clone()),
                    };
                    tx.send(copy).is_ok()
                });
            };
            // A (re-)list: the cache keeps what it had until the list is complete, so
            // its objects are told only then (from the cache, which holds the new list
            // by that event), with those it no longer has as deleted.
            let mut before: Vec<std::sync::Arc<K>> = Vec::new();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(obj)) => tell(Seen::Applied(obj), &mut subscribers),
                    Ok(watcher::Event::Delete(obj)) => tell(Seen::Deleted(obj), &mut subscribers),
                    Ok(watcher::Event::Init) => before = store.state(),
                    Ok(watcher::Event::InitApply(_)) => {}
                    Ok(watcher::Event::InitDone) => {
                        let listed = store.state();
                        let uids: HashSet<String> = listed.iter().filter_map(|o| o.uid()).collect();
                        for gone in before.drain(..) {
                            if !gone.uid().is_some_and(|uid| uids.contains(&uid)) {
                                tell(Seen::Deleted(K::clone(&gone)), &mut subscribers);
                            }
                        }
                        for obj in listed {
                            tell(Seen::Applied(K::clone(&obj)), &mut subscribers);
                        }
                    }
                    Err(error) => warn!(%error, kind = %K::kind(&()), "watch failed; retrying"),
                }
            }
        })
    }
}

/// A stream of changed objects of `K`, as [`SharedWatch::subscribe`] gives.
pub trait TriggerStream<K>: Stream<Item = Result<K, watcher::Error>> + Send + 'static {}
impl<K, S: Stream<Item = Result<K, watcher::Error>> + Send + 'static> TriggerStream<K> for S {}

/// A hash of what a controller acts on: generation (the spec), deletion, finalizers,
/// labels and annotations. A change of status alone (the operator's own status
/// writes, the autoscaler's figures) hashes the same and triggers no reconcile.
pub fn spec_or_metadata<K: Resource>(obj: &K) -> u64 {
    spec_metadata_and(obj, ())
}

/// [`spec_or_metadata`] together with `more`: what else of the object a subscriber
/// acts on.
pub fn spec_metadata_and<K: Resource>(obj: &K, more: impl Hash) -> u64 {
    let meta = obj.meta();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut hasher);
    meta.deletion_timestamp.is_some().hash(&mut hasher);
    obj.finalizers().hash(&mut hasher);
    obj.labels().hash(&mut hasher);
    obj.annotations().hash(&mut hasher);
    more.hash(&mut hasher);
    hasher.finish()
}

/// For each object the operator wrote, the resourceVersion its cached copy must reach
/// before a reconcile may act on it. The cache learns of a write only when its watch
/// event arrives; a reconcile that starts before then (triggered by a timer or another
/// object) would act on the object as it was. For an EventTopic, that may be a claim to a
/// topic the pass that just ended gave up, so it would take over a topic that is somebody
/// else's by now. For a ConsumerGroup, it is the status before the last write: the
/// reconcile would compare its new status with that and skip a write it needs. Such a
/// reconcile waits for the cache instead.
///
/// Versions are compared as integers, as Kubernetes allows since 1.35 (KEP-5504,
/// comparable resource versions): a version somebody else wrote between two of the
/// operator's own writes is older than the last of them, and still stale. A version that
/// is not a plain integer is never held back.
#[derive(Default)]
pub struct Superseded(std::sync::Mutex<BTreeMap<String, (u64, Instant)>>);

/// How long a reconcile may be held back waiting for the cache: it has long caught up by
/// then (and an object deleted without a finalizer leaves nothing behind for longer).
const SUPERSEDED_FOR: Duration = Duration::from_secs(300);

impl Superseded {
    /// Whether `obj` is older than the operator's own last write of it; forgets the
    /// write once the cache has caught up (it never goes back).
    pub fn is_stale(&self, obj: &impl Resource) -> bool {
        let meta = obj.meta();
        let Some(uid) = &meta.uid else { return false };
        let Some(rv) = meta.resource_version.as_deref().and_then(version) else {
            return false;
        };
        let mut map = self.0.lock().expect("not poisoned");
        let stale = map
            .get(uid)
            .is_some_and(|(wanted, at)| rv < *wanted && at.elapsed() < SUPERSEDED_FOR);
        if !stale {
            map.remove(uid);
        }
        stale
    }

    /// Forgets `obj`, which is going away.
    pub fn forget(&self, obj: &impl Resource) {
        if let Some(uid) = &obj.meta().uid {
            self.0.lock().expect("not poisoned").remove(uid);
        }
    }

    /// Notes that a write of `obj` produced version `rv`.
    pub fn wrote(&self, obj: &impl Resource, rv: Option<&str>) {
        self.hold(obj, rv.and_then(version));
    }

    /// Notes that `obj` has changed since version `rv` (somebody's write refused one of
    /// the operator's for being older), without knowing the new version.
    pub fn replaced(&self, obj: &impl Resource, rv: Option<&str>) {
        self.hold(obj, rv.and_then(version).map(|v| v + 1));
    }

    fn hold(&self, obj: &impl Resource, wanted: Option<u64>) {
        let (Some(uid), Some(wanted)) = (&obj.meta().uid, wanted) else {
            return;
        };
        let mut map = self.0.lock().expect("not poisoned");
        map.retain(|_, (_, at)| at.elapsed() < SUPERSEDED_FOR);
        let entry = map.entry(uid.clone()).or_insert((wanted, Instant::now()));
        *entry = (entry.0.max(wanted), Instant::now());
    }
}

/// A resourceVersion as the integer it is (KEP-5504); `None` for any other string.
fn version(rv: &str) -> Option<u64> {
    rv.parse().ok().filter(|_| !rv.starts_with('0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventops_crds::EventTopic;

    fn topic(generation: i64, status_reason: &str) -> EventTopic {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "eventops.dev/v1alpha1", "kind": "EventTopic",
            "metadata": {"name": "t", "namespace": "n", "generation": generation,
                         "finalizers": ["f"], "annotations": {"a": "1"}},
            "spec": {"partitions": 1},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": status_reason,
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_status_change_alone_is_not_a_trigger() {
        let before = spec_or_metadata(&topic(1, "Creating"));
        assert_eq!(before, spec_or_metadata(&topic(1, "InSync")));
        assert_ne!(before, spec_or_metadata(&topic(2, "InSync")));
        let mut deleting = topic(1, "InSync");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_ne!(before, spec_or_metadata(&deleting));
        let mut released = topic(1, "InSync");
        released.metadata.finalizers = None;
        assert_ne!(before, spec_or_metadata(&released));
        let mut annotated = topic(1, "InSync");
        annotated
            .annotations_mut()
            .insert("eventops.dev/paused".into(), "true".into());
        assert_ne!(before, spec_or_metadata(&annotated));
    }

    fn at(uid: &str, rv: &str) -> EventTopic {
        let mut et = EventTopic::new("t", Default::default());
        et.metadata.uid = Some(uid.into());
        et.metadata.resource_version = Some(rv.into());
        et
    }

    #[test]
    fn a_version_before_the_operators_last_write_is_stale_until_the_cache_catches_up() {
        let written = Superseded::default();
        assert!(!written.is_stale(&at("a", "1")));
        // One pass: a claim wrote version 2, the final status version 3.
        written.wrote(&at("a", "1"), Some("2"));
        written.wrote(&at("a", "1"), Some("3"));
        assert!(written.is_stale(&at("a", "1")));
        assert!(written.is_stale(&at("a", "2")));
        assert!(!written.is_stale(&at("b", "2")), "per object");
        assert!(!written.is_stale(&at("a", "3")));
        // Caught up: the cache never goes back, so nothing is kept.
        assert!(!written.is_stale(&at("a", "1")));
        // Refused for being older than somebody's write: anything newer will do.
        written.replaced(&at("a", "3"), Some("3"));
        assert!(written.is_stale(&at("a", "3")));
        assert!(!written.is_stale(&at("a", "9")));
        // Not an integer: never held back.
        written.wrote(&at("a", "9"), Some("x1"));
        assert!(!written.is_stale(&at("a", "9")));
        written.wrote(&at("a", "9"), Some("10"));
        assert!(!written.is_stale(&at("a", "x")));
    }

    #[test]
    fn a_foreign_write_between_two_of_the_operators_own_is_still_stale() {
        let written = Superseded::default();
        // A pass read version 10 and claimed a topic (11); somebody labelled the object
        // (12); the pass gave the claim up in its final status (13).
        written.wrote(&at("a", "10"), Some("11"));
        written.wrote(&at("a", "10"), Some("13"));
        // The cache has the label change but not yet the final status: 12 still shows
        // the claim, so acting on it would take the topic over.
        assert!(written.is_stale(&at("a", "12")));
        assert!(!written.is_stale(&at("a", "13")));
    }
}
