//! Coalesced reads. Reconciles running at the same time ask Kafka about different keys
//! (topics, SCRAM users, ACL principals); a [`Batcher`] answers them all from one
//! request. Questions asked while a request is out wait for the next one, which carries
//! them all: under load, batches grow instead of requests multiplying.
//!
//! How old an answer may be is the asker's to say ([`Reading`]):
//!
//! - [`Reading::Fresh`]: from a request sent after the question was asked, so a
//!   reconcile never acts on a reading older than itself (a topic it created a moment
//!   ago, an ACL somebody deleted).
//! - [`Reading::Since`]: from a request sent at or after the given instant. A pass that
//!   compares an object with Kafka again asks for a reading taken after its own last
//!   pass ended (so it sees its own writes) and no older than a step of the resync grid.
//!   Such questions are answered from a *snapshot*: a request that carried every key
//!   asked lately, taken when such a question finds none recent enough, and never twice
//!   within half that age. The resyncs of a quiet interval then cost a few requests per
//!   grid step, however many objects there are. An error is never answered from a
//!   snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// One request's answers: per key, its value or the error Kafka gave for that key alone.
/// A key the answer leaves out has the value's default (no such topic, no credentials,
/// no ACLs).
pub type Answers<K, V, E> = BTreeMap<K, Result<V, E>>;

type Fetch<K, V, E> = dyn Fn(Vec<K>) -> Pin<Box<dyn Future<Output = Result<Answers<K, V, E>, E>> + Send>>
    + Send
    + Sync;

/// How old a reading an asker may act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// From a request sent after the question.
    Fresh,
    /// From a request sent at or after this instant.
    Since(Instant),
}

/// Coalesces concurrent reads of keys `K` into one request for all of them.
pub struct Batcher<K, V, E> {
    fetch: Arc<Fetch<K, V, E>>,
    /// What to answer when the request's task was cancelled (the runtime shutting down).
    cancelled: fn() -> E,
    /// How old a snapshot may get before a [`Reading::Since`] question makes the next
    /// request one (zero: never).
    refresh: Duration,
    /// How long a key nobody asked about stays in snapshots.
    forget_after: Duration,
    queue: Arc<Mutex<Queue<K, V, E>>>,
}

struct Question<K, V, E> {
    key: K,
    reading: Reading,
    reply: oneshot::Sender<Result<V, E>>,
}

/// A request that carried every key asked lately, and its answers.
struct Snapshot<K, V, E> {
    sent: Instant,
    keys: BTreeSet<K>,
    answers: Arc<Answers<K, V, E>>,
}

impl<K: Ord, V: Clone + Default, E: Clone> Snapshot<K, V, E> {
    /// The answer for `key` if this snapshot carried it and `reading` accepts it. An
    /// error (a request that failed as a whole is one per key) is never answered from
    /// a snapshot: Kafka is asked again.
    fn answer(&self, key: &K, reading: Reading) -> Option<Result<V, E>> {
        match reading {
            Reading::Since(since) if self.sent >= since && self.keys.contains(key) => {
                Some(answer(&self.answers, key)).filter(Result::is_ok)
            }
            _ => None,
        }
    }
}

fn answer<K: Ord, V: Clone + Default, E: Clone>(
    answers: &Answers<K, V, E>,
    key: &K,
) -> Result<V, E> {
    answers.get(key).cloned().unwrap_or(Ok(V::default()))
}

struct Queue<K, V, E> {
    asked: Vec<Question<K, V, E>>,
    /// Whether a task is sending requests; it runs until nobody waits.
    sending: bool,
    /// Every key asked about, and when last.
    known: BTreeMap<K, Instant>,
    snapshot: Option<Snapshot<K, V, E>>,
}

