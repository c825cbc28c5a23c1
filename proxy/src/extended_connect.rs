//! WebSocket over HTTP/2 (RFC 8441): an extended CONNECT with `:protocol: websocket` is turned,
//! where the HTTP/2 connection hands it over, into the HTTP/1.1 upgrade request the request
//! pipeline already knows (`GET` with `Upgrade: websocket`), and the upstream's `101` back into
//! the `200` that opens the stream for the tunnel. Everything between (routing, policies, Lua,
//! the upstream step and its tunnel) is the same for both protocols.
//!
//! The upstream speaks HTTP/1.1, so the request gets the `Sec-WebSocket-Key` an HTTP/1.1
//! handshake needs (RFC 8441 has none), and the answer loses the `Sec-WebSocket-Accept` that
//! goes with it. `Sec-WebSocket-Version`, `-Protocol` and `-Extensions` pass both ways.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http1::{Detached, Io, OnUpgrade};
use crate::reactor::Key;

/// Whether `request` opens a WebSocket over HTTP/2.
pub(crate) fn is_websocket<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns an extended CONNECT into an HTTP/1.1 WebSocket upgrade request: the stream, once the
/// answer opened it, is what the pipeline's upgrade hands the tunnel.
pub(crate) fn into_upgrade<B>(request: &mut Request<B>) {
    let opened = hyper::upgrade::on(&mut *request);
    let (sender, on_upgrade) = OnUpgrade::new();
    tokio::task::spawn_local(async move {
        match opened.await {
            Ok(upgraded) => {
                let _ = sender.send(Detached::new(Box::new(Stream(TokioIo::new(upgraded)))));
            }
            Err(e) => tracing::debug!(error = %e, "the WebSocket stream was not opened"),
        }
    });
    request.extensions_mut().insert(on_upgrade);
    *request.method_mut() = Method::GET;
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let key = base64::engine::general_purpose::STANDARD.encode(rand_key());
    if let Ok(key) = HeaderValue::from_str(&key) {
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
}

/// The answer to an extended CONNECT: the upstream's `101` becomes `200` (the stream stays open
/// for the tunnel), without the HTTP/1.1 handshake's own headers. Any other answer stays as it is.
pub(crate) fn answer<B>(response: &mut Response<B>) {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    for name in [header::CONNECTION, header::UPGRADE, header::SEC_WEBSOCKET_ACCEPT, header::CONTENT_LENGTH] {
        headers.remove(name);
    }
}

/// 16 random bytes for `Sec-WebSocket-Key`.
fn rand_key() -> [u8; 16] {
    let (a, b) = (crate::upstream::random(), crate::upstream::random());
    let mut key = [0; 16];
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..].copy_from_slice(&b.to_le_bytes());
    key
}

/// The opened HTTP/2 stream, as the tunnel's client side.
struct Stream(TokioIo<hyper::upgrade::Upgraded>);

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Io for Stream {
    #[cfg(test)]
    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }

    fn key(&self) -> Option<Key> {
        None
    }

    fn into_client(self: Box<Self>) -> Result<crate::reactor::ClientStream, Box<dyn Io>> {
        Err(self)
    }
}
