//! The upstream step: a request made ready for its backend, sent through the worker's pool, and
//! the answer (or the failure, as a status) turned into the response the filters see.

use std::rc::Rc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Body;
use tidegate_snapshot::{Balance, Timeouts};

use super::context::Outcome;
use crate::body::{Capped, ClientBody, IdleTimeout, LocalBody};
use crate::connection::Connection;
use crate::headers::strip_hop_by_hop;
use crate::http1::{Detached, OnUpgrade};
use crate::policy::{Facts, Head, expand};
use crate::respond::{grpc_timeout, text};
use crate::router::Target;
use crate::runtime::Runtime;
use crate::upstream::{Attempts, RequestBody, Session};
use crate::worker::Worker;

/// Proxies a request as it came.
pub(super) async fn proxy(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    mut request: Request<ClientBody>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    // The HTTP/1 loop gives an upgrade request (and only one) the means to switch.
    let client_upgrade = crate::http1::on_upgrade(&mut request);
    let upgrade = client_upgrade.is_some();
    let (mut parts, body) = request.into_parts();
    let pages = target.action.policies.error_pages.as_ref();
    let original = super::error_page::Original::of(pages, &parts.uri, &parts.headers);
    // A mirror copies the request as the client sent it.
    let copy = match target.filters.mirror() {
        Some(mirror) if !upgrade => mirror.copy(conn, &worker.pool, outcome.client(conn), &parts),
        _ => None,
    };
    rewrite_uri(target, &mut parts);
    // The client's hop-by-hop headers go first: a route may set one of its own (`Connection`,
    // with `connection-proxy-header`), as nginx's `proxy_set_header` may.
    prepare_upstream(&mut parts, upgrade);
    upstream_headers(target, outcome, &mut parts.headers);
    let mut body = upstream_body(target, &parts.headers, body);
    if let Some(copy) = copy {
        body = copy.send(&worker.pool, body);
    }
    let upstream_request = Request::from_parts(parts, body);
    let response = forward(worker, runtime, conn, target, upstream_request, client_upgrade, outcome).await;
    match (pages, original) {
        // Boxed: routes without error pages carry no room for the call.
        (Some(pages), Some(original)) => {
            let from_upstream = outcome.from_upstream;
            Box::pin(super::error_page::replace(worker, runtime, conn, pages, original, from_upstream, response)).await
        }
        _ => response,
    }
}

/// `proxy-redirect-from` / `-to`: a `Location` that starts with `from` gets `to` instead of it,
/// as nginx's `proxy_redirect from to`.
fn rewrite_location(headers: &mut http::HeaderMap, from: &str, to: &str) {
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else { return };
    if let Some(rest) = location.strip_prefix(from)
        && let Ok(value) = HeaderValue::from_str(&format!("{to}{rest}"))
    {
        headers.insert(header::LOCATION, value);
    }
}

/// Replaces the URI with the route's `rewrite-target`, when it has one.
pub(super) fn rewrite_uri(target: &Target, parts: &mut Parts) {
    if let Some(uri) = target.rewritten(&parts.uri) {
        parts.uri = uri;
    }
}

/// Puts the headers the route and its filters set into the upstream request: those the
/// filters found (`auth-response-headers`), then the route's own (`upstream-vhost`,
/// `x-forwarded-prefix`). The client's `Host`, when the route replaces it, is kept for
/// `X-Forwarded-Host`.
pub(super) fn upstream_headers(target: &Target, outcome: &mut Outcome, headers: &mut http::HeaderMap) {
    if let Some(effects) = outcome.effects.as_mut() {
        for (name, value) in effects.upstream_headers.drain(..) {
            headers.insert(name, value);
        }
    }
    for (name, value) in target.filters.upstream_headers() {
        let before = headers.insert(name, value.clone());
        if name == header::HOST {
            outcome.effects.get_or_insert_with(Box::default).client_host = before;
        }
    }
}

