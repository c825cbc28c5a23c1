//! The pipeline's steps for routes with Lua handlers, in OpenResty's phase order; in each phase
//! the route's built-in filters ([`crate::policy`]) run before its Lua:
//!
//! ```text
//! rewrite ─> access ─> content (Lua answers) | upstream ─> header_filter ─> body_filter ─> log
//!    │          │          │
//!    └─ ngx.exit(status ≥ 200), ngx.redirect: answer now, skip the rest but the filters and log
//! ```
//!
//! - rewrite, access and content may wait (read the body, sleep, sockets); the worker serves
//!   other requests meanwhile.
//! - header_filter runs on the response head (from the upstream or from content) before it is
//!   sent; body_filter on each chunk as it streams (`ngx.arg[1]`, `ngx.arg[2]`); log after the
//!   last byte, unable to change anything. Unlike OpenResty, all three may wait too.
//! - A Lua failure (error, CPU budget, memory) answers 500 when nothing was sent yet and cuts the
//!   response otherwise; it is logged once with route, phase and Lua line, and counted. A
//!   failure before the upstream is reached never lets the request through.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, SizeHint};
use tidegate_lua::{FailureKind, LuaRequest, Outcome as LuaOutcome, Phase, RequestHead, join_output};
use tidegate_snapshot::Phase as Step;

use super::context::Outcome;
use super::internal::{Hops, Internal, redirect};
use super::upstream::{forward, prepare_upstream, rewrite_uri, upstream_body, upstream_headers};
use crate::body::{BoxError, ClientBody, LocalBody, full};
use crate::connection::Connection;
use crate::http1::CloseConnection;
use crate::metrics::LuaErrorLabels;
use crate::policy::{Facts, Head, Ran};
use crate::respond::error_response;
use crate::router::{LuaChain, Target};
use crate::runtime::Runtime;
use crate::worker::Worker;

/// Bodies Lua reads whole (`ngx.req.read_body`) may be at most this large.
const MAX_READ_BODY: usize = 16 << 20;

