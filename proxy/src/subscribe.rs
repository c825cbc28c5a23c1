//! The proxy's side of the config stream: subscribe to a controller, apply each snapshot,
//! acknowledge it, and keep doing so whatever happens to the controller.
//!
//! # Guarantees
//! - The runtime being served changes only when a snapshot builds; while the controller is away
//!   (restarting, unreachable, replaced) the last good configuration keeps serving.
//! - Reconnection backs off exponentially (100 ms to 10 s) with jitter, so a fleet of proxies
//!   does not stampede a restarted controller. With several controller URLs, each attempt goes
//!   to the next one: a proxy whose controller died moves to another replica.
//! - A controller that stops answering (a partition, not a closed socket) is noticed by HTTP/2
//!   pings within 15 s.
//! - `/readyz` turns 200 after the first snapshot is applied and stays so across reconnections.
//! - While subscribed, the counts of shared limits (`global-rate-limit`) are posted to the same
//!   controller every 100 ms and its totals taken back ([`crate::policy::shared_limit`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tidegate_snapshot::stream::{
    ACKS_PATH, Ack, Decoder, LIMITS_PATH, LimitSync, LimitTotals, PROXY_HEADER, SNAPSHOTS_PATH,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::Proxy;

/// Where and how to subscribe.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// `https://host:port` of each controller (in a cluster, usually one Service).
    pub controllers: Vec<Uri>,
    /// This proxy's name in acknowledgements.
    pub name: String,
    /// Client configuration: the controller's CA, this proxy's certificate, ALPN `h2`.
    pub tls: Arc<rustls::ClientConfig>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Subscribes forever (run it on its own thread's runtime).
pub async fn run(proxy: Proxy, subscription: Subscription) {
    let mut backoff = MIN_BACKOFF;
    for attempt in 0usize.. {
        let Some(controller) = subscription.controllers.get(attempt % subscription.controllers.len().max(1)) else {
            tracing::error!("no controller URL to subscribe to");
            return;
        };
        match session(&proxy, controller, &subscription).await {
            Ok(applied) => {
                tracing::warn!(controller = %controller, applied, "config stream ended; reconnecting");
                if applied > 0 {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(e) => {
                tracing::warn!(controller = %controller, error = %e, "config stream unavailable; serving the last good configuration");
            }
        }
        tokio::time::sleep(backoff + jitter(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Up to half of `backoff`, from the clock's nanoseconds (good enough to spread a fleet).
fn jitter(backoff: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let half = u32::try_from(backoff.as_millis() / 2).unwrap_or(u32::MAX).max(1);
    Duration::from_millis(u64::from(nanos % half))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One connection: returns how many snapshots it applied before the stream ended.
async fn session(proxy: &Proxy, uri: &Uri, subscription: &Subscription) -> Result<usize, BoxError> {
    let host = uri.host().ok_or("controller URL has no host")?;
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect((host, port)))
        .await
        .map_err(|_| "connect timed out")??;
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(host.to_owned())?;
    let tls = TlsConnector::from(Arc::clone(&subscription.tls)).connect(server_name, tcp).await?;
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });

    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{host}:{port}{SNAPSHOTS_PATH}"))
        .header(PROXY_HEADER, &subscription.name)
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(format!("controller answered {}", response.status()).into());
    }
    tracing::info!(controller = %uri, "subscribed to the config stream");
    let limits_uri: Uri = format!("https://{host}:{port}{LIMITS_PATH}").parse()?;
    let sync = AbortOnDrop(tokio::spawn(sync_limits(sender.clone(), limits_uri, subscription.name.clone())));
    let mut body = response.into_body();
    let mut decoder = Decoder::default();
    let mut applied = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        decoder.push(&data);
        while let Some(snapshot) = decoder.next_snapshot()? {
            let version = snapshot.version;
            let error = match proxy.apply(&snapshot) {
                Ok(done) => {
                    proxy.set_ready();
                    applied += 1;
                    for warning in &done.warnings {
                        tracing::warn!(version, "{warning}");
                    }
                    tracing::info!(
                        version,
                        apply_ms = done.duration.as_secs_f64() * 1000.0,
                        routing_rebuilt = done.routing_rebuilt,
                        "configuration applied"
                    );
                    None
                }
                Err(e) => {
                    tracing::error!(version, error = %e, "configuration refused; the previous one keeps serving");
                    Some(e.to_string())
                }
            };
            let ack = Ack { proxy: subscription.name.clone(), version, content: snapshot.content, error };
            let request = Request::builder()
                .method(Method::POST)
                .uri(format!("https://{host}:{port}{ACKS_PATH}"))
                .header(PROXY_HEADER, &subscription.name)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&ack)?)))?;
            let mut acks = sender.clone();
            tokio::spawn(async move {
                if let Err(e) = acks.send_request(request).await {
                    tracing::debug!(error = %e, "acknowledgement not delivered");
                }
            });
        }
    }
    drop(sync);
    Ok(applied)
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Posts the shared limits' counts to the controller and takes its totals back, every
/// [`SYNC_EVERY`](crate::policy::shared_limit::SYNC_EVERY), for as long as the session lasts.
async fn sync_limits(sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>, uri: Uri, name: String) {
    use crate::policy::shared_limit::{SYNC_EVERY, counts};
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Totals this session has seen up to (a new session hears them all again).
    let mut since = 0;
    loop {
        tick.tick().await;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        if !counts().any_limit() {
            continue;
        }
        let posted = LimitSync { since, counts: counts().sync_request(now) };
        let Ok(body) = serde_json::to_vec(&posted) else { continue };
        let Ok(request) = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(PROXY_HEADER, &name)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
        else {
            continue;
        };
        let answer = match sender.clone().send_request(request).await {
            Ok(answer) if answer.status() == StatusCode::OK => answer,
            Ok(answer) => {
                tracing::debug!(status = %answer.status(), "shared limit counts refused");
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "shared limit counts not delivered");
                continue;
            }
        };
        let Ok(body) = http_body_util::Limited::new(answer.into_body(), 16 << 20).collect().await else { continue };
        if let Ok(answer) = serde_json::from_slice::<LimitTotals>(&body.to_bytes()) {
            counts().sync_answer(&answer.totals);
            since = answer.seq;
        }
    }
}
