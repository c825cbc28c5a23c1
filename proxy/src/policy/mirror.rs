//! Mirrors (`mirror-target`, `mirror-host`, `mirror-request-body`), as nginx's `mirror` in
//! ingress-nginx's configuration: a copy of each request of the route goes to another server,
//! and its answer is read and thrown away.
//!
//! A copy never delays the request it copies. It is sent by a task of its own, and its body is
//! what the request's body was as it streamed to the upstream: each piece is handed over
//! without waiting. When the copy cannot keep up ([`QUEUED_PIECES`] pieces behind), or too many
//! copies are on their way already ([`IN_FLIGHT`] per worker), the copy is dropped, never the
//! request.
//!
//! The copy has the client's method and headers (less hop-by-hop ones), the target's path
//! with variables expanded against the request as the client sent it (`$request_uri` is the
//! client's, before `rewrite-target`), and `Host` from `mirror-host`, or the target's host.
//! With `mirror-request-body: off` it has no body, nor `Content-Length`.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tidegate_snapshot::{Mirror, Template, Timeouts};
use tokio::sync::mpsc;

use super::outbound::{Outbound, Url};
use super::variables::expand;
use super::{Facts, Head};
use crate::body::{BoxError, LocalBody};
use crate::connection::Connection;
use crate::upstream::{Attempts, Pool};

/// Body pieces a copy may fall behind by before it is dropped.
const QUEUED_PIECES: usize = 64;

/// Copies on their way at once, per worker.
const IN_FLIGHT: usize = 1024;

thread_local! {
    static SENDING: Cell<usize> = const { Cell::new(0) };
}

/// A route's mirror, compiled.
#[derive(Debug)]
pub(crate) struct MirrorFilter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    target: Template,
    host: Option<HeaderValue>,
    request_body: bool,
    timeouts: Timeouts,
    outbound: Outbound,
}

/// The copy of one request, ready to go once its body is known.
pub(crate) struct Copy {
    shared: Arc<Shared>,
    url: String,
    request: Request<()>,
}

impl MirrorFilter {
    pub(super) fn new(mirror: &Mirror, timeouts: Timeouts) -> MirrorFilter {
        let host = mirror.host.as_deref().and_then(|h| HeaderValue::from_str(h).ok());
        MirrorFilter {
            shared: Arc::new(Shared {
                target: mirror.target.clone(),
                host,
                request_body: mirror.request_body,
                timeouts,
                outbound: Outbound::default(),
            }),
        }
    }

    /// The copy of a request with `parts` as the client sent them (`client`: its address), or
    /// `None` when too many copies are on their way.
    pub(crate) fn copy(
        &self,
        conn: &Connection,
        pool: &Rc<Pool>,
        client: std::net::IpAddr,
        parts: &Parts,
    ) -> Option<Copy> {
        if SENDING.get() >= IN_FLIGHT {
            tracing::debug!("mirror: {IN_FLIGHT} copies on their way; this one is dropped");
            return None;
        }
        let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let head = Head {
            method: &parts.method,
            uri: &parts.uri,
            host: crate::headers::strip_port(host),
            headers: &parts.headers,
            client,
        };
        let url = expand(&self.shared.target, &Facts::of(conn, head, pool));
        let mut headers = HeaderMap::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            headers.append(name, value.clone());
        }
        crate::headers::strip_hop_by_hop(&mut headers, false);
        if !self.shared.request_body {
            headers.remove(header::CONTENT_LENGTH);
            headers.remove(header::TRANSFER_ENCODING);
        }
        let mut request = Request::new(());
        *request.method_mut() = parts.method.clone();
        *request.headers_mut() = headers;
        Some(Copy { shared: Arc::clone(&self.shared), url, request })
    }
}

impl Copy {
    /// Sends the copy from a task of its own, and returns the body the upstream gets instead of
    /// `body`: the same, handing each piece to the copy too.
    pub(crate) fn send(self, pool: &Rc<Pool>, body: LocalBody) -> LocalBody {
        let Copy { shared, url, request } = self;
        let (body, copy_body) = if shared.request_body && !body.is_end_stream() {
            let (sender, receiver) = mpsc::channel(QUEUED_PIECES);
            let exact = body.size_hint().exact();
            let complete = Rc::new(Cell::new(false));
            let tee = Tee { inner: body, copy: Some(sender), complete: Rc::clone(&complete) };
            (LocalBody::new(tee), LocalBody::new(Copied { receiver, exact, complete }))
        } else {
            (body, crate::body::full(Bytes::new()))
        };
        let pool = Rc::clone(pool);
        SENDING.set(SENDING.get() + 1);
        tokio::task::spawn_local(async move {
            if let Err(why) = send(&shared, &pool, &url, request.map(|()| copy_body)).await {
                tracing::debug!(target = %url, "mirror: the copy did not go through: {why}");
            }
            SENDING.set(SENDING.get() - 1);
        });
        body
    }
}

/// Sends one copy and reads its answer to the end.
async fn send(shared: &Shared, pool: &Rc<Pool>, url: &str, mut request: Request<LocalBody>) -> Result<(), String> {
    let parsed = Url::parse(url)?;
    let host = match &shared.host {
        Some(host) => host.clone(),
        None => HeaderValue::from_str(parsed.authority).map_err(|e| e.to_string())?,
    };
    request.headers_mut().insert(header::HOST, host);
    *request.uri_mut() = parsed.path.parse().map_err(|e| format!("{url}: {e}"))?;
    let (endpoint, transport) = shared.outbound.target(&parsed).await?;
    let answer = pool
        .send(&mut Attempts::one(endpoint), &transport, request, None, shared.timeouts)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    answer.into_body().collect().await.map_err(|e| e.to_string())?;
    tracing::debug!(target = %url, status = status.as_u16(), "mirror: copy answered");
    Ok(())
}

/// A request body that hands each piece to a copy too, without waiting for it.
struct Tee {
    inner: LocalBody,
    /// Dropped once the copy falls behind or goes away, or at the end.
    copy: Option<mpsc::Sender<Bytes>>,
    /// Set when the body ended whole: the copy's body ends cleanly only then, in error else.
    complete: Rc<Cell<bool>>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(copy)) = (frame.data_ref(), &self.copy)
                    && copy.try_send(data.clone()).is_err()
                {
                    // Behind or gone: the copy ends here (its body in error), the request goes on.
                    self.copy = None;
                }
            }
            Poll::Ready(Some(Err(_))) => self.copy = None,
            Poll::Ready(None) => {
                self.complete.set(true);
                self.copy = None;
            }
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

/// The copy's body: the pieces the request's body handed over.
struct Copied {
    receiver: mpsc::Receiver<Bytes>,
    exact: Option<u64>,
    complete: Rc<Cell<bool>>,
}

impl Body for Copied {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.receiver.poll_recv(cx).map(|piece| match piece {
            Some(data) => Some(Ok(Frame::data(data))),
            None if self.complete.get() => None,
            None => Some(Err("the request's body went on without the copy".into())),
        })
    }

    fn size_hint(&self) -> SizeHint {
        self.exact.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
