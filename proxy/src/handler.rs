//! One request, start to finish: route, redirect or proxy, then the response headers every
//! answer carries, then metrics and the access log once the body is done.
//!
//! Handlers cannot fail: every error becomes a response here (404 no route, 502 upstream
//! refused or broke, 503 no ready endpoint, 504 upstream timeout), never a dropped connection.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tidegate_snapshot::RouteAction;

use crate::Shared;
use crate::access_log::Entry;
use crate::body::{IdleTimeout, Observed, ResponseBody, full};
use crate::headers::{Forwarded, is_upgrade, set_forwarded, strip_hop_by_hop};
use crate::metrics::{RequestLabels, status_class};
use crate::router::Match;
use crate::runtime::Runtime;
use crate::upstream::Pool;

/// State of one worker thread, shared by its connections; never crosses threads.
pub(crate) struct Worker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Rc<Pool>,
}

/// What a request knows about its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connection {
    pub(crate) remote: SocketAddr,
    pub(crate) local_port: u16,
    pub(crate) tls: bool,
}

/// Filled in while the request is handled, written out when its body is done.
struct Outcome {
    vhost: Option<String>,
    route: Option<String>,
    upstream: Option<SocketAddr>,
    upstream_time: Option<Duration>,
}

pub(crate) async fn handle(
    worker: Rc<Worker>,
    conn: Connection,
    request: Request<Incoming>,
) -> Result<Response<Observed>, Infallible> {
    let started = Instant::now();
    let runtime = worker.shared.runtime.load_full();
    let method = request.method().clone();
    let version = request.version();
    let path = request.uri().path().to_owned();
    let host = request_host(&request).to_owned();
    let mut outcome = Outcome { vhost: None, route: None, upstream: None, upstream_time: None };

    let mut response = route(&worker, &runtime, conn, &host, request, &mut outcome).await;
    finish_headers(&worker.shared, conn, &mut response);
    let status = response.status();

    let metrics = &worker.shared.metrics;
    metrics.request_duration.observe(started.elapsed().as_secs_f64());
    if let Some(t) = outcome.upstream_time {
        metrics.upstream_duration.observe(t.as_secs_f64());
    }
    let labels = RequestLabels {
        host: outcome.vhost.clone().unwrap_or_default(),
        route: outcome.route.clone().unwrap_or_default(),
        status: status_class(status.as_u16()),
    };
    metrics.requests.get_or_create(&labels).inc();

    let shared = Arc::clone(&worker.shared);
    let on_done = Box::new(move |bytes_sent: u64, completed: bool| {
        let entry = Entry {
            ts: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default(),
            remote_addr: conn.remote.ip().to_canonical().to_string(),
            method: method.to_string(),
            host,
            path,
            protocol: protocol_name(version),
            status: status.as_u16(),
            bytes_sent,
            completed,
            request_time_ms: started.elapsed().as_secs_f64() * 1000.0,
            upstream: outcome.upstream.map(|u| u.to_string()),
            upstream_time_ms: outcome.upstream_time.map(|t| t.as_secs_f64() * 1000.0),
            route: outcome.route,
        };
        if !shared.access_log.record(&entry) {
            shared.metrics.access_log_dropped.inc();
        }
    });
    Ok(response.map(|body| Observed::new(body, on_done)))
}

async fn route(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: Connection,
    host: &str,
    request: Request<Incoming>,
    outcome: &mut Outcome,
) -> Response<ResponseBody> {
    match runtime.routing.router.find(host, request.uri().path()) {
        Match::NotFound => text(StatusCode::NOT_FOUND, "404 page not found\n"),
        Match::Route { host: vhost, route } => {
            outcome.vhost = Some(vhost.to_owned());
            outcome.route = Some(route.name.clone());
            if route.ssl_redirect && !conn.tls {
                return redirect_to_https(&worker.shared, host, request.uri());
            }
            proxy(worker, runtime, conn, &route.action, request, outcome).await
        }
        Match::DefaultBackend(action) => {
            outcome.route = Some("default-backend".to_owned());
            proxy(worker, runtime, conn, action, request, outcome).await
        }
    }
}

