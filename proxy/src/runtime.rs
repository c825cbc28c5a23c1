//! A [`Runtime`]: everything a snapshot becomes, built off the request path before the swap.
//!
//! # Guarantees
//! - All fallible work (parsing certificates, checking endpoints, building the router) happens in
//!   [`Runtime::build`]; a snapshot that fails to build never reaches a worker.
//! - When only endpoints changed, the router and certificates of the current runtime are reused
//!   as they are: endpoint churn costs a new endpoint table, nothing more.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use tidegate_snapshot::{BackendId, Routing, Snapshot};

use crate::router::{CounterFactory, Router};
use crate::tls::CertStore;

/// What requests are served with. Requests hold an `Arc<Runtime>` for their whole life, so a
/// swap never changes a request in flight.
#[derive(Debug)]
pub struct Runtime {
    pub version: u64,
    pub(crate) routing: Arc<RoutingState>,
    pub(crate) upstreams: Arc<Upstreams>,
}

/// The parts built from [`Routing`].
#[derive(Debug)]
pub(crate) struct RoutingState {
    /// What it was built from, as [`fingerprint`] tells. Computed during the build when the
    /// routing before had as many virtual hosts (otherwise the two differ anyway), else right
    /// after the swap ([`Runtime::settle`]), off the way of the change.
    fingerprint: OnceLock<u64>,
    virtual_hosts: usize,
    pub(crate) router: Router,
    pub(crate) certificates: CertStore,
    /// Ids (as workers cache them) of the compiled scripts this routing uses.
    pub(crate) script_ids: std::collections::HashSet<u64>,
    /// The compiled scripts by snapshot id, for the next build to reuse.
    scripts: HashMap<String, Arc<tidegate_lua::Script>>,
    /// Who the client is behind a load balancer (`use-proxy-protocol`, `use-forwarded-headers`).
    pub(crate) client_rules: crate::client_address::ClientRules,
    /// `Strict-Transport-Security` as the configuration sets it (`Some(None)`: none); the
    /// proxy's own when `None`.
    pub(crate) hsts: Option<Option<http::HeaderValue>>,
    /// HTTP/2 streams per client connection, when the configuration sets it.
    pub(crate) http2_max_concurrent_streams: Option<u32>,
    /// HTTP/1 client connections' timeouts and request limit.
    pub(crate) client_limits: crate::http1::Limits,
    /// Which TLS versions clients may use (`ssl-protocols`).
    pub(crate) client_tls_versions: TlsVersions,
    /// The TLS 1.2 suites clients may use, by IANA name (`ssl-ciphers`); rustls' when empty.
    pub(crate) client_tls12_ciphers: Vec<String>,
    /// Upstream keep-alive (`upstream-keepalive-*`), which each worker's pool takes.
    pub(crate) pool_limits: crate::upstream::PoolLimits,
    /// `ssl-passthrough` hosts and their backends (empty: TLS connections are not peeked at).
    pub(crate) passthrough: HashMap<String, tidegate_snapshot::BackendId>,
    /// The access log's line format (`log-format-upstream`); JSON lines when `None`.
    pub(crate) access_log_format: Option<Arc<crate::access_log::LineFormat>>,
    /// Each namespace's Lua modules and module-level code, compiled, for the workers' VMs.
    pub(crate) lua_namespaces: HashMap<String, Arc<tidegate_lua::NamespaceCode>>,
    /// `ssl_certificate` handlers, compiled, in the snapshot's order.
    pub(crate) lua_certificates: Vec<LuaCertificateHandler>,
}

/// A LuaRoute's `sslCertificate` handler, compiled.
#[derive(Debug)]
pub(crate) struct LuaCertificateHandler {
    pub(crate) hosts: Vec<tidegate_snapshot::HostMatch>,
    pub(crate) namespace: Arc<str>,
    pub(crate) name: Arc<str>,
    pub(crate) script: Arc<tidegate_lua::Script>,
    /// How long what it chose serves the name.
    pub(crate) cache: std::time::Duration,
    pub(crate) budget: Option<std::time::Duration>,
}

impl RoutingState {
    /// The `ssl_certificate` handler that serves handshakes for `name`, if any: the first whose
    /// hosts match (exactly, or `*.suffix` for one more label).
    pub(crate) fn lua_certificate_for(&self, name: &str) -> Option<&LuaCertificateHandler> {
        use tidegate_snapshot::HostMatch;
        let name = name.to_ascii_lowercase();
        self.lua_certificates.iter().find(|handler| {
            handler.hosts.iter().any(|host| match host {
                HostMatch::Exact(exact) => *exact == name,
                HostMatch::Wildcard(suffix) => name
                    .strip_suffix(suffix.as_str())
                    .and_then(|front| front.strip_suffix('.'))
                    .is_some_and(|label| !label.is_empty() && !label.contains('.')),
                HostMatch::Any => false,
            })
        })
    }
}