#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    chain: &Arc<LuaChain>,
    host: &str,
    mut request: Request<ClientBody>,
    outcome: &mut Outcome,
    internal: Option<Internal>,
) -> Response<LocalBody> {
    let vm = &worker.vm;
    // The HTTP/1 loop gives an upgrade request (and only one) the means to switch.
    let client_upgrade = crate::http1::on_upgrade(&mut request);
    let upgrade = client_upgrade.is_some();
    let (mut parts, body) = request.into_parts();
    let head = RequestHead {
        method: parts.method.clone(),
        request_uri: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        version: parts.version,
        remote: std::net::SocketAddr::new(outcome.client(conn), conn.remote.port()),
        server_port: conn.local_port,
        https: conn.tls,
        host: host.to_owned(),
        route: Arc::clone(&target.name),
        namespace: Arc::clone(&chain.namespace),
        request_id: Some(worker.next_request_id()),
    };
    let lua = match vm.begin(head, std::mem::take(&mut parts.headers)) {
        Ok(r) => r,
        Err(e) => return failed(worker, &target.name, Phase::Rewrite, FailureKind::Memory, &e.to_string(), None),
    };
    if let Some(budget) = chain.cpu_budget {
        lua.set_cpu_budget(budget);
    }
    let hops = match internal {
        Some(internal) => {
            lua.inherit(internal.inherited, internal.hops.depth);
            // An internal request's body is there already, as if read.
            if let ClientBody::Internal(Some(bytes)) = &body {
                *lua.state.body.borrow_mut() = Some(bytes.clone());
            }
            internal.hops
        }
        None => Hops::default(),
    };
    worker.note_lua_memory();
    let unread: Rc<RefCell<Option<ClientBody>>> = Rc::new(RefCell::new(Some(body)));
    *lua.body_reader.borrow_mut() = Some(body_reader(Rc::clone(&unread)));

    // rewrite, access: the phase's built-in filters, then its Lua
    for (step, phase) in [(Step::Rewrite, Phase::Rewrite), (Step::Access, Phase::Access)] {
        if target.filters.has(step) {
            // The head as the Lua before left it; a copy, as filters may wait.
            let headers = lua.state.headers.borrow().clone();
            let method = lua.state.method.borrow().clone();
            let uri: http::Uri = lua.state.upstream_uri().parse().unwrap_or_else(|_| parts.uri.clone());
            let head = Head { method: &method, uri: &uri, host, headers: &headers, client: outcome.client(conn) };
            let facts = Facts::of(conn, head, &worker.pool);
            let answer = match target.filters.run(step, &facts, &mut outcome.effects) {
                Ran::Decided(answer) => answer,
                Ran::Waiting(checks) => checks.await,
            };
            if let Some(answer) = answer {
                return filtered(worker, target, chain, &lua, answer, outcome).await;
            }
        }
        let scripts = chain.phase(phase);
        if scripts.is_empty() {
            continue;
        }
        match vm.run(&lua, phase, scripts).await {
            LuaOutcome::Continue => {}
            LuaOutcome::Exit(status) => {
                return filtered(worker, target, chain, &lua, lua_response(&lua, Some(status)), outcome).await;
            }
            LuaOutcome::Exec => {
                let unread = unread.borrow_mut().take();
                return redirect(worker, runtime, conn, host, &lua, parts.version, unread, outcome, hops).await;
            }
            LuaOutcome::Failed { kind, message } => {
                return failed(worker, &target.name, phase, kind, &message, Some(&lua));
            }
        }
    }

    // content, or the upstream
    let response = if chain.phase(Phase::Content).is_empty() {
        parts.method = lua.state.method.borrow().clone();
        parts.headers = lua.state.headers.borrow().clone();
        let pages = target.action.policies.error_pages.as_ref();
        let original = super::error_page::Original::of(pages, &parts.uri, &parts.headers);
        parts.uri = lua.state.upstream_uri().parse().unwrap_or_else(|_| parts.uri.clone());
        // `rewrite-target` applies to the URI as the handlers leave it.
        rewrite_uri(target, &mut parts);
        let set_body = lua.state.body.borrow().clone();
        if set_body.is_some() {
            parts.headers.remove(header::TRANSFER_ENCODING);
        }
        // The client's hop-by-hop headers go before the route sets its own.
        prepare_upstream(&mut parts, upgrade);
        upstream_headers(target, outcome, &mut parts.headers);
        let body = match set_body {
            Some(bytes) => {
                parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                LocalBody::new(Full::new(bytes))
            }
            None => match unread.borrow_mut().take() {
                Some(incoming) => upstream_body(target, &parts.headers, incoming),
                None => full(Bytes::new()),
            },
        };
        // Boxed: a request that Lua answers (or that sleeps first) does not carry the upstream
        // exchange's state.
        let upstream_request = Request::from_parts(parts, body);
        let mut response = if chain.phase(Phase::Balancer).is_empty() {
            Box::pin(forward(worker, runtime, conn, target, upstream_request, client_upgrade, outcome)).await
        } else {
            let forwarded = super::balancer::forward(
                worker,
                runtime,
                conn,
                target,
                chain,
                &lua,
                upstream_request,
                client_upgrade,
                outcome,
            );
            Box::pin(forwarded).await
        };
        if let (Some(pages), Some(original)) = (pages, original) {
            let from_upstream = outcome.from_upstream;
            response =
                Box::pin(super::error_page::replace(worker, runtime, conn, pages, original, from_upstream, response))
                    .await;
        }
        lua.state.upstream_addr.set(outcome.upstream);
        lua.state.upstream_status.set(outcome.upstream.map(|_| response.status().as_u16()));
        lua.state.upstream_response_time.set(outcome.upstream_time.map(|t| t.as_secs_f64()));
        response
    } else {
        match vm.run(&lua, Phase::Content, chain.phase(Phase::Content)).await {
            LuaOutcome::Continue => lua_response(&lua, None),
            LuaOutcome::Exit(status) => lua_response(&lua, Some(status)),
            LuaOutcome::Exec => {
                let unread = unread.borrow_mut().take();
                return redirect(worker, runtime, conn, host, &lua, parts.version, unread, outcome, hops).await;
            }
            LuaOutcome::Failed { kind, message } => {
                return failed(worker, &target.name, Phase::Content, kind, &message, Some(&lua));
            }
        }
    };
    filtered(worker, target, chain, &lua, response, outcome).await
}