async fn proxy(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: Connection,
    action: &RouteAction,
    mut request: Request<Incoming>,
    outcome: &mut Outcome,
) -> Response<ResponseBody> {
    let Some(endpoint) = runtime.upstreams.get(&action.backend).and_then(|b| b.pick()) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "503 no ready endpoint for this backend\n");
    };
    outcome.upstream = Some(endpoint);

    let upgrade = request.version() == Version::HTTP_11 && is_upgrade(request.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(header::HOST)
        && let Some(value) = authority.as_deref().and_then(|a| HeaderValue::from_str(a).ok())
    {
        parts.headers.insert(header::HOST, value);
    }
    let forwarded_host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    set_forwarded(
        &mut parts.headers,
        &Forwarded { client: conn.remote, https: conn.tls, host: &forwarded_host, port: conn.local_port },
    );
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    let upstream_request = Request::from_parts(parts, body.boxed_unsync());

    let sent = Instant::now();
    let result = worker.pool.send(endpoint, upstream_request, action.timeouts).await;
    outcome.upstream_time = Some(sent.elapsed());
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(backend = %action.backend, error = %e, "upstream request failed");
            let status = e.status();
            return text(status, &format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or("")));
        }
    };
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), switching);
    if switching && let Some(client_upgrade) = client_upgrade {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::task::spawn_local(tunnel(client_upgrade, upstream_upgrade));
    }
    let read_timeout = Duration::from_millis(action.timeouts.read_ms);
    response.map(|body| IdleTimeout::new(body, read_timeout).boxed_unsync())
}

/// Copies bytes both ways between an upgraded client and upstream connection until either ends.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "protocol switch did not complete");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel closed with an error");
    }
}

/// The host a request is for, without port: the URI authority (HTTP/2, absolute-form) or the
/// `Host` header.
fn request_host(request: &Request<Incoming>) -> &str {
    let raw = match request.uri().authority() {
        Some(a) => a.as_str(),
        None => request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""),
    };
    strip_port(raw)
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_once(']').map_or(authority, |(h, _)| &authority[..=h.len()]);
    }
    authority.split_once(':').map_or(authority, |(h, _)| h)
}

/// `/path?query`, as an HTTP/1.1 origin server expects it.
fn origin_form(uri: &Uri) -> Uri {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    path.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

fn redirect_to_https(shared: &Shared, host: &str, uri: &Uri) -> Response<ResponseBody> {
    let port = match shared.https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut response = text(StatusCode::PERMANENT_REDIRECT, "308 Permanent Redirect\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

/// Headers every response carries: our `Server`, a fresh `Date`, and HSTS on TLS.
fn finish_headers(shared: &Shared, conn: Connection, response: &mut Response<ResponseBody>) {
    let headers = response.headers_mut();
    headers.insert(header::SERVER, HeaderValue::from_static("tidegate"));
    headers.insert(header::DATE, http_date());
    if conn.tls
        && let Some(hsts) = &shared.hsts
        && !headers.contains_key(header::STRICT_TRANSPORT_SECURITY)
    {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
}

/// The `Date` header value, formatted once per second per worker.
fn http_date() -> HeaderValue {
    thread_local! {
        static CACHE: RefCell<(u64, HeaderValue)> = const { RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != second {
            let formatted = httpdate::fmt_http_date(now);
            *cache = (second, HeaderValue::from_str(&formatted).unwrap_or_else(|_| HeaderValue::from_static("")));
        }
        cache.1.clone()
    })
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.com:8080"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn origin_form_keeps_path_and_query() {
        let uri: Uri = "http://a.com:80/x/y?z=1".parse().expect("uri");
        assert_eq!(origin_form(&uri), "/x/y?z=1");
        assert_eq!(origin_form(&Uri::from_static("http://a.com")), "/");
    }
}
