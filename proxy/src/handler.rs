//! One request, start to finish: route, redirect, run Lua or proxy, then the response headers
//! every answer carries, then metrics, the Lua log phase and the access log once the body is done.
//!
//! Handlers cannot fail: every error becomes a response here (404 no route, 500 Lua failure, 502
//! upstream refused or broke, 503 no ready endpoint, 504 upstream timeout), never a dropped
//! connection.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use tidegate_lua::{RequestId, Vm};

use crate::Shared;
use crate::access_log::Entry;
use crate::body::{ClientBody, IdleTimeout, LocalBody, Observed, full};
use crate::headers::{Forwarded, strip_hop_by_hop};
use crate::http1::{Detached, OnUpgrade};
use crate::reactor::Reactor;
use crate::router::{Match, RequestFacts, Target};
use crate::runtime::Runtime;
use crate::server::ConnectionGuard;
use crate::upstream::{Pool, RequestBody};

/// State of one worker thread, shared by its connections; never crosses threads.
pub(crate) struct Worker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Rc<Pool>,
    /// The worker's client sockets, and its HTTP/1 connections waiting without a task.
    pub(crate) reactor: Reactor<ConnectionGuard>,
    pub(crate) vm: Rc<Vm>,
    pub(crate) id: usize,
    /// Runtime version whose scripts the VM's cache was last trimmed to.
    pub(crate) scripts_version: Cell<u64>,
    /// Lua requests started (the sequence of their ids).
    pub(crate) requests: Cell<u64>,
    /// Requests started, of every kind (what tells the worker's upkeep it is quiet).
    pub(crate) started: Cell<u64>,
    /// The runtime this worker serves with, refreshed when the shared one is swapped: requests
    /// clone this `Rc` rather than the shared `Arc`, whose counter every worker would contend on.
    #[allow(clippy::redundant_allocation)]
    pub(crate) runtime: RefCell<Rc<Arc<Runtime>>>,
}

impl Worker {
    /// A request id unique in this process.
    pub(crate) fn next_request_id(&self) -> RequestId {
        static PROCESS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let sequence = self.requests.get().wrapping_add(1);
        self.requests.set(sequence);
        RequestId {
            process: *PROCESS.get_or_init(std::process::id),
            worker: u32::try_from(self.id).unwrap_or(u32::MAX),
            sequence,
        }
    }

    /// Publishes how much memory this worker's Lua VM holds (read by `/metrics`).
    pub(crate) fn note_lua_memory(&self) {
        if let Some(slot) = self.shared.lua_memory.get(self.id) {
            slot.store(u64::try_from(self.vm.used_memory()).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[allow(clippy::redundant_allocation)]
    fn current_runtime(&self) -> Rc<Arc<Runtime>> {
        let latest = self.shared.runtime.load();
        let mut cached = self.runtime.borrow_mut();
        if !Arc::ptr_eq(&latest, &**cached) {
            *cached = Rc::new(Arc::clone(&latest));
        }
        Rc::clone(&cached)
    }

    /// Drops loaded scripts that the current runtime no longer uses.
    fn trim_scripts(&self, runtime: &Runtime) {
        if self.scripts_version.replace(runtime.version) != runtime.version {
            let keep = &runtime.routing.script_ids;
            self.vm.retain_scripts(|id| keep.contains(&id));
        }
    }
}

/// What a request knows about its connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) remote: SocketAddr,
    /// The client address as a header value, formatted once per connection, when a request
    /// first needs it (one going upstream).
    client_ip: std::cell::OnceCell<HeaderValue>,
    pub(crate) local_port: u16,
    pub(crate) tls: bool,
}

impl Connection {
    pub(crate) fn new(remote: SocketAddr, local_port: u16, tls: bool) -> Connection {
        Connection { remote, client_ip: std::cell::OnceCell::new(), local_port, tls }
    }

    /// What the upstream is told of the client (`X-Forwarded-*`).
    pub(crate) fn forwarded(&self) -> Forwarded<'_> {
        let client_ip = self.client_ip.get_or_init(|| crate::headers::client_ip_value(self.remote));
        Forwarded { client_ip, https: self.tls, port: self.local_port }
    }
}

/// Filled in while the request is handled, written out when its body is done.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) route: Option<Arc<str>>,
    pub(crate) upstream: Option<SocketAddr>,
    pub(crate) upstream_time: Option<Duration>,
    /// Runs once the response body is done, with the bytes sent (the Lua log phase).
    pub(crate) after: Option<Box<dyn FnOnce(u64)>>,
}

