//! What Lua sees of one request and what it changes, shared by every phase of that request.
//!
//! The proxy fills a [`RequestState`] from the client request, runs phases against it, and reads
//! back what Lua changed (request headers, URI, method, body; response status, headers, output).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Version};

/// The OpenResty phases, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Rewrite,
    Access,
    Content,
    /// Picks the peer of each try of the upstream (`ngx.balancer`).
    Balancer,
    HeaderFilter,
    BodyFilter,
    Log,
    /// A `ngx.timer` callback, outside any request.
    Timer,
    /// A namespace's module-level code, before its first handler ([`crate::modules`]).
    Init,
    /// What a worker runs for each new version of a namespace's Lua, without a request.
    InitWorker,
    /// Chooses a TLS handshake's certificate (`ngx.ssl`), before any request.
    SslCertificate,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Rewrite,
        Phase::Access,
        Phase::Content,
        Phase::Balancer,
        Phase::HeaderFilter,
        Phase::BodyFilter,
        Phase::Log,
    ];

    /// The name `ngx.get_phase()` returns.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::Content => "content",
            Phase::Balancer => "balancer",
            Phase::HeaderFilter => "header_filter",
            Phase::BodyFilter => "body_filter",
            Phase::Log => "log",
            Phase::Timer => "timer",
            Phase::Init => "init",
            Phase::InitWorker => "init_worker",
            Phase::SslCertificate => "ssl_cert",
        }
    }

    /// Phases that may produce output and end the request with `ngx.exit`.
    pub fn may_respond(self) -> bool {
        matches!(self, Phase::Rewrite | Phase::Access | Phase::Content)
    }
}

/// Phases whose handlers may wait (sleep, cosockets). Unlike OpenResty, that includes
/// header_filter, body_filter and log.
pub(crate) const WAITING_PHASES: &[Phase] = &[
    Phase::Rewrite,
    Phase::Access,
    Phase::Content,
    Phase::HeaderFilter,
    Phase::BodyFilter,
    Phase::Log,
    Phase::Timer,
    Phase::SslCertificate,
];

/// The client request as Lua first sees it.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    /// Path and query as received (`ngx.var.request_uri`).
    pub request_uri: String,
    pub version: Version,
    pub remote: SocketAddr,
    pub server_port: u16,
    pub https: bool,
    /// The host the request was routed by, without port.
    pub host: String,
    /// Route name, for logs.
    pub route: Arc<str>,
    /// Namespace of the object the handlers come from: the `ngx.shared` dictionaries they see.
    pub namespace: Arc<str>,
    /// Request id, for logs (`ngx.var.request_id`); none for timers.
    pub request_id: Option<RequestId>,
}

/// A request's id, unique in the proxy: written out (32 hex digits, like nginx's
/// `$request_id`) only when Lua or a log asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    pub process: u32,
    pub worker: u32,
    /// The worker's request count.
    pub sequence: u64,
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}{:08x}{:016x}", self.process, self.worker, self.sequence)
    }
}

impl RequestHead {
    /// The head of Lua that runs outside any client request (timers, `init`, `init_worker`,
    /// a TLS handshake's `ssl_certificate`), named `route` in logs.
    pub fn outside_request(namespace: Arc<str>, route: Arc<str>) -> RequestHead {
        RequestHead {
            method: Method::GET,
            request_uri: "/".into(),
            version: Version::HTTP_11,
            remote: SocketAddr::from(([0, 0, 0, 0], 0)),
            server_port: 0,
            https: false,
            host: String::new(),
            route,
            namespace,
            request_id: None,
        }
    }

    /// The request id as text; empty outside a request.
    pub fn request_id_text(&self) -> String {
        self.request_id.map(|id| id.to_string()).unwrap_or_default()
    }
}

/// One request's state, read and written by the ngx API.
#[derive(Debug)]
pub struct RequestState {
    pub head: RequestHead,
    pub phase: Cell<Phase>,
    pub started: Instant,
    pub started_at: SystemTime,

    // The request as it goes upstream.
    pub method: RefCell<Method>,
    /// `ngx.var.uri`: the path, without query.
    pub uri: RefCell<String>,
    /// `ngx.var.args`: the query string, without `?`.
    pub args: RefCell<Option<String>>,
    /// The request headers as they go upstream: the client's, with what Lua changed.
    pub headers: RefCell<HeaderMap>,
    /// The body once read (`ngx.req.read_body`) or set (`ngx.req.set_body_data`).
    pub body: RefCell<Option<Bytes>>,
    /// Set when the proxy must read the client body before Lua can continue.
    pub wants_body: Cell<bool>,

