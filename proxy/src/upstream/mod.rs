//! Requests to upstream endpoints: one [`Pool::send`] over HTTP/1.1 ([`http1`]) and HTTP/2
//! ([`http2`]), each over TCP or TLS as the route's [`Transport`] says.
//!
//! Each worker owns one [`Pool`]; nothing in it is shared across threads, so checking a
//! connection out or in takes no lock, and no task or channel stands between a request and its
//! upstream connection. Connections are pooled by endpoint and transport: HTTP/1.1 ones idle
//! between exchanges (holding a socket and a timestamp, no buffer); HTTP/2 ones carry as many
//! requests at once as the peer allows, and another is opened when all are full. One the
//! upstream closed while it idled is noticed when it is checked out (from readiness already
//! known, no system call).
//!
//! # Errors
//! [`UpstreamError`] says what went wrong in terms of the status the client gets: a refused or
//! failed connection, a failed TLS handshake or a malformed answer is 502, a connect or read
//! timeout 504, a client body that broke off 400.

pub(crate) mod affinity;
mod attempts;
mod balance;
mod body;
mod canary;
mod http1;
mod http2;
mod stream;
mod transport;
pub(crate) mod wire;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use hyper::body::Body;
use tidegate_snapshot::{Timeouts, UpstreamProtocol};

pub(crate) use affinity::Session;
pub(crate) use attempts::{Attempts, Cause, PickPeer};
pub(crate) use balance::{Endpoints, random};
use body::Http1Body;
pub(crate) use canary::CanaryRule;
use stream::Io;
pub(crate) use transport::Transport;

use crate::alarm::Alarm;
use crate::body::BoxError;
use crate::framing::spare;
use crate::headers::Forwarded;

/// The body type of requests sent upstream.
pub(crate) type RequestBody = crate::body::LocalBody;

/// Idle connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 128;
/// Idle connections older than this are closed rather than reused (upstreams commonly close
/// after 60–75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP/2 exchange with {0} failed: {1}")]
    Http2(SocketAddr, String),
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("no response from {0} within the read timeout after the request was sent")]
    ReadTimeout(SocketAddr),
    #[error("the request to {0} made no progress within the send timeout")]
    SendTimeout(SocketAddr),
    #[error("exchange with {0} failed: {1}")]
    Io(SocketAddr, io::Error),
    #[error("{0} answered with a malformed response: {1}")]
    Malformed(SocketAddr, &'static str),
    #[error("the client's request body for {0} failed: {1}")]
    ClientBody(SocketAddr, BoxError),
}

impl UpstreamError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Connect(..)
            | UpstreamError::Io(..)
            | UpstreamError::Malformed(..)
            | UpstreamError::Tls(..)
            | UpstreamError::Http2(..) => StatusCode::BAD_GATEWAY,
            UpstreamError::ConnectTimeout(_) | UpstreamError::ReadTimeout(_) | UpstreamError::SendTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::ClientBody(_, e) if e.is::<crate::body::TooLarge>() => StatusCode::PAYLOAD_TOO_LARGE,
            // `client-body-timeout`, as nginx answers it.
            UpstreamError::ClientBody(_, e)
                if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut) =>
            {
                StatusCode::REQUEST_TIMEOUT
            }
            UpstreamError::ClientBody(..) => StatusCode::BAD_REQUEST,
        }
    }
}

/// One HTTP/1.1 connection to an upstream endpoint.
pub(crate) struct UpstreamConn {
    io: Io,
    /// Read and not yet consumed; without an allocation while the connection idles.
    buf: BytesMut,
    endpoint: SocketAddr,
    /// The [`Transport::id`] it was made for.
    transport: u64,
    /// Bounds each wait of an exchange; kept with the connection, so that a reused one moves
    /// its deadline instead of filing a new timer.
    stall: Alarm,
    /// Requests it has been taken for (`upstream-keepalive-requests`).
    served: u64,
}

