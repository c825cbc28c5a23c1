//! HTTP/1.1 to upstream endpoints, written and read inline by the request's own task, over
//! connections kept alive in the worker's [`Pool`].
//!
//! An exchange writes the request head (and the body as the client sends it) while it waits
//! for the response head, so an upstream that answers early (a `413`, a redirect) is heard at
//! once. The response body is read from the connection as the client side polls it
//! ([`Http1Body`]), and the connection goes back to the pool the moment its last byte is read.
//! Upgraded (WebSocket) connections, connections whose body was cut short and connections the
//! upstream asked to close never return. A request with no body whose reused connection fails
//! before any answer arrives is sent again on a new one, as nginx does for its cached
//! connections.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body;
use tidegate_snapshot::{Timeouts, UpstreamProtocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::attempts::{Attempts, Cause};
use super::body::Http1Body;
use super::stream::{Half, Io};
use super::transport::Transport;
use super::wire::{self, RequestFraming, ResponseHead};
use super::{Pool, RequestBody, UpstreamBody, UpstreamConn, UpstreamError};
use crate::alarm::Alarm;
use crate::body::BoxError;
use crate::framing::spare;
use crate::headers::Forwarded;

/// Bytes read at once for a response head.
const HEAD_READ: usize = 4096;
/// Request body data at most this large is copied into the output buffer; larger goes out on
/// its own.
const COPY_LIMIT: usize = 16 * 1024;

/// [`Pool::send`]: sends a request over HTTP/1.1 to the endpoint of `attempts` (and on to others
/// as they allow), on a pooled connection when one is open, and returns the response with its
/// body still to be read from the connection. `forwarded`: the `X-Forwarded-*` headers it
/// carries in place of the client's. Another protocol (HTTP/2, ALPN) goes on at once in a box
/// of its own.
pub(super) async fn send(
    pool: &Rc<Pool>,
    attempts: &mut Attempts<'_>,
    transport: &Transport,
    request: Request<RequestBody>,
    forwarded: Option<Forwarded<'_>>,
    timeouts: Timeouts,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    if !matches!(transport.protocol, UpstreamProtocol::Http1 | UpstreamProtocol::Https) {
        return Box::pin(pool.send_other(attempts, transport, request, forwarded, timeouts)).await;
    }
    let (mut parts, mut body) = request.into_parts();
    let framing = RequestFraming::of(&parts.method, body.is_end_stream(), body.size_hint().exact());
    let upgrade = crate::headers::is_upgrade(&parts.headers);
    let head_request = parts.method == Method::HEAD;
    // Only a request that is whole in its head can be sent twice.
    let replayable = matches!(framing, RequestFraming::Empty | RequestFraming::Length(0));
    let repeatable = replayable && parts.method.is_idempotent();
    let mut head = spare::take_write(256 + parts.headers.len() * 48);
    wire::encode_request(&mut head, &parts, forwarded.as_ref(), framing);
    spare::keep_headers(std::mem::take(&mut parts.headers));
    let limits =
        Limits { send: Duration::from_millis(timeouts.send_ms), read: Duration::from_millis(timeouts.read_ms) };

    let mut endpoint = attempts.endpoint();
    let exchanged = loop {
        let (mut conn, reused) = match pool.checkout(endpoint, transport.id) {
            Some(conn) => (conn, true),
            None => match transport.connect(endpoint, Duration::from_millis(timeouts.connect_ms)).await {
                Ok((io, _)) => (UpstreamConn::new(io, endpoint, transport.id).taken(), false),
                Err(e) => match attempts.next_after_error(&e, false, replayable).await {
                    // Nothing was sent: another endpoint may have it, whatever its method.
                    Some(next) => {
                        tracing::debug!(%endpoint, error = %e, next = %next, "trying the next endpoint");
                        endpoint = next;
                        continue;
                    }
                    None => break Err(e),
                },
            },
        };
        match exchange(&mut conn, &head, &mut body, framing, head_request, limits).await {
            Err(Failure::NoAnswer(e)) if reused && repeatable => {
                tracing::debug!(%endpoint, error = %e, "reused upstream connection was closed; sending again");
            }
            Err(failure) => {
                let e = failure.into_error(endpoint);
                match attempts.next_after_error(&e, true, replayable).await {
                    Some(next) => {
                        tracing::debug!(%endpoint, error = %e, next = %next, "trying the next endpoint");
                        endpoint = next;
                    }
                    None => break Err(e),
                }
            }
            Ok((response, sent_whole)) if attempts.retries_status(response.parts.status.as_u16()) => {
                let status = response.parts.status.as_u16();
                // The answer is dropped unread, and its connection with it.
                match attempts.next_after(Cause::Status(status), true, replayable).await {
                    Some(next) => {
                        tracing::debug!(%endpoint, status, next = %next, "trying the next endpoint");
                        endpoint = next;
                    }
                    None => break Ok((conn, response, sent_whole)),
                }
            }
            Ok((response, sent_whole)) => break Ok((conn, response, sent_whole)),
        }
    };
    spare::keep_write(head);
    let (conn, response, sent_whole) = exchanged?;

    let ResponseHead { parts, framing, keep_alive } = response;
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade {
            return Err(UpstreamError::Malformed(endpoint, "101 Switching Protocols to a request that did not ask"));
        }
        return Ok(Response::from_parts(parts, UpstreamBody::Http1(Http1Body::switched(conn, pool))));
    }
    // The connection carries on only if both messages were whole.
    let reusable = keep_alive && sent_whole;
    Ok(Response::from_parts(parts, UpstreamBody::Http1(Http1Body::new(conn, framing, reusable, pool))))
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
    let UpstreamConn { io, buf, stall, .. } = conn;
    match io {
        Io::Tcp(tcp) => {
            let (reader, writer) = tcp.split();
            exchange_on(reader, writer, buf, stall, head, body, framing, head_request, limits).await
        }
        // In a box of its own, so that the plain exchange's state stays as small as it was.
        Io::Tls(tls) => {
            Box::pin(async move {
                let tls = RefCell::new(&mut **tls);
                exchange_on(Half(&tls), Half(&tls), buf, stall, head, body, framing, head_request, limits).await
            })
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn exchange_on<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut writer: W,
    buf: &mut BytesMut,
    stall: &mut Alarm,
    head: &[u8],
    body: &mut RequestBody,
    framing: RequestFraming,
    head_request: bool,
    limits: Limits,
) -> Result<(ResponseHead, bool), Failure> {
    let progress = Cell::new(Instant::now());
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

async fn send_request<W: AsyncWrite + Unpin>(
    writer: &mut W,
    head: &[u8],
    body: &mut RequestBody,
    framing: RequestFraming,
    progress: &Cell<Instant>,
) -> Result<(), Failure> {
    if matches!(framing, RequestFraming::Empty | RequestFraming::Length(0)) {
        // Progress, too, but `exchange` marks it once this is done. Over TLS, the flush sends
        // what the session still holds.
        writer.write_all(head).await.map_err(Failure::Io)?;
        writer.flush().await.map_err(Failure::Io)?;
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
async fn send_body<W: AsyncWrite + Unpin>(
    writer: &mut W,
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

async fn flush<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut Vec<u8>,
    progress: &Cell<Instant>,
) -> Result<(), Failure> {
    if !out.is_empty() {
        writer.write_all(out).await.map_err(Failure::Io)?;
        writer.flush().await.map_err(Failure::Io)?;
        out.clear();
        progress.set(Instant::now());
    }
    Ok(())
}

/// Reads up to the final response head, skipping interim (1xx) ones other than `101`.
async fn receive_head<R: AsyncRead + Unpin>(
    reader: &mut R,
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
