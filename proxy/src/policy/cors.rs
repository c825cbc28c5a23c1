//! CORS (`enable-cors` and `cors-*`), as ingress-nginx writes it into nginx: in the rewrite
//! step, a request whose `Origin` is allowed gets the `Access-Control-*` headers on its response,
//! and an `OPTIONS` request from one is answered 204 at once, before authentication, since
//! browsers send a preflight without credentials. With the default origin `*`, every request
//! counts as allowed and gets `Access-Control-Allow-Origin: *`; with a list, the request's own
//! origin is sent back, and a request from elsewhere gets no CORS header at all.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use tidegate_snapshot::Cors;

use super::{Effects, Verdict};
use crate::body::{LocalBody, full};

#[derive(Debug)]
pub(super) struct CorsFilter {
    origins: Vec<Origin>,
    /// Sent with every allowed response but the origin: credentials, methods, headers,
    /// exposed headers, max age.
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// One allowed origin, lower case.
#[derive(Debug)]
enum Origin {
    Exact(String),
    /// `scheme://*.rest`: one DNS label in place of the `*`.
    Wildcard {
        scheme: String,
        rest: String,
    },
}

impl Origin {
    fn parse(text: &str) -> Origin {
        let text = text.trim().trim_end_matches('/').to_ascii_lowercase();
        match text.split_once("://*.") {
            Some((scheme, rest)) => Origin::Wildcard { scheme: format!("{scheme}://"), rest: format!(".{rest}") },
            None => Origin::Exact(text),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            Origin::Exact(exact) => origin.eq_ignore_ascii_case(exact),
            Origin::Wildcard { scheme, rest } => {
                let lower = origin.to_ascii_lowercase();
                let Some(after) = lower.strip_prefix(scheme.as_str()) else { return false };
                let Some(label) = after.strip_suffix(rest.as_str()) else { return false };
                !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }
        }
    }
}

impl CorsFilter {
    pub(super) fn new(cors: &Cors) -> CorsFilter {
        let value = |text: &str| HeaderValue::from_str(text).ok();
        let mut headers = Vec::new();
        if cors.allow_credentials {
            headers.push((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true")));
        }
        let lists = [
            (header::ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers),
            (header::ACCESS_CONTROL_EXPOSE_HEADERS, &cors.expose_headers),
        ];
        for (name, text) in lists {
            if let Some(v) = value(text).filter(|_| !text.is_empty()) {
                headers.push((name, v));
            }
        }
        headers.push((header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(cors.max_age)));
        CorsFilter { origins: cors.allow_origins.iter().map(|o| Origin::parse(o)).collect(), headers }
    }

    /// The `Access-Control-Allow-Origin` a request gets, if its origin is allowed.
    fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        if self.origins.is_empty() {
            return Some(HeaderValue::from_static("*"));
        }
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.origins.iter().any(|o| o.matches(text)).then(|| origin.clone())
    }

    pub(super) fn check(&self, method: &Method, headers: &HeaderMap, slot: &mut Option<Box<Effects>>) -> Verdict {
        let Some(origin) = self.allowed(headers) else { return Verdict::Continue };
        if method == Method::OPTIONS {
            let mut response: Response<LocalBody> = Response::new(full(bytes::Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            let out = response.headers_mut();
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            for (name, value) in &self.headers {
                out.insert(name, value.clone());
            }
            out.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain charset=UTF-8"));
            out.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            return Verdict::Answer(response);
        }
        let add = &mut Effects::of(slot).headers;
        add.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin));
        add.extend(self.headers.iter().cloned());
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_one_label() {
        let exact = Origin::parse("https://App.example.com:8443");
        assert!(exact.matches("https://app.example.com:8443"));
        assert!(!exact.matches("https://app.example.com") && !exact.matches("http://app.example.com:8443"));
        let wild = Origin::parse("https://*.example.com");
        assert!(wild.matches("https://a.example.com") && wild.matches("https://A-1.example.com"));
        assert!(!wild.matches("https://a.b.example.com"), "one label only");
        assert!(!wild.matches("https://example.com") && !wild.matches("http://a.example.com"));
        assert!(!wild.matches("https://a.example.com.evil.test"));
    }
}
