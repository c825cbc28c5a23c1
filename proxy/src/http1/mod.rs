//! HTTP/1.1 (and 1.0) from the client side: our own connection loop rather than hyper's, so
//! that a connection waiting for its next request holds no buffers, as nginx's do.
//!
//! ```text
//! idle ─(readable: read into a fresh buffer)─> head (httparse) ─> service(request) ─> response
//!   ^                                              │                    │
//!   └──── keep-alive, rest of the body discarded ──┴── 101: the stream leaves with what was read
//! ```
//!
//! - While idle the connection is a small task and a socket; the request's work (parsing,
//!   the service's future, the response) lives in a box that is freed when it ends.
//! - Request bodies stream from the connection as the service polls them (Content-Length or
//!   chunked); `Expect: 100-continue` is answered before the service runs.
//! - Responses are framed by their `Content-Length`, by the body's exact size, chunked for
//!   HTTP/1.1 or delimited by the close for HTTP/1.0. The status line is `HTTP/1.1` whatever the
//!   client spoke, as nginx does.
//! - The HTTP/2 preface on a fresh connection (h2c with prior knowledge) hands the connection
//!   to the caller; so does a `101 Switching Protocols` answer to an upgrade request, through
//!   the [`OnUpgrade`] the request carries.
//! - Malformed heads get 400, oversized ones 431, and the connection closes.

pub(crate) mod head;
mod stream;

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Body;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::alarm::Alarm;
use crate::framing::{chunked, spare};
use crate::headers::write_line;
use head::{Framing, Head, Refused};
use stream::{BodyState, Conn};
pub(crate) use stream::{Detached, Io, OnUpgrade, RequestStream};

/// Time a client has to send a request head once it started one, or the first head of a new
/// connection, unless the configuration says (nginx's `client_header_timeout`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// nginx's default `client_body_timeout`.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Time an idle keep-alive connection is kept, unless the configuration says (nginx's
/// `keepalive_timeout`).
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(75);

/// Requests one client connection carries unless the configuration says (nginx's and
/// ingress-nginx's `keepalive_requests` default).
const KEEP_ALIVE_REQUESTS: u64 = 1000;

/// What a client connection may take: the global ConfigMap's `client-header-timeout`,
/// `keep-alive` and `keep-alive-requests`, or the defaults above.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) header: Duration,
    /// How long a request body may send nothing (`client-body-timeout`).
    pub(crate) body: Duration,
    pub(crate) keep_alive: Duration,
    /// Requests one connection carries; the last response says `Connection: close`.
    pub(crate) requests: u64,
}

impl Limits {
    pub(crate) fn of(settings: &tidegate_snapshot::ClientConnections) -> Limits {
        Limits {
            header: settings.header_seconds.map_or(HEADER_READ_TIMEOUT, Duration::from_secs),
            body: settings.body_seconds.map_or(BODY_READ_TIMEOUT, Duration::from_secs),
            keep_alive: settings.keep_alive_seconds.map_or(KEEP_ALIVE_TIMEOUT, Duration::from_secs),
            requests: settings.keep_alive_requests.unwrap_or(KEEP_ALIVE_REQUESTS),
        }
    }
}
/// A connection that has had nothing to read for this long leaves the loop ([`Ended::Idle`]),
/// to wait without a task. A busy client's next request (a round trip) comes well within it,
/// so only connections that really idle pay for leaving and coming back (a task freed and a
/// new one spawned), and a burst of new connections that go quiet does not leave a burst of freed
/// tasks behind.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(20);
/// What is read and dropped of a body the service left unread before the connection is reused;
/// beyond either bound it closes instead.
const MAX_DISCARD: usize = 1 << 20;
const DISCARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Body data at most this large is copied into the output buffer; larger goes out on its own.
const COPY_LIMIT: usize = 16 * 1024;

/// A response extension: send nothing and close the connection (nginx's `444`, Lua's
/// `ngx.exit(ngx.ERROR)`). Over HTTP/2 the stream is reset instead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CloseConnection;

/// How a connection left the loop.
pub(crate) enum Ended {
    Closed,
    /// The client opened with the HTTP/2 preface.
    Http2(Detached),
    /// Nothing to read for [`PARK_AFTER`]: the caller keeps the connection until it is
    /// readable, then serves it again (or closes it at `deadline`).
    Idle(Idle),
    /// A request head was answered with this status (400, 431) and the connection closed.
    Refused(StatusCode),
}

/// A connection waiting for its next request, between two runs of [`serve`]. It holds no
/// buffer and nothing was left unread.
pub(crate) struct Idle {
    pub(crate) io: Box<dyn Io>,
    /// Requests served so far (none: the next head is the connection's first).
    pub(crate) served: u64,
    /// When the connection closes if no request has started.
    pub(crate) deadline: Instant,
}

