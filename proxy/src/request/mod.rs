//! The request pipeline: one request, start to finish, as a fixed sequence of steps over one
//! context (the request, its [`Connection`] and a [`context::Outcome`]).
//!
//! ```text
//! accept ─> route ─> rewrite ─> access ─> content | upstream ─> header_filter ─> body_filter ─> log
//!            │         │          │           │         │                          │
//!            │         │          │           │         │                          └─ limit-rate
//!            │         │          │           │         └─ backend: endpoint (or Lua balancer), pool, client
//!            │         │          │           └─ Lua content handlers answer instead of a backend
//!            │         │          └─ limits, IP rules, Basic auth, external auth; then Lua access
//!            │         └─ client certificate, CORS, redirects; then Lua rewrite
//!            └─ host, path, method, headers; 404, 308 to https, a refused route's 500/503,
//!               413 for a declared body over the limit
//! ```
//!
//! Each step's contract:
//! - **route** reads the host, path, method and headers, and picks the route (or the default
//!   backend). It ends the request with 404 when nothing matches, a 308 to HTTPS for plain HTTP
//!   to a TLS host, the refusal's status for a route the controller closed, and 413 for a
//!   `Content-Length` over the route's body limit (where nginx checks `client_max_body_size`).
//!   Nothing of the route runs before it.
//! - **rewrite** runs the route's built-in rewrite filters ([`crate::policy`]: the client
//!   certificate, 400; CORS, whose preflights it answers 204; `app-root` and the permanent and
//!   temporal redirects, 301/302/308) and then Lua
//!   `rewrite`, which may change the method, URI, headers and body that go upstream, and may
//!   answer (`ngx.exit`, `ngx.redirect`).
//! - **access** runs the route's built-in access filters (limits, 503; IP rules, 403; Basic
//!   auth and external auth, 401 or what the auth service says; `satisfy any` lets one of the
//!   last three suffice) and then Lua `access`. Any of them may answer; an answer skips content
//!   and upstream. Filters that let the request on may leave effects: headers for the response
//!   (CORS), for the upstream request (an auth service's), places held until the response ends
//!   (a client's requests in progress).
//! - **content | upstream**: Lua `content` handlers produce the response, or the request goes to
//!   the route's backend ([`upstream`]), or to the peers Lua `balancer` handlers pick for each
//!   try ([`balancer`]), with the route's own upstream headers
//!   (`upstream-vhost`, `x-forwarded-prefix`). Failures become statuses here (502 refused or
//!   broken, 503 no ready endpoint, 504 timeout, 413 a body cut at the limit), never a dropped
//!   connection.
//! - **header_filter** (Lua) may change the response status and headers before they are sent,
//!   answers made by earlier steps included.
//! - **body_filter** paces the body (`limit-rate`); Lua `body_filter` sees each chunk as it
//!   streams, and may change or end it.
//! - **log** runs once the last byte is sent (or the client went away): metrics, the access log
//!   and Lua `log` handlers, which can change nothing.
//!
//! Every response of a route carries the route's response headers (`custom-headers`, the global
//! ConfigMap's `add-headers`), whichever step made it, and leaves with `Server`, `Date` and (on
//! TLS) HSTS ([`crate::respond`]). A route
//! without Lua and without policies goes from route straight to upstream, paying nothing for
//! the steps it does not use; filters that cannot wait run at once, keeping no state.

mod balancer;
mod context;
mod error_page;
mod internal;
mod lua;
mod upstream;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Body;
use tidegate_snapshot::Phase;

use crate::connection::Connection;
use context::Outcome;

use crate::access_log::Entry;
use crate::body::{ClientBody, LocalBody, Observed};
use crate::policy::{Facts, Head, Ran};
use crate::respond::{as_grpc, error_response, finish_headers, is_grpc, redirect_to_https, text};
use crate::router::{Match, RequestFacts, Target};
use crate::runtime::Runtime;
use crate::worker::Worker;

pub(crate) use internal::subrequests;