/// The TLS versions clients may use: an index into the server configurations made at start
/// ([`crate::tls::ServerConfigs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlsVersions {
    Both = 0,
    Tls13 = 1,
    Tls12 = 2,
}

impl TlsVersions {
    fn of(versions: &[tidegate_snapshot::TlsVersion]) -> TlsVersions {
        use tidegate_snapshot::TlsVersion;
        match (versions.contains(&TlsVersion::Tls12), versions.contains(&TlsVersion::Tls13)) {
            (false, true) => TlsVersions::Tls13,
            (true, false) => TlsVersions::Tls12,
            _ => TlsVersions::Both,
        }
    }
}

/// Ready endpoints of every backend.
#[derive(Debug, Default)]
pub(crate) struct Upstreams {
    /// Looked up on every proxied request: foldhash, not SipHash (the keys are configuration).
    backends: foldhash::HashMap<BackendId, Backend>,
}

/// A backend's endpoints, and what its balancers keep about them.
pub(crate) type Backend = crate::upstream::Endpoints;

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("backend {backend}: endpoint address {address:?} is not an IP address")]
    BadEndpoint { backend: BackendId, address: String },
    #[error("Lua {name}: {error}")]
    Lua { name: String, error: tidegate_lua::CompileError },
    #[error("{0}")]
    Routing(String),
}

/// A runtime ready to swap in, with what was noticed while building it.
#[derive(Debug)]
pub struct Built {
    pub runtime: Runtime,
    /// Problems that degrade one host (a certificate that does not load) but refuse nothing.
    pub warnings: Vec<String>,
    /// False when only endpoints changed and the router was reused.
    pub routing_rebuilt: bool,
}

impl Runtime {
    /// The runtime before any snapshot: every request gets 404.
    pub(crate) fn empty() -> Self {
        Runtime {
            version: 0,
            routing: Arc::new(RoutingState {
                fingerprint: OnceLock::from(fingerprint(&Routing::default())),
                virtual_hosts: 0,
                router: Router::default(),
                certificates: CertStore::default(),
                script_ids: std::collections::HashSet::new(),
                scripts: HashMap::new(),
                client_rules: crate::client_address::ClientRules::default(),
                hsts: None,
                http2_max_concurrent_streams: None,
                client_limits: crate::http1::Limits::of(&tidegate_snapshot::ClientConnections::default()),
                client_tls_versions: TlsVersions::Both,
                client_tls12_ciphers: Vec::new(),
                pool_limits: crate::upstream::PoolLimits::of(&tidegate_snapshot::UpstreamConnections::default()),
                passthrough: HashMap::new(),
                access_log_format: None,
                lua_namespaces: HashMap::new(),
                lua_certificates: Vec::new(),
            }),
            upstreams: Arc::new(Upstreams::default()),
        }
    }

