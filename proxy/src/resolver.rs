//! Backends known by a DNS name (ExternalName Services, the snapshot's `names`): resolved on a
//! thread of their own, since the system resolver blocks, and never on a worker. A name is
//! resolved when a snapshot first names it and again every [`REFRESH`] (as ingress-nginx's
//! `resolver ... valid=30s`); when its addresses change, the last snapshot is applied again
//! with them, which swaps endpoint lists only. Until a name resolves, its backend has no
//! endpoint (503); a name that stops resolving keeps its last addresses.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tidegate_snapshot::{Endpoint, NamedEndpoint, Snapshot};

/// How long resolved addresses are used before the name is resolved again.
pub(crate) const REFRESH: Duration = Duration::from_secs(30);

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

#[derive(Default)]
struct State {
    /// The last snapshot applied, when it names backends (applied again as names change).
    last: Option<Snapshot>,
    resolved: HashMap<NamedEndpoint, (Vec<SocketAddr>, Instant)>,
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
    /// snapshot when any resolved to other addresses.
    pub(crate) fn run(self: Arc<Self>, apply: impl Fn(&Snapshot)) {
        loop {
            let due: Vec<NamedEndpoint> = {
                let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let state =
                    self.wake.wait_timeout(state, Duration::from_secs(1)).map_or_else(|e| e.into_inner().0, |r| r.0);
                let Some(last) = &state.last else { continue };
                last.names
                    .values()
                    .filter(|n| state.resolved.get(*n).is_none_or(|(_, at)| at.elapsed() >= REFRESH))
                    .cloned()
                    .collect()
            };
            if due.is_empty() {
                continue;
            }
            let mut answers = Vec::new();
            for named in due {
                let found = (named.name.as_str(), named.port).to_socket_addrs().map(|a| {
                    let mut list: Vec<SocketAddr> = a.collect();
                    list.sort();
                    list.dedup();
                    list
                });
                match found {
                    Ok(list) if !list.is_empty() => answers.push((named, Some(list))),
                    Ok(_) | Err(_) => {
                        tracing::warn!(name = %named.name, "ExternalName did not resolve; its last addresses stay");
                        answers.push((named, None));
                    }
                }
            }
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut changed = false;
            for (named, list) in answers {
                let before = state.resolved.get(&named).map(|(l, _)| l.clone());
                let list = list.or(before.clone()).unwrap_or_default();
                changed |= before.as_ref() != Some(&list);
                state.resolved.insert(named, (list, Instant::now()));
            }
            if changed && let Some(last) = &state.last {
                let filled = fill(last, &state.resolved);
                apply(&filled);
            }
        }
    }
}

/// `snapshot` with the endpoints of its named backends filled in from `resolved`.
fn fill(snapshot: &Snapshot, resolved: &HashMap<NamedEndpoint, (Vec<SocketAddr>, Instant)>) -> Snapshot {
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