/// Applies header_filter, installs body_filter and log around a response. Handlers of all three
/// may wait (sleep, cosockets).
async fn filtered(
    worker: &Rc<Worker>,
    target: &Target,
    chain: &Arc<LuaChain>,
    lua: &Rc<LuaRequest>,
    mut response: Response<LocalBody>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    let vm = &worker.vm;
    // A request closed without a response runs no filters, only the log phase.
    let closing = response.extensions().get::<CloseConnection>().is_some();
    if !closing && !chain.phase(Phase::HeaderFilter).is_empty() {
        lua.state.status.set(response.status().as_u16());
        *lua.state.response_headers.borrow_mut() = std::mem::take(response.headers_mut());
        lua.state.headers_sent.set(false);
        let result = vm.run(lua, Phase::HeaderFilter, chain.phase(Phase::HeaderFilter)).await;
        lua.state.headers_sent.set(true);
        match result {
            LuaOutcome::Failed { kind, message } => {
                return failed(worker, &target.name, Phase::HeaderFilter, kind, &message, Some(lua));
            }
            // ngx.exit in header_filter replaces the response: nginx's page for an error status
            // it has one for, an empty body otherwise (444 and 499 included).
            LuaOutcome::Exit(status) => {
                if lua.state.abort.get() {
                    return close_connection(status);
                }
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                if status.as_u16() >= 300 && status.canonical_reason().is_some() {
                    return error_response(status);
                }
                let mut empty = Response::new(full(Bytes::new()));
                *empty.status_mut() = status;
                return empty;
            }
            // ngx.exec is refused in header_filter.
            LuaOutcome::Continue | LuaOutcome::Exec => {}
        }
        *response.headers_mut() = std::mem::take(&mut *lua.state.response_headers.borrow_mut());
        if let Ok(status) = StatusCode::from_u16(lua.state.status.get()) {
            *response.status_mut() = status;
        }
    } else {
        lua.state.status.set(response.status().as_u16());
    }
    if !closing && !chain.phase(Phase::BodyFilter).is_empty() {
        // The filter may change the length.
        response.headers_mut().remove(header::CONTENT_LENGTH);
        let filter = BodyFilter {
            inner: std::mem::replace(response.body_mut(), full(Bytes::new())),
            worker: Rc::clone(worker),
            lua: Rc::clone(lua),
            chain: Arc::clone(chain),
            route: Arc::clone(&target.name),
            running: None,
            input_ended: false,
            finished: false,
        };
        *response.body_mut() = LocalBody::new(filter);
    }
    if chain.phase(Phase::Log).is_empty() {
        worker.note_lua_memory();
        return response;
    }
    let (worker, lua, chain, route) = (Rc::clone(worker), Rc::clone(lua), Arc::clone(chain), Arc::clone(&target.name));
    outcome.after = Some(Box::new(move |bytes_sent| {
        lua.state.bytes_sent.set(bytes_sent);
        // The response is over; log handlers run on their own and may wait (cosockets, sleep).
        tokio::task::spawn_local(async move {
            if let LuaOutcome::Failed { kind, message } = worker.vm.run(&lua, Phase::Log, chain.phase(Phase::Log)).await
            {
                report(&worker, &route, Phase::Log, kind, &message, Some(&lua));
            }
            worker.note_lua_memory();
        });
    }));
    response
}

/// The response Lua produced: its status, headers and output. Like nginx: an error page when
/// `ngx.exit` ends the request with an error status and nothing was written, `Content-Length`
/// only when Lua set it (the body is cut to it), the default type unless Lua set or cleared
/// one, and 304 when the client's `If-Modified-Since` equals the `Last-Modified` Lua set.
fn lua_response(lua: &LuaRequest, exit: Option<u16>) -> Response<LocalBody> {
    let state = &lua.state;
    if state.abort.get() {
        return close_connection(exit.unwrap_or_default());
    }
    let mut output = join_output(state.take_output());
    let sent = state.headers_sent.get();
    let status = match (exit, state.status.get()) {
        (Some(code), _) if code >= 200 && !sent => code,
        (_, 0) => 200,
        (_, set) => set,
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if exit.is_some_and(|code| code >= 300) && output.is_empty() && !sent {
        let mut response = error_response(status);
        for (name, value) in state.response_headers.borrow().iter() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                response.headers_mut().append(name, value.clone());
            }
        }
        if state.location_as_set.get() {
            response.extensions_mut().insert(crate::policy::LocationAsSet);
        }
        return response;
    }
    let mut headers = std::mem::take(&mut *state.response_headers.borrow_mut());
    if status == StatusCode::OK
        && let (Some(since), Some(modified)) =
            (state.headers.borrow().get(header::IF_MODIFIED_SINCE).cloned(), headers.get(header::LAST_MODIFIED))
        && since == *modified
    {
        headers.remove(header::CONTENT_LENGTH);
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = headers;
        return response;
    }
    // nginx's not_modified filter: a `Last-Modified` later than `If-Unmodified-Since` fails the
    // precondition.
    if status.is_success()
        && let Some(since) = state.headers.borrow().get(header::IF_UNMODIFIED_SINCE).and_then(http_date)
        && headers.get(header::LAST_MODIFIED).and_then(http_date).is_some_and(|modified| modified > since)
    {
        return error_response(StatusCode::PRECONDITION_FAILED);
    }
    if !state.content_type_touched.get() && !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<usize>().ok());
    let body = match declared {
        Some(length) => {
            output.truncate(length.min(output.len()));
            full(output)
        }
        // HTTP/1.0 has no chunks: the output goes with its length, as nginx's
        // `lua_http10_buffering` sends it (a HEAD's head alone, without one).
        None if state.head.version == http::Version::HTTP_10 && state.head.method != http::Method::HEAD => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(output.len()));
            full(output)
        }
        // Like nginx, Lua output goes out without a length (chunked) unless Lua declares one.
        None => LocalBody::new(Streamed(Some(output))),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if state.location_as_set.get() {
        response.extensions_mut().insert(crate::policy::LocationAsSet);
    }
    if let Some(reason) = state.reason.borrow().as_deref()
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec())
    {
        response.extensions_mut().insert(reason);
    }
    response
}