impl UpstreamConn {
    fn new(io: Io, endpoint: SocketAddr, transport: u64) -> UpstreamConn {
        UpstreamConn { io, buf: BytesMut::new(), endpoint, transport, stall: Alarm::default(), served: 0 }
    }

    /// Counted as taken for a request (as [`Pool::checkout`] counts a reused one).
    fn taken(mut self) -> UpstreamConn {
        self.served += 1;
        self
    }

    /// Gives the read buffer back to the worker's spare when nothing is left in it.
    fn release_buffer(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            spare::keep_read(std::mem::take(&mut self.buf));
        }
    }
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// One worker's upstream connections.
pub(crate) struct Pool {
    /// Idle HTTP/1.1 connections per endpoint and transport, the oldest first.
    idle: RefCell<foldhash::HashMap<(SocketAddr, u64), VecDeque<Idle>>>,
    /// HTTP/2 connections per endpoint and transport.
    http2: http2::Connections,
    /// The time of the last sweep, which the worker's upkeep makes once a second: how idle
    /// connections are dated and aged, read from the clock once a second rather than twice per
    /// request. A connection so dated is up to a second older than its date says, and one
    /// reused is idle for at most [`IDLE_TIMEOUT`] and that second (upstreams commonly wait
    /// 60 s and more).
    swept: Cell<Instant>,
    /// How many idle connections are kept, how long, and for how many requests.
    limits: Cell<PoolLimits>,
}

/// The global ConfigMap's `upstream-keepalive-*`, or the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolLimits {
    idle_per_endpoint: usize,
    idle_timeout: Duration,
    requests: u64,
}

impl PoolLimits {
    pub(crate) fn of(settings: &tidegate_snapshot::UpstreamConnections) -> PoolLimits {
        PoolLimits {
            idle_per_endpoint: settings.idle_per_endpoint.map_or(MAX_IDLE_PER_ENDPOINT, |n| n as usize),
            idle_timeout: settings.idle_seconds.map_or(IDLE_TIMEOUT, Duration::from_secs),
            requests: settings.requests.unwrap_or(u64::MAX),
        }
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: RefCell::default(),
            http2: http2::Connections::default(),
            swept: Cell::new(Instant::now()),
            limits: Cell::new(PoolLimits::of(&tidegate_snapshot::UpstreamConnections::default())),
        }
    }
}