pub(crate) async fn handle(
    worker: Rc<Worker>,
    conn: Rc<Connection>,
    request: Request<ClientBody>,
) -> Response<Observed> {
    let started = Instant::now();
    worker.started.set(worker.started.get().wrapping_add(1));
    let runtime = worker.current_runtime();
    worker.trim_scripts(&runtime);
    let logging = worker.shared.access_log.enabled();
    let method = request.method().clone();
    let version = request.version();
    let path = if logging { request.uri().path().to_owned() } else { String::new() };
    let host = request_host(&request).to_owned();
    let mut outcome = Outcome::default();

    let remote = conn.remote;
    let mut response = match route(&worker, &runtime, &conn, &host, &request, &mut outcome) {
        Routed::Answer(response) => response,
        Routed::Target(target) => {
            // Each way of serving keeps its state in a box of its own, for as long as it runs:
            // inline, every request would carry the largest of them (the upstream exchange's)
            // whichever it takes, and a Lua route answering by itself would hold the upstream
            // state it never uses for as long as it sleeps.
            let response = match &target.lua {
                Some(chain) => {
                    Box::pin(crate::lua_flow::serve(
                        &worker,
                        &runtime,
                        &conn,
                        target,
                        chain,
                        &host,
                        request,
                        &mut outcome,
                    ))
                    .await
                }
                None => Box::pin(proxy(&worker, &runtime, &conn, target, request, &mut outcome)).await,
            };
            target.counters.count(response.status().as_u16());
            response
        }
    };
    finish_headers(&worker.shared, conn.tls, version, &mut response);
    let status = response.status();

    let metrics = &worker.shared.metrics;
    metrics.request_duration.observe(worker.id, started.elapsed().as_secs_f64());
    if let Some(t) = outcome.upstream_time {
        metrics.upstream_duration.observe(worker.id, t.as_secs_f64());
    }

    let shared = Arc::clone(&worker.shared);
    let after = outcome.after.take();
    let on_done = Box::new(move |bytes_sent: u64, completed: bool| {
        if let Some(after) = after {
            after(bytes_sent);
        }
        if !logging {
            return;
        }
        let entry = Entry {
            ts: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default(),
            remote_addr: remote.ip().to_canonical().to_string(),
            method: method.to_string(),
            host,
            path,
            protocol: protocol_name(version),
            status: status.as_u16(),
            bytes_sent,
            completed,
            request_time_ms: started.elapsed().as_secs_f64() * 1000.0,
            upstream: outcome.upstream.map(|u| u.to_string()),
            upstream_time_ms: outcome.upstream_time.map(|t| t.as_secs_f64() * 1000.0),
            route: outcome.route.map(|r| r.to_string()),
        };
        if !shared.access_log.record(&entry) {
            shared.metrics.access_log_dropped.inc();
        }
    });
    response.map(|body| Observed::new(body, on_done))
}

/// Where routing sent a request: a target to serve, or an answer already.
enum Routed<'a> {
    Target(&'a Target),
    Answer(Response<LocalBody>),
}

/// Finds the request's route, and answers what needs no serving: no route (404), plain HTTP
/// to a TLS host (308) and a route the controller refused (500 misconfigured, 503 asking for a
/// protection tidegate does not honour).
fn route<'a>(
    worker: &Worker,
    runtime: &'a Runtime,
    conn: &Connection,
    host: &str,
    request: &Request<ClientBody>,
    outcome: &mut Outcome,
) -> Routed<'a> {
    let facts = RequestFacts { method: request.method().as_str(), headers: request.headers() };
    let target = match runtime.routing.router.find(host, request.uri().path(), facts) {
        Match::NotFound => {
            worker.shared.metrics.unmatched.count(404);
            return Routed::Answer(text(StatusCode::NOT_FOUND, "404 page not found\n"));
        }
        Match::Route(target) | Match::DefaultBackend(target) => target,
    };
    outcome.route = Some(Arc::clone(&target.name));
    let answer = |response: Response<LocalBody>| {
        target.counters.count(response.status().as_u16());
        Routed::Answer(response)
    };
    if target.ssl_redirect && !conn.tls {
        return answer(redirect_to_https(&worker.shared, host, request.uri()));
    }
    if let Some(refusal) = &target.action.refusal {
        // The controller reported the cause; here the route only has to stay closed.
        tracing::debug!(route = &*target.name, reason = refusal.reason, status = refusal.status, "route refused");
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return answer(crate::lua_flow::error_response(status));
    }
    Routed::Target(target)
}

/// Proxies a request as it came.
async fn proxy(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    mut request: Request<ClientBody>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    // The HTTP/1 loop gives an upgrade request (and only one) the means to switch.
    let client_upgrade = crate::http1::on_upgrade(&mut request);
    let upgrade = client_upgrade.is_some();
    let (mut parts, body) = request.into_parts();
    prepare_upstream(&mut parts, upgrade);
    let upstream_request = Request::from_parts(parts, LocalBody::new(body));
    forward(worker, runtime, conn, target, upstream_request, client_upgrade, outcome).await
}

