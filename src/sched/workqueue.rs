//! The controllers' work queue, shaped like client-go's: a key added many times before a
//! worker takes it is processed once (de-duplicated); a key is never processed by two workers
//! at once (one added while it is being processed runs again afterwards); keys can be added
//! after a delay (the earliest pending delay wins). Workers block on `get` until there is work
//! or the queue shuts down.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    notify: Notify,
}

struct State<K> {
    queue: VecDeque<K>,
    dirty: HashSet<K>,
    processing: HashSet<K>,
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
}