impl Pool {
    /// Sends a request to `endpoint` the way `transport` says, and returns the response with
    /// its body still to come. `forwarded`: the `X-Forwarded-*` headers it carries in place of
    /// the client's.
    ///
    /// The future is HTTP/1.1's exchange ([`http1::send`]), the common case; it hands any other
    /// protocol to [`Pool::send_other`] at once, in a box of its own, so that a plain request's
    /// state holds no room for the others' (and no second copy of its arguments).
    pub(crate) fn send<'a>(
        self: &'a Rc<Self>,
        attempts: &'a mut Attempts<'_>,
        transport: &'a Transport,
        request: Request<RequestBody>,
        forwarded: Option<Forwarded<'a>>,
        timeouts: Timeouts,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> + 'a {
        http1::send(self, attempts, transport, request, forwarded, timeouts)
    }

    /// HTTP/2, and what ALPN picks.
    async fn send_other(
        self: &Rc<Self>,
        attempts: &mut Attempts<'_>,
        transport: &Transport,
        request: Request<RequestBody>,
        forwarded: Option<Forwarded<'_>>,
        timeouts: Timeouts,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match transport.protocol {
            UpstreamProtocol::Negotiated => {
                self.send_negotiated(attempts, transport, request, forwarded, timeouts).await
            }
            _ => http2::send(self, attempts, transport, None, request, forwarded, timeouts).await,
        }
    }

    /// `AUTO_HTTP`: over a connection already open, whichever protocol it speaks; else over a
    /// new one, in the protocol the backend chose by ALPN.
    async fn send_negotiated(
        self: &Rc<Self>,
        attempts: &mut Attempts<'_>,
        transport: &Transport,
        request: Request<RequestBody>,
        forwarded: Option<Forwarded<'_>>,
        timeouts: Timeouts,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let endpoint = attempts.endpoint();
        let key = (endpoint, transport.id);
        if self.http2.has(key) {
            return http2::send(self, attempts, transport, None, request, forwarded, timeouts).await;
        }
        if self.idle.borrow().get(&key).is_some_and(|l| !l.is_empty()) {
            return http1::send(self, attempts, &transport.over_http1(), request, forwarded, timeouts).await;
        }
        let (io, h2) = transport.connect(endpoint, Duration::from_millis(timeouts.connect_ms)).await?;
        if h2 {
            http2::send(self, attempts, transport, Some(io), request, forwarded, timeouts).await
        } else {
            // Into the pool, where the exchange takes it from.
            self.checkin(UpstreamConn::new(io, endpoint, transport.id));
            http1::send(self, attempts, &transport.over_http1(), request, forwarded, timeouts).await
        }
    }

    fn checkout(&self, endpoint: SocketAddr, transport: u64) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&(endpoint, transport))?;
        let timeout = self.limits.get().idle_timeout;
        while let Some(mut entry) = list.pop_back() {
            if self.swept.get().duration_since(entry.since) < timeout && entry.conn.io.still_open() {
                entry.conn.served += 1;
                return Some(entry.conn);
            }
        }
        None
    }

    /// Takes the configuration's upstream keep-alive settings (when its runtime changes).
    pub(crate) fn configure(&self, limits: PoolLimits) {
        self.limits.set(limits);
    }

    /// Keeps a connection whose exchange ended cleanly for the next request to its endpoint.
    fn checkin(&self, mut conn: UpstreamConn) {
        conn.release_buffer();
        let now = self.swept.get();
        let limits = self.limits.get();
        if conn.served >= limits.requests {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry((conn.endpoint, conn.transport)).or_default();
        while list.front().is_some_and(|e| now.duration_since(e.since) >= limits.idle_timeout) {
            list.pop_front();
        }
        if list.len() < limits.idle_per_endpoint {
            list.push_back(Idle { conn, since: now });
        }
    }

    /// Closes idle connections that expired or that their upstream closed, and forgets
    /// endpoints with none left (called by the worker's upkeep).
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.swept.set(now);
        self.idle.borrow_mut().retain(|_, list| {
            let timeout = self.limits.get().idle_timeout;
            list.retain(|e| now.duration_since(e.since) < timeout && e.conn.io.still_open());
            !list.is_empty()
        });
        self.http2.sweep();
    }

    #[cfg(test)]
    fn idle_count(&self, endpoint: SocketAddr) -> usize {
        self.idle.borrow().get(&(endpoint, 0)).map_or(0, VecDeque::len)
    }
}

/// A response body as the upstream sends it.
pub(crate) enum UpstreamBody {
    Http1(Http1Body),
    Http2(http2::Http2Body),
}

impl UpstreamBody {
    /// The connection of a `101` answer (HTTP/1.1 only), with what the upstream sent after its
    /// head.
    pub(crate) fn take_switched(&mut self) -> Option<crate::http1::Detached> {
        match self {
            UpstreamBody::Http1(body) => body.take_switched(),
            UpstreamBody::Http2(_) => None,
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamBody::Http1(body) => body.fmt(f),
            UpstreamBody::Http2(_) => f.write_str("Http2Body"),
        }
    }
}

impl Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, io::Error>>> {
        match self.get_mut() {
            UpstreamBody::Http1(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Http2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(body) => body.is_end_stream(),
            UpstreamBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpstreamBody::Http1(body) => body.size_hint(),
            UpstreamBody::Http2(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests;
