//! The admin port: `/healthz`, `/readyz`, `/metrics`, and `/status` (the per-object statuses of
//! the current configuration, as JSON). Served on its own thread, apart from the workers.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Shared;

pub(crate) fn run(shared: Arc<Shared>, listener: std::net::TcpListener) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(Arc::clone(&shared), request));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

async fn answer(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body): (StatusCode, &str, Bytes) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" if shared.ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        "/readyz" => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", Bytes::from_static(b"no configuration applied yet\n"))
        }
        "/metrics" => {
            shared.metrics.observe_dicts(&shared.lua.shared_dicts.stats());
            shared.metrics.observe_lua_memory(&shared.lua_memory);
            (StatusCode::OK, "text/plain; version=0.0.4", Bytes::from(shared.metrics.encode()))
        }
        "/status" => (StatusCode::OK, "application/json", (**shared.status.load()).clone()),
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    Ok(response)
}
