//! tidegate's data plane.
//!
//! ```text
//! Snapshot ──Proxy::apply──> Runtime::build (router, certificates, endpoints; fallible, off the
//!                            request path) ──> one ArcSwap<Runtime> swap
//!   (ExternalName backends: the resolver thread applies the last snapshot again with their
//!   addresses, `resolver`)
//!
//! worker 1..N (OS thread, current-thread tokio runtime, own SO_REUSEPORT listeners, own epoll
//!   set of client sockets: reactor)
//!   accept ─> TLS (SNI from the current runtime) ─> HTTP/1.x (http1, our own loop) | HTTP/2 (hyper)
//!     request ─> load runtime ─> the request pipeline (`request`):
//!       route ─> rewrite ─> access (policy filters, then Lua) ─> content | upstream
//!         ─> header_filter ─> body_filter ─> log
//!       upstream: canary or main backend ─> session / balancer picks an endpoint (round robin,
//!         EWMA, consistent hash; ejected ones skipped) ─> HTTP/1.1 (our client) or HTTP/2 (h2),
//!         over TCP or TLS, per-worker pool ─> another endpoint while retries allow
//!     response ─> Server, Date, HSTS ─> streamed body ─> metrics + access log at its end
//!   HTTP/1 idle 20 ms ─> parked in its socket's slot (reactor), no task ─(readable)─> new task, loop again
//! ```
//!
//! Requests in flight keep the runtime they started with; a swap affects only new requests. A
//! snapshot that fails to build is refused and the current runtime keeps serving.
// The exceptions: `allocator` is the process's allocator (mimalloc behind `GlobalAlloc`, its
// options, returning free memory), `reactor::watched_epoll_set` registers an owned descriptor
// with tokio, and `reactor::recv_into` reads into a buffer's uninitialized part (as tokio's own
// sockets do).
#![deny(unsafe_code)]

mod access_log;
mod admin;
mod alarm;
mod allocator;
mod body;
mod client_address;
mod connection;
mod extended_connect;
mod framing;
#[doc(hidden)]
pub mod fuzzing;
mod headers;
mod http1;
mod lua_certificate;
mod metrics;
mod passthrough;
mod policy;
mod reactor;
mod request;
mod resolver;
mod respond;
pub mod router;
pub mod runtime;
mod server;
pub mod subscribe;
pub mod tls;
mod upkeep;
mod upstream;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use rustls::sign::CertifiedKey;
use tidegate_snapshot::Snapshot;

pub use allocator::release_free_memory;
pub use runtime::{BuildError, Built, Runtime};
pub use tidegate_lua::network::Network;

/// How the proxy listens and behaves.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Worker threads; at least 1.
    pub workers: usize,
    /// `Strict-Transport-Security: max-age=N` on TLS responses; 0 turns it off.
    pub hsts_max_age: u64,
    /// The port plain-HTTP requests are redirected to; the HTTPS listener's port when `None`
    /// (set it when a Service maps 443 to another port).
    pub https_redirect_port: Option<u16>,
    /// JSON access log lines on stdout.
    pub access_log: bool,
    /// Lua time allowed per request unless a LuaRoute says otherwise.
    pub lua_cpu_budget: std::time::Duration,
    /// Memory allowed to each worker's Lua VM.
    pub lua_memory_limit: usize,
    /// Certificate authorities Lua cosockets trust in `sslhandshake`.
    pub lua_tls_roots: Arc<rustls::RootCertStore>,
    /// Address ranges Lua cosockets may not connect to.
    pub lua_socket_deny: Arc<Vec<tidegate_lua::network::Network>>,
    /// `ngx.log` lines begin as OpenResty's (`[lua] <source>:<line>: `).
    pub lua_openresty_log_lines: bool,
    /// Streams one HTTP/2 client connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub http2_max_concurrent_streams: u32,
    /// Name servers for ExternalName Services; the system's (`/etc/resolv.conf`) when empty.
    pub dns_servers: Vec<SocketAddr>,
}

