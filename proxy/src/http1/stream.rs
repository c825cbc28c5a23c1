//! The connection as the loop and a request body share it, the request body itself, and a
//! connection leaving HTTP/1 (a protocol switch, or the HTTP/2 preface) with the bytes already
//! read.
//!
//! Both sides borrow [`Conn`] only inside a poll, never across an await: the loop may be writing
//! the response while the body is still being read by the task sending it upstream.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::framing::chunked::{Decoded, Decoder};
use crate::framing::spare;
use crate::reactor::{ClientStream, Key};

/// A client stream, plain or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {
    /// Ready once the socket underneath has bytes to read or has ended; otherwise `cx` is woken
    /// when it does. (The worker parks its connections in the epoll set instead.)
    #[cfg(test)]
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The socket's place in its worker's epoll set (`None`: it is not in one, and cannot wait
    /// there without a task).
    fn key(&self) -> Option<Key>;

    /// The plain socket, if that is all this is.
    fn into_client(self: Box<Self>) -> Result<ClientStream, Box<dyn Io>>;
}

/// A stream outside the worker's set: an upstream connection switched to another protocol (the
/// far side of a WebSocket tunnel), and the loop's own tests.
impl Io for tokio::net::TcpStream {
    #[cfg(test)]
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn key(&self) -> Option<Key> {
        None
    }

    fn into_client(self: Box<Self>) -> Result<ClientStream, Box<dyn Io>> {
        Err(self)
    }
}

/// Bytes read at once for a request head, and at most for body data.
const HEAD_READ: usize = 4096;
const BODY_READ: usize = 64 * 1024;

/// Where the current request's body stands.
#[derive(Debug)]
pub(crate) enum BodyState {
    Length(u64),
    Chunked(Decoder),
    Done,
    /// Broken framing or the client left: the connection cannot carry another request.
    Failed,
}

pub(crate) struct Conn {
    /// `None` once the connection has been handed over.
    pub(crate) io: Option<Box<dyn Io>>,
    /// Read and not yet consumed; empty, and without an allocation, while the connection idles.
    pub(crate) buf: BytesMut,
    /// The request [`BodyState`] belongs to (0: none; bodies of other requests get an error).
    pub(crate) request: u64,
    pub(crate) body: BodyState,
    /// How long a body may send nothing (nginx's `client_body_timeout`), and the wait running.
    body_timeout: std::time::Duration,
    body_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection handed over")
}

impl Conn {
    pub(crate) fn new(io: Box<dyn Io>, body_timeout: std::time::Duration) -> Self {
        Conn { io: Some(io), buf: BytesMut::new(), request: 0, body: BodyState::Done, body_timeout, body_wait: None }
    }

    /// Reads more into the buffer: `Ok(0)` at the end of the stream. A buffer that is still
    /// empty when nothing can be read (or the stream ended) is given back (to the worker's
    /// spare, see [`spare`]), so a waiting connection holds no memory and a closing one frees
    /// none.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else { return Poll::Ready(Err(closed())) };
        spare::make_room(&mut self.buf, want);
        let polled = tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.buf);
        // Nothing read (yet, or ever: the end of the stream or an error) leaves nothing to keep.
        if self.buf.is_empty() && !matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            spare::keep_read(std::mem::take(&mut self.buf));
        }
        polled
    }

    pub(crate) fn poll_fill_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = if self.buf.is_empty() { HEAD_READ } else { self.buf.len() };
        self.poll_fill(cx, want)
    }

    /// The next piece of the current request's body; `None` at its end.
    pub(crate) fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let want = match &mut self.body {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Failed => return Poll::Ready(Some(Err(io::Error::other("the request body was cut short")))),
                BodyState::Length(0) => {
                    self.body = BodyState::Done;
                    return Poll::Ready(None);
                }
                BodyState::Length(left) => {
                    let left_now = usize::try_from(*left).unwrap_or(usize::MAX);
                    if !self.buf.is_empty() {
                        let n = self.buf.len().min(left_now);
                        *left -= n as u64;
                        return Poll::Ready(Some(Ok(self.buf.split_to(n).freeze())));
                    }
                    left_now.min(BODY_READ)
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut self.buf, BODY_READ) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Decoded::End) => {
                        self.body = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => 8192,
                    Err(why) => {
                        self.body = BodyState::Failed;
                        return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, why))));
                    }
                },
            };
            let Poll::Ready(filled) = self.poll_fill(cx, want) else {
                // Nothing from the client: the body timeout runs between two reads.
                let timeout = self.body_timeout;
                let wait = self.body_wait.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if wait.as_mut().poll(cx).is_ready() {
                    self.body_wait = None;
                    self.body = BodyState::Failed;
                    let e = io::Error::new(io::ErrorKind::TimedOut, "the client sent no body for client-body-timeout");
                    return Poll::Ready(Some(Err(e)));
                }
                return Poll::Pending;
            };
            self.body_wait = None;
            match filled {
                Ok(0) => {
                    self.body = BodyState::Failed;
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed before the end of the body");
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.body = BodyState::Failed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(closed())),
        }
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(closed())),
        }
    }

    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Takes the stream out, with what was read and not consumed.
    pub(crate) fn detach(&mut self) -> Option<Detached> {
        let io = self.io.take()?;
        Some(Detached { io, read: std::mem::take(&mut self.buf).freeze() })
    }
}

/// The body of a request received over HTTP/1, read from the connection as it is polled.
pub(crate) struct RequestStream {
    pub(crate) conn: Rc<RefCell<Conn>>,
    pub(crate) request: u64,
}

impl Body for RequestStream {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut conn = self.conn.borrow_mut();
        if conn.request != self.request {
            return Poll::Ready(Some(Err(io::Error::other("the request is over"))));
        }
        conn.poll_body(cx).map(|piece| piece.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.conn
            .try_borrow()
            .is_ok_and(|c| c.request == self.request && matches!(c.body, BodyState::Done | BodyState::Length(0)))
    }

    fn size_hint(&self) -> SizeHint {
        match self.conn.try_borrow().as_deref() {
            Ok(Conn { request, body: BodyState::Length(left), .. }) if *request == self.request => {
                SizeHint::with_exact(*left)
            }
            _ => SizeHint::default(),
        }
    }
}

/// A connection taken out of the HTTP/1 loop: reads give the bytes already buffered first.
pub(crate) struct Detached {
    io: Box<dyn Io>,
    read: Bytes,
}

impl Detached {
    pub(crate) fn new(io: Box<dyn Io>) -> Self {
        Detached { io, read: Bytes::new() }
    }

    /// A stream whose first reads give `read`.
    pub(crate) fn with_read(io: Box<dyn Io>, read: Bytes) -> Self {
        Detached { io, read }
    }
}

impl AsyncRead for Detached {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Detached {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The client side of a protocol switch: gives the connection once the `101` response has been
/// written. (Shared and locked only because request extensions must be `Clone + Sync`; it is
/// taken once, on the worker's thread.)
#[derive(Clone)]
pub(crate) struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Detached>>>>);

impl OnUpgrade {
    pub(crate) fn new() -> (oneshot::Sender<Detached>, Self) {
        let (sender, receiver) = oneshot::channel();
        (sender, OnUpgrade(Arc::new(Mutex::new(Some(receiver)))))
    }

    pub(crate) async fn wait(self) -> Option<Detached> {
        let receiver = self.0.lock().ok()?.take()?;
        receiver.await.ok()
    }
}
