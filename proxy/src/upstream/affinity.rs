//! Sticky sessions by cookie (`affinity: cookie`), as ingress-nginx's:
//! - **balanced** (the default): the cookie holds a random session id, placed on the backend's
//!   consistent-hash ring; when endpoints come or go, only the sessions of that part of the
//!   ring move.
//! - **persistent**: the cookie names its endpoint (by a digest, not its address); the session
//!   stays there while the endpoint exists.
//!
//! The cookie's value ends in `|` and a tag of the backend the session belongs to, as
//! ingress-nginx's does, so that a session started on a canary backend stays on it and one
//! started on the main backend stays off the canary ([`carries`]).
//!
//! A request without the cookie, or whose cookie leads nowhere now, starts a session: its
//! response sets the cookie (`HttpOnly`, with the route's path unless `session-cookie-path`
//! says; the controller writes the route's path in). With `session-cookie-change-on-failure`, a session whose endpoint failed follows
//! the request to the endpoint that answered instead.

use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{self, HeaderValue};
use tidegate_snapshot::Affinity;

use super::balance::{Endpoints, address_key, random};

/// A backend's tag in its sessions' cookies: a digest of its name, the same on every proxy.
pub(crate) fn backend_tag(backend: &tidegate_snapshot::BackendId) -> Box<str> {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(backend.0.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>().into()
}

/// Whether the request's session cookie says it belongs to the backend tagged `tag`.
pub(crate) fn carries(affinity: &Affinity, tag: &str, headers: &HeaderMap) -> bool {
    crate::headers::cookie(headers, &affinity.cookie).and_then(|v| v.rsplit_once('|')).is_some_and(|(_, t)| t == tag)
}

/// One request's session.
pub(crate) struct Session<'a> {
    affinity: &'a Affinity,
    /// The tag of the backend the request goes to.
    tag: &'a str,
    /// The cookie's value, and whether the response must set it.
    value: String,
    fresh: bool,
    /// Where the session says the request goes.
    pub(crate) endpoint: Option<SocketAddr>,
}

impl<'a> Session<'a> {
    /// The session of a request with `headers` on `endpoints` of the backend tagged `tag`.
    pub(crate) fn of(affinity: &'a Affinity, tag: &'a str, endpoints: &Endpoints, headers: &HeaderMap) -> Session<'a> {
        // The session id, without the backend's tag (cookies set before tags had none).
        let cookie = crate::headers::cookie(headers, &affinity.cookie)
            .map(|v| v.rsplit_once('|').map_or(v, |(session, _)| session))
            .filter(|v| !v.is_empty());
        let endpoint = cookie.and_then(|value| match affinity.persistent {
            true => endpoints.by_key(value),
            false => endpoints.on_ring(value),
        });
        match (cookie, endpoint) {
            (Some(value), Some(endpoint)) => {
                Session { affinity, tag, value: value.to_owned(), fresh: false, endpoint: Some(endpoint) }
            }
            _ if affinity.persistent => Session { affinity, tag, value: String::new(), fresh: true, endpoint: None },
            _ => {
                let value = format!("{:016x}{:016x}", random(), random());
                let endpoint = endpoints.on_ring(&value);
                Session { affinity, tag, value, fresh: true, endpoint }
            }
        }
    }

    /// The `Set-Cookie` the response carries, when the session is new or moved: `answered`
    /// is the endpoint that answered; `headers` the request's.
    pub(crate) fn set_cookie(
        &mut self,
        endpoints: &Endpoints,
        answered: SocketAddr,
        headers: &HeaderMap,
    ) -> Option<HeaderValue> {
        let moved = self.endpoint.is_some_and(|e| e != answered);
        if moved && self.affinity.change_on_failure {
            self.fresh = true;
            self.value.clear();
        }
        if !self.fresh {
            return None;
        }
        if self.affinity.persistent {
            self.value = address_key(answered);
        } else if self.value.is_empty() || endpoints.on_ring(&self.value) != Some(answered) {
            // A session id that lands where the request went (a few draws: one of N each).
            for _ in 0..256 {
                let value = format!("{:016x}{:016x}", random(), random());
                if endpoints.on_ring(&value) == Some(answered) {
                    self.value = value;
                    break;
                }
            }
        }
        let a = self.affinity;
        let mut cookie = format!("{}={}|{}; Path={}", a.cookie, self.value, self.tag, a.path.as_deref().unwrap_or("/"));
        if let Some(domain) = &a.domain {
            cookie.push_str(&format!("; Domain={domain}"));
        }
        if let Some(max_age) = a.max_age {
            cookie.push_str(&format!("; Max-Age={max_age}"));
        }
        if let Some(expires) = a.expires {
            let at = std::time::SystemTime::now() + std::time::Duration::from_secs(expires);
            cookie.push_str(&format!("; Expires={}", httpdate::fmt_http_date(at)));
        }
        if let Some(same_site) = &a.same_site
            && !(same_site == "None" && a.conditional_same_site_none && rejects_same_site_none(headers))
        {
            cookie.push_str(&format!("; SameSite={same_site}"));
        }
        if a.secure {
            cookie.push_str("; Secure");
        }
        cookie.push_str("; HttpOnly");
        HeaderValue::from_str(&cookie).ok()
    }
}

/// The browsers that reject `SameSite=None` cookies (Chromium's list): Chrome 51 to 66, and
/// Safari on iOS 12 and macOS 10.14.
fn rejects_same_site_none(headers: &HeaderMap) -> bool {
    let Some(agent) = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()) else { return false };
    let chrome = agent
        .split("Chrome/")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| (51..=66).contains(&major));
    let ios12 = agent.contains("CPU iPhone OS 12_") || agent.contains("iPad; CPU OS 12_");
    let mojave_safari =
        agent.contains("Macintosh; Intel Mac OS X 10_14") && agent.contains("Safari") && !agent.contains("Chrome");
    chrome || ios12 || mojave_safari
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_site_none_is_left_out_for_the_browsers_that_reject_it() {
        let agent = |ua: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::USER_AGENT, HeaderValue::from_str(ua).expect("value"));
            rejects_same_site_none(&h)
        };
        assert!(agent("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/60.0.3112.113 Safari/537.36"));
        assert!(!agent("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0.0.0 Safari/537.36"));
        assert!(agent("Mozilla/5.0 (iPhone; CPU iPhone OS 12_4 like Mac OS X) AppleWebKit/605.1.15"));
        assert!(!agent("curl/8.0"));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; INGRESSCOOKIE=abc; b=2"));
        assert_eq!(crate::headers::cookie(&h, "INGRESSCOOKIE"), Some("abc"));
        assert_eq!(crate::headers::cookie(&h, "INGRESS"), None);
    }
}
