//! HTTP/1.1 connections to upstream endpoints, kept alive in a per-worker pool.
//!
//! Each worker owns one [`Pool`]; nothing in it is shared across threads, so checking a
//! connection out or in takes no lock. A connection returns to the pool only once hyper reports
//! it ready for the next request (the response body has been read to the end); upgraded
//! (WebSocket) and failed connections never return.
//!
//! # Errors
//! [`UpstreamError`] says what went wrong in terms of the status the client gets: a refused or
//! failed connection is 502, a connect or read timeout is 504.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tidegate_snapshot::Timeouts;
use tokio::net::TcpStream;
use tokio::time::timeout;

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
    Connect(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("no response from {0} within the read timeout")]
    ReadTimeout(SocketAddr),
    #[error("exchange with {0} failed: {1}")]
    Protocol(SocketAddr, hyper::Error),
}

impl UpstreamError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Connect(..) | UpstreamError::Protocol(..) => StatusCode::BAD_GATEWAY,
            UpstreamError::ConnectTimeout(_) | UpstreamError::ReadTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// One worker's upstream connections.
#[derive(Default)]
pub(crate) struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
}

impl Pool {
    /// Sends a request to `endpoint`, on a pooled connection when one is ready. A pooled
    /// connection the upstream has closed meanwhile is detected before the request is written,
    /// and the request goes out on the next one.
    pub(crate) async fn send(
        self: &Rc<Self>,
        endpoint: SocketAddr,
        mut request: Request<RequestBody>,
        timeouts: Timeouts,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let read = Duration::from_millis(timeouts.read_ms);
        while let Some(mut sender) = self.checkout(endpoint) {
            match timeout(read, sender.try_send_request(request)).await {
                Err(_) => return Err(UpstreamError::ReadTimeout(endpoint)),
                Ok(Ok(response)) => {
                    self.recycle(endpoint, sender);
                    return Ok(response);
                }
                Ok(Err(mut failed)) => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Protocol(endpoint, failed.into_error())),
                },
            }
        }
        let mut sender = self.connect(endpoint, Duration::from_millis(timeouts.connect_ms)).await?;
        match timeout(read, sender.send_request(request)).await {
            Err(_) => Err(UpstreamError::ReadTimeout(endpoint)),
            Ok(Err(e)) => Err(UpstreamError::Protocol(endpoint, e)),
            Ok(Ok(response)) => {
                self.recycle(endpoint, sender);
                Ok(response)
            }
        }
    }

    fn checkout(&self, endpoint: SocketAddr) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() < IDLE_TIMEOUT && entry.sender.is_ready() {
                return Some(entry.sender);
            }
        }
        None
    }

    async fn connect(&self, endpoint: SocketAddr, limit: Duration) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let stream = match timeout(limit, TcpStream::connect(endpoint)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout(endpoint)),
            Ok(Err(e)) => return Err(UpstreamError::Connect(endpoint, e)),
            Ok(Ok(s)) => s,
        };
        // Small responses must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Protocol(endpoint, e))?;
        tokio::task::spawn_local(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Returns the connection to the pool once it is ready for another request.
    fn recycle(self: &Rc<Self>, endpoint: SocketAddr, mut sender: SendRequest<RequestBody>) {
        let pool = Rc::clone(self);
        tokio::task::spawn_local(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.idle.borrow_mut();
            let list = idle.entry(endpoint).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(Idle { sender, since: Instant::now() });
            }
        });
    }
}
