//! Bodies. A client's request body is a [`ClientBody`], whichever protocol it came over.
//! Every response is streamed through [`Observed`], which counts the bytes sent and reports once
//! when the body ends or is dropped (the client went away). Upstream bodies also pass through
//! [`IdleTimeout`], so an upstream that stops sending mid-body cannot hold a client forever.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;

use crate::http1::RequestStream;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body from the client: read off an HTTP/1 connection by our own loop, or an HTTP/2
/// stream's from hyper.
pub(crate) enum ClientBody {
    Http1(RequestStream),
    /// `ended`: the stream ended with its HEADERS (a GET's, mostly), asked once. Asking hyper
    /// takes the connection's stream lock, and the steps ask several times.
    Http2 {
        body: Incoming,
        ended: bool,
    },
    /// An internal request's body, whole (a subrequest's, or one Lua read before `ngx.exec`).
    Internal(Option<Bytes>),
}

impl ClientBody {
    pub(crate) fn http2(body: Incoming) -> Self {
        let ended = body.is_end_stream();
        ClientBody::Http2 { body, ended }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ClientBody::Http2 { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ClientBody::Internal(bytes) => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Http1(body) => body.is_end_stream(),
            ClientBody::Http2 { body, ended } => *ended || body.is_end_stream(),
            ClientBody::Internal(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Http1(body) => body.size_hint(),
            ClientBody::Http2 { body, .. } => body.size_hint(),
            ClientBody::Internal(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A boxed body that stays on its worker thread: requests sent upstream (a client's body,
/// Lua's replacement) and responses before observation (upstream bodies, our own, Lua-filtered
/// ones). Not `Send`: a client's HTTP/1 body reads from its connection and a body filter holds
/// the worker's Lua VM, and neither leaves the worker.
pub(crate) struct LocalBody(Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>);

impl LocalBody {
    pub(crate) fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        LocalBody(Box::pin(body.map_err(Into::into)))
    }
}

impl Body for LocalBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// A complete body from bytes we generate.
pub(crate) fn full(bytes: impl Into<Bytes>) -> LocalBody {
    LocalBody::new(Full::new(bytes.into()))
}

/// An upstream stopped sending for longer than the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?}")]
pub(crate) struct IdleTimeoutError(Duration);

/// Fails a body when no frame arrives within `limit` of the previous one (nginx's
/// `proxy_read_timeout` semantics: between two reads, not for the whole body).
pub(crate) struct IdleTimeout<B> {
    inner: B,
    limit: Duration,
    /// Armed only once the upstream makes us wait: a response that is already there (most
    /// small ones) never touches the timer wheel.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, limit: Duration) -> Self {
        IdleTimeout { inner, limit, timer: None }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // The next wait starts from now.
                self.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeoutError(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once with the bytes sent and whether the body reached its end.
pub(crate) type OnDone = Box<dyn FnOnce(u64, bool)>;

pub(crate) struct Observed {
    inner: LocalBody,
    bytes: u64,
    on_done: Option<OnDone>,
}

impl Observed {
    pub(crate) fn new(inner: LocalBody, on_done: OnDone) -> Self {
        Observed { inner, bytes: 0, on_done: Some(on_done) }
    }

    fn finish(&mut self, completed: bool) {
        if let Some(done) = self.on_done.take() {
            done(self.bytes, completed);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // A body never polled to the end (a HEAD answer, or the client went away): an empty
        // body (is_end_stream) is complete, any other was cut short.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// A request body cut off once it exceeds the route's limit (`proxy-body-size`).
pub(crate) struct Capped<B> {
    inner: B,
    limit: u64,
    seen: u64,
}

/// The error a [`Capped`] body ends with: the upstream step answers 413 for it.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the route's limit of {0} bytes")]
pub(crate) struct TooLarge(pub(crate) u64);

impl<B> Capped<B> {
    pub(crate) fn new(inner: B, limit: u64) -> Self {
        Capped { inner, limit, seen: 0 }
    }
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            self.seen += data.map_or(0, |d| d.len() as u64);
            if self.seen > self.limit {
                return Poll::Ready(Some(Err(Box::new(TooLarge(self.limit)))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body sent no faster than `rate` bytes a second once `free` bytes have gone
/// (`limit-rate`, `limit-rate-after`; nginx's `limit_rate`, `limit_rate_after`): each chunk
/// waits, before it goes, until the bytes sent so far are within the rate since the first one.
pub(crate) struct Throttled {
    inner: LocalBody,
    rate: u64,
    free: u64,
    sent: u64,
    started: Option<tokio::time::Instant>,
    /// A chunk held back until its time.
    held: Option<(Frame<Bytes>, Pin<Box<tokio::time::Sleep>>)>,
}

impl Throttled {
    pub(crate) fn new(inner: LocalBody, rate: u64, free: u64) -> Self {
        Throttled { inner, rate: rate.max(1), free, sent: 0, started: None, held: None }
    }
}

impl Body for Throttled {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some((_, sleep)) = self.held.as_mut() {
            std::task::ready!(sleep.as_mut().poll(cx));
            let (frame, _) = self.held.take().unzip();
            return Poll::Ready(frame.map(Ok));
        }
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let started = *self.started.get_or_insert_with(tokio::time::Instant::now);
        self.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
        let limited = self.sent.saturating_sub(self.free);
        let due = started + Duration::from_secs_f64(limited as f64 / self.rate as f64);
        if limited == 0 || due <= tokio::time::Instant::now() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let mut sleep = Box::pin(tokio::time::sleep_until(due));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.held = Some((frame, sleep));
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
