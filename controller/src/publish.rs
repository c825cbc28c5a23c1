//! The controller's side of the config stream: every replica serves its current snapshot to the
//! proxies that subscribe, over HTTP/2 with mutual TLS (the stream carries TLS keys).
//!
//! # Guarantees
//! - A proxy that subscribes gets the current snapshot at once, then every newer version; a
//!   proxy that falls behind skips straight to the newest (versions are whole snapshots).
//! - Nothing is sent before the first snapshot is published: a partial view never leaves.
//! - What each proxy acknowledged (or why it refused a version) is kept, for `/proxies` and
//!   statuses.
//! - Shared limits (`global-rate-limit`): each proxy posts what it admitted per key and window
//!   to `/v1/limits` and gets every proxy's totals back. The totals of this replica's proxies
//!   are kept for the current and the previous window of each limit, no longer.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tidegate_snapshot::Snapshot;
use tidegate_snapshot::stream::{
    ACKS_PATH, Ack, LIMITS_PATH, LimitSync, LimitTotals, PROXY_HEADER, SNAPSHOTS_PATH, WindowCount, encode,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// What the controller knows of one proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProxyState {
    /// The last version the proxy acknowledged, applied or refused.
    pub version: u64,
    /// That version's content id ([`tidegate_snapshot::Snapshot::content`]).
    #[serde(default)]
    pub content: u64,
    /// Why it refused that version.
    pub error: Option<String>,
    /// Open subscriptions from that proxy now.
    pub connected: usize,
}

/// Holds the current snapshot and the proxies' states.
#[derive(Debug)]
pub struct Publisher {
    current: watch::Sender<Option<Arc<Snapshot>>>,
    proxies: Mutex<BTreeMap<String, ProxyState>>,
    /// Bumped on every acknowledgement, connection and disconnection.
    proxies_changed: watch::Sender<u64>,
    /// Shared limits' totals.
    limits: Mutex<Totals>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl Publisher {
    pub fn new() -> Arc<Self> {
        Arc::new(Publisher {
            current: watch::Sender::new(None),
            proxies: Mutex::new(BTreeMap::new()),
            proxies_changed: watch::Sender::new(0),
            limits: Mutex::new(Totals::default()),
        })
    }

    /// Makes `snapshot` the one every proxy gets.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.send_replace(Some(Arc::new(snapshot)));
    }

    /// The proxies seen so far, by name.
    pub fn proxies(&self) -> BTreeMap<String, ProxyState> {
        self.proxies.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Changes whenever a proxy acknowledges, connects or disconnects.
    pub fn proxies_changed(&self) -> watch::Receiver<u64> {
        self.proxies_changed.subscribe()
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut ProxyState)) {
        if let Ok(mut proxies) = self.proxies.lock() {
            change(proxies.entry(name.to_owned()).or_default());
        }
        self.proxies_changed.send_modify(|n| *n += 1);
    }

