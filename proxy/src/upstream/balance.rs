//! Choosing an endpoint for each request, and learning from how each exchange ended.
//!
//! A backend's [`Endpoints`] are shared by the workers and rebuilt only when its endpoints
//! change. Each route says how it chooses among them ([`Balance`], from the snapshot):
//! - **round robin**: each endpoint in turn, across all workers.
//! - **peak EWMA** (`load-balance: ewma`), as ingress-nginx's balancer and Finagle's: each
//!   endpoint keeps a moving average of its response times that jumps up at once to a slower
//!   one and decays over 10 s; two endpoints are drawn at random and the one with the lower
//!   average, weighted by its requests in progress, is taken. An endpoint never measured
//!   counts as fast, so that it is tried.
//! - **consistent hash** (`upstream-hash-by`): the key is placed on a ring of 160 points per
//!   endpoint and goes to the next endpoint clockwise, so that removing one of N endpoints
//!   moves about 1/N of the keys. With a subset size, the ring holds subsets of endpoints
//!   and requests spread round robin within the key's subset.
//!
//! A request that goes on to another endpoint ([`super::Attempts`]) names the ones tried, and
//! a choice skips them while others remain.
//!
//! **Passive health**, as Envoy's outlier detection: an endpoint whose connections fail, or
//! that answers 5xx, [`EJECT_AFTER`] times in a row is left out of every choice for
//! [`EJECTED_FOR`], then tried again. At most half of a backend's endpoints are out at once,
//! and when every endpoint left is out, they are chosen anyway rather than none.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tidegate_snapshot::Balance;

/// Points on the ring per endpoint (or subset).
const POINTS: usize = 160;
/// How fast an endpoint's average forgets: its time constant.
const DECAY: Duration = Duration::from_secs(10);
/// Failures in a row that take an endpoint out.
pub(crate) const EJECT_AFTER: u32 = 5;
/// How long an endpoint stays out.
pub(crate) const EJECTED_FOR: Duration = Duration::from_secs(10);

/// One backend's endpoints, and what the balancers keep about them.
#[derive(Debug)]
pub(crate) struct Endpoints {
    addresses: Vec<SocketAddr>,
    next: AtomicUsize,
    stats: Box<[Stats]>,
    ring: OnceLock<Ring>,
    /// The subsets' ring, and the size it was made for.
    subsets: OnceLock<(u32, Ring, Vec<Vec<usize>>)>,
    /// When these endpoints were made: the clock of the averages.
    epoch: Instant,
    /// The latest time any endpoint is out until (milliseconds since `epoch`; 0: none is), so
    /// that choosing reads no clock while all are in.
    out_until_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Stats {
    in_progress: AtomicU32,
    /// The average response time in microseconds; 0 until measured.
    average_us: AtomicU64,
    /// When it was last changed, in microseconds since `epoch`.
    touched_us: AtomicU64,
    /// Failed exchanges in a row.
    failures: AtomicU32,
    /// Out of the choices until then, in milliseconds since `epoch` (0: in).
    ejected_until_ms: AtomicU64,
}

/// A ring of points, each naming an entry (an endpoint or a subset), sorted by point.
#[derive(Debug)]
struct Ring(Vec<(u64, usize)>);

impl Ring {
    fn new(names: impl Iterator<Item = String>) -> Ring {
        let mut points = Vec::new();
        for (entry, name) in names.enumerate() {
            for i in 0..POINTS {
                points.push((stable_hash(&(name.as_str(), i)), entry));
            }
        }
        points.sort_unstable();
        Ring(points)
    }

    /// The entries clockwise from `key`'s point, each once.
    fn walk(&self, key: &str) -> impl Iterator<Item = usize> + '_ {
        let point = stable_hash(&key);
        let start = self.0.partition_point(|(p, _)| *p < point);
        let mut seen: Vec<usize> = Vec::new();
        (0..self.0.len()).filter_map(move |i| {
            let entry = self.0[(start + i) % self.0.len()].1;
            if seen.contains(&entry) {
                return None;
            }
            seen.push(entry);
            Some(entry)
        })
    }
}

/// A hash that is the same in every process and every version: keys map to the same
/// endpoints on every proxy.
fn stable_hash(value: &impl Hash) -> u64 {
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new_with_keys(0x7469_6465, 0x6761_7465);
    value.hash(&mut hasher);
    hasher.finish()
}

/// The endpoint chosen for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pick {
    index: usize,
    pub(crate) address: SocketAddr,
    /// Its exchange feeds the averages (only EWMA keeps them: the others pay nothing).
    tracked: bool,
}

