//! Custom error pages (`custom-http-errors` with the `default-backend` annotation), as
//! ingress-nginx's `error_page CODE = @custom_...` to its default backend: a response with one
//! of the route's codes (the upstream's, unless `disable-proxy-intercept-errors`, or the proxy's
//! own 502, 503 and 504) is replaced by what the error Service answers to `GET /` with the
//! headers ingress-nginx's custom-errors documentation lists. The error Service's status is the
//! client's, as with nginx's `=`. When the error Service cannot answer, the original response
//! goes out.

use std::rc::Rc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use tidegate_snapshot::{Balance, ErrorPages, Retry, Timeouts};

use crate::body::{IdleTimeout, LocalBody, full};
use crate::connection::Connection;
use crate::runtime::Runtime;
use crate::upstream::{Attempts, RequestBody};
use crate::worker::Worker;

/// What the error Service is told of the request, kept before the request goes upstream.
pub(super) struct Original {
    uri: Uri,
    accept: Option<HeaderValue>,
}

impl Original {
    pub(super) fn of(pages: Option<&ErrorPages>, uri: &Uri, headers: &http::HeaderMap) -> Option<Original> {
        pages.map(|_| Original { uri: uri.clone(), accept: headers.get(header::ACCEPT).cloned() })
    }
}

/// `response`, or the error Service's answer in its place when the route asks for it.
pub(super) async fn replace(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    pages: &ErrorPages,
    original: Original,
    from_upstream: bool,
    response: Response<LocalBody>,
) -> Response<LocalBody> {
    let status = response.status().as_u16();
    if !pages.codes.contains(&status) || (from_upstream && pages.only_proxy_errors) {
        return response;
    }
    let Some(endpoints) = runtime.upstreams.get(&pages.backend) else { return response };
    let (balance, retry) = (Balance::RoundRobin, Retry::default());
    let Some(mut attempts) = Attempts::balanced(endpoints, &balance, &retry, None, true, None) else {
        return response;
    };
    let mut request: Request<RequestBody> = Request::new(full(bytes::Bytes::new()));
    *request.uri_mut() = Uri::from_static("/");
    let headers = request.headers_mut();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    // `namespace/service:port`: the Service's name in its namespace, as a cluster's DNS has it.
    let service = pages.backend.0.split(':').next().unwrap_or_default();
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    set("host", &format!("{name}.{namespace}"));
    set("x-code", &status.to_string());
    set("x-format", original.accept.as_ref().and_then(|a| a.to_str().ok()).unwrap_or("text/html"));
    set("x-original-uri", original.uri.path_and_query().map_or("/", |p| p.as_str()));
    set("x-namespace", &pages.namespace);
    set("x-ingress-name", &pages.ingress);
    set("x-service-name", &pages.service);
    set("x-service-port", &pages.service_port);
    set("x-request-id", &worker.next_request_id().to_string());
    let transport = crate::upstream::Transport::plain();
    let timeouts = Timeouts::default();
    let sent = std::time::Instant::now();
    match worker.pool.send(&mut attempts, &transport, request, Some(conn.forwarded()), timeouts).await {
        Ok(page) => {
            attempts.finished(Some((sent.elapsed(), page.status().as_u16())));
            let read = std::time::Duration::from_millis(timeouts.read_ms);
            page.map(|body| LocalBody::new(IdleTimeout::new(body, read)))
        }
        Err(e) => {
            tracing::warn!(backend = %pages.backend, error = %e, "the error page Service did not answer; the error goes out as it is");
            response
        }
    }
}
