//! Limits per client address (`limit-rps`, `limit-rpm`, `limit-burst-multiplier`,
//! `limit-connections`, `limit-whitelist`), shared by all of the proxy's workers as nginx's
//! zones are shared by its workers.
//!
//! A rate is nginx's `limit_req ... burst=B nodelay` leaky bucket: each request adds one to the
//! client's excess, which drains at the rate; a request that would take the excess past the
//! burst is refused, and one within it passes at once. So a quiet client may send `burst + 1`
//! requests at once, then `rate` per second. The concurrency limit counts a client's requests in
//! progress, from the access step until the response's last byte (nginx's `limit_conn` counts
//! requests being processed, in HTTP/2 each stream). Accuracy: exact within one proxy (one
//! lock per shard of clients, held for a few arithmetic operations, never across a wait);
//! proxies do not share counts, so N proxies admit up to N times the rate, as N ingress-nginx
//! pods do.
//!
//! With `tidegate.dev/limit-key`, the limits count by the key's value (a header, a cookie, a
//! variable) instead of the client address; a request for which it expands to nothing is
//! counted by its address, so that leaving the header out does not escape the limit.
//!
//! Memory is bounded: a shard drops clients whose bucket has drained (they are as good as new)
//! once it holds [`SHARD_CLIENTS`], and refuses no one for want of room.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::StatusCode;
use tidegate_snapshot::{Cidr, Limits, Template};

use super::variables::expand;
use super::{Effects, Facts, Verdict};
use crate::respond::error_response;

const SHARDS: usize = 16;
/// Clients a shard holds before it sweeps out drained ones.
const SHARD_CLIENTS: usize = 4096;

#[derive(Debug)]
pub(super) struct LimitFilter {
    rates: Vec<Rate>,
    concurrent: Option<Arc<Concurrent>>,
    exempt: Vec<Cidr>,
    /// Over a rate (`limit-req-status-code`), and over the concurrency (`limit-conn-status-code`).
    status: StatusCode,
    concurrent_status: StatusCode,
    /// What is counted by, instead of the client address.
    key: Option<Template>,
}

/// Who a limit counts: a client address, or the value of the limit's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Counted {
    Address(IpAddr),
    Key(Box<str>),
}

/// One leaky bucket per client, in milli-requests.
#[derive(Debug)]
struct Rate {
    /// Milli-requests drained per second.
    per_second_milli: u64,
    burst_milli: u64,
    shards: Shards<Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    excess_milli: u64,
    at: Instant,
}

#[derive(Debug)]
struct Concurrent {
    limit: u32,
    shards: Shards<u32>,
}

/// Who is counted, with its hash: taken once per request, it picks the shard and is the key's
/// hash in the shard's table, so that a request hashes its client once, not once per lookup.
#[derive(Clone, Debug)]
struct Hashed {
    hash: u64,
    counted: Counted,
}

impl PartialEq for Hashed {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.counted == other.counted
    }
}

impl Eq for Hashed {}

impl Hash for Hashed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes on the hash a [`Hashed`] carries.
#[derive(Default)]
struct Carried(u64);

impl Hasher for Carried {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is called (by `Hashed`); fold anything else in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

type Table<T> = HashMap<Hashed, T, BuildHasherDefault<Carried>>;

#[derive(Debug)]
struct Shards<T> {
    /// Seeded per limit at random, so that no one can choose clients that collide.
    hasher: foldhash::quality::RandomState,
    shards: Vec<Mutex<Table<T>>>,
}

impl<T> Shards<T> {
    fn new() -> Self {
        Shards {
            hasher: foldhash::quality::RandomState::default(),
            shards: (0..SHARDS).map(|_| Mutex::new(Table::default())).collect(),
        }
    }

    fn hashed(&self, counted: Counted) -> Hashed {
        Hashed { hash: self.hasher.hash_one(&counted), counted }
    }