    /// Builds a runtime for `snapshot`, reusing from `current` what did not change.
    ///
    /// # Errors
    /// When the snapshot holds something no request could be served with.
    pub fn build(snapshot: &Snapshot, current: &Runtime, counters: CounterFactory<'_>) -> Result<Built, BuildError> {
        let upstreams = Arc::new(Upstreams::build(snapshot)?);
        let virtual_hosts = snapshot.routing.virtual_hosts.len();
        let fingerprint = (virtual_hosts == current.routing.virtual_hosts).then(|| fingerprint(&snapshot.routing));
        if fingerprint.is_some() && current.routing.fingerprint.get() == fingerprint.as_ref() {
            let runtime = Runtime { version: snapshot.version, routing: Arc::clone(&current.routing), upstreams };
            return Ok(Built { runtime, warnings: Vec::new(), routing_rebuilt: false });
        }
        // Ids are content hashes: a script the current routing compiled is reused as it is.
        let mut scripts = HashMap::with_capacity(snapshot.routing.scripts.len());
        for script in &snapshot.routing.scripts {
            let compiled = match current.routing.scripts.get(&script.id) {
                Some(compiled) => Arc::clone(compiled),
                None => Arc::new(
                    tidegate_lua::compile(&script.name, &script.source)
                        .map_err(|error| BuildError::Lua { name: script.name.clone(), error })?,
                ),
            };
            scripts.insert(script.id.clone(), compiled);
        }
        let router =
            Router::new(&snapshot.routing, &scripts, counters, &current.routing.router).map_err(BuildError::Routing)?;
        let script_ids = scripts.values().map(|s| s.id).collect();
        let lua_namespaces = lua_namespaces(&snapshot.routing, &scripts, &current.routing.lua_namespaces);
        let (certificates, warnings) = CertStore::build(&snapshot.routing, &current.routing.certificates);
        let fingerprint = fingerprint.map_or_else(OnceLock::new, OnceLock::from);
        let client_rules = crate::client_address::ClientRules::new(&snapshot.routing.client_address);
        let hsts = snapshot
            .routing
            .hsts
            .as_deref()
            .map(|value| (!value.is_empty()).then(|| http::HeaderValue::from_str(value).ok()).flatten());
        let lua_certificates: Vec<LuaCertificateHandler> = snapshot
            .routing
            .lua_certificates
            .iter()
            .filter_map(|c| {
                Some(LuaCertificateHandler {
                    hosts: c.hosts.clone(),
                    namespace: c.namespace.as_str().into(),
                    name: c.name.as_str().into(),
                    script: Arc::clone(scripts.get(&c.script)?),
                    cache: std::time::Duration::from_millis(c.cache_ms),
                    budget: c.cpu_budget_ms.map(std::time::Duration::from_millis),
                })
            })
            .collect();
        let routing = RoutingState {
            router,
            certificates,
            script_ids,
            scripts,
            fingerprint,
            virtual_hosts,
            client_rules,
            hsts,
            http2_max_concurrent_streams: snapshot.routing.http2_max_concurrent_streams,
            client_limits: crate::http1::Limits::of(&snapshot.routing.client_connections),
            client_tls_versions: TlsVersions::of(&snapshot.routing.client_tls_versions),
            client_tls12_ciphers: snapshot.routing.client_tls12_ciphers.clone(),
            pool_limits: crate::upstream::PoolLimits::of(&snapshot.routing.upstream_connections),
            passthrough: snapshot.routing.passthrough.iter().map(|p| (p.host.clone(), p.backend.clone())).collect(),
            access_log_format: snapshot
                .routing
                .access_log_format
                .as_ref()
                .map(|f| Arc::new(crate::access_log::LineFormat::compile(f))),
            lua_namespaces,
            lua_certificates,
        };
        let runtime = Runtime { version: snapshot.version, routing: Arc::new(routing), upstreams };
        Ok(Built { runtime, warnings, routing_rebuilt: true })
    }
}

impl Runtime {
    /// Completes what the build left for after the swap: the fingerprint of `routing`, the one
    /// this runtime was built from.
    pub(crate) fn settle(&self, routing: &Routing) {
        self.routing.fingerprint.get_or_init(|| fingerprint(routing));
    }
}

/// The namespaces' modules and module-level code with their compiled scripts; a namespace's
/// code that did not change is the current one (the same `Arc`), which workers keep as it is.
fn lua_namespaces(
    routing: &Routing,
    scripts: &HashMap<String, Arc<tidegate_lua::Script>>,
    current: &HashMap<String, Arc<tidegate_lua::NamespaceCode>>,
) -> HashMap<String, Arc<tidegate_lua::NamespaceCode>> {
    let mut code = HashMap::with_capacity(routing.lua_namespaces.len());
    for namespace in &routing.lua_namespaces {
        let modules = namespace
            .modules
            .iter()
            .filter_map(|m| Some((m.name.clone(), Arc::clone(scripts.get(&m.script)?))))
            .collect();
        let compiled = |ids: &[String]| ids.iter().filter_map(|id| scripts.get(id).cloned()).collect();
        let made = tidegate_lua::NamespaceCode {
            modules,
            init: compiled(&namespace.init),
            init_worker: compiled(&namespace.init_worker),
        };
        let made = match current.get(&namespace.namespace) {
            Some(same) if **same == made => Arc::clone(same),
            _ => Arc::new(made),
        };
        code.insert(namespace.namespace.clone(), made);
    }
    code
}

/// Tells whether a new snapshot changes the routing without keeping a copy of the old one (at
/// 10,000 virtual hosts, copying took 12 ms of every change). The hash keys are random per
/// process, so no object can be crafted to collide with another routing.
fn fingerprint(routing: &Routing) -> u64 {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    KEYS.get_or_init(RandomState::new).hash_one(routing)
}