/// The upgrade a request carries when it asked to switch protocols (HTTP/1.1 `Upgrade`).
pub(crate) fn on_upgrade<B>(request: &mut Request<B>) -> Option<OnUpgrade> {
    request.extensions_mut().remove::<OnUpgrade>()
}

/// Serves requests on one connection until it closes, fails, switches protocols, idles or a
/// drain starts (`shutdown` turns true: an idle connection closes within [`PARK_AFTER`], a busy
/// one after its response). `served`: requests served on it before (by earlier runs).
pub(crate) async fn serve<S, F, B>(
    io: Box<dyn Io>,
    mut served: u64,
    limits: Limits,
    mut service: S,
    shutdown: watch::Receiver<bool>,
) -> Ended
where
    S: FnMut(Request<RequestStream>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let conn = Rc::new(RefCell::new(Conn::new(io, limits.body)));
    let mut alarm = Alarm::default();
    loop {
        // No await inside this match: the matched value would be kept in the task's state.
        let mut head = match next_head(&conn, served == 0, limits, &shutdown, &mut alarm).await {
            Next::Head(head) => head,
            Next::Closed => return Ended::Closed,
            Next::Refused(status) => return Ended::Refused(status),
            Next::Http2 => return conn.borrow_mut().detach().map_or(Ended::Closed, Ended::Http2),
            Next::Idle(deadline) => {
                let io = conn.borrow_mut().io.take();
                return io.map_or(Ended::Closed, |io| Ended::Idle(Idle { io, served, deadline }));
            }
        };
        served += 1;
        // The connection's last request (`keep-alive-requests`), or keep-alive off.
        head.keep_alive &= served < limits.requests && !limits.keep_alive.is_zero();
        match Box::pin(exchange(&conn, head, served, &mut service, &shutdown)).await {
            After::Next => {}
            After::Close => {
                let _ = poll_fn(|cx| conn.borrow_mut().poll_shutdown(cx)).await;
                return Ended::Closed;
            }
            After::Switched => return Ended::Closed,
        }
    }
}

// Returned once per request and moved straight into the request's box: boxing the head here
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    /// The connection opened with the HTTP/2 preface.
    Http2,
    Closed,
    /// Nothing arrived for [`PARK_AFTER`]; the connection closes at this deadline.
    Idle(Instant),
    /// The head was refused with this status; the connection is closed.
    Refused(StatusCode),
}

/// Waits for the next request head: without a buffer while nothing has arrived, closing on
/// timeouts or the end of the stream, and leaving the loop once idle for [`PARK_AFTER`], or
/// closing then if a drain has started. A head that cannot be served is answered here, and the
/// connection closes.
async fn next_head(
    conn: &RefCell<Conn>,
    first: bool,
    limits: Limits,
    shutdown: &watch::Receiver<bool>,
    alarm: &mut Alarm,
) -> Next {
    let now = Instant::now();
    let mut deadline = now + if first { limits.header } else { limits.keep_alive };
    let park_at = now + PARK_AFTER;
    let mut started = false;
    loop {
        let (idle, refused) = {
            let mut c = conn.borrow_mut();
            let mut refused = None;
            if !c.buf.is_empty() {
                match head::parse(&mut c.buf) {
                    Ok(Some(head)) => return Next::Head(head),
                    Ok(None) => {}
                    Err(why) => refused = Some(why),
                }
            }
            (c.buf.is_empty(), refused)
        };
        if let Some(why) = refused {
            if first && why == Refused::Http2Preface {
                return Next::Http2;
            }
            return Next::Refused(refuse(conn, &why).await);
        }
        if !idle && !started {
            started = true;
            deadline = Instant::now() + limits.header;
        }
        let read = poll_fn(|cx| conn.borrow_mut().poll_fill_head(cx));
        // Idle, it parks first: the last read found nothing, so nothing waits unread.
        let parks = idle && park_at < deadline;
        // The read first: when the bytes are there, no timer is set. A drain is not watched
        // for: an idle connection learns of it when it would park, within [`PARK_AFTER`]
        // (watching took a `Notified` made and dropped per request).
        let read = tokio::select! {
            biased;
            read = read => read,
            () = alarm.ring_at(if parks { park_at } else { deadline }) => {
                return if parks && !*shutdown.borrow() { Next::Idle(deadline) } else { Next::Closed };
            }
        };
        match read {
            Ok(0) | Err(_) => return Next::Closed,
            Ok(_) => {}
        }
    }
}

