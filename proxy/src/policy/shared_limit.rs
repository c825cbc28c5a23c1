//! A request rate shared by every proxy of a controller (ingress-nginx's `global-rate-limit`,
//! which ingress-nginx counts in memcached; here the controller adds the proxies' counts up).
//!
//! Each limit counts per value of its key over a sliding window, as lua-resty-global-throttle
//! does: windows of `window_seconds` aligned on the clock; a request is refused when
//! `previous × (share of the window still to come) + current` has reached the limit, and a
//! refused request is not counted. Counts live in one table per proxy process ([`counts`]),
//! shared by its workers, as nginx's shared memory zones are.
//!
//! In a cluster, while any route has such a limit, the proxy's subscription posts what it
//! admitted every [`SYNC_EVERY`] to the controller it subscribes to, which adds the proxies'
//! counts up and answers every total that changed since that proxy's last post, keys it has not
//! seen among them ([`Counts::sync_request`], [`Counts::sync_answer`]). Accuracy: a proxy learns
//! of the others' requests one to two syncs (plus a round trip) late, so N proxies together may
//! admit up to about `(N − 1) × rate × 0.2 s` more than the limit. Proxies subscribed to
//! different controller replicas count apart (each replica adds up its own proxies). Without a controller (standalone), the limit is the proxy's own.
//! Clocks are assumed in step within a fraction of the window, as in any cluster with NTP.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tidegate_snapshot::stream::WindowCount;
use tidegate_snapshot::{Cidr, SharedLimit, Template};

use super::variables::expand;
use super::{Facts, Verdict};
use crate::respond::error_response;

/// How often a proxy syncs its counts with the controller.
pub(crate) const SYNC_EVERY: Duration = Duration::from_millis(100);
/// Keys a sync carries at most (the most recent beyond that wait for the next).
const SYNC_KEYS: usize = 20_000;
const SHARDS: usize = 16;

#[derive(Debug)]
pub(super) struct SharedLimitFilter {
    id: Arc<str>,
    requests: u64,
    window_seconds: u32,
    key: Template,
    ignored: Vec<Cidr>,
    status: StatusCode,
}

impl Drop for SharedLimitFilter {
    fn drop(&mut self) {
        counts().filters.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SharedLimitFilter {
    pub(super) fn new(limit: &SharedLimit) -> SharedLimitFilter {
        counts().filters.fetch_add(1, Ordering::Relaxed);
        SharedLimitFilter {
            id: limit.id.as_str().into(),
            requests: u64::from(limit.requests),
            window_seconds: limit.window_seconds.max(1),
            key: limit.key.clone(),
            ignored: limit.ignored.clone(),
            status: StatusCode::from_u16(limit.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
        }
    }

    pub(super) fn check(&self, facts: &Facts<'_>) -> Verdict {
        if self.ignored.iter().any(|c| c.contains(facts.client)) {
            return Verdict::Continue;
        }
        let mut key = expand(&self.key, facts);
        if key.is_empty() {
            // Leaving a header out must not escape the limit.
            key = facts.client.to_canonical().to_string();
        }
        let now = now_seconds();
        if counts().admit(&self.id, key, self.window_seconds, self.requests, now) {
            Verdict::Continue
        } else {
            Verdict::Answer(error_response(self.status))
        }
    }
}

fn now_seconds() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// One key's counts in its current and previous window.
#[derive(Debug, Clone, Default)]
struct Counter {
    window_seconds: u32,
    window: u64,
    /// Admitted here in `window`, and in the one before.
    own: u64,
    own_previous: u64,
    /// Of `own`, how many the controller has been told of.
    sent: u64,
    /// The other proxies' counts, as of the last sync.
    others: u64,
    others_previous: u64,
}

impl Counter {
    /// Moves the counter to `window`.
    fn roll(&mut self, window: u64) {
        if window == self.window {
            return;
        }
        if window == self.window + 1 {
            self.own_previous = self.own;
            self.others_previous = self.others;
        } else {
            self.own_previous = 0;
            self.others_previous = 0;
        }
        self.window = window;
        self.own = 0;
        self.sent = 0;
        self.others = 0;
    }
}

type Key = (Arc<str>, String);

/// The counts of every shared limit in this process.
#[derive(Debug)]
pub(crate) struct Counts {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<Key, Counter>>>,
    /// Shared-limit filters alive: nothing to sync while there are none.
    filters: AtomicUsize,
}

/// The process's counts.
pub(crate) fn counts() -> &'static Counts {
    static COUNTS: OnceLock<Counts> = OnceLock::new();
    COUNTS.get_or_init(Counts::new)
}

impl Counts {
    fn new() -> Counts {
        Counts {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            filters: AtomicUsize::new(0),
        }
    }

    /// Whether any route has a shared limit now.
    pub(crate) fn any_limit(&self) -> bool {
        self.filters.load(Ordering::Relaxed) > 0
    }

    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, Counter>> {
        &self.shards[usize::try_from(self.hasher.hash_one(key)).unwrap_or(0) % SHARDS]
    }

    /// Counts a request for `key` of limit `id` at `now` (seconds); false when over the limit.
    fn admit(&self, id: &Arc<str>, key: String, window_seconds: u32, limit: u64, now: f64) -> bool {
        let length = f64::from(window_seconds);
        // Whole windows since the epoch: a float's integer part, never negative.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let window = (now / length).floor() as u64;
        #[allow(clippy::cast_precision_loss)]
        let elapsed = (now - window as f64 * length) / length;
        let key = (Arc::clone(id), key);
        let Ok(mut shard) = self.shard(&key).lock() else { return false };
        let counter = shard.entry(key).or_insert_with(|| Counter { window_seconds, window, ..Counter::default() });
        counter.window_seconds = window_seconds;
        counter.roll(window);
        #[allow(clippy::cast_precision_loss)]
        let estimate = (counter.own_previous + counter.others_previous) as f64 * (1.0 - elapsed)
            + (counter.own + counter.others) as f64;
        #[allow(clippy::cast_precision_loss)]
        if estimate >= limit as f64 {
            return false;
        }
        counter.own += 1;
        true
    }

    /// What to post to the controller: for each key with requests admitted here since the last
    /// post, how many. Marks them as sent.
    pub(crate) fn sync_request(&self, now: f64) -> Vec<WindowCount> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let Ok(mut shard) = shard.lock() else { continue };
            shard.retain(|_, counter| {
                let length = f64::from(counter.window_seconds.max(1));
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let window = (now / length).floor() as u64;
                // Nothing in this window or the one before: as good as new.
                counter.window + 1 >= window
            });
            for ((id, key), counter) in shard.iter_mut().filter(|(_, c)| c.own > c.sent) {
                if out.len() >= SYNC_KEYS {
                    break;
                }
                out.push(WindowCount {
                    limit: id.to_string(),
                    key: key.clone(),
                    window: counter.window,
                    window_seconds: counter.window_seconds,
                    count: counter.own - counter.sent,
                    previous: 0,
                });
                counter.sent = counter.own;
            }
        }
        out
    }