    /// The table holds the low bits for the bucket and the top seven for its tags: the shard
    /// takes bits from the middle.
    fn shard(&self, client: &Hashed) -> &Mutex<Table<T>> {
        &self.shards[(client.hash >> 32) as usize % SHARDS]
    }
}

impl Rate {
    /// Counts a request of `client` at `now`; false when it is over the limit.
    fn admit(&self, client: &Hashed, now: Instant) -> bool {
        let Ok(mut shard) = self.shards.shard(client).lock() else { return false };
        let drained = |bucket: &Bucket| {
            let elapsed_milli = u64::try_from(now.saturating_duration_since(bucket.at).as_millis()).unwrap_or(u64::MAX);
            bucket.excess_milli.saturating_sub(elapsed_milli.saturating_mul(self.per_second_milli) / 1000)
        };
        if shard.len() >= SHARD_CLIENTS && !shard.contains_key(client) {
            shard.retain(|_, bucket| drained(bucket) > 0);
        }
        match shard.entry(client.clone()) {
            Entry::Occupied(mut held) => {
                let excess = drained(held.get()) + 1000;
                if excess > self.burst_milli + 1000 {
                    return false;
                }
                *held.get_mut() = Bucket { excess_milli: excess, at: now };
            }
            // A first request fits any burst, even 0.
            Entry::Vacant(free) => {
                free.insert(Bucket { excess_milli: 1000, at: now });
            }
        }
        true
    }
}

/// A client's request in progress, counted until dropped (when its response is done).
pub(crate) struct InProgress {
    concurrent: Arc<Concurrent>,
    client: Hashed,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut shard) = self.concurrent.shards.shard(&self.client).lock()
            && let Some(count) = shard.get_mut(&self.client)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(&self.client);
            }
        }
    }
}

impl Concurrent {
    fn enter(self: &Arc<Self>, client: Counted) -> Option<InProgress> {
        let client = self.shards.hashed(client);
        let Ok(mut shard) = self.shards.shard(&client).lock() else { return None };
        let count = shard.entry(client.clone()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(InProgress { concurrent: Arc::clone(self), client })
    }
}

impl LimitFilter {
    pub(super) fn new(limits: &Limits) -> LimitFilter {
        let rates = limits
            .rates
            .iter()
            .map(|r| Rate {
                per_second_milli: u64::from(r.requests) * 1000 / u64::from(r.per_seconds.max(1)),
                burst_milli: u64::from(r.burst) * 1000,
                shards: Shards::new(),
            })
            .collect();
        let concurrent = limits.concurrent.map(|limit| Arc::new(Concurrent { limit, shards: Shards::new() }));
        let status = |code| StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        LimitFilter {
            rates,
            concurrent,
            exempt: limits.exempt.clone(),
            status: status(limits.status),
            concurrent_status: status(limits.concurrent_status),
            key: limits.key.clone(),
        }
    }

    /// Admits a request or refuses it; an admitted one holds its place among the client's
    /// requests in progress through `hold`, until the response is done.
    pub(super) fn check(&self, facts: &Facts<'_>, slot: &mut Option<Box<Effects>>) -> Verdict {
        if self.exempt.iter().any(|c| c.contains(facts.client)) {
            return Verdict::Continue;
        }
        let key = self.key.as_ref().map(|key| expand(key, facts)).filter(|k| !k.is_empty());
        let client = match key {
            Some(key) => Counted::Key(key.into_boxed_str()),
            None => Counted::Address(facts.client.to_canonical()),
        };
        let now = Instant::now();
        // Every rate counts the request, as nginx's limit_req lines each do.
        let mut admitted = true;
        for rate in &self.rates {
            admitted &= rate.admit(&rate.shards.hashed(client.clone()), now);
        }
        if !admitted {
            return Verdict::Answer(error_response(self.status));
        }
        if let Some(concurrent) = &self.concurrent {
            match concurrent.enter(client) {
                Some(in_progress) => Effects::of(slot).holds.push(in_progress),
                None => return Verdict::Answer(error_response(self.concurrent_status)),
            }
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_rate_admits_the_burst_then_the_rate() {
        let rate = Rate { per_second_milli: 5000, burst_milli: 10_000, shards: Shards::new() };
        let client = rate.shards.hashed(Counted::Address("192.0.2.1".parse().expect("ip")));
        let start = Instant::now();
        let admitted = (0..20).filter(|_| rate.admit(&client, start)).count();
        assert_eq!(admitted, 11, "burst + 1 at once");
        assert!(!rate.admit(&client, start + Duration::from_millis(100)), "half a request drained: still full");
        assert!(rate.admit(&client, start + Duration::from_millis(200)), "one request drained");
        assert!(
            rate.admit(&rate.shards.hashed(Counted::Address("192.0.2.2".parse().expect("ip"))), start),
            "another client has its own bucket"
        );
        assert!(rate.admit(&rate.shards.hashed(Counted::Key("192.0.2.1".into())), start), "a key is not an address");
    }

    #[test]
    fn concurrency_is_counted_until_the_request_is_done() {
        let concurrent = Arc::new(Concurrent { limit: 2, shards: Shards::new() });
        let client = Counted::Key("tenant-a".into());
        let first = concurrent.enter(client.clone()).expect("first");
        let _second = concurrent.enter(client.clone()).expect("second");
        assert!(concurrent.enter(client.clone()).is_none(), "a third at once is refused");
        drop(first);
        assert!(concurrent.enter(client).is_some(), "a place freed");
    }
}