/// State shared by all workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) runtime: ArcSwap<Runtime>,
    pub(crate) default_certificate: Arc<CertifiedKey>,
    /// Certificates `ssl_certificate` Lua chose, shared by the workers.
    pub(crate) lua_chosen: tls::LuaChosen,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) access_log: access_log::AccessLog,
    pub(crate) ready: AtomicBool,
    pub(crate) status: ArcSwap<Bytes>,
    pub(crate) hsts: Option<HeaderValue>,
    pub(crate) https_port: u16,
    /// Flips to true once: workers stop accepting and close connections when idle.
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
    /// Client connections open now, across workers (what a drain waits for).
    pub(crate) open_connections: AtomicUsize,
    /// Limits of the workers' Lua VMs.
    pub(crate) lua: tidegate_lua::LuaConfig,
    /// Bytes each worker's Lua VM holds, as last seen by that worker.
    pub(crate) lua_memory: Vec<std::sync::atomic::AtomicU64>,
    /// Streams one HTTP/2 client connection may have open at once.
    pub(crate) http2_max_concurrent_streams: u32,
    /// Backends by DNS name, and the resolver's state.
    pub(crate) names: Arc<resolver::Names>,
}

/// Builds a runtime from `snapshot` and swaps it in: the one place a configuration takes effect.
fn build_and_swap(shared: &Shared, snapshot: &Snapshot) -> Result<Applied, BuildError> {
    let started = Instant::now();
    let current = shared.runtime.load();
    let counters = |host: &str, route: &str| shared.metrics.route_counters(host, route);
    let built = match Runtime::build(snapshot, &current, &counters) {
        Ok(b) => b,
        Err(e) => {
            shared.metrics.config_apply_failures.inc();
            return Err(e);
        }
    };
    // Dictionaries first, so that the new routes find theirs; ones no longer declared go.
    let dicts: Vec<(String, String, u64)> =
        snapshot.routing.shared_dicts.iter().map(|d| (d.namespace.clone(), d.name.clone(), d.size)).collect();
    shared.lua.shared_dicts.configure(&dicts);
    let runtime = Arc::new(built.runtime);
    shared.runtime.store(Arc::clone(&runtime));
    let duration = started.elapsed();
    runtime.settle(&snapshot.routing);
    let metrics = &shared.metrics;
    metrics.config_apply_duration.observe(duration.as_secs_f64());
    metrics.config_version.set(i64::try_from(snapshot.version).unwrap_or(i64::MAX));
    Ok(Applied {
        version: snapshot.version,
        warnings: built.warnings,
        routing_rebuilt: built.routing_rebuilt,
        duration,
    })
}

/// The addresses the proxy actually listens on (ports chosen when 0 was asked for).
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot generate the default certificate: {0}")]
    DefaultCertificate(String),
}

/// What applying a snapshot did.
#[derive(Debug)]
pub struct Applied {
    pub version: u64,
    pub warnings: Vec<String>,
    pub routing_rebuilt: bool,
    pub duration: std::time::Duration,
}

/// A running proxy: its workers serve until the process ends.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    addresses: Addresses,
}