impl<K, V, E> Batcher<K, V, E>
where
    K: Ord + Clone + Send + Sync + 'static,
    V: Clone + Default + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A batcher that reads with `fetch`, given the distinct keys asked for. It takes no
    /// snapshots until [`with_snapshots`](Self::with_snapshots).
    pub fn new<F, Fut>(fetch: F, cancelled: fn() -> E) -> Self
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Answers<K, V, E>, E>> + Send + 'static,
    {
        Self {
            fetch: Arc::new(move |keys| Box::pin(fetch(keys))),
            cancelled,
            refresh: Duration::ZERO,
            forget_after: Duration::ZERO,
            queue: Arc::new(Mutex::new(Queue {
                asked: Vec::new(),
                sending: false,
                known: BTreeMap::new(),
                snapshot: None,
            })),
        }
    }

    /// Answers [`Reading::Since`] questions from snapshots taken at most once per
    /// `age / 2`, carrying every key asked within `age * 24` (two resync intervals, when
    /// `age` is a step of the resync grid).
    pub fn with_snapshots(mut self, age: Duration) -> Self {
        self.refresh = age / 2;
        self.forget_after = age * 24;
        self
    }

    /// The value of `key`, from a request `reading` accepts.
    pub async fn get(&self, key: K, reading: Reading) -> Result<V, E> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("not poisoned");
            if !self.refresh.is_zero() {
                queue.known.insert(key.clone(), Instant::now());
            }
            if let Some(found) = queue
                .snapshot
                .as_ref()
                .and_then(|s| s.answer(&key, reading))
            {
                return found;
            }
            queue.asked.push(Question {
                key,
                reading,
                reply,
            });
            !std::mem::replace(&mut queue.sending, true)
        };
        if start {
            let sender = Sender {
                fetch: self.fetch.clone(),
                refresh: self.refresh,
                forget_after: self.forget_after,
                queue: self.queue.clone(),
                finished: false,
            };
            tokio::spawn(sender.run());
        }
        answer.await.unwrap_or_else(|_| Err((self.cancelled)()))
    }
}

/// The task that sends requests while anybody waits.
struct Sender<K, V, E> {
    fetch: Arc<Fetch<K, V, E>>,
    refresh: Duration,
    forget_after: Duration,
    queue: Arc<Mutex<Queue<K, V, E>>>,
    /// Set when it stopped because nobody waited (rather than being cancelled).
    finished: bool,
}

impl<K, V, E> Sender<K, V, E>
where
    K: Ord + Clone,
    V: Clone + Default,
    E: Clone,
{
    async fn run(mut self) {
        loop {
            // Reconciles woken together ask within a few polls of each other.
            tokio::task::yield_now().await;
            let (asked, keys, snapshot) = {
                let mut queue = self.queue.lock().expect("not poisoned");
                // Those a snapshot taken while they waited can answer.
                let waiting = std::mem::take(&mut queue.asked);
                let snapshot = queue.snapshot.as_ref();
                let asked: Vec<_> = waiting
                    .into_iter()
                    .filter_map(
                        |q| match snapshot.and_then(|s| s.answer(&q.key, q.reading)) {
                            Some(found) => {
                                // The asker may have given up; nothing to do then.
                                let _ = q.reply.send(found);
                                None
                            }
                            None => Some(q),
                        },
                    )
                    .collect();
                if asked.is_empty() {
                    queue.sending = false;
                    self.finished = true;
                    return;
                }
                let mut keys: BTreeSet<K> = asked.iter().map(|q| q.key.clone()).collect();
                let due = queue
                    .snapshot
                    .as_ref()
                    .is_none_or(|s| s.sent.elapsed() >= self.refresh);
                let snapshot = !self.refresh.is_zero()
                    && due
                    && asked.iter().any(|q| matches!(q.reading, Reading::Since(_)));
                if snapshot {
                    let forget_after = self.forget_after;
                    queue.known.retain(|_, last| last.elapsed() < forget_after);
                    keys.extend(queue.known.keys().cloned());
                }
                (asked, keys, snapshot)
            };
            let sent = Instant::now();
            let answers = (self.fetch)(keys.iter().cloned().collect())
                .await
                .map(Arc::new);
            if snapshot && let Ok(answers) = &answers {
                self.queue.lock().expect("not poisoned").snapshot = Some(Snapshot {
                    sent,
                    keys,
                    answers: answers.clone(),
                });
            }
            for q in asked {
                let found = match &answers {
                    Ok(answers) => answer(answers, &q.key),
                    Err(e) => Err(e.clone()),
                };
                // The asker may have given up; nothing to do then.
                let _ = q.reply.send(found);
            }
        }
    }
}