/// Answers a head that cannot be served, and the connection closes; the status it got.
async fn refuse(conn: &RefCell<Conn>, why: &Refused) -> StatusCode {
    let (status, detail) = match why {
        Refused::Malformed(what) => (StatusCode::BAD_REQUEST, *what),
        Refused::TooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"),
        Refused::Http2Preface => (StatusCode::BAD_REQUEST, "HTTP/2 preface after an HTTP/1 request"),
    };
    tracing::debug!(status = status.as_u16(), detail, "request refused");
    let text = format!("{} {}: {detail}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut out = Vec::with_capacity(256);
    status_line(&mut out, status, None);
    out.extend_from_slice(b"server: tidegate\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: ");
    out.extend_from_slice(text.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(text.as_bytes());
    if write_all(conn, &out).await.is_ok() {
        let _ = poll_fn(|cx| conn.borrow_mut().poll_shutdown(cx)).await;
    }
    status
}

enum After {
    Next,
    Close,
    Switched,
}

/// One request and its response.
async fn exchange<S, F, B>(
    conn: &Rc<RefCell<Conn>>,
    head: Head,
    id: u64,
    service: &mut S,
    shutdown: &watch::Receiver<bool>,
) -> After
where
    S: FnMut(Request<RequestStream>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let Head { parts, framing, keep_alive, expect_continue, upgrade } = head;
    let waiting_body = {
        let mut c = conn.borrow_mut();
        c.request = id;
        c.body = match framing {
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(chunked::Decoder::new()),
        };
        let waiting = framing != Framing::Length(0) && c.buf.is_empty();
        // The head is out of the buffer: an empty one goes back to the worker's spare rather
        // than stay with the request for as long as it takes (a body read takes it again).
        if c.buf.is_empty() {
            spare::keep_read(std::mem::take(&mut c.buf));
        }
        waiting
    };
    if expect_continue && waiting_body && write_all(conn, b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
        return After::Close;
    }
    let is_head = parts.method == Method::HEAD;
    let version = parts.version;
    let mut request = Request::from_parts(parts, RequestStream { conn: Rc::clone(conn), request: id });
    let switch = upgrade.then(|| {
        let (sender, on_upgrade) = OnUpgrade::new();
        request.extensions_mut().insert(on_upgrade);
        sender
    });
    let response = service(request).await;
    if response.extensions().get::<CloseConnection>().is_some() {
        return After::Close;
    }
    let keep_alive = keep_alive && !*shutdown.borrow();

    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(switch) = switch
    {
        let mut out = Vec::with_capacity(256);
        status_line(&mut out, response.status(), None);
        encode_head(&mut out, response.headers(), Out::Switch, version, true);
        if write_all(conn, &out).await.is_err() || poll_fn(|cx| conn.borrow_mut().poll_flush(cx)).await.is_err() {
            return After::Close;
        }
        let detached = conn.borrow_mut().detach();
        if let Some(detached) = detached {
            let _ = switch.send(detached);
        }
        return After::Switched;
    }

    if !write_response(conn, response, is_head, version, keep_alive).await {
        return After::Close;
    }
    if discard_body(conn).await { After::Next } else { After::Close }
}

/// Reads and drops what the service left of the request body, so the next request can start;
/// false when that is too much or takes too long.
async fn discard_body(conn: &RefCell<Conn>) -> bool {
    // A body stream the service still holds gets an error from now on.
    conn.borrow_mut().request = 0;
    // Timed from the first wait: a body already read to its end (the usual case) sets no timer.
    let deadline = async { tokio::time::sleep(DISCARD_TIMEOUT).await };
    tokio::pin!(deadline);
    let mut discarded = 0;
    loop {
        let piece = tokio::select! {
            biased;
            piece = poll_fn(|cx| conn.borrow_mut().poll_body(cx)) => piece,
            () = &mut deadline => return false,
        };
        match piece {
            None => return true,
            Some(Ok(data)) => {
                discarded += data.len();
                if discarded > MAX_DISCARD {
                    return false;
                }
            }
            Some(Err(_)) => return false,
        }
    }
}

/// How a response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304); the headers stay as they are.
    None,
    /// `add_header` when the length comes from the body, not from a `Content-Length` header.
    Length {
        length: u64,
        add_header: bool,
    },
    Chunked,
    /// HTTP/1.0 and no length known: the body ends when the connection closes.
    UntilClose,
    /// The head of a `101`: its headers as they are.
    Switch,
}

/// Writes a response; true when it went out whole and the connection carries on (the client
/// keeps it and the body's end did not need the close).
async fn write_response<B>(
    conn: &RefCell<Conn>,
    response: Response<B>,
    is_head: bool,
    version: Version,
    keep_alive: bool,
) -> bool
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let no_length = status.is_informational() || status == StatusCode::NO_CONTENT;
    let exact = if declared.is_none() && !no_length && status != StatusCode::NOT_MODIFIED {
        body.size_hint().exact()
    } else {
        None
    };
    let out = if is_head || no_length || status == StatusCode::NOT_MODIFIED {
        Out::None
    } else if let Some(length) = declared.or(exact) {
        Out::Length { length, add_header: declared.is_none() }
    } else if version == Version::HTTP_11 {
        Out::Chunked
    } else {
        Out::UntilClose
    };
    let keep_alive = keep_alive && out != Out::UntilClose;
    let mut buf = spare::take_write(256 + parts.headers.len() * 48);
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().map(hyper::ext::ReasonPhrase::as_bytes);
    status_line(&mut buf, status, reason);
    encode_head(&mut buf, &parts.headers, out, version, keep_alive);
    spare::keep_headers(parts.headers);
    if out == Out::None {
        drop(body);
        let sent = write_all(conn, &buf).await.is_ok() && poll_fn(|cx| conn.borrow_mut().poll_flush(cx)).await.is_ok();
        spare::keep_write(buf);
        return sent && keep_alive;
    }

    let mut sent: u64 = 0;
    let mut whole = true;
    loop {
        // Whatever is ready goes out together with the head; a body that makes us wait gets
        // what is buffered sent first.
        let frame = match poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if send(conn, &mut buf).await.is_err() {
                    return false;
                }
                poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let mut data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                let _ = send(conn, &mut buf).await;
                return false;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        match out {
            Out::Length { length, .. } => {
                let room = length - sent;
                if data.len() as u64 > room {
                    data.truncate(usize::try_from(room).unwrap_or(usize::MAX));
                    whole = false;
                }
                sent += data.len() as u64;
            }
            // Into the buffer directly: no string per chunk.
            Out::Chunked => {
                let _ = write!(buf, "{:x}\r\n", data.len());
            }
            _ => {}
        }
        if data.len() <= COPY_LIMIT {
            buf.extend_from_slice(&data);
        } else if send(conn, &mut buf).await.is_err() || write_all(conn, &data).await.is_err() {
            return false;
        }
        if out == Out::Chunked {
            buf.extend_from_slice(b"\r\n");
        }
        if buf.len() >= COPY_LIMIT && send(conn, &mut buf).await.is_err() {
            return false;
        }
        if !whole {
            break;
        }
    }
    match out {
        Out::Chunked => buf.extend_from_slice(b"0\r\n\r\n"),
        Out::Length { length, .. } => whole &= sent == length,
        _ => {}
    }
    let sent = send(conn, &mut buf).await.is_ok() && poll_fn(|cx| conn.borrow_mut().poll_flush(cx)).await.is_ok();
    spare::keep_write(buf);
    sent && whole && keep_alive
}

