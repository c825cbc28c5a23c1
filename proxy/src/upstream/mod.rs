//! HTTP/1.1 to upstream endpoints, written and read inline by the request's own task, over
//! connections kept alive in a per-worker pool.
//!
//! Each worker owns one [`Pool`]; nothing in it is shared across threads, so checking a
//! connection out or in takes no lock, and no task or channel stands between a request and its
//! upstream connection. An exchange writes the request head (and the body as the client sends
//! it) while it waits for the response head, so an upstream that answers early (a `413`, a
//! redirect) is heard at once. The response body is read from the connection as the client
//! side polls it, and the connection goes back to the pool the moment its last byte is read.
//! Upgraded (WebSocket) connections, connections whose body was cut short and connections the
//! upstream asked to close never return.
//!
//! An idle connection holds no buffer: a socket and a timestamp. One the upstream closed while
//! it idled is noticed when it is checked out (from readiness already known, no system call),
//! and a request with no body whose reused connection fails before any answer arrives is sent
//! again on a new one, as nginx does for its cached connections.
//!
//! # Errors
//! [`UpstreamError`] says what went wrong in terms of the status the client gets: a refused or
//! failed connection or a malformed answer is 502, a connect or read timeout 504, a client body
//! that broke off 400.

mod body;
mod wire;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body;
use tidegate_snapshot::Timeouts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::timeout;

pub(crate) use body::UpstreamBody;
use wire::{RequestFraming, ResponseHead};

use crate::alarm::Alarm;
use crate::body::BoxError;
use crate::headers::Forwarded;
use crate::http1::spare;

/// The body type of requests sent upstream.
pub(crate) type RequestBody = crate::body::LocalBody;

/// Idle connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 128;
/// Idle connections older than this are closed rather than reused (upstreams commonly close
/// after 60–75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read at once for a response head.
const HEAD_READ: usize = 4096;
/// Request body data at most this large is copied into the output buffer; larger goes out on
/// its own.
const COPY_LIMIT: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, io::Error),
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
            UpstreamError::Connect(..) | UpstreamError::Io(..) | UpstreamError::Malformed(..) => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamError::ConnectTimeout(_) | UpstreamError::ReadTimeout(_) | UpstreamError::SendTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::ClientBody(_, e) if e.is::<crate::body::TooLarge>() => StatusCode::PAYLOAD_TOO_LARGE,
            UpstreamError::ClientBody(..) => StatusCode::BAD_REQUEST,
        }
    }
}

/// One connection to an upstream endpoint.
pub(crate) struct UpstreamConn {
    io: TcpStream,
    /// Read and not yet consumed; without an allocation while the connection idles.
    buf: BytesMut,
    endpoint: SocketAddr,
    /// Bounds each wait of an exchange; kept with the connection, so that a reused one moves
    /// its deadline instead of filing a new timer.
    stall: Alarm,
}

impl UpstreamConn {
    /// Whether the upstream may still be there: false when the socket is known readable and a
    /// read finds its end, an error or bytes nobody asked for. Readiness the runtime has not
    /// reported costs no system call.
    fn still_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
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
    /// Per endpoint, the oldest first.
    idle: RefCell<foldhash::HashMap<SocketAddr, VecDeque<Idle>>>,
    /// The time of the last sweep, which the worker's upkeep makes once a second: how idle
    /// connections are dated and aged, read from the clock once a second rather than twice per
    /// request. A connection so dated is up to a second older than its date says, and one
    /// reused is idle for at most [`IDLE_TIMEOUT`] and that second (upstreams commonly wait
    /// 60 s and more).
    swept: Cell<Instant>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { idle: RefCell::default(), swept: Cell::new(Instant::now()) }
    }
}

