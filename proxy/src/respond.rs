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
pub(crate) fn finish_headers(shared: &Shared, tls: bool, version: Version, response: &mut Response<LocalBody>) {
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
        && let Some(hsts) = &shared.hsts
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