fn http_date(value: &HeaderValue) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

/// A body of known bytes sent as if streamed: no length is announced.
struct Streamed(Option<Bytes>);

impl Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Bytes::is_empty)
    }
}

/// No response, and the connection closes: `ngx.exit(ngx.ERROR)`, 408, 444 or 499. The status
/// is what metrics and the access log record (444 for `ngx.ERROR`).
fn close_connection(status: u16) -> Response<LocalBody> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    response.extensions_mut().insert(CloseConnection);
    response
}

/// Logs and counts a Lua failure and answers 500.
pub(super) fn failed(
    worker: &Worker,
    route: &str,
    phase: Phase,
    kind: FailureKind,
    message: &str,
    lua: Option<&LuaRequest>,
) -> Response<LocalBody> {
    report(worker, route, phase, kind, message, lua);
    error_response(StatusCode::INTERNAL_SERVER_ERROR)
}

fn report(worker: &Worker, route: &str, phase: Phase, kind: FailureKind, message: &str, lua: Option<&LuaRequest>) {
    let request_id = lua.map(|l| l.state.head.request_id_text()).unwrap_or_default();
    tracing::error!(
        route,
        phase = phase.name(),
        kind = kind.name(),
        request_id = %request_id,
        "Lua {} handler failed: {message}",
        phase.name()
    );
    let labels = LuaErrorLabels { route: route.to_owned(), phase: phase.name(), kind: kind.name() };
    worker.shared.metrics.lua_errors.get_or_create(&labels).inc();
    if kind == FailureKind::Memory {
        worker.vm.collect_if_needed();
    }
}

/// Reads the client body whole when Lua asks (bounded by [`MAX_READ_BODY`]).
fn body_reader(unread: Rc<RefCell<Option<ClientBody>>>) -> tidegate_lua::BodyReader {
    Box::new(move || {
        Box::pin(async move {
            let Some(incoming) = unread.borrow_mut().take() else { return Ok(Bytes::new()) };
            match Limited::new(incoming, MAX_READ_BODY).collect().await {
                Ok(collected) => Ok(collected.to_bytes()),
                Err(e) => Err(format!("cannot read the request body: {e}")),
            }
        })
    })
}

/// Runs body_filter handlers on each chunk as it streams, and once more at the end. A handler
/// may wait (sleep, cosockets): the body waits with it while the worker serves others.
struct BodyFilter {
    inner: LocalBody,
    worker: Rc<Worker>,
    lua: Rc<LuaRequest>,
    chain: Arc<LuaChain>,
    route: Arc<str>,
    /// The handlers running over the current chunk.
    running: Option<Pin<Box<dyn Future<Output = LuaOutcome>>>>,
    /// The upstream body has ended (the last run was told `ngx.arg[2] == true`).
    input_ended: bool,
    /// Nothing more goes out: the input ended, a handler set `ngx.arg[2] = true`, or one failed.
    finished: bool,
}

impl BodyFilter {
    /// Starts the handlers over one chunk.
    fn start(&mut self, chunk: Bytes, eof: bool) {
        *self.lua.state.arg_chunk.borrow_mut() = Some(chunk);
        self.lua.state.arg_eof.set(eof);
        let (worker, lua, chain) = (Rc::clone(&self.worker), Rc::clone(&self.lua), Arc::clone(&self.chain));
        self.running =
            Some(Box::pin(async move { worker.vm.run(&lua, Phase::BodyFilter, chain.phase(Phase::BodyFilter)).await }));
    }
}

impl Body for BodyFilter {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(running) = self.running.as_mut() {
                let outcome = std::task::ready!(running.as_mut().poll(cx));
                self.running = None;
                if let LuaOutcome::Failed { kind, message } = outcome {
                    self.finished = true;
                    report(&self.worker, &self.route, Phase::BodyFilter, kind, &message, Some(&self.lua));
                    return Poll::Ready(Some(Err(format!("Lua body_filter failed: {message}").into())));
                }
                let chunk = self.lua.state.arg_chunk.borrow_mut().take().unwrap_or_default();
                // Setting ngx.arg[2] = true ends the body here.
                self.finished = self.input_ended || self.lua.state.arg_eof.get();
                if !chunk.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                continue;
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.input_ended = true;
                    self.start(Bytes::new(), true);
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.start(data, false),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.running.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