impl Proxy {
    /// Binds every listener, then starts the admin thread and the workers. Until the first
    /// [`Proxy::apply`], every request gets 404 and `/readyz` is 503.
    ///
    /// # Errors
    /// When a listener cannot be bound or a thread cannot start.
    pub fn start(config: &ProxyConfig) -> Result<Proxy, StartError> {
        allocator::configure();
        let workers = config.workers.max(1);
        let bind = |addr: SocketAddr, count| {
            server::bind_group(addr, count).map_err(|source| StartError::Bind { addr, source })
        };
        let http = bind(config.http_addr, workers)?;
        let https = bind(config.https_addr, workers)?;
        let admin = std::net::TcpListener::bind(config.admin_addr)
            .map_err(|source| StartError::Bind { addr: config.admin_addr, source })?;
        let _ = admin.set_nonblocking(true);
        let local = |l: &std::net::TcpListener, asked: SocketAddr| l.local_addr().unwrap_or(asked);
        let addresses = Addresses {
            http: http.first().map_or(config.http_addr, |l| local(l, config.http_addr)),
            https: https.first().map_or(config.https_addr, |l| local(l, config.https_addr)),
            admin: local(&admin, config.admin_addr),
        };

        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(Runtime::empty()),
            default_certificate: tls::default_certificate().map_err(StartError::DefaultCertificate)?,
            lua_chosen: tls::LuaChosen::default(),
            metrics: metrics::Metrics::new(workers),
            access_log: access_log::AccessLog::start(config.access_log).map_err(StartError::Thread)?,
            ready: AtomicBool::new(false),
            status: ArcSwap::from_pointee(Bytes::from_static(b"[]")),
            hsts: (config.hsts_max_age > 0)
                .then(|| HeaderValue::from_str(&format!("max-age={}", config.hsts_max_age)).ok())
                .flatten(),
            https_port: config.https_redirect_port.unwrap_or(addresses.https.port()),
            shutdown: tokio::sync::watch::Sender::new(false),
            open_connections: AtomicUsize::new(0),
            lua: tidegate_lua::LuaConfig {
                cpu_budget: config.lua_cpu_budget,
                memory_limit: config.lua_memory_limit,
                worker_id: 0,
                worker_count: workers,
                shared_dicts: tidegate_lua::SharedDicts::new(),
                max_pending_timers: 1024,
                tls_roots: Arc::clone(&config.lua_tls_roots),
                socket_deny: Arc::clone(&config.lua_socket_deny),
                openresty_log_lines: config.lua_openresty_log_lines,
            },
            lua_memory: (0..workers).map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
            http2_max_concurrent_streams: config.http2_max_concurrent_streams.max(1),
            names: Arc::new(resolver::Names::default()),
        });
        let resolving = Arc::clone(&shared);
        let dns_servers = config.dns_servers.clone();
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                let names = Arc::clone(&resolving.names);
                names.run(&dns_servers, |snapshot| match build_and_swap(&resolving, snapshot) {
                    Ok(applied) => tracing::info!(
                        version = applied.version,
                        apply_ms = applied.duration.as_secs_f64() * 1000.0,
                        "ExternalName addresses changed; endpoints swapped"
                    ),
                    Err(e) => tracing::error!(error = %e, "ExternalName addresses could not be applied"),
                });
            })
            .map_err(StartError::Thread)?;

        let admin_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                if let Err(e) = admin::run(admin_shared, admin) {
                    tracing::error!(error = %e, "admin server stopped");
                }
            })
            .map_err(StartError::Thread)?;

        let tls_config = tls::server_configs(Arc::clone(&shared));
        for (index, (http, https)) in http.into_iter().zip(https).enumerate() {
            let shared = Arc::clone(&shared);
            let tls_config = tls_config.clone();
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    if let Err(e) = server::run_worker(index, shared, http, https, tls_config) {
                        tracing::error!(worker = index, error = %e, "worker stopped");
                    }
                })
                .map_err(StartError::Thread)?;
        }
        Ok(Proxy { shared, addresses })
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// Builds a runtime for the snapshot and swaps it in. Readiness is the caller's to declare
    /// ([`Proxy::set_ready`]) once everything that goes with the configuration is published.
    ///
    /// # Errors
    /// When the snapshot does not build; the current runtime keeps serving.
    pub fn apply(&self, snapshot: &Snapshot) -> Result<Applied, BuildError> {
        // Backends by name get the addresses resolved so far; the resolver follows them.
        let names = Arc::clone(&self.shared.names);
        names.apply(snapshot, |snapshot| build_and_swap(&self.shared, snapshot))
    }

    /// Stops taking new connections, lets open ones finish their requests (HTTP/1.1 connections
    /// close after the response in progress, HTTP/2 ones get GOAWAY), and returns once none is
    /// left or `limit` has passed, with the number still open. `/readyz` answers 503 from the
    /// start, so a load balancer stops sending traffic here.
    pub fn drain(&self, limit: std::time::Duration) -> usize {
        self.shared.ready.store(false, Ordering::Release);
        self.shared.shutdown.send_replace(true);
        let deadline = Instant::now() + limit;
        loop {
            let open = self.shared.open_connections.load(Ordering::Acquire);
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// `/readyz` answers 200 from now on (until a drain starts).
    pub fn set_ready(&self) {
        self.shared.ready.store(true, Ordering::Release);
    }

    /// Publishes the per-object statuses served at `/status` (JSON).
    pub fn set_status(&self, json: Bytes, rejected_objects: usize) {
        self.shared.status.store(Arc::new(json));
        self.shared.metrics.rejected_objects.set(i64::try_from(rejected_objects).unwrap_or(i64::MAX));
    }
}