/// How an exchange failed.
enum Failure {
    /// Before any byte of an answer arrived, the connection ended or broke: on a reused
    /// connection, the upstream most likely closed it while it idled.
    NoAnswer(io::Error),
    Io(io::Error),
    Malformed(&'static str),
    ClientBody(BoxError),
    /// The request did not move for the send timeout: nothing taken from the client, nothing
    /// written to the upstream.
    SendStalled,
    /// No answer for the read timeout after the request was sent.
    ReadStalled,
}

impl Failure {
    fn into_error(self, endpoint: SocketAddr) -> UpstreamError {
        match self {
            Failure::NoAnswer(e) | Failure::Io(e) => UpstreamError::Io(endpoint, e),
            Failure::Malformed(why) => UpstreamError::Malformed(endpoint, why),
            Failure::ClientBody(e) => UpstreamError::ClientBody(endpoint, e),
            Failure::SendStalled => UpstreamError::SendTimeout(endpoint),
            Failure::ReadStalled => UpstreamError::ReadTimeout(endpoint),
        }
    }
}

impl Pool {
    /// Sends a request to `endpoint`, on a pooled connection when one is open, and returns the
    /// response with its body still to be read from the connection. `forwarded`: the
    /// `X-Forwarded-*` headers it carries in place of the client's.
    pub(crate) async fn send(
        self: &Rc<Self>,
        endpoint: SocketAddr,
        request: Request<RequestBody>,
        forwarded: Option<Forwarded<'_>>,
        timeouts: Timeouts,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut parts, mut body) = request.into_parts();
        let framing = RequestFraming::of(&parts.method, body.is_end_stream(), body.size_hint().exact());
        let upgrade = crate::headers::is_upgrade(&parts.headers);
        let head_request = parts.method == Method::HEAD;
        // Only a request that is whole in its head can be sent twice.
        let repeatable =
            matches!(framing, RequestFraming::Empty | RequestFraming::Length(0)) && parts.method.is_idempotent();
        let mut head = spare::take_write(256 + parts.headers.len() * 48);
        wire::encode_request(&mut head, &parts, forwarded.as_ref(), framing);
        spare::keep_headers(std::mem::take(&mut parts.headers));
        let limits =
            Limits { send: Duration::from_millis(timeouts.send_ms), read: Duration::from_millis(timeouts.read_ms) };

        let exchanged = loop {
            let (mut conn, reused) = match self.checkout(endpoint) {
                Some(conn) => (conn, true),
                None => match connect(endpoint, Duration::from_millis(timeouts.connect_ms)).await {
                    Ok(conn) => (conn, false),
                    Err(e) => break Err(e),
                },
            };
            match exchange(&mut conn, &head, &mut body, framing, head_request, limits).await {
                Err(Failure::NoAnswer(e)) if reused && repeatable => {
                    tracing::debug!(%endpoint, error = %e, "reused upstream connection was closed; sending again");
                }
                Err(failure) => break Err(failure.into_error(endpoint)),
                Ok((response, sent_whole)) => break Ok((conn, response, sent_whole)),
            }
        };
        spare::keep_write(head);
        let (conn, response, sent_whole) = exchanged?;

        let ResponseHead { parts, framing, keep_alive } = response;
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if !upgrade {
                return Err(UpstreamError::Malformed(
                    endpoint,
                    "101 Switching Protocols to a request that did not ask",
                ));
            }
            return Ok(Response::from_parts(parts, UpstreamBody::switched(conn, self)));
        }
        // The connection carries on only if both messages were whole.
        let reusable = keep_alive && sent_whole;
        Ok(Response::from_parts(parts, UpstreamBody::new(conn, framing, reusable, self)))
    }

    fn checkout(&self, endpoint: SocketAddr) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        while let Some(entry) = list.pop_back() {
            if self.swept.get().duration_since(entry.since) < IDLE_TIMEOUT && entry.conn.still_open() {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Keeps a connection whose exchange ended cleanly for the next request to its endpoint.
    fn checkin(&self, mut conn: UpstreamConn) {
        conn.release_buffer();
        let now = self.swept.get();
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(conn.endpoint).or_default();
        while list.front().is_some_and(|e| now.duration_since(e.since) >= IDLE_TIMEOUT) {
            list.pop_front();
        }
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push_back(Idle { conn, since: now });
        }
    }

    /// Closes idle connections that expired or that their upstream closed, and forgets
    /// endpoints with none left (called by the worker's upkeep).
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.swept.set(now);
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|e| now.duration_since(e.since) < IDLE_TIMEOUT && e.conn.still_open());
            !list.is_empty()
        });
    }

    #[cfg(test)]
    fn idle_count(&self, endpoint: SocketAddr) -> usize {
        self.idle.borrow().get(&endpoint).map_or(0, VecDeque::len)
    }
}

async fn connect(endpoint: SocketAddr, limit: Duration) -> Result<UpstreamConn, UpstreamError> {
    let io = match timeout(limit, TcpStream::connect(endpoint)).await {
        Err(_) => return Err(UpstreamError::ConnectTimeout(endpoint)),
        Ok(Err(e)) => return Err(UpstreamError::Connect(endpoint, e)),
        Ok(Ok(io)) => io,
    };
    // Small requests must not wait for Nagle.
    let _ = io.set_nodelay(true);
    Ok(UpstreamConn { io, buf: BytesMut::new(), endpoint, stall: Alarm::default() })
}

/// How long an exchange may stand still: while the request goes out, and after.
#[derive(Clone, Copy)]
struct Limits {
    send: Duration,
    read: Duration,
}

