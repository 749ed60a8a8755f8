//! The controllers' work queue, shaped like client-go's: a key added many times before a
//! worker takes it is processed once (de-duplicated); a key is never processed by two workers
//! at once (one added while it is being processed runs again afterwards); keys can be added
//! after a delay (the earliest pending delay wins). Workers block on `get` until there is work
//! or the queue shuts down.
//!
//! [`WorkQueue::add_paced`] is for the noisy triggers (every status change of every pod of a
//! ReplicaSet): a key whose last run was expensive waits, after that run, [`PACE_FACTOR`] times
//! as long as it took (at most [`PACE_MAX`]) before it runs again, so one reconcile over 10,000
//! pods cannot become a busy loop that takes a core, while a cheap key still runs at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A paced key rests this many times its last run's duration before it runs again.
pub const PACE_FACTOR: u32 = 20;
/// ...but never longer than this.
pub const PACE_MAX: Duration = Duration::from_millis(500);
/// Runs shorter than this are not remembered (a paced add of such a key is an add).
pub const PACE_MIN_COST: Duration = Duration::from_millis(1);

pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    notify: Notify,
}

struct State<K> {
    queue: VecDeque<K>,
    dirty: HashSet<K>,
    processing: HashSet<K>,
    /// Keys whose last run was expensive: when it ended and how long it took.
    cost: HashMap<K, (Instant, Duration)>,
    /// Pending delayed adds: key → when.
    delayed: HashMap<K, Instant>,
    shut: bool,
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(WorkQueue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                cost: HashMap::new(),
                delayed: HashMap::new(),
                shut: false,
            }),
            notify: Notify::new(),
        })
    }

    /// Queue a key (a no-op if it is already queued).
    pub fn add(&self, k: K) {
        let mut st = self.state.lock().unwrap();
        if st.shut || !st.dirty.insert(k.clone()) {
            return;
        }
        if !st.processing.contains(&k) {
            st.queue.push_back(k);
            drop(st);
            self.notify.notify_one();
        }
    }

    /// Record what `k`'s run (ending now) cost, for [`WorkQueue::add_paced`]; `None`, or a
    /// run under [`PACE_MIN_COST`], forgets it (its paced adds are adds again).
    pub fn record_cost(&self, k: &K, took: Option<Duration>) {
        let mut st = self.state.lock().unwrap();
        match took {
            Some(t) if t >= PACE_MIN_COST => {
                st.cost.insert(k.clone(), (Instant::now(), t));
            }
            _ => {
                st.cost.remove(k);
            }
        }
    }

    /// Queue a key, paced by its last run's cost (see the module docs): at once when it is
    /// cheap or rested long enough, else when its rest is over.
    pub fn add_paced(self: &Arc<Self>, k: K) {
        let wait = {
            let st = self.state.lock().unwrap();
            if st.shut || st.dirty.contains(&k) {
                return;
            }
            match st.cost.get(&k) {
                Some((ended, took)) => {
                    let rest = (*took * PACE_FACTOR).min(PACE_MAX);
                    (*ended + rest).saturating_duration_since(Instant::now())
                }
                None => Duration::ZERO,
            }
        };
        self.add_after(k, wait);
    }

    /// Queue a key after `delay` (kept only if earlier than a delayed add already pending).
    pub fn add_after(self: &Arc<Self>, k: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(k);
        }
        let at = Instant::now() + delay;
        {
            let mut st = self.state.lock().unwrap();
            if st.shut {
                return;
            }
            match st.delayed.get(&k) {
                Some(t) if *t <= at => return,
                _ => {
                    st.delayed.insert(k.clone(), at);
                }
            }
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let due = {
                let mut st = q.state.lock().unwrap();
                match st.delayed.get(&k) {
                    Some(t) if *t == at => {
                        st.delayed.remove(&k);
                        true
                    }
                    _ => false,
                }
            };
            if due {
                q.add(k);
            }
        });
    }

    /// The next key to process; `None` once the queue has shut down.
    pub async fn get(&self) -> Option<K> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.state.lock().unwrap();
                if st.shut {
                    return None;
                }
                if let Some(k) = st.queue.pop_front() {
                    st.dirty.remove(&k);
                    st.processing.insert(k.clone());
                    if !st.queue.is_empty() {
                        self.notify.notify_one();
                    }
                    return Some(k);
                }
            }
            notified.await;
        }
    }

    /// A worker finished `k`: if it was added meanwhile, it is queued again.
    pub fn done(&self, k: &K) {
        let mut st = self.state.lock().unwrap();
        st.processing.remove(k);
        if st.dirty.contains(k) {
            st.queue.push_back(k.clone());
            drop(st);
            self.notify.notify_one();
        }
    }

    pub fn shutdown(&self) {
        self.state.lock().unwrap().shut = true;
        self.notify.notify_waiters();
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dedupes_and_never_runs_a_key_twice_at_once() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let k = q.get().await.unwrap();
        assert_eq!(k, "a");
        // Added while processing: not handed out until done.
        q.add("a");
        assert_eq!(q.get().await.unwrap(), "b");
        assert!(q.is_empty());
        q.done(&"a");
        assert_eq!(q.get().await.unwrap(), "a");
        q.done(&"a");
        q.done(&"b");
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn delayed_adds_keep_the_earliest() {
        let q = WorkQueue::new();
        q.add_after("a", Duration::from_secs(10));
        q.add_after("a", Duration::from_millis(100));
        q.add_after("a", Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(q.get().await.unwrap(), "a");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(4),
            "{took:?}"
        );
        q.done(&"a");
        q.shutdown();
        assert_eq!(q.get().await, None);
    }

    #[tokio::test]
    async fn paced_adds_rest_an_expensive_key_and_not_a_cheap_one() {
        let q = WorkQueue::new();
        // A cheap run: the next paced add is immediate.
        q.add_paced("cheap");
        let k = q.get().await.unwrap();
        q.record_cost(&k, Some(Duration::from_micros(100)));
        q.done(&k);
        q.add_paced("cheap");
        assert_eq!(q.len(), 1, "a cheap key is queued at once");
        let k = q.get().await.unwrap();
        q.done(&k);
        // An expensive run (20 ms): the next paced add waits about 20 times that.
        q.add("slow");
        let k = q.get().await.unwrap();
        q.record_cost(&k, Some(Duration::from_millis(20)));
        q.done(&k);
        q.add_paced("slow");
        assert!(q.is_empty(), "an expensive key rests first");
        let t0 = Instant::now();
        assert_eq!(q.get().await.unwrap(), "slow");
        let rested = t0.elapsed();
        assert!(
            rested >= Duration::from_millis(300) && rested <= PACE_MAX + Duration::from_secs(1),
            "{rested:?}"
        );
        q.done(&"slow");
    }
}
