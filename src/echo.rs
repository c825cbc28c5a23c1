//! `tidegate echo`: a small HTTP/1.1 backend that answers every request with a JSON description
//! of it, for the quick start and for tests. It is a real server on a real socket.
//!
//! The JSON is the echo contract of the Ingress conformance suite:
//! `{"path","host","method","proto","headers":{name:[values]},"namespace","ingress","service","pod"}`
//! plus `body_length` (bytes of request body received) and `query` (the raw query string). Query parameters steer it:
//! `delay_ms=N` waits before answering; a WebSocket upgrade is accepted and echoes messages.

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
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, identity: Identity) {
    let identity = Arc::new(identity);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let identity = Arc::clone(&identity);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(Arc::clone(&identity), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn answer(identity: Arc<Identity>, mut request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
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
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let host = host.split(':').next().unwrap_or(host);
    let echo = Echo {
        path: parts.uri.path(),
        host,
        method: parts.method.as_str(),
        proto: match parts.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        headers,
        namespace: &identity.namespace,
        ingress: "",
        service: &identity.service,
        pod: &identity.pod,
        body_length,
        query: parts.uri.query().unwrap_or(""),
    };
    let json = serde_json::to_vec(&echo).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(json)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
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