/// The client's body as it goes upstream: capped at the route's limit when its length was not
/// declared (a declared one was checked in the rewrite step, and the framing holds it to it).
pub(super) fn upstream_body(target: &Target, headers: &http::HeaderMap, body: ClientBody) -> LocalBody {
    match target.filters.max_body() {
        Some(limit) if !body.is_end_stream() && !headers.contains_key(header::CONTENT_LENGTH) => {
            LocalBody::new(Capped::new(body, limit))
        }
        _ => LocalBody::new(body),
    }
}

/// Turns client request parts into what an upstream gets: origin-form URI over HTTP/1.1, a
/// `Host`, and no hop-by-hop headers. The `X-Forwarded-*` headers are written on the way out
/// ([`Connection::forwarded`]).
pub(super) fn prepare_upstream(parts: &mut Parts, upgrade: bool) {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(header::HOST)
        && let Some(value) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = origin_form(std::mem::take(&mut parts.uri));
    parts.version = Version::HTTP_11;
}

/// Sends a prepared request to the backend and turns the answer, or the failure, into a
/// response.
pub(super) async fn forward(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    upstream_request: Request<RequestBody>,
    client_upgrade: Option<OnUpgrade>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    let (mut backend, mut timeouts) = (target.action.backend.as_ref(), target.action.timeouts);
    let (mut upstream, mut affinity_tag) = (&target.action.upstream, &*target.affinity_tag);
    // A canary takes the requests its sessions, header, cookie or weight say.
    if let Some(rule) = target.canary.as_deref()
        && rule.takes(upstream_request.headers(), upstream.affinity.as_ref().map(|a| (a, affinity_tag)))
    {
        backend = Some(&rule.canary.backend);
        (upstream, affinity_tag) = (&rule.canary.upstream, &*rule.tag);
    }
    if outcome.grpc
        && let Some(deadline) = upstream_request.headers().get("grpc-timeout").and_then(|v| grpc_timeout(v.as_bytes()))
    {
        // The call's deadline bounds the wait for its answer too.
        timeouts.read_ms = timeouts.read_ms.min(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX).max(1));
    }
    let key = match &upstream.balance {
        Balance::Hash { key, .. } => Some(hash_key(key, worker, conn, outcome.client(conn), &upstream_request)),
        _ => None,
    };
    let idempotent = upstream_request.method().is_idempotent();
    let Some(endpoints) = backend.and_then(|b| runtime.upstreams.get(b)) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "503 no ready endpoint for this backend\n");
    };
    // Sticky sessions: the cookie's endpoint first; the session (and what the response must
    // set) is kept with the request's headers, which the exchange takes.
    let mut session = upstream.affinity.as_ref().map(|a| {
        let session = Session::of(a, affinity_tag, endpoints, upstream_request.headers());
        let agent = upstream_request.headers().get(header::USER_AGENT).cloned();
        (session, agent)
    });
    let first = session.as_ref().and_then(|(s, _)| s.endpoint);
    let Some(mut attempts) = Attempts::balanced(endpoints, &upstream.balance, &upstream.retry, key, idempotent, first)
    else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "503 no ready endpoint for this backend\n");
    };
    let label = || backend.map(ToString::to_string).unwrap_or_default();
    let mut response =
        match exchange(worker, conn, target, &mut attempts, upstream_request, timeouts, outcome, label).await {
            Ok(response) => response,
            Err(answer) => return answer,
        };
    if let Some((session, agent)) = session.as_mut() {
        let mut request = http::HeaderMap::new();
        if let Some(agent) = agent.take() {
            request.insert(header::USER_AGENT, agent);
        }
        if let Some(cookie) = session.set_cookie(endpoints, attempts.endpoint(), &request) {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
    finish(response, client_upgrade, timeouts)
}

/// Sends the request to the endpoints of `attempts`, with what the upstream is told of the
/// client, and records the exchange in `outcome`: the upstream's response (its `Location`
/// rewritten as the route says), or the failure answered with its status.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    worker: &Rc<Worker>,
    conn: &Connection,
    target: &Target,
    attempts: &mut Attempts<'_>,
    upstream_request: Request<RequestBody>,
    timeouts: Timeouts,
    outcome: &mut Outcome,
    backend: impl FnOnce() -> String,
) -> Result<Response<crate::upstream::UpstreamBody>, Response<LocalBody>> {
    let sent = Instant::now();
    let client_host = outcome.effects.as_ref().and_then(|e| e.client_host.as_ref());
    let forwarded = match outcome.forwarded.as_deref() {
        // What a trusted peer said of the client goes on, as nginx's real_ip module has it.
        Some(seen) => crate::headers::Forwarded {
            client_ip: &seen.real_ip,
            forwarded_for: Some(&seen.forwarded_for),
            proto: seen.proto.as_ref(),
            port_value: seen.port.as_ref(),
            host: client_host.or(seen.host.as_ref()),
            ..conn.forwarded()
        },
        None => crate::headers::Forwarded { host: client_host, ..conn.forwarded() },
    };
    let result = worker.pool.send(attempts, &target.transport, upstream_request, Some(forwarded), timeouts).await;
    let took = sent.elapsed();
    outcome.upstream_time = Some(took);
    outcome.upstream = Some(attempts.endpoint());
    attempts.finished(result.as_ref().ok().map(|r| (took, r.status().as_u16())));
    match result {
        Ok(mut r) => {
            outcome.from_upstream = true;
            if let Some((from, to)) = &target.action.policies.location_rewrite {
                rewrite_location(r.headers_mut(), from, to);
            }
            Ok(r)
        }
        Err(e) => {
            tracing::warn!(backend = %backend(), error = %e, "upstream request failed");
            let status = e.status();
            Err(text(status, &format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or(""))))
        }
    }
}