impl Endpoints {
    pub(crate) fn new(addresses: Vec<SocketAddr>) -> Endpoints {
        let stats = addresses.iter().map(|_| Stats::default()).collect();
        Endpoints {
            addresses,
            next: AtomicUsize::new(0),
            stats,
            ring: OnceLock::new(),
            subsets: OnceLock::new(),
            epoch: Instant::now(),
            out_until_ms: AtomicU64::new(0),
        }
    }

    /// An endpoint for a request, by `balance`, other than those `tried` while one remains;
    /// `key`: the request's hash key, when the balance hashes. `None` when there is none.
    pub(crate) fn pick(&self, balance: &Balance, key: Option<&str>, tried: &[SocketAddr]) -> Option<Pick> {
        if self.addresses.is_empty() {
            return None;
        }
        if tried.len() >= self.addresses.len() {
            return None;
        }
        let out_until = self.out_until_ms.load(Ordering::Relaxed);
        let now = if out_until == 0 {
            0
        } else {
            let now = self.now_ms();
            if now >= out_until {
                // All are back in: no clock for the next choices.
                let _ = self.out_until_ms.compare_exchange(out_until, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
            now
        };
        let healthy = |i: &usize| !tried.contains(&self.addresses[*i]) && (now == 0 || !self.ejected(*i, now));
        let index = match self.choose(balance, key, healthy) {
            Some(index) => index,
            // Every endpoint left is out: one of them rather than none.
            None => self.choose(balance, key, |i: &usize| !tried.contains(&self.addresses[*i]))?,
        };
        let tracked = *balance == Balance::Ewma;
        if tracked {
            self.stats[index].in_progress.fetch_add(1, Ordering::Relaxed);
        }
        Some(Pick { index, address: self.addresses[index], tracked })
    }

    fn choose(&self, balance: &Balance, key: Option<&str>, fresh: impl Fn(&usize) -> bool) -> Option<usize> {
        match balance {
            Balance::RoundRobin => self.round_robin(fresh),
            Balance::Ewma => self.ewma(fresh),
            Balance::Hash { subset_size: None, .. } => {
                let ring = self.ring.get_or_init(|| Ring::new(self.addresses.iter().map(ToString::to_string)));
                ring.walk(key.unwrap_or("")).find(fresh)
            }
            Balance::Hash { subset_size: Some(size), .. } => self.subset(*size, key.unwrap_or(""), fresh),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    fn ejected(&self, i: usize, now_ms: u64) -> bool {
        self.stats[i].ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Passive health: `healthy` says whether the exchange with `pick` went well (answered,
    /// and not with a 5xx).
    fn health(&self, pick: Pick, healthy: bool) {
        let Some(stats) = self.stats.get(pick.index).filter(|_| self.addresses.get(pick.index) == Some(&pick.address))
        else {
            return;
        };
        if healthy {
            // Read first: most exchanges go well, and the line stays shared between workers.
            if stats.failures.load(Ordering::Relaxed) != 0 {
                stats.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        if stats.failures.fetch_add(1, Ordering::Relaxed) + 1 < EJECT_AFTER {
            return;
        }
        stats.failures.store(0, Ordering::Relaxed);
        let now = self.now_ms();
        let out = (0..self.addresses.len()).filter(|i| self.ejected(*i, now)).count();
        if (out + 1) * 2 > self.addresses.len() {
            return;
        }
        let until = now + u64::try_from(EJECTED_FOR.as_millis()).unwrap_or(u64::MAX);
        stats.ejected_until_ms.store(until, Ordering::Relaxed);
        self.out_until_ms.fetch_max(until, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %pick.address,
            failures = EJECT_AFTER,
            seconds = EJECTED_FOR.as_secs(),
            "endpoint failed in a row; left out of the choices for a while"
        );
    }

    /// `address`, when it is one of these endpoints (a session's).
    pub(crate) fn find(&self, address: SocketAddr, balance: &Balance) -> Option<Pick> {
        let index = self.addresses.iter().position(|a| *a == address)?;
        let tracked = *balance == Balance::Ewma;
        if tracked {
            self.stats[index].in_progress.fetch_add(1, Ordering::Relaxed);
        }
        Some(Pick { index, address, tracked })
    }

    /// The endpoint a session `key` lands on, on the consistent-hash ring of all endpoints.
    pub(crate) fn on_ring(&self, key: &str) -> Option<SocketAddr> {
        let ring = self.ring.get_or_init(|| Ring::new(self.addresses.iter().map(ToString::to_string)));
        ring.walk(key).next().map(|i| self.addresses[i])
    }

    /// The endpoint whose [`address_key`] is `key`.
    pub(crate) fn by_key(&self, key: &str) -> Option<SocketAddr> {
        self.addresses.iter().copied().find(|a| address_key(*a) == key)
    }

    /// The exchange of `pick` was given up by the client: no longer in progress, and nothing
    /// learnt.
    pub(crate) fn abandoned(&self, pick: Pick) {
        if pick.tracked
            && self.addresses.get(pick.index) == Some(&pick.address)
            && let Some(stats) = self.stats.get(pick.index)
        {
            let _ = stats.in_progress.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// How the exchange of `pick` ended: its response time and status when it answered.
    pub(crate) fn finished(&self, pick: Pick, answered: Option<(Duration, u16)>) {
        self.health(pick, answered.is_some_and(|(_, status)| status < 500));
        let answered_in = answered.map(|(took, _)| took);
        let Some(stats) = self
            .stats
            .get(pick.index)
            .filter(|_| pick.tracked && self.addresses.get(pick.index) == Some(&pick.address))
        else {
            return;
        };
        let _ = stats.in_progress.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        // A failure counts as the slowest answer the read timeout would allow: 10 s.
        let sample = answered_in.unwrap_or(Duration::from_secs(10));
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let sample_us = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
        let before = stats.average_us.load(Ordering::Relaxed);
        let since = now.saturating_sub(stats.touched_us.swap(now, Ordering::Relaxed));
        let average = if before == 0 || sample_us > before {
            // Peak: a slower answer counts at once.
            sample_us
        } else {
            let weight = (-(since as f64) / DECAY.as_micros() as f64).exp();
            (before as f64 * weight + sample_us as f64 * (1.0 - weight)) as u64
        };
        stats.average_us.store(average.max(1), Ordering::Relaxed);
    }

    fn round_robin(&self, fresh: impl Fn(&usize) -> bool) -> Option<usize> {
        let n = self.addresses.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| (start + i) % n).find(fresh)
    }

    fn ewma(&self, fresh: impl Fn(&usize) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.addresses.len()).filter(fresh).collect();
        match candidates.len() {
            0 => None,
            1 => candidates.first().copied(),
            n => {
                let draw = random();
                let a = candidates[(draw % n as u64) as usize];
                let mut b = candidates[((draw >> 32) % (n as u64 - 1)) as usize];
                if b == a {
                    b = candidates[n - 1];
                }
                Some(if self.cost(a) <= self.cost(b) { a } else { b })
            }
        }
    }

    /// The decayed average of `i`, weighted by its requests in progress.
    fn cost(&self, i: usize) -> f64 {
        let stats = &self.stats[i];
        let average = stats.average_us.load(Ordering::Relaxed) as f64;
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let since = now.saturating_sub(stats.touched_us.load(Ordering::Relaxed)) as f64;
        let decayed = average * (-since / DECAY.as_micros() as f64).exp();
        decayed * f64::from(stats.in_progress.load(Ordering::Relaxed) + 1)
    }

    fn subset(&self, size: u32, key: &str, fresh: impl Fn(&usize) -> bool) -> Option<usize> {
        let (_, ring, subsets) = self.subsets.get_or_init(|| {
            let size = usize::try_from(size).unwrap_or(1).max(1);
            let mut order: Vec<usize> = (0..self.addresses.len()).collect();
            order.sort_by_key(|i| self.addresses[*i]);
            let subsets: Vec<Vec<usize>> = order.chunks(size).map(<[usize]>::to_vec).collect();
            let names =
                subsets.iter().map(|s| s.iter().map(|i| self.addresses[*i].to_string()).collect::<Vec<_>>().join(","));
            (size as u32, Ring::new(names), subsets)
        });
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        ring.walk(key).find_map(|s| {
            let members = &subsets[s];
            (0..members.len()).map(|i| members[(start + i) % members.len()]).find(|i| fresh(i))
        })
    }
}

/// A stable name for an endpoint that does not tell its address: what a persistent session's
/// cookie holds.
pub(crate) fn address_key(address: SocketAddr) -> String {
    format!("{:016x}", stable_hash(&address.to_string()))
}

/// A cheap random number per call (xorshift over a per-thread state seeded from the clock).
pub(crate) fn random() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1,
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Endpoints {
        Endpoints::new((1..=n).map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect())
    }

    fn hash(subset_size: Option<u32>) -> Balance {
        Balance::Hash { key: "$request_uri".parse().expect("template"), subset_size }
    }

    #[test]
    fn round_robin_takes_each_in_turn_and_skips_the_tried() {
        let e = endpoints(3);
        let ports: Vec<u16> =
            (0..6).filter_map(|_| e.pick(&Balance::RoundRobin, None, &[])).map(|p| p.address.port()).collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
        let tried = [SocketAddr::from(([127, 0, 0, 1], 2))];
        assert!((0..6).all(|_| e.pick(&Balance::RoundRobin, None, &tried).is_some_and(|p| p.address.port() != 2)));
        let all: Vec<SocketAddr> = (1..=3).map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect();
        assert_eq!(e.pick(&Balance::RoundRobin, None, &all), None, "all tried: none left");
    }

    /// Removing one of 10 endpoints moves about a tenth of the keys, and only keys of the one
    /// removed.
    #[test]
    fn a_hash_key_stays_and_few_move_when_an_endpoint_goes() {
        let (ten, nine) = (endpoints(10), endpoints(9));
        let keys: Vec<String> = (0..1000).map(|i| format!("/item/{i}")).collect();
        let on = |e: &Endpoints, key: &str| e.pick(&hash(None), Some(key), &[]).map(|p| p.address.port());
        let moved = keys.iter().filter(|k| on(&ten, k) != on(&nine, k)).count();
        assert!(moved <= 150, "{moved} of 1000 keys moved");
        assert!(keys.iter().all(|k| on(&ten, k) == on(&ten, k)), "stable");
        assert!(keys.iter().filter(|k| on(&ten, k) != on(&nine, k)).all(|k| on(&ten, k) == Some(10)));
        let spread: std::collections::BTreeSet<_> = keys.iter().filter_map(|k| on(&ten, k)).collect();
        assert_eq!(spread.len(), 10, "every endpoint gets keys");
    }

    #[test]
    fn a_subset_keeps_a_key_on_its_few_endpoints() {
        let e = endpoints(9);
        let seen: std::collections::BTreeSet<u16> =
            (0..30).filter_map(|_| e.pick(&hash(Some(3)), Some("user-7"), &[])).map(|p| p.address.port()).collect();
        assert_eq!(seen.len(), 3, "spread over one subset of 3: {seen:?}");
    }

    /// An endpoint that answers slowly gets few requests.
    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let e = endpoints(3);
        let mut slow = 0;
        for _ in 0..1000 {
            let pick = e.pick(&Balance::Ewma, None, &[]).expect("pick");
            let took = if pick.address.port() == 1 {
                slow += 1;
                Duration::from_millis(100)
            } else {
                Duration::from_millis(1)
            };
            e.finished(pick, Some((took, 200)));
        }
        assert!(slow < 150, "{slow} of 1000 to the slow endpoint");
    }

    /// An endpoint failing 5 times in a row is left out, and the others take its turns.
    #[test]
    fn a_failing_endpoint_is_left_out_for_a_while() {
        let e = endpoints(3);
        let bad = SocketAddr::from(([127, 0, 0, 1], 2));
        let mut failures = 0;
        for _ in 0..30 {
            let pick = e.pick(&Balance::RoundRobin, None, &[]).expect("pick");
            if pick.address == bad {
                failures += 1;
                e.finished(pick, None);
            } else {
                e.finished(pick, Some((Duration::from_millis(1), 200)));
            }
        }
        assert_eq!(failures, EJECT_AFTER as usize, "left out after {EJECT_AFTER} failures in a row");
        // At most half out: a second failing endpoint stays in.
        let other = SocketAddr::from(([127, 0, 0, 1], 3));
        for _ in 0..30 {
            let pick = e.pick(&Balance::RoundRobin, None, &[]).expect("pick");
            e.finished(pick, (pick.address != other).then_some((Duration::from_millis(1), 200)));
        }
        assert!((0..6).any(|_| e.pick(&Balance::RoundRobin, None, &[]).is_some_and(|p| p.address == other)));
    }

    /// Clients that go away while an endpoint works count neither for nor against it.
    #[test]
    fn abandoned_exchanges_do_not_eject() {
        let e = endpoints(2);
        for _ in 0..20 {
            let pick = e.pick(&Balance::RoundRobin, None, &[]).expect("pick");
            e.abandoned(pick);
        }
        let ports: std::collections::BTreeSet<u16> =
            (0..4).filter_map(|_| e.pick(&Balance::RoundRobin, None, &[])).map(|p| p.address.port()).collect();
        assert_eq!(ports.len(), 2, "both still chosen");
    }
}
