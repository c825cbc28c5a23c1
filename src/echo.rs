//! `tidegate echo`: a small HTTP backend that answers every request with a JSON description of
//! it, for the quick start and for tests. It is a real server on a real socket: HTTP/1.1 and
//! HTTP/2 with prior knowledge (h2c) on the same port, or over TLS ([`serve_tls`]) with HTTP/2
//! or HTTP/1.1 by ALPN.
//!
//! The JSON is the echo contract of the Ingress conformance suite:
//! `{"path","host","method","proto","headers":{name:[values]},"namespace","ingress","service","pod"}`
//! plus `body_length` (bytes of request body received), `query` (the raw query string) and,
//! over TLS, `sni` (the server name the client sent, empty for none) and `client_certificate`
//! (whether it presented one). Query parameters steer it: `delay_ms=N` waits before answering;
//! `status=N` answers with that status; `location=URL` answers 302 with that `Location` (the
//! rest of the query string, unescaped);
//! a WebSocket upgrade is accepted and echoes messages.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Who this echo server says it is.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub namespace: String,
    pub service: String,
    pub pod: String,
    /// Waited before every answer (a slow backend, for tests and benchmarks).
    pub delay: Duration,
}

#[derive(Serialize)]
struct Echo<'a> {
    path: &'a str,
    host: &'a str,
    method: &'a str,
    proto: &'static str,
    headers: BTreeMap<String, Vec<String>>,
    namespace: &'a str,
    ingress: &'a str,
    service: &'a str,
    pod: &'a str,
    body_length: usize,
    /// The raw query string, empty when there is none.
    query: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sni: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_certificate: Option<bool>,
}

/// What the TLS handshake of a connection told.
#[derive(Clone, Debug, Default)]
struct Handshake {
    sni: String,
    client_certificate: bool,
}

/// Serves HTTP/1.1 and h2c until the task is dropped.
pub async fn serve(listener: TcpListener, identity: Identity) {
    let identity = Arc::new(identity);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(serve_connection(stream, Arc::clone(&identity), None));
    }
}

/// Serves HTTPS until the task is dropped: HTTP/2 or HTTP/1.1 as ALPN (or the first bytes)
/// say, with `config`'s certificate and client-certificate checks.
pub async fn serve_tls(listener: TcpListener, identity: Identity, config: Arc<rustls::ServerConfig>) {
    let identity = Arc::new(identity);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (acceptor, identity) = (acceptor.clone(), Arc::clone(&identity));
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else { return };
            let connection = stream.get_ref().1;
            let handshake = Handshake {
                sni: connection.server_name().unwrap_or("").to_owned(),
                client_certificate: connection.peer_certificates().is_some_and(|c| !c.is_empty()),
            };
            serve_connection(stream, identity, Some(handshake)).await;
        });
    }
}

async fn serve_connection<S>(stream: S, identity: Arc<Identity>, handshake: Option<Handshake>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handshake = Arc::new(handshake);
    let service = service_fn(move |request| answer(Arc::clone(&identity), Arc::clone(&handshake), request));
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

async fn answer(
    identity: Arc<Identity>,
    handshake: Arc<Option<Handshake>>,
    mut request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(response) = websocket(&mut request) {
        return Ok(response);
    }
    let delay = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("delay_ms="))
        .and_then(|v| v.parse::<u64>().ok());
    let delay = delay.map_or(identity.delay, Duration::from_millis);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (parts, body) = request.into_parts();
    let body_length = match body.collect().await {
        Ok(collected) => collected.to_bytes().len(),
        Err(_) => 0,
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(canonical(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let host = match parts.uri.authority() {
        Some(authority) => authority.as_str(),
        None => parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(""),
    };
    let host = host.split(':').next().unwrap_or(host);
    let echo = Echo {
        path: parts.uri.path(),
        host,
        method: parts.method.as_str(),
        proto: match parts.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        },
        headers,
        namespace: &identity.namespace,
        ingress: "",
        service: &identity.service,
        pod: &identity.pod,
        body_length,
        query: parts.uri.query().unwrap_or(""),
        sni: handshake.as_ref().as_ref().map(|h| h.sni.as_str()),
        client_certificate: handshake.as_ref().as_ref().map(|h| h.client_certificate),
    };
    let json = serde_json::to_vec(&echo).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(json)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    let status = parts.uri.query().into_iter().flat_map(|q| q.split('&')).find_map(|p| p.strip_prefix("status="));
    if let Some(status) = status.and_then(|s| s.parse::<u16>().ok()).and_then(|s| StatusCode::from_u16(s).ok()) {
        *response.status_mut() = status;
    }
    if let Some(location) = parts.uri.query().and_then(|q| q.split_once("location=")).map(|(_, l)| l)
        && let Ok(value) = header::HeaderValue::from_str(location)
    {
        *response.status_mut() = StatusCode::FOUND;
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// Accepts a WebSocket handshake and echoes every text and binary message back.
fn websocket(request: &mut Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let wants = request.headers().get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = request.headers().get(header::SEC_WEBSOCKET_KEY)?.clone();
    if !wants {
        return None;
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, header::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Some(response)
}

/// `user-agent` → `User-Agent`, as Go's servers report header names.
fn canonical(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn canonical_header_names() {
        assert_eq!(super::canonical("user-agent"), "User-Agent");
        assert_eq!(super::canonical("x-forwarded-for"), "X-Forwarded-For");
    }
}