/// `HTTP/1.1`, the code and the reason: the handler's (`hyper::ext::ReasonPhrase`, which Lua's
/// `ngx.resp.set_status` sets) or the standard one.
fn status_line(out: &mut Vec<u8>, status: StatusCode, reason: Option<&[u8]>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.unwrap_or_else(|| status.canonical_reason().unwrap_or("Unknown").as_bytes()));
    out.extend_from_slice(b"\r\n");
}

/// The headers after the status line, with the framing and connection headers `out` calls for
/// (`Connection: keep-alive` only to HTTP/1.0 clients, for which it is not the default), and
/// `Server` and `Date` unless the map has them (`respond::finish_headers`).
fn encode_head(buf: &mut Vec<u8>, headers: &HeaderMap, out: Out, version: Version, keep_alive: bool) {
    let length = match out {
        Out::Length { length, add_header: true } => Some(length),
        _ => None,
    };
    let (mut server, mut date) = (false, false);
    for (name, value) in headers {
        let ours = name == header::TRANSFER_ENCODING
            || (name == header::CONNECTION && out != Out::Switch)
            || (name == header::CONTENT_LENGTH && length.is_some());
        if !ours {
            server |= name == header::SERVER;
            date |= name == header::DATE;
            write_line(buf, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !server {
        write_line(buf, b"server", crate::headers::SERVER_NAME.as_bytes());
    }
    if !date {
        write_line(buf, b"date", crate::headers::http_date().as_bytes());
    }
    if let Some(length) = length {
        write_line(buf, b"content-length", length.to_string().as_bytes());
    }
    if out == Out::Chunked {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if out != Out::Switch {
        if !keep_alive {
            buf.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            buf.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    buf.extend_from_slice(b"\r\n");
}

/// Writes and clears the buffer.
async fn send(conn: &RefCell<Conn>, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    write_all(conn, buf).await?;
    buf.clear();
    Ok(())
}

async fn write_all(conn: &RefCell<Conn>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| conn.borrow_mut().poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests;