impl<K, V, E> Drop for Sender<K, V, E> {
    /// A sender cancelled mid-request (its runtime shutting down) lets the next
    /// question start another, and tells those waiting that it is gone.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Ok(mut queue) = self.queue.lock() {
            queue.sending = false;
            queue.asked.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    type Requests = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A batcher whose every request takes 50 ms and answers each key with its double,
    /// except key 13 (an error of its own) and key 7 (left out of the answer).
    fn doubling(requests: Requests) -> Batcher<u32, u32, String> {
        Batcher::new(
            move |keys: Vec<u32>| {
                let requests = requests.clone();
                async move {
                    requests.lock().unwrap().push(keys.clone());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(keys
                        .into_iter()
                        .filter(|k| *k != 7)
                        .map(|k| {
                            (
                                k,
                                if k == 13 {
                                    Err("thirteen".into())
                                } else {
                                    Ok(2 * k)
                                },
                            )
                        })
                        .collect())
                }
            },
            || "cancelled".into(),
        )
    }

    #[tokio::test]
    async fn concurrent_questions_share_one_request_and_each_gets_its_own_answer() {
        let requests = Requests::default();
        let batcher = Arc::new(doubling(requests.clone()));
        let asks = (0..20u32).map(|k| {
            let batcher = batcher.clone();
            tokio::spawn(async move { (k, batcher.get(k % 15, Reading::Fresh).await) })
        });
        for ask in futures::future::join_all(asks).await {
            let (k, answer) = ask.unwrap();
            let expected = match k % 15 {
                13 => Err("thirteen".to_string()),
                // Left out of the answer: the default.
                7 => Ok(0),
                k => Ok(2 * k),
            };
            assert_eq!(answer, expected, "key {k}");
        }
        let requests = requests.lock().unwrap();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(
            requests[0],
            (0..15).collect::<Vec<_>>(),
            "distinct keys, once"
        );
    }