    /// Serves subscriptions and acknowledgements until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let Ok((stream, remote)) = listener.accept().await else { continue };
            let (publisher, acceptor) = (Arc::clone(&self), acceptor.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(stream).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "config stream: TLS handshake refused");
                        return;
                    }
                };
                let service = service_fn(move |request| {
                    let publisher = Arc::clone(&publisher);
                    async move { Ok::<_, Infallible>(publisher.answer(request).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    async fn answer(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let name = request.headers().get(PROXY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("unnamed").to_owned();
        match (request.method(), request.uri().path()) {
            (&Method::GET, SNAPSHOTS_PATH) => self.subscribe(name),
            (&Method::POST, ACKS_PATH) => {
                let Ok(body) = Limited::new(request.into_body(), 64 << 10).collect().await else {
                    return status(StatusCode::BAD_REQUEST);
                };
                match serde_json::from_slice::<Ack>(&body.to_bytes()) {
                    Ok(ack) => {
                        if let Some(error) = &ack.error {
                            tracing::warn!(
                                proxy = ack.proxy,
                                version = ack.version,
                                error,
                                "proxy refused a configuration"
                            );
                        }
                        self.update(&ack.proxy, |p| {
                            p.version = ack.version;
                            p.content = ack.content;
                            p.error = ack.error;
                        });
                        status(StatusCode::NO_CONTENT)
                    }
                    Err(_) => status(StatusCode::BAD_REQUEST),
                }
            }
            (&Method::POST, LIMITS_PATH) => {
                let Ok(body) = Limited::new(request.into_body(), 16 << 20).collect().await else {
                    return status(StatusCode::BAD_REQUEST);
                };
                match serde_json::from_slice::<LimitSync>(&body.to_bytes()) {
                    Ok(posted) => {
                        let totals = self.add_up(posted);
                        let mut response = Response::new(BodyExt::boxed_unsync(Full::new(Bytes::from(
                            serde_json::to_vec(&totals).unwrap_or_default(),
                        ))));
                        response
                            .headers_mut()
                            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                        response
                    }
                    Err(_) => status(StatusCode::BAD_REQUEST),
                }
            }
            _ => status(StatusCode::NOT_FOUND),
        }
    }

    /// Adds a proxy's counts to the totals, and answers every total that changed since the
    /// proxy's last sync (with the one of the window before). Windows older than the one before
    /// the current are dropped.
    fn add_up(&self, posted: LimitSync) -> LimitTotals {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let Ok(mut totals) = self.limits.lock() else { return LimitTotals::default() };
        totals.counts.retain(|(_, _, window), total| (window + 2) * u64::from(total.window_seconds.max(1)) > now);
        totals.seq += 1;
        let seq = totals.seq;
        for count in posted.counts {
            let total = totals.counts.entry((count.limit, count.key, count.window)).or_insert(Total {
                requests: 0,
                window_seconds: count.window_seconds,
                changed: seq,
            });
            total.requests += count.count;
            total.changed = seq;
        }
        let answer = totals
            .counts
            .iter()
            .filter(|(_, total)| total.changed > posted.since)
            .map(|((limit, key, window), total)| {
                let before = (limit.clone(), key.clone(), window.saturating_sub(1));
                WindowCount {
                    limit: limit.clone(),
                    key: key.clone(),
                    window: *window,
                    window_seconds: total.window_seconds,
                    count: total.requests,
                    previous: totals.counts.get(&before).map_or(0, |t| t.requests),
                }
            })
            .collect();
        LimitTotals { seq, totals: answer }
    }

    /// A response whose body is the stream of snapshot frames.
    fn subscribe(self: Arc<Self>, name: String) -> Response<Body> {
        self.update(&name, |p| p.connected += 1);
        tracing::info!(proxy = name, "proxy subscribed");
        let guard = Subscription { publisher: Arc::clone(&self), name };
        let receiver = self.current.subscribe();
        let frames = futures_util::stream::unfold((receiver, guard, true), |(mut receiver, guard, first)| async move {
            // The first frame is the current snapshot, if there is one yet; then each change.
            if !first || receiver.borrow().is_none() {
                receiver.changed().await.ok()?;
            }
            let snapshot = receiver.borrow_and_update().clone()?;
            let frame = encode(&snapshot).ok()?;
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(frame))), (receiver, guard, false)))
        });
        let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames.boxed())));
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-tidegate-snapshots"));
        response
    }
}

/// The shared limits' totals of this replica's proxies.
#[derive(Debug, Default)]
struct Totals {
    /// Bumped on every post; each total remembers the post that last changed it.
    seq: u64,
    counts: HashMap<(String, String, u64), Total>,
}

#[derive(Debug)]
struct Total {
    requests: u64,
    window_seconds: u32,
    changed: u64,
}

/// Counts a subscription as open until its stream is dropped.
struct Subscription {
    publisher: Arc<Publisher>,
    name: String,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.publisher.update(&self.name, |p| p.connected = p.connected.saturating_sub(1));
        tracing::info!(proxy = self.name, "proxy unsubscribed");
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed_unsync(Full::new(Bytes::new())));
    *response.status_mut() = code;
    response
}