/// Turns client request parts into what an upstream gets: origin-form URI over HTTP/1.1, a
/// `Host`, and no hop-by-hop headers. The `X-Forwarded-*` headers are written on the way out
/// ([`Connection::forwarded`]).
pub(crate) fn prepare_upstream(parts: &mut Parts, upgrade: bool) {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(header::HOST)
        && let Some(value) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = origin_form(std::mem::take(&mut parts.uri));
    parts.version = Version::HTTP_11;
}

/// Sends a prepared request to the backend and turns the answer, or the failure, into a
/// response.
pub(crate) async fn forward(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    upstream_request: Request<RequestBody>,
    client_upgrade: Option<OnUpgrade>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    let (backend, timeouts) = (target.action.backend.as_ref(), target.action.timeouts);
    let Some(endpoint) = backend.and_then(|b| runtime.upstreams.get(b)).and_then(|b| b.pick()) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "503 no ready endpoint for this backend\n");
    };
    outcome.upstream = Some(endpoint);
    let sent = Instant::now();
    let result = worker.pool.send(endpoint, upstream_request, Some(conn.forwarded()), timeouts).await;
    outcome.upstream_time = Some(sent.elapsed());
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(backend = %backend.map(ToString::to_string).unwrap_or_default(), error = %e, "upstream request failed");
            let status = e.status();
            return text(status, &format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or("")));
        }
    };
    // The upstream's hop-by-hop headers stayed out of the response (`wire::parse_response`),
    // but for a protocol switch's.
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(response.headers_mut(), true);
        if let Some(client_upgrade) = client_upgrade
            && let Some(upstream) = response.body_mut().take_switched()
        {
            tokio::task::spawn_local(tunnel(client_upgrade, upstream));
        }
    }
    let read_timeout = Duration::from_millis(timeouts.read_ms);
    response.map(|body| LocalBody::new(IdleTimeout::new(body, read_timeout)))
}

/// Copies bytes both ways between an upgraded client and upstream connection until either ends.
async fn tunnel(client: OnUpgrade, mut upstream: Detached) {
    let Some(mut client) = client.wait().await else {
        tracing::debug!("protocol switch did not complete: the client connection ended");
        return;
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel closed with an error");
    }
}

/// The host a request is for, without port: the URI authority (HTTP/2, absolute-form) or the
/// `Host` header.
fn request_host(request: &Request<ClientBody>) -> &str {
    let raw = match request.uri().authority() {
        Some(a) => a.as_str(),
        None => request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""),
    };
    strip_port(raw)
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_once(']').map_or(authority, |(h, _)| &authority[..=h.len()]);
    }
    authority.split_once(':').map_or(authority, |(h, _)| h)
}

/// `/path?query`, as an HTTP/1.1 origin server expects it.
fn origin_form(uri: Uri) -> Uri {
    // What an HTTP/1 client sends, usually: nothing to take off.
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path().starts_with('/') {
        return uri;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    path.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

fn redirect_to_https(shared: &Shared, host: &str, uri: &Uri) -> Response<LocalBody> {
    let port = match shared.https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut response = text(StatusCode::PERMANENT_REDIRECT, "308 Permanent Redirect\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<LocalBody> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

/// Headers every response carries: our `Server` and a fresh `Date` unless set (nginx lets Lua
/// set them too), and HSTS on TLS. The HTTP/1 encoder writes `Server` and `Date` itself
/// (`http1::encode_head`), so that they never enter the map; hyper writes HTTP/2 responses
/// from the map, which then gets them here.
fn finish_headers(shared: &Shared, tls: bool, version: Version, response: &mut Response<LocalBody>) {
    let headers = response.headers_mut();
    if version == Version::HTTP_2 {
        if !headers.contains_key(header::SERVER) {
            headers.insert(header::SERVER, HeaderValue::from_static(crate::headers::SERVER_NAME));
        }
        if !headers.contains_key(header::DATE) {
            headers.insert(header::DATE, crate::headers::http_date());
        }
    }
    if tls
        && let Some(hsts) = &shared.hsts
        && !headers.contains_key(header::STRICT_TRANSPORT_SECURITY)
    {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.com:8080"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn origin_form_keeps_path_and_query() {
        let uri: Uri = "http://a.com:80/x/y?z=1".parse().expect("uri");
        assert_eq!(origin_form(uri), "/x/y?z=1");
        assert_eq!(origin_form(Uri::from_static("http://a.com")), "/");
        assert_eq!(origin_form(Uri::from_static("/a?b")), "/a?b");
    }
}
