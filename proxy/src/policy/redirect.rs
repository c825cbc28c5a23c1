//! Redirects a route answers instead of going upstream, as ingress-nginx writes them into
//! nginx's rewrite phase: `app-root` sends a request for `/` to the application's root on the
//! same host (302), and `permanent-redirect` / `temporal-redirect` send every request to a URL
//! (301 / 302 unless their `-code` says), with nginx variables put in.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use tidegate_snapshot::Redirect;

use super::{Facts, Verdict, expand};
use crate::body::{LocalBody, full};

#[derive(Debug)]
pub(super) struct AppRoot {
    pub(super) path: String,
}

impl AppRoot {
    pub(super) fn check(&self, facts: &Facts<'_>) -> Verdict {
        if facts.uri.path() != "/" {
            return Verdict::Continue;
        }
        let location = format!(
            "{}://{}{}",
            facts.scheme(),
            facts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(facts.host),
            self.path
        );
        Verdict::Answer(redirect(StatusCode::FOUND, &location))
    }
}

#[derive(Debug)]
pub(super) struct RedirectFilter {
    pub(super) redirect: Redirect,
}

impl RedirectFilter {
    pub(super) fn check(&self, facts: &Facts<'_>) -> Verdict {
        let status = StatusCode::from_u16(self.redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        Verdict::Answer(redirect(status, &expand(&self.redirect.to, facts)))
    }
}

fn redirect(status: StatusCode, location: &str) -> Response<LocalBody> {
    let mut response = Response::new(full(bytes::Bytes::new()));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}
