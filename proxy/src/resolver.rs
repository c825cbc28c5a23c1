//! Backends known by a DNS name (ExternalName Services, the snapshot's `names`): resolved on a
//! thread of their own, never on a worker, by a DNS client that reads the answers' TTLs
//! (hickory; the system resolver, `getaddrinfo`, gives none and blocks). A name is resolved when
//! a snapshot first names it and again when its answer's TTL ends (at least [`MIN_TTL`], at
//! most [`MAX_TTL`] later); when its addresses change, the last snapshot is applied again with
//! them, which swaps endpoint lists only. Until a name resolves, its backend has no endpoint
//! (503); a name that stops resolving keeps its last addresses and is asked again after
//! [`RETRY`].
//!
//! The name servers are the system's (`/etc/resolv.conf`: in a cluster, its DNS with the pod's
//! search domains), or those `--dns-server` names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tidegate_snapshot::{Endpoint, NamedEndpoint, Snapshot};

/// The shortest time addresses are used before the name is asked again, whatever the TTL.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest, whatever the TTL.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(300);
/// When a name that did not resolve is asked again.
pub(crate) const RETRY: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names").finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(crate) struct Names {
    state: Mutex<State>,
    wake: Condvar,
}

/// A name's addresses, and when to ask again.
type Resolved = HashMap<NamedEndpoint, (Vec<SocketAddr>, Instant)>;

#[derive(Default)]
struct State {
    /// The last snapshot applied, when it names backends (applied again as names change).
    last: Option<Snapshot>,
    resolved: Resolved,
}

impl Names {
    /// Applies `snapshot` through `apply` with the addresses its names resolved to so far,
    /// and keeps it for the resolver. Holds the lock throughout, so that the resolver's
    /// re-applying and a new snapshot never cross.
    pub(crate) fn apply<T>(&self, snapshot: &Snapshot, apply: impl FnOnce(&Snapshot) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if snapshot.names.is_empty() {
            state.last = None;
            return apply(snapshot);
        }
        // The filled copy is kept: filling it again replaces the same backends' endpoints.
        let filled = fill(snapshot, &state.resolved);
        let result = apply(&filled);
        state.last = Some(filled);
        self.wake.notify_one();
        result
    }

    /// The resolver's loop: resolves names that are new or due, and re-applies the last
    /// snapshot when any resolved to other addresses. `servers`: the name servers to ask; the
    /// system's when empty.
    pub(crate) fn run(self: Arc<Self>, servers: &[SocketAddr], apply: impl Fn(&Snapshot)) {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the DNS client: ExternalName Services get no endpoints");
                return;
            }
        };
        let resolver = match runtime.block_on(async { client(servers) }) {
            Ok(resolver) => resolver,
            Err(e) => {
                tracing::error!(error = %e, "cannot set the DNS client up: ExternalName Services get no endpoints");
                return;
            }
        };
        loop {
            let due: Vec<NamedEndpoint> = {
                let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let wait = next_due(&state).unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
                let state = self.wake.wait_timeout(state, wait).map_or_else(|e| e.into_inner().0, |r| r.0);
                let Some(last) = &state.last else { continue };
                let now = Instant::now();
                last.names
                    .values()
                    .filter(|n| state.resolved.get(*n).is_none_or(|(_, due)| *due <= now))
                    .cloned()
                    .collect()
            };
            if due.is_empty() {
                continue;
            }
            let mut answers = Vec::new();
            for named in due {
                let found = runtime.block_on(lookup(&resolver, &named));
                if found.is_none() {
                    tracing::warn!(name = %named.name, "ExternalName did not resolve; its last addresses stay");
                }
                answers.push((named, found));
            }
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut changed = false;
            for (named, found) in answers {
                let before = state.resolved.get(&named).map(|(l, _)| l.clone());
                let (list, due) = match found {
                    Some((list, ttl)) => (list, Instant::now() + ttl),
                    None => (before.clone().unwrap_or_default(), Instant::now() + RETRY),
                };
                changed |= before.as_ref() != Some(&list);
                state.resolved.insert(named, (list, due));
            }
            if changed && let Some(last) = &state.last {
                let filled = fill(last, &state.resolved);
                apply(&filled);
            }
        }
    }
}

/// How long until the first name is due (`None`: none resolved yet).
fn next_due(state: &State) -> Option<Duration> {
    let now = Instant::now();
    state.resolved.values().map(|(_, due)| due.saturating_duration_since(now)).min()
}

/// The DNS client: `servers`, or the system's configuration.
fn client(servers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let builder = if servers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder.build().map_err(|e| e.to_string())
}

/// The addresses of `named` and how long they hold (its answer's TTL, within bounds); `None`
/// when it does not resolve.
async fn lookup(resolver: &TokioResolver, named: &NamedEndpoint) -> Option<(Vec<SocketAddr>, Duration)> {
    let answer = resolver.lookup_ip(named.name.as_str()).await.ok()?;
    let ttl = answer.valid_until().saturating_duration_since(Instant::now()).clamp(MIN_TTL, MAX_TTL);
    let mut list: Vec<SocketAddr> = answer.iter().map(|ip| SocketAddr::new(ip, named.port)).collect();
    list.sort();
    list.dedup();
    (!list.is_empty()).then_some((list, ttl))
}

/// `snapshot` with the endpoints of its named backends filled in from `resolved`.
fn fill(snapshot: &Snapshot, resolved: &Resolved) -> Snapshot {
    let mut filled = snapshot.clone();
    for (id, named) in &snapshot.names {
        let endpoints = resolved
            .get(named)
            .map(|(list, _)| list.iter().map(|a| Endpoint { address: a.ip().to_string(), port: a.port() }).collect())
            .unwrap_or_default();
        filled.endpoints.insert(id.clone(), endpoints);
    }
    filled
}