impl Upstreams {
    fn build(snapshot: &Snapshot) -> Result<Self, BuildError> {
        let mut backends = foldhash::HashMap::with_capacity_and_hasher(
            snapshot.endpoints.len(),
            foldhash::fast::RandomState::default(),
        );
        for (id, endpoints) in &snapshot.endpoints {
            let mut addresses = Vec::with_capacity(endpoints.len());
            for endpoint in endpoints {
                let ip: IpAddr = endpoint
                    .address
                    .parse()
                    .map_err(|_| BuildError::BadEndpoint { backend: id.clone(), address: endpoint.address.clone() })?;
                addresses.push(SocketAddr::new(ip, endpoint.port));
            }
            backends.insert(id.clone(), Backend::new(addresses));
        }
        Ok(Upstreams { backends })
    }

    pub(crate) fn get(&self, id: &BackendId) -> Option<&Backend> {
        self.backends.get(id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tidegate_snapshot::Endpoint;

    use super::*;

    fn no_counters(_: &str, _: &str) -> crate::router::RouteCounters {
        crate::router::RouteCounters::default()
    }

    fn snapshot(version: u64, endpoints: &[(&str, u16)]) -> Snapshot {
        let list = endpoints.iter().map(|(a, p)| Endpoint { address: (*a).into(), port: *p }).collect();
        let routing = Routing {
            default_backend: Some(tidegate_snapshot::RouteAction {
                backend: Some(BackendId("b".into())),
                timeouts: tidegate_snapshot::Timeouts::default(),
                lua: None,
                policies: tidegate_snapshot::Policies::default(),
                upstream: Default::default(),
                canary: None,
                refusal: None,
            }),
            ..Routing::default()
        };
        Snapshot {
            version,
            content: 0,
            routing,
            endpoints: BTreeMap::from([(BackendId("b".into()), list)]),
            names: BTreeMap::new(),
        }
    }

    #[test]
    fn endpoint_only_changes_reuse_the_router() {
        let first = Runtime::build(&snapshot(1, &[("127.0.0.1", 1)]), &Runtime::empty(), &no_counters).expect("builds");
        assert!(first.routing_rebuilt);
        let second = Runtime::build(&snapshot(2, &[("127.0.0.1", 2)]), &first.runtime, &no_counters).expect("builds");
        assert!(!second.routing_rebuilt);
        assert!(Arc::ptr_eq(&first.runtime.routing, &second.runtime.routing));
    }

    /// A routing with a new number of virtual hosts is fingerprinted after the swap: the next
    /// endpoint-only change still reuses it.
    #[test]
    fn endpoint_only_changes_reuse_a_router_fingerprinted_after_the_swap() {
        let with_host = |version, port| {
            let mut s = snapshot(version, &[("127.0.0.1", port)]);
            s.routing.virtual_hosts.push(tidegate_snapshot::VirtualHost {
                host: tidegate_snapshot::HostMatch::Exact("a.test".into()),
                routes: Vec::new(),
                tls: None,
            });
            s
        };
        let (one, two) = (with_host(1, 1), with_host(2, 2));
        let first = Runtime::build(&one, &Runtime::empty(), &no_counters).expect("builds");
        let unsettled = Runtime::build(&two, &first.runtime, &no_counters).expect("builds");
        assert!(unsettled.routing_rebuilt, "no fingerprint yet: rebuilt rather than guessed");
        first.runtime.settle(&one.routing);
        let second = Runtime::build(&two, &first.runtime, &no_counters).expect("builds");
        assert!(!second.routing_rebuilt);
        assert!(Arc::ptr_eq(&first.runtime.routing, &second.runtime.routing));
    }

    #[test]
    fn round_robin_over_endpoints() {
        let built =
            Runtime::build(&snapshot(1, &[("127.0.0.1", 1), ("127.0.0.1", 2)]), &Runtime::empty(), &no_counters)
                .expect("builds");
        let backend = built.runtime.upstreams.get(&BackendId("b".into())).expect("backend");
        let balance = tidegate_snapshot::Balance::RoundRobin;
        let ports: Vec<u16> =
            (0..4).filter_map(|_| backend.pick(&balance, None, &[])).map(|p| p.address.port()).collect();
        assert_eq!(ports, vec![1, 2, 1, 2]);
    }

    #[test]
    fn lua_that_does_not_compile_refuses_the_snapshot() {
        let mut broken = snapshot(1, &[("127.0.0.1", 1)]);
        broken.routing.scripts.push(tidegate_snapshot::LuaScript {
            id: "x".into(),
            name: "bad".into(),
            source: "if then".into(),
        });
        let error = Runtime::build(&broken, &Runtime::empty(), &no_counters).expect_err("refused");
        assert!(error.to_string().starts_with("Lua bad: line 1"), "{error}");
    }

    #[test]
    fn a_bad_endpoint_refuses_the_snapshot() {
        assert!(Runtime::build(&snapshot(1, &[("not-an-ip", 1)]), &Runtime::empty(), &no_counters).is_err());
    }
}