pub(crate) async fn handle(
    worker: Rc<Worker>,
    conn: Rc<Connection>,
    request: Request<ClientBody>,
) -> Response<Observed> {
    let started = Instant::now();
    worker.started.set(worker.started.get().wrapping_add(1));
    let runtime = worker.current_runtime();
    worker.trim_scripts(&runtime);
    let mut logging = worker.shared.access_log.enabled();
    let method = request.method().clone();
    let version = request.version();
    let path = if logging { request.uri().path().to_owned() } else { String::new() };
    // A log format may want more of the request than the JSON line has.
    let format = if logging { runtime.routing.access_log_format.clone() } else { None };
    let mut taken = format.as_ref().map(|f| Box::new(f.take(&request, conn.tls)));
    let host = request_host(&request).to_owned();
    let mut outcome = Outcome { grpc: is_grpc(version, &method, request.headers()), ..Outcome::default() };
    outcome.forwarded = runtime.routing.client_rules.forwarded(conn.remote.ip(), request.headers()).map(Box::new);

    let remote = outcome.client(&conn);
    let mut response = match route(&worker, &runtime, &conn, &host, &request, &mut outcome) {
        Routed::Answer(response) => response,
        Routed::Target(target) => {
            logging &= target.filters.access_log();
            if let Some(taken) = taken.as_mut() {
                taken.backend = target.action.backend.as_ref().map(|b| b.0.clone());
            }
            // Each way of serving keeps its state in a box of its own, for as long as it runs:
            // inline, every request would carry the largest of them (the upstream exchange's)
            // whichever it takes, and a Lua route answering by itself would hold the upstream
            // state it never uses for as long as it sleeps.
            let response = match &target.lua {
                // The Lua steps run the built-in filters of each phase before its handlers.
                Some(chain) => {
                    Box::pin(lua::serve(&worker, &runtime, &conn, target, chain, &host, request, &mut outcome, None))
                        .await
                }
                None => {
                    Box::pin(filtered_upstream(&worker, &runtime, &conn, target, &host, request, &mut outcome)).await
                }
            };
            target.counters.count(response.status().as_u16());
            let mut response = target.filters.body_filter(response);
            for (name, value) in target.filters.response_headers() {
                response.headers_mut().insert(name, value.clone());
            }
            target.filters.absolute_location(&mut response, outcome.https(&conn), &host);
            response
        }
    };
    if outcome.grpc && !outcome.from_upstream && response.status().as_u16() >= 400 {
        response = as_grpc(response.status());
    }
    if let Some(effects) = outcome.effects.as_mut() {
        for (name, value) in effects.headers.drain(..) {
            response.headers_mut().insert(name, value);
        }
        if effects.cookies_for(response.status()) {
            for cookie in effects.cookies.drain(..) {
                response.headers_mut().append(http::header::SET_COOKIE, cookie);
            }
        }
    }
    finish_headers(&worker.shared, runtime.routing.hsts.as_ref(), conn.tls, version, &mut response);
    let status = response.status();

    let metrics = &worker.shared.metrics;
    metrics.request_duration.observe(worker.id, started.elapsed().as_secs_f64());
    if let Some(t) = outcome.upstream_time {
        metrics.upstream_duration.observe(worker.id, t.as_secs_f64());
    }

    if let Some(taken) = taken.as_mut() {
        taken.from_upstream = outcome.from_upstream;
    }
    let shared = Arc::clone(&worker.shared);
    // Held until the response is done: a client's request in progress (limit-connections).
    if let Some(holds) = outcome.effects.as_mut().map(|e| std::mem::take(&mut e.holds)).filter(|h| !h.is_empty()) {
        let then = outcome.after.take();
        outcome.after = Some(Box::new(move |bytes_sent| {
            drop(holds);
            if let Some(then) = then {
                then(bytes_sent);
            }
        }));
    }
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
            remote_addr: remote.to_canonical().to_string(),
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
        if !shared.access_log.record(&entry, format.as_deref().zip(taken.as_deref())) {
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
/// to a TLS host (308), a route the controller refused (500 misconfigured, 503 asking for a
/// protection tidegate does not honour) and a declared body over the route's limit (413).
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
    if target.ssl_redirect && !outcome.https(conn) {
        return answer(redirect_to_https(&worker.shared, host, request.uri()));
    }
    if let Some(refusal) = &target.action.refusal {
        // The controller reported the cause; here the route only has to stay closed.
        tracing::debug!(route = &*target.name, reason = refusal.reason, status = refusal.status, "route refused");
        let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return answer(error_response(status));
    }
    // A body already done (a GET's, mostly) has no length left to exceed.
    if !request.body().is_end_stream() && target.filters.body_too_large(request.headers()) {
        return answer(error_response(StatusCode::PAYLOAD_TOO_LARGE));
    }
    Routed::Target(target)
}

/// The steps of a route without Lua after routing: its built-in rewrite and access filters
/// (skipped with one check when it has none), then the upstream. One box for all of it: what
/// the request's own state holds across the wait is a pointer.
async fn filtered_upstream(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    host: &str,
    request: Request<ClientBody>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    for phase in [Phase::Rewrite, Phase::Access] {
        if !target.filters.has(phase) {
            continue;
        }
        let client = outcome.client(conn);
        let head = Head { method: request.method(), uri: request.uri(), host, headers: request.headers(), client };
        let facts = Facts::of(conn, head, &worker.pool);
        let answer = match target.filters.run(phase, &facts, &mut outcome.effects) {
            Ran::Decided(answer) => answer,
            Ran::Waiting(checks) => checks.await,
        };
        if let Some(answer) = answer {
            return answer;
        }
    }
    upstream::proxy(worker, runtime, conn, target, request, outcome).await
}

/// The host a request is for, without port: the URI authority (HTTP/2, absolute-form) or the
/// `Host` header.
fn request_host(request: &Request<ClientBody>) -> &str {
    let raw = match request.uri().authority() {
        Some(a) => a.as_str(),
        None => request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""),
    };
    crate::headers::strip_port(raw)
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
