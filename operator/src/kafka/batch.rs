//! Coalesced reads. Reconciles running at the same time ask Kafka about different keys
//! (topics, SCRAM users, ACL principals); a [`Batcher`] answers them all from one
//! request. Every answer comes from a request sent after the question was asked, so no
//! reconcile acts on a reading older than itself (a topic it created a moment ago, an
//! ACL somebody deleted). Questions asked while a request is out wait for the next one,
//! which carries them all: under load, batches grow instead of requests multiplying.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// One request's answers: per key, its value or the error Kafka gave for that key alone.
/// A key the answer leaves out has the value's default (no such topic, no credentials,
/// no ACLs).
pub type Answers<K, V, E> = BTreeMap<K, Result<V, E>>;

type Fetch<K, V, E> = dyn Fn(Vec<K>) -> Pin<Box<dyn Future<Output = Result<Answers<K, V, E>, E>> + Send>>
    + Send
    + Sync;

/// Coalesces concurrent reads of keys `K` into one request for all of them.
pub struct Batcher<K, V, E> {
    fetch: Arc<Fetch<K, V, E>>,
    /// What to answer when the request's task was cancelled (the runtime shutting down).
    cancelled: fn() -> E,
    queue: Arc<Mutex<Queue<K, V, E>>>,
}

struct Queue<K, V, E> {
    asked: Vec<(K, oneshot::Sender<Result<V, E>>)>,
    /// Whether a task is sending requests; it runs until nobody waits.
    sending: bool,
}

impl<K, V, E> Batcher<K, V, E>
where
    K: Ord + Clone + Send + 'static,
    V: Clone + Default + Send + 'static,
    E: Clone + Send + 'static,
{
    /// A batcher that reads with `fetch`, given the distinct keys asked for.
    pub fn new<F, Fut>(fetch: F, cancelled: fn() -> E) -> Self
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Answers<K, V, E>, E>> + Send + 'static,
    {
        Self {
            fetch: Arc::new(move |keys| Box::pin(fetch(keys))),
            cancelled,
            queue: Arc::new(Mutex::new(Queue {
                asked: Vec::new(),
                sending: false,
            })),
        }
    }

    /// The value of `key`, from a request sent after this call began.
    pub async fn get(&self, key: K) -> Result<V, E> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("not poisoned");
            queue.asked.push((key, reply));
            !std::mem::replace(&mut queue.sending, true)
        };
        if start {
            let sender = Sender {
                fetch: self.fetch.clone(),
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
            let asked = {
                let mut queue = self.queue.lock().expect("not poisoned");
                if queue.asked.is_empty() {
                    queue.sending = false;
                    self.finished = true;
                    return;
                }
                std::mem::take(&mut queue.asked)
            };
            let keys: BTreeSet<K> = asked.iter().map(|(k, _)| k.clone()).collect();
            let answers = (self.fetch)(keys.into_iter().collect()).await;
            for (key, reply) in asked {
                let answer = match &answers {
                    Ok(answers) => answers.get(&key).cloned().unwrap_or(Ok(V::default())),
                    Err(e) => Err(e.clone()),
                };
                // The asker may have given up; nothing to do then.
                let _ = reply.send(answer);
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
            tokio::spawn(async move { (k, batcher.get(k % 15).await) })
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
            tokio::spawn(async move { batcher.get(1).await })
        };
        // The first request is out (it takes 50 ms).
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(requests.lock().unwrap().len(), 1);
        let later = (2..5u32).map(|k| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.get(k).await })
        });
        let later = futures::future::join_all(later).await;
        assert_eq!(first.await.unwrap(), Ok(2));
        assert_eq!(
            later.into_iter().map(|a| a.unwrap()).collect::<Vec<_>>(),
            vec![Ok(4), Ok(6), Ok(8)]
        );
        assert_eq!(*requests.lock().unwrap(), vec![vec![1], vec![2, 3, 4]]);
    }

    #[tokio::test]
    async fn a_failed_request_fails_every_question_in_it_and_the_next_one_is_sent() {
        let calls = Arc::new(AtomicUsize::new(0));
        let batcher: Batcher<u32, u32, String> = Batcher::new(
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
        assert_eq!(batcher.get(3).await, Err("broker down".into()));
        assert_eq!(batcher.get(3).await, Ok(3));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
