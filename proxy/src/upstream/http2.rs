//! HTTP/2 to upstream endpoints: h2c with prior knowledge, h2 over TLS, and so gRPC.
//!
//! Each worker keeps its own connections per endpoint and transport ([`Connections`]), and
//! sends each request on the first one with a stream to spare: as many requests share a
//! connection as the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` allows, and another connection is
//! opened when all are full. A connection's frames are read and written by a task of its own on
//! the worker; the request's task waits for the response head, and the request body, when there
//! is one, is sent by a task of its own as the client sends it, so that a bidirectional stream
//! (gRPC's) flows both ways at once. Trailers pass both ways.
//!
//! Timeouts are nginx's `grpc_*_timeout`: the send timeout bounds each wait while the request
//! body goes out, the read timeout runs from when all of it has gone.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tidegate_snapshot::Timeouts;

use super::attempts::Attempts;
use super::stream::Io;
use super::transport::Transport;
use super::{Pool, RequestBody, UpstreamBody, UpstreamError};
use crate::body::BoxError;
use crate::headers::Forwarded;

/// Connections kept per endpoint and transport, at most; past that, requests queue on the
/// least busy one (h2 waits for a stream to close).
const MAX_CONNECTIONS: usize = 64;
/// The receive windows offered to upstreams, per stream and per connection (h2's defaults of
/// 64 KiB hold a fast backend to a few hundred KiB per round trip).
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

/// One connection: its request handle, and how many of its streams are open.
struct Connection {
    sender: SendRequest<Bytes>,
    open: Rc<Cell<usize>>,
}

/// One worker's HTTP/2 upstream connections.
#[derive(Default)]
pub(super) struct Connections {
    by_key: RefCell<foldhash::HashMap<(SocketAddr, u64), Vec<Connection>>>,
}

impl Connections {
    pub(super) fn has(&self, key: (SocketAddr, u64)) -> bool {
        self.by_key.borrow().get(&key).is_some_and(|list| !list.is_empty())
    }

    /// A connection with a stream to spare; `None` when a new one should be opened. Closed
    /// connections are dropped on the way.
    fn pick(&self, key: (SocketAddr, u64)) -> Option<(SendRequest<Bytes>, Rc<Cell<usize>>)> {
        let mut by_key = self.by_key.borrow_mut();
        let list = by_key.get_mut(&key)?;
        list.retain_mut(is_open);
        let spare = list.iter().find(|c| c.open.get() < c.sender.current_max_send_streams());
        let chosen = match spare {
            Some(c) => c,
            None if list.len() >= MAX_CONNECTIONS => list.iter().min_by_key(|c| c.open.get())?,
            None => return None,
        };
        Some((chosen.sender.clone(), Rc::clone(&chosen.open)))
    }

    fn add(&self, key: (SocketAddr, u64), sender: SendRequest<Bytes>) -> Rc<Cell<usize>> {
        let open = Rc::new(Cell::new(0));
        self.by_key.borrow_mut().entry(key).or_default().push(Connection { sender, open: Rc::clone(&open) });
        open
    }

    /// Forgets closed connections (called by the worker's upkeep).
    pub(super) fn sweep(&self) {
        self.by_key.borrow_mut().retain(|_, list| {
            list.retain_mut(is_open);
            !list.is_empty()
        });
    }
}