/// Writes the request and reads the response head, both at once: the head, and whether the
/// request went out whole. As with nginx, the send timeout bounds each gap while the request
/// goes out (a piece taken from the client or written to the upstream is progress), so an
/// upload of any length passes as long as it moves; the read timeout runs from when it has all
/// gone out. An answer that comes earlier is taken at once.
async fn exchange(
    conn: &mut UpstreamConn,
    head: &[u8],
    body: &mut RequestBody,
    framing: RequestFraming,
    head_request: bool,
    limits: Limits,
) -> Result<(ResponseHead, bool), Failure> {
    let progress = Cell::new(Instant::now());
    let UpstreamConn { io, buf, stall, .. } = conn;
    let (mut reader, mut writer) = io.split();
    let sending = send_request(&mut writer, head, body, framing, &progress);
    let receiving = receive_head(&mut reader, buf, head_request);
    tokio::pin!(sending, receiving);
    let mut sent = None;
    loop {
        let (limit, failure) =
            if sent.is_none() { (limits.send, Failure::SendStalled) } else { (limits.read, Failure::ReadStalled) };
        let due = progress.get() + limit;
        // The alarm is set only when the exchange has to wait: a request that goes out at once
        // (most do) moves it once, to the read timeout, not first to the send timeout.
        tokio::select! {
            biased;
            outcome = &mut sending, if sent.is_none() => {
                match outcome {
                    Ok(()) => sent = Some(true),
                    Err(Failure::ClientBody(e)) => return Err(Failure::ClientBody(e)),
                    // The upstream may have answered before it stopped reading: listen on.
                    Err(_) => sent = Some(false),
                }
                progress.set(Instant::now());
            }
            response = &mut receiving => return response.map(|head| (head, sent == Some(true))),
            () = stall.ring_at(due.into()) => {
                // Progress since the alarm was set moved the deadline: wait on.
                if Instant::now() >= progress.get() + limit {
                    return Err(failure);
                }
            }
        }
    }
}

async fn send_request(
    writer: &mut WriteHalf<'_>,
    head: &[u8],
    body: &mut RequestBody,
    framing: RequestFraming,
    progress: &Cell<Instant>,
) -> Result<(), Failure> {
    if matches!(framing, RequestFraming::Empty | RequestFraming::Length(0)) {
        // Progress, too, but `exchange` marks it once this is done.
        writer.write_all(head).await.map_err(Failure::Io)?;
        return Ok(());
    }
    let mut out = spare::take_write(head.len() + COPY_LIMIT);
    out.extend_from_slice(head);
    let result = send_body(writer, &mut out, body, framing, progress).await;
    spare::keep_write(out);
    result
}

/// The body after the head already in `out`: frames that are ready go out together, and what
/// is buffered goes out whenever the client makes us wait. Each piece taken from the client
/// and each write is progress.
async fn send_body(
    writer: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    body: &mut RequestBody,
    framing: RequestFraming,
    progress: &Cell<Instant>,
) -> Result<(), Failure> {
    let mut sent: u64 = 0;
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                flush(writer, out, progress).await?;
                poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
            }
        };
        progress.set(Instant::now());
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(Failure::ClientBody(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        sent += data.len() as u64;
        match framing {
            RequestFraming::Length(length) if sent > length => {
                return Err(Failure::ClientBody("the request body is longer than its length".into()));
            }
            RequestFraming::Chunked => {
                let _ = write!(out, "{:x}\r\n", data.len());
            }
            _ => {}
        }
        if data.len() <= COPY_LIMIT {
            out.extend_from_slice(&data);
        } else {
            flush(writer, out, progress).await?;
            writer.write_all(&data).await.map_err(Failure::Io)?;
            progress.set(Instant::now());
        }
        if framing == RequestFraming::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= COPY_LIMIT {
            flush(writer, out, progress).await?;
        }
    }
    match framing {
        RequestFraming::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        RequestFraming::Length(length) if sent < length => {
            return Err(Failure::ClientBody("the request body ended before its length".into()));
        }
        _ => {}
    }
    flush(writer, out, progress).await
}

async fn flush(writer: &mut WriteHalf<'_>, out: &mut Vec<u8>, progress: &Cell<Instant>) -> Result<(), Failure> {
    if !out.is_empty() {
        writer.write_all(out).await.map_err(Failure::Io)?;
        out.clear();
        progress.set(Instant::now());
    }
    Ok(())
}

/// Reads up to the final response head, skipping interim (1xx) ones other than `101`.
async fn receive_head(
    reader: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<ResponseHead, Failure> {
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            match wire::parse_response(buf, head_request) {
                Ok(Some(head)) if head.parts.status.is_informational() && head.parts.status != 101 => continue,
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(why) => return Err(Failure::Malformed(why)),
            }
        }
        spare::make_room(buf, HEAD_READ);
        match reader.read_buf(buf).await {
            Ok(0) if !answered => {
                return Err(Failure::NoAnswer(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection without answering",
                )));
            }
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the upstream closed within the response head");
                return Err(Failure::Io(e));
            }
            Ok(_) => answered = true,
            Err(e) if !answered => return Err(Failure::NoAnswer(e)),
            Err(e) => return Err(Failure::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests;