/// The upstream's response as the client gets it: a protocol switch tunnelled, the body read
/// under the read timeout.
pub(super) fn finish(
    mut response: Response<crate::upstream::UpstreamBody>,
    client_upgrade: Option<OnUpgrade>,
    timeouts: Timeouts,
) -> Response<LocalBody> {
    // The upstream's hop-by-hop headers stayed out of the response (`wire::parse_response`),
    // but for a protocol switch's.
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(response.headers_mut(), true);
        if let Some(client_upgrade) = client_upgrade
            && let Some(upstream) = response.body_mut().take_switched()
        {
            tokio::task::spawn_local(tunnel(client_upgrade, upstream));
        }
    }
    let read_timeout = Duration::from_millis(timeouts.read_ms);
    response.map(|body| LocalBody::new(IdleTimeout::new(body, read_timeout)))
}

/// A request's `upstream-hash-by` key: its template with the request's variables put in.
fn hash_key(
    template: &tidegate_snapshot::Template,
    worker: &Rc<Worker>,
    conn: &Connection,
    client: std::net::IpAddr,
    request: &Request<RequestBody>,
) -> String {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let head = Head {
        method: request.method(),
        uri: request.uri(),
        host: crate::headers::strip_port(host),
        headers: request.headers(),
        client,
    };
    expand(template, &Facts::of(conn, head, &worker.pool))
}

/// Copies bytes both ways between an upgraded client and upstream connection until either ends.
async fn tunnel(client: OnUpgrade, mut upstream: Detached) {
    let Some(mut client) = client.wait().await else {
        tracing::debug!("protocol switch did not complete: the client connection ended");
        return;
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel closed with an error");
    }
}

/// `/path?query`, as an HTTP/1.1 origin server expects it.
fn origin_form(uri: Uri) -> Uri {
    // What an HTTP/1 client sends, usually: nothing to take off.
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path().starts_with('/') {
        return uri;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    path.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query() {
        let uri: Uri = "http://a.com:80/x/y?z=1".parse().expect("uri");
        assert_eq!(origin_form(uri), "/x/y?z=1");
        assert_eq!(origin_form(Uri::from_static("http://a.com")), "/");
        assert_eq!(origin_form(Uri::from_static("/a?b")), "/a?b");
    }
}