    /// Takes the controller's totals: the others' counts are the totals less what this proxy
    /// has told it. A key not seen here yet starts with the others' counts.
    pub(crate) fn sync_answer(&self, totals: &[WindowCount]) {
        for total in totals {
            let key: Key = (total.limit.as_str().into(), total.key.clone());
            let Ok(mut shard) = self.shard(&key).lock() else { continue };
            let counter = shard.entry(key).or_insert_with(|| Counter {
                window_seconds: total.window_seconds,
                window: total.window,
                ..Counter::default()
            });
            if total.window > counter.window {
                counter.roll(total.window);
            }
            if counter.window == total.window {
                counter.others = total.count.saturating_sub(counter.sent);
                counter.others_previous = total.previous.saturating_sub(counter.own_previous);
            } else if counter.window == total.window + 1 {
                // The window turned since the post: the answer's is the previous one now.
                counter.others_previous = total.count.saturating_sub(counter.own_previous);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Counts {
        Counts::new()
    }

    #[test]
    fn a_window_admits_the_limit_then_slides() {
        let counts = fresh();
        let id: Arc<str> = "ns/a".into();
        let start = 6000.0; // the start of a 60 s window
        let admitted = (0..15).filter(|_| counts.admit(&id, "k".into(), 60, 10, start + 1.0)).count();
        assert_eq!(admitted, 10, "the limit in a window");
        assert!(counts.admit(&id, "other".into(), 60, 10, start + 1.0), "keys count apart");
        // Half-way into the next window, half of the previous one still counts: 5 more.
        let later = (0..15).filter(|_| counts.admit(&id, "k".into(), 60, 10, start + 90.0)).count();
        assert_eq!(later, 5);
        // Two windows on, nothing of it is left.
        assert_eq!((0..15).filter(|_| counts.admit(&id, "k".into(), 60, 10, start + 200.0)).count(), 10);
    }

    #[test]
    fn other_proxies_counts_take_the_room() {
        let (a, b) = (fresh(), fresh());
        let id: Arc<str> = "ns/a".into();
        let now = 6001.0;
        assert_eq!((0..4).filter(|_| a.admit(&id, "k".into(), 60, 10, now)).count(), 4);
        assert_eq!((0..3).filter(|_| b.admit(&id, "k".into(), 60, 10, now)).count(), 3);
        // The controller adds the posts up and answers every total.
        let mut total: HashMap<(String, String, u64), WindowCount> = HashMap::new();
        let mut post = |counts: &Counts| {
            for c in counts.sync_request(now) {
                let key = (c.limit.clone(), c.key.clone(), c.window);
                total.entry(key).or_insert(WindowCount { count: 0, ..c.clone() }).count += c.count;
            }
            total.values().cloned().collect::<Vec<_>>()
        };
        let _ = post(&a);
        let answer = post(&b);
        b.sync_answer(&answer);
        assert_eq!((0..10).filter(|_| b.admit(&id, "k".into(), 60, 10, now)).count(), 3, "7 of 10 used");
        let _ = post(&b);
        let answer = post(&a);
        a.sync_answer(&answer);
        assert!(!a.admit(&id, "k".into(), 60, 10, now), "all 10 used across both");
        // A proxy that never saw the key hears of it.
        let c = fresh();
        c.sync_answer(&answer);
        assert!(!c.admit(&id, "k".into(), 60, 10, now), "the others used it all");
    }
}