fn is_open(connection: &mut Connection) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    !matches!(connection.sender.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// Counts a stream open on its connection for as long as it lives.
struct OpenStream(Rc<Cell<usize>>);

impl OpenStream {
    fn new(open: Rc<Cell<usize>>) -> OpenStream {
        open.set(open.get() + 1);
        OpenStream(open)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Sends a request over HTTP/2, on a pooled connection with a stream to spare (or on `fresh`,
/// just opened and negotiated), and returns the response with its body still to come.
pub(super) async fn send(
    pool: &Rc<Pool>,
    attempts: &mut Attempts<'_>,
    transport: &Transport,
    fresh: Option<Io>,
    request: Request<RequestBody>,
    forwarded: Option<Forwarded<'_>>,
    timeouts: Timeouts,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let (mut parts, body) = request.into_parts();
    let mut endpoint = attempts.endpoint();
    // HTTP/2 names the host in `:authority`, and has no connection-specific headers.
    let host = parts.headers.remove(header::HOST);
    for name in [header::CONNECTION, header::UPGRADE, header::TRANSFER_ENCODING, header::TE] {
        parts.headers.remove(name);
    }
    parts.headers.remove("keep-alive");
    parts.headers.remove("proxy-connection");
    if let Some(forwarded) = forwarded {
        forwarded.insert(&mut parts.headers, host.as_ref());
    }
    if parts.headers.get(header::CONTENT_TYPE).is_some_and(|t| t.as_bytes().starts_with(b"application/grpc")) {
        // gRPC servers require it: the response ends with trailers.
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let authority = host.as_ref().and_then(|h| h.to_str().ok()).map_or_else(|| endpoint.to_string(), str::to_owned);
    let scheme = if transport.protocol.tls() { "https" } else { "http" };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| UpstreamError::Malformed(endpoint, "the request's host cannot be an HTTP/2 authority"))?;
    parts.version = Version::HTTP_2;

    let connect = Duration::from_millis(timeouts.connect_ms);
    let (sender, open) = match fresh {
        Some(io) => handshake(pool, (endpoint, transport.id), io).await?,
        None => loop {
            let key = (endpoint, transport.id);
            if let Some(found) = pool.http2.pick(key) {
                break found;
            }
            let opened = match transport.connect(endpoint, connect).await {
                Ok((io, _)) => handshake(pool, key, io).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(found) => break found,
                // Nothing was sent: another endpoint may have it.
                Err(e) => match attempts.next_after_error(&e, false, false).await {
                    Some(next) => endpoint = next,
                    None => return Err(e),
                },
            }
        },
    };
    let failed = |e: h2::Error| UpstreamError::Http2(endpoint, e.to_string());
    let mut sender = match tokio::time::timeout(connect, sender.ready()).await {
        Ok(ready) => ready.map_err(failed)?,
        Err(_) => return Err(UpstreamError::ConnectTimeout(endpoint)),
    };
    let end = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(parts, ()), end).map_err(failed)?;
    let open = OpenStream::new(open);
    let send = Duration::from_millis(timeouts.send_ms);
    let read = Duration::from_millis(timeouts.read_ms);
    let sending = Rc::new(Sending { sent: Cell::new(end.then(Instant::now)), failed: RefCell::new(None) });
    if !end {
        tokio::task::spawn_local(send_body(body, stream, send, Rc::clone(&sending)));
    }
    let response = wait_for_head(response, &sending.sent, read).await.map_err(|e| {
        // The stream was reset because the client's body failed (cut at the body limit, or
        // broken off): that is the answer's cause.
        if let Some(cause) = sending.failed.borrow_mut().take() {
            return UpstreamError::ClientBody(endpoint, cause);
        }
        match e {
            None => UpstreamError::ReadTimeout(endpoint),
            Some(e) => failed(e),
        }
    })?;
    let (parts, recv) = response.into_parts();
    Ok(Response::from_parts(parts, UpstreamBody::Http2(Http2Body { recv, data_done: false, _open: open })))
}

/// Opens HTTP/2 on a new connection, and keeps it in the pool.
async fn handshake(
    pool: &Pool,
    key: (SocketAddr, u64),
    io: Io,
) -> Result<(SendRequest<Bytes>, Rc<Cell<usize>>), UpstreamError> {
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| UpstreamError::Http2(key.0, e.to_string()))?;
    let endpoint = key.0;
    tokio::task::spawn_local(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    let open = pool.http2.add(key, sender.clone());
    Ok((sender, open))
}

/// Waits for the response head: without a deadline while the request body goes out (its own
/// sending is bounded), then for the read timeout. `Err(None)` when it ran out.
async fn wait_for_head(
    mut response: h2::client::ResponseFuture,
    sent: &Cell<Option<Instant>>,
    read: Duration,
) -> Result<Response<RecvStream>, Option<h2::Error>> {
    loop {
        let due = sent.get().unwrap_or_else(Instant::now) + read;
        tokio::select! {
            biased;
            answer = &mut response => return answer.map_err(Some),
            () = tokio::time::sleep_until(due.into()) => {
                if sent.get().is_some_and(|at| at.elapsed() >= read) {
                    return Err(None);
                }
            }
        }
    }
}

/// How the request body's sending went: when it ended, or why it failed.
struct Sending {
    sent: Cell<Option<Instant>>,
    failed: RefCell<Option<BoxError>>,
}

/// Sends the client's body on the stream as it arrives, within the flow control the peer
/// grants, then its trailers or the end of the stream. A body that breaks off, or a wait longer
/// than the send timeout, resets the stream.
async fn send_body(mut body: RequestBody, mut stream: SendStream<Bytes>, limit: Duration, sending: Rc<Sending>) {
    loop {
        let frame = match tokio::time::timeout(limit, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                break;
            }
            Ok(Some(Err(e))) => {
                *sending.failed.borrow_mut() = Some(e);
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Err(_) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    break;
                }
                continue;
            }
        };
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let granted = tokio::time::timeout(limit, poll_fn(|cx| stream.poll_capacity(cx))).await;
            let room = match granted {
                Ok(Some(Ok(room))) => room,
                Ok(Some(Err(_)) | None) => return,
                Err(_) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    return;
                }
            };
            if room == 0 {
                continue;
            }
            let chunk = data.split_to(room.min(data.len()));
            if stream.send_data(chunk, false).is_err() {
                return;
            }
        }
    }
    sending.sent.set(Some(Instant::now()));
}

/// A response body read from its HTTP/2 stream: data as it arrives (its flow-control window
/// given back as it is taken), then the trailers.
pub(crate) struct Http2Body {
    recv: RecvStream,
    data_done: bool,
    _open: OpenStream,
}

impl Body for Http2Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(io::Error::other(e)))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(io::Error::other(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
