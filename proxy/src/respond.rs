//! Responses the proxy makes itself (error pages, redirects, plain text), and the headers every
//! response carries on its way out.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Uri, Version};

use crate::Shared;
use crate::body::{LocalBody, full};

pub(crate) fn redirect_to_https(shared: &Shared, host: &str, uri: &Uri) -> Response<LocalBody> {
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

pub(crate) fn text(status: StatusCode, body: &str) -> Response<LocalBody> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

/// Headers every response carries: our `Server` and a fresh `Date` unless set (nginx lets Lua
/// set them too), and HSTS on TLS. The HTTP/1 encoder writes `Server` and `Date` itself
/// (`http1::encode_head`), so that they never enter the map; hyper writes HTTP/2 responses
/// from the map, which then gets them here.
/// `hsts` is the configuration's `Strict-Transport-Security` (`Some(None)`: none), the
/// proxy's own when `None`.
pub(crate) fn finish_headers(
    shared: &Shared,
    hsts: Option<&Option<HeaderValue>>,
    tls: bool,
    version: Version,
    response: &mut Response<LocalBody>,
) {
    let headers = response.headers_mut();
    if version == Version::HTTP_2 {
        if !headers.contains_key(header::SERVER) {
            headers.insert(header::SERVER, HeaderValue::from_static(crate::headers::SERVER_NAME));
        }
        if !headers.contains_key(header::DATE) {
            headers.insert(header::DATE, crate::headers::http_date());
        }
    }
    if tls
        && let Some(hsts) = hsts.map_or(shared.hsts.as_ref(), Option::as_ref)
        && !headers.contains_key(header::STRICT_TRANSPORT_SECURITY)
    {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
}

/// An nginx-style error page response.
pub(crate) fn error_response(status: StatusCode) -> Response<LocalBody> {
    let page = error_page(status);
    let mut response = Response::new(full(page.clone()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(page.len()));
    response
}

/// nginx's page for a status, so clients and tests that look for it find it.
fn error_page(status: StatusCode) -> String {
    let title = format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""));
    format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>tidegate</center>\r\n</body>\r\n</html>\r\n"
    )
}

/// A gRPC call's answer in place of an HTTP error of `status` the proxy made itself, as Envoy answers: HTTP
/// 200 with the status in `grpc-status` and no body (a trailers-only response), so that gRPC
/// clients see a gRPC error rather than a broken call.
pub(crate) fn as_grpc(status: StatusCode) -> Response<LocalBody> {
    let code = match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        413 => 8,              // RESOURCE_EXHAUSTED
        429 | 502 | 503 => 14, // UNAVAILABLE
        504 => 4,              // DEADLINE_EXCEEDED
        _ => 2,                // UNKNOWN
    };
    let mut answer = Response::new(full(bytes::Bytes::new()));
    let headers = answer.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", http::HeaderValue::from(code));
    let message = format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""));
    if let Ok(value) = http::HeaderValue::from_str(&grpc_message(message.trim_end())) {
        headers.insert("grpc-message", value);
    }
    answer
}

/// gRPC's percent-encoding of `grpc-message`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Whether a request is a gRPC call: HTTP/2, POST, `content-type: application/grpc...`.
pub(crate) fn is_grpc(version: Version, method: &http::Method, headers: &http::HeaderMap) -> bool {
    version == Version::HTTP_2
        && method == http::Method::POST
        && headers.get(http::header::CONTENT_TYPE).is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"))
}

/// A `grpc-timeout` value (`1S`, `250m`...): the call's deadline from now.
pub(crate) fn grpc_timeout(value: &[u8]) -> Option<std::time::Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod grpc_tests {
    use super::*;

    #[test]
    fn proxy_errors_become_grpc_statuses() {
        let code = |status: u16| {
            let answer = as_grpc(StatusCode::from_u16(status).expect("status"));
            assert_eq!(answer.status(), StatusCode::OK);
            answer.headers()["grpc-status"].to_str().expect("ascii").to_owned()
        };
        assert_eq!(code(503), "14");
        assert_eq!(code(502), "14");
        assert_eq!(code(504), "4");
        assert_eq!(code(401), "16");
        assert_eq!(code(403), "7");
        assert_eq!(code(404), "12");
        assert_eq!(code(500), "2");
        let answer = as_grpc(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()["grpc-message"], "503 Service Unavailable");
        assert_eq!(answer.headers()["content-type"], "application/grpc");
    }

    #[test]
    fn grpc_timeouts_read_as_the_spec_writes_them() {
        use std::time::Duration;
        assert_eq!(grpc_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(b"100u"), Some(Duration::from_micros(100)));
        assert_eq!(grpc_timeout(b"S"), None);
        assert_eq!(grpc_timeout(b"123456789S"), None, "at most 8 digits");
        assert_eq!(grpc_timeout(b"10x"), None);
        assert_eq!(grpc_message("a%b\n"), "a%25b%0A");
    }
}