    // The response.
    /// `ngx.status`; 0 until set or until a response arrives.
    pub status: Cell<u16>,
    /// A reason phrase for that status (`ngx.resp.set_status(status, reason)`), HTTP/1 only.
    pub reason: RefCell<Option<String>>,
    pub response_headers: RefCell<HeaderMap>,
    /// Output of `ngx.say`/`ngx.print` not yet sent.
    pub output: RefCell<Vec<Bytes>>,
    /// Response headers have gone out (the first output does that); status changes are refused.
    pub headers_sent: Cell<bool>,
    /// `ngx.exit(status)` was called: the current handler stops and so does the request when the
    /// status is ≥ 200 (or anything in the content phase).
    pub exit: Cell<Option<u16>>,
    /// The exit was `ngx.exit(ngx.ERROR)` or a status that only closes the connection (408, 444,
    /// 499): the client gets no response, as from nginx.
    pub abort: Cell<bool>,
    /// `ngx.eof()` was called: no more output.
    pub eof: Cell<bool>,
    /// Lua assigned `ngx.header.content_type` (even to nil): no default type is added.
    pub content_type_touched: Cell<bool>,
    /// `Location` was set through `ngx.header` (not `ngx.redirect`): it goes out as set, not
    /// made absolute (as lua-nginx-module leaves it out of nginx's redirect handling).
    pub location_as_set: Cell<bool>,

    // Body filter arguments (`ngx.arg[1]`, `ngx.arg[2]`).
    pub arg_chunk: RefCell<Option<Bytes>>,
    pub arg_eof: Cell<bool>,

    /// Variables set by Lua (`ngx.var.foo = ...`).
    pub vars: RefCell<HashMap<String, String>>,
    pub upstream_addr: Cell<Option<SocketAddr>>,
    pub upstream_status: Cell<Option<u16>>,
    pub upstream_response_time: Cell<Option<f64>>,
    pub bytes_sent: Cell<u64>,
    /// `ngx.exec(uri)` was called: the URI (with its query) the request goes on at.
    pub exec: RefCell<Option<String>>,
    /// How many subrequests deep this request is: 0 for a client's (`ngx.is_subrequest`).
    pub depth: Cell<u8>,
    /// A subrequest, or a request an internal redirect brought here (`ngx.req.is_internal`).
    pub internal: Cell<bool>,
    /// What the `balancer` phase decided (`ngx.balancer`), once it has run.
    pub balancer: RefCell<Option<Box<BalancerState>>>,
    /// The handshake an `ssl_certificate` handler serves, and what it chose (`ngx.ssl`).
    pub ssl: RefCell<Option<Box<SslState>>>,
}

/// A handshake as the `ssl_certificate` phase sees it, and the certificate it sets.
#[derive(Debug, Default)]
pub struct SslState {
    /// The name the client asked for (SNI).
    pub server_name: Option<String>,
    /// `clear_certs` was called: without a new certificate, the handshake fails.
    pub cleared: bool,
    /// The chain set, end entity first, as DER.
    pub chain: Option<Vec<Vec<u8>>>,
    /// The private key set, as DER (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<Vec<u8>>,
}

/// The `balancer` phase's choices for a request's tries.
#[derive(Debug, Default)]
pub struct BalancerState {
    /// The peer `set_current_peer` chose for the coming try (taken by the proxy).
    pub peer: Option<SocketAddr>,
    /// More tries allowed after this one (`set_more_tries`).
    pub more_tries: u32,
    /// Tries made so far.
    pub tries: u32,
    /// Why the last try failed: `"failed"` (no answer: error, timeout) or `"next"` (an
    /// answer whose status the route retries), with its status.
    pub last_failure: Option<(&'static str, Option<u16>)>,
    /// Connect, send and read timeouts for the tries (`set_timeouts`).
    pub timeouts: [Option<std::time::Duration>; 3],
}

impl BalancerState {
    /// Tries of one request at most, as nginx bounds them.
    pub const MAX_TRIES: u32 = 100;
}

impl RequestState {
    /// The state of a request with this head and these headers (taken, not copied).
    pub fn new(head: RequestHead, headers: HeaderMap) -> Self {
        let (path, query) = match head.request_uri.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (head.request_uri.clone(), None),
        };
        RequestState {
            phase: Cell::new(Phase::Rewrite),
            started: Instant::now(),
            started_at: SystemTime::now(),
            method: RefCell::new(head.method.clone()),
            uri: RefCell::new(path),
            args: RefCell::new(query),
            headers: RefCell::new(headers),
            body: RefCell::new(None),
            wants_body: Cell::new(false),
            status: Cell::new(0),
            reason: RefCell::new(None),
            response_headers: RefCell::new(HeaderMap::new()),
            output: RefCell::new(Vec::new()),
            headers_sent: Cell::new(false),
            exit: Cell::new(None),
            abort: Cell::new(false),
            eof: Cell::new(false),
            content_type_touched: Cell::new(false),
            location_as_set: Cell::new(false),
            arg_chunk: RefCell::new(None),
            arg_eof: Cell::new(false),
            vars: RefCell::new(HashMap::new()),
            upstream_addr: Cell::new(None),
            upstream_status: Cell::new(None),
            upstream_response_time: Cell::new(None),
            bytes_sent: Cell::new(0),
            exec: RefCell::new(None),
            depth: Cell::new(0),
            internal: Cell::new(false),
            balancer: RefCell::new(None),
            ssl: RefCell::new(None),
            head,
        }
    }

    /// The URI as it goes upstream: path plus `?args` when there are any.
    pub fn upstream_uri(&self) -> String {
        let uri = self.uri.borrow();
        match self.args.borrow().as_deref() {
            Some(args) if !args.is_empty() => format!("{uri}?{args}"),
            _ => uri.clone(),
        }
    }

    /// Takes the output produced so far.
    pub fn take_output(&self) -> Vec<Bytes> {
        std::mem::take(&mut *self.output.borrow_mut())
    }
}