    #[tokio::test]
    async fn a_question_asked_during_a_request_waits_for_the_next_one() {
        let requests = Requests::default();
        let batcher = Arc::new(doubling(requests.clone()));
        let first = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.get(1, Reading::Fresh).await })
        };
        // The first request is out (it takes 50 ms).
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(requests.lock().unwrap().len(), 1);
        let later = (2..5u32).map(|k| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.get(k, Reading::Fresh).await })
        });
        let later = futures::future::join_all(later).await;
        assert_eq!(first.await.unwrap(), Ok(2));
        assert_eq!(
            later.into_iter().map(|a| a.unwrap()).collect::<Vec<_>>(),
            vec![Ok(4), Ok(6), Ok(8)]
        );
        assert_eq!(*requests.lock().unwrap(), vec![vec![1], vec![2, 3, 4]]);
    }

    /// A batcher whose first request fails as a whole ("broker down") and whose later
    /// ones answer each key with itself; and its count of requests.
    fn down_once() -> (Batcher<u32, u32, String>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher::new(
            {
                let calls = calls.clone();
                move |keys: Vec<u32>| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n == 0 {
                            Err("broker down".to_string())
                        } else {
                            Ok(keys.into_iter().map(|k| (k, Ok(k))).collect())
                        }
                    }
                }
            },
            || "cancelled".into(),
        );
        (batcher, calls)
    }

    #[tokio::test]
    async fn a_failed_request_fails_every_question_in_it_and_the_next_one_is_sent() {
        let (batcher, calls) = down_once();
        assert_eq!(
            batcher.get(3, Reading::Fresh).await,
            Err("broker down".into())
        );
        assert_eq!(batcher.get(3, Reading::Fresh).await, Ok(3));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Asks `keys` at once, each with `reading`; their answers in order.
    async fn ask(
        batcher: &Arc<Batcher<u32, u32, String>>,
        keys: &[u32],
        reading: Reading,
    ) -> Vec<Result<u32, String>> {
        let asks = keys.iter().map(|&k| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.get(k, reading).await })
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .map(|a| a.unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_reading_since_an_instant_comes_from_a_snapshot_sent_after_it() {
        let requests = Requests::default();
        let batcher = Arc::new(doubling(requests.clone()).with_snapshots(Duration::from_secs(5)));
        let since = Instant::now();
        // Fresh questions never take a snapshot.
        assert_eq!(
            ask(&batcher, &[1, 2, 3], Reading::Fresh).await,
            [Ok(2), Ok(4), Ok(6)]
        );
        // The first question that accepts an older reading makes the next request a
        // snapshot: it carries every key asked so far.
        assert_eq!(ask(&batcher, &[1], Reading::Since(since)).await, [Ok(2)]);
        assert_eq!(requests.lock().unwrap()[1], vec![1, 2, 3]);
        // Questions the snapshot can answer cost no request.
        assert_eq!(
            ask(&batcher, &[3, 2, 7], Reading::Since(since)).await,
            [Ok(6), Ok(4), Ok(0)],
            "7 was not in the snapshot and is asked in a request of its own"
        );
        assert_eq!(requests.lock().unwrap().len(), 3);
        assert_eq!(
            requests.lock().unwrap()[2],
            vec![7],
            "the snapshot is 2.5 s from due"
        );
        // A fresh question, or one that needs a reading newer than the snapshot (its
        // own last pass ended after it), goes to Kafka.
        assert_eq!(ask(&batcher, &[2], Reading::Fresh).await, [Ok(4)]);
        let after = Instant::now();
        assert_eq!(ask(&batcher, &[3], Reading::Since(after)).await, [Ok(6)]);
        assert_eq!(
            *requests.lock().unwrap(),
            vec![vec![1, 2, 3], vec![1, 2, 3], vec![7], vec![2], vec![3]]
        );
    }

    #[tokio::test]
    async fn a_snapshot_is_taken_again_when_half_its_age_has_passed_without_forgotten_keys() {
        let requests = Requests::default();
        // Snapshots at most every 50 ms; keys nobody asked about for 2.4 s are dropped.
        let batcher =
            Arc::new(doubling(requests.clone()).with_snapshots(Duration::from_millis(100)));
        ask(&batcher, &[1, 2], Reading::Fresh).await;
        ask(&batcher, &[1], Reading::Since(Instant::now())).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        ask(&batcher, &[2], Reading::Since(Instant::now())).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        ask(&batcher, &[3], Reading::Since(Instant::now())).await;
        assert_eq!(
            *requests.lock().unwrap(),
            vec![vec![1, 2], vec![1, 2], vec![1, 2], vec![3]],
            "1 and 2 were last asked 2.5 s before the last snapshot"
        );
    }

    #[tokio::test]
    async fn a_failed_snapshot_is_not_kept() {
        let (batcher, calls) = down_once();
        let batcher = batcher.with_snapshots(Duration::from_secs(60));
        let since = Instant::now();
        assert_eq!(
            batcher.get(3, Reading::Since(since)).await,
            Err("broker down".into())
        );
        assert_eq!(batcher.get(3, Reading::Since(since)).await, Ok(3));
        assert_eq!(batcher.get(3, Reading::Since(since)).await, Ok(3));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the second request's snapshot answers the third"
        );
    }

    #[tokio::test]
    async fn an_error_in_a_snapshot_is_asked_again() {
        let requests = Requests::default();
        let batcher = Arc::new(doubling(requests.clone()).with_snapshots(Duration::from_secs(5)));
        let since = Instant::now();
        // 13 is answered with an error of its own (a failed request is one per key).
        assert_eq!(
            ask(&batcher, &[1, 13], Reading::Since(since)).await,
            [Ok(2), Err("thirteen".to_string())]
        );
        assert_eq!(ask(&batcher, &[1], Reading::Since(since)).await, [Ok(2)]);
        assert_eq!(
            ask(&batcher, &[13], Reading::Since(since)).await,
            [Err("thirteen".to_string())]
        );
        assert_eq!(
            *requests.lock().unwrap(),
            vec![vec![1, 13], vec![13]],
            "1 from the snapshot, 13 from Kafka again"
        );
    }
}
