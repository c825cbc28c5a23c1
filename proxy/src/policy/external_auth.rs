//! External authentication (`auth-url` and its keys), as nginx's `auth_request` in
//! ingress-nginx's configuration: each request is first sent, without its body, to the auth
//! service, through the worker's own upstream pool (so the call waits without blocking the
//! worker, and its connections are kept alive). The service's answer decides:
//! - 2xx: the request goes on, carrying the headers `auth-response-headers` names from the
//!   answer;
//! - 401: passed to the client with the service's `WWW-Authenticate`, or, with `auth-signin`,
//!   a 302 to the sign-in page with the original URL in its `rd` parameter;
//! - 403: passed to the client;
//! - anything else, or no answer: 500.
//!
//! The auth request carries the client's headers and `X-Original-URL`, `X-Original-URI`,
//! `X-Original-Method`, `X-Sent-From`, `X-Real-IP`, `X-Forwarded-For`, `X-Forwarded-Host`,
//! `X-Scheme` and `X-Auth-Request-Redirect`, as ingress-nginx sends them, then the headers of
//! `auth-proxy-set-headers` (variables expanded), which replace any of the same name.
//!
//! With `auth-cache-key`, answers are kept as nginx's `proxy_cache` keeps them: per key, for the
//! time `auth-cache-duration` gives their status, shared by the proxy's workers, and per route
//! (ingress-nginx shares one zone between locations; a key repeated across routes does not
//! carry an answer from one to the other here). As nginx, an answer with `Set-Cookie` or with
//! `Cache-Control: no-store`, `no-cache` or `private` is not kept; unlike nginx, neither is
//! one whose key expands to nothing, which would otherwise answer every client alike. At most
//! [`CACHED_ANSWERS`] answers are kept per route; expired ones go first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tidegate_snapshot::{ExternalAuth, Template, Timeouts};

use super::outbound::{Outbound, Url};
use super::variables::{escape, expand};
use super::{Effects, Facts, Verdict};
use crate::body::{LocalBody, full};
use crate::respond::error_response;
use crate::upstream::Attempts;

/// Auth answers are read whole up to this; a larger one is no answer.
const MAX_ANSWER: usize = 64 << 10;
/// Answers kept per route (`auth-cache-key`).
const CACHED_ANSWERS: usize = 10_000;

/// A kept answer: its status and headers (the body is never used), until `until`.
#[derive(Debug, Clone)]
struct Kept {
    status: StatusCode,
    headers: HeaderMap,
    until: Instant,
}

#[derive(Debug)]
pub(super) struct ExternalAuthFilter {
    auth: ExternalAuth,
    method: Option<Method>,
    response_headers: Vec<HeaderName>,
    timeouts: Timeouts,
    /// Where the auth service is.
    outbound: Outbound,
    /// `auth-proxy-set-headers`.
    set_headers: Vec<(HeaderName, Template)>,
    /// Kept answers by expanded `auth-cache-key`, when it is set.
    cache: Option<Mutex<HashMap<String, Kept>>>,
}

impl ExternalAuthFilter {
    pub(super) fn new(auth: &ExternalAuth, timeouts: Timeouts) -> ExternalAuthFilter {
        ExternalAuthFilter {
            method: auth.method.as_deref().and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
            response_headers: auth
                .response_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            set_headers: auth
                .set_headers
                .iter()
                .filter_map(|h| Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, h.value.clone())))
                .collect(),
            cache: auth.cache.as_ref().map(|_| Mutex::new(HashMap::new())),
            auth: auth.clone(),
            timeouts,
            outbound: Outbound::default(),
        }
    }

    pub(super) async fn check(&self, facts: &Facts<'_>, slot: &mut Option<Box<Effects>>) -> Verdict {
        let url = expand(&self.auth.url, facts);
        let key = self.auth.cache.as_ref().map(|c| expand(&c.key, facts)).filter(|k| !k.is_empty());
        let kept = key.as_deref().and_then(|key| self.kept(key));
        let answer = match kept {
            Some(answer) => answer,
            None => match self.ask(&url, facts).await {
                Ok(answer) => {
                    if let Some(key) = key {
                        self.keep(key, &answer);
                    }
                    answer
                }
                Err(why) => {
                    tracing::warn!(auth_url = %url, error = %why, "external auth failed; answering 500");
                    return Verdict::Answer(error_response(StatusCode::INTERNAL_SERVER_ERROR));
                }
            },
        };
        let cookies: Vec<HeaderValue> = answer.headers().get_all(header::SET_COOKIE).iter().cloned().collect();
        let status = answer.status();
        if status.is_success() {
            let effects = Effects::of(slot);
            for name in &self.response_headers {
                if let Some(value) = answer.headers().get(name) {
                    effects.upstream_headers.push((name.clone(), value.clone()));
                }
            }
            effects.cookies.extend(cookies);
            effects.cookies_always |= self.auth.always_set_cookie;
            return Verdict::Continue;
        }
        let mut response = match status {
            StatusCode::UNAUTHORIZED => match &self.auth.signin {
                Some(signin) => self.signin(signin, facts),
                None => {
                    let mut response = error_response(StatusCode::UNAUTHORIZED);
                    if let Some(challenge) = answer.headers().get(header::WWW_AUTHENTICATE) {
                        response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge.clone());
                    }
                    response
                }
            },
            StatusCode::FORBIDDEN => error_response(StatusCode::FORBIDDEN),
            other => {
                tracing::warn!(auth_url = %url, status = other.as_u16(), "external auth answered neither 2xx, 401 nor 403; answering 500");
                error_response(StatusCode::INTERNAL_SERVER_ERROR)
            }
        };
        if self.auth.always_set_cookie {
            for cookie in cookies {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
        }
        Verdict::Answer(response)
    }

    /// The answer kept for `key`, while it lasts.
    fn kept(&self, key: &str) -> Option<Response<bytes::Bytes>> {
        let cache = self.cache.as_ref()?.lock().ok()?;
        let kept = cache.get(key).filter(|k| k.until > Instant::now())?;
        let mut answer = Response::new(bytes::Bytes::new());
        *answer.status_mut() = kept.status;
        *answer.headers_mut() = kept.headers.clone();
        Some(answer)
    }

    /// Keeps `answer` under `key` for as long as `auth-cache-duration` gives its status, unless
    /// it sets a cookie or asks not to be kept.
    fn keep(&self, key: String, answer: &Response<bytes::Bytes>) {
        let (Some(cache), Some(config)) = (&self.cache, &self.auth.cache) else { return };
        let status = answer.status();
        let Some(duration) = config
            .durations
            .iter()
            .find(|d| d.statuses.is_empty() || d.statuses.contains(&status.as_u16()))
            .filter(|d| d.seconds > 0)
        else {
            return;
        };
        let headers = answer.headers();
        let forbidden = headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "no-store" | "no-cache" | "private"))
            })
        });
        if forbidden || headers.contains_key(header::SET_COOKIE) {
            return;
        }
        let Ok(mut cache) = cache.lock() else { return };
        let now = Instant::now();
        if cache.len() >= CACHED_ANSWERS {
            cache.retain(|_, k| k.until > now);
            if cache.len() >= CACHED_ANSWERS {
                let Some(first) = cache.keys().next().cloned() else { return };
                cache.remove(&first);
            }
        }
        let until = now + Duration::from_secs(duration.seconds);
        cache.insert(key, Kept { status, headers: headers.clone(), until });
    }

    /// A 302 to the sign-in page, with the original URL in the redirect parameter unless the
    /// page's URL already sets it.
    fn signin(&self, signin: &Template, facts: &Facts<'_>) -> Response<LocalBody> {
        let mut location = expand(signin, facts);
        let param = &self.auth.signin_redirect_param;
        let has_param = location
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|pair| pair.split('=').next() == Some(param.as_str())));
        if !has_param {
            let original = format!("{}://{}{}", facts.scheme(), facts.host, facts.request_uri());
            let separator = if location.contains('?') { '&' } else { '?' };
            location = format!("{location}{separator}{param}={}", escape(&original));
        }
        let mut response: Response<LocalBody> = Response::new(full(bytes::Bytes::new()));
        *response.status_mut() = StatusCode::FOUND;
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        response
    }

    /// Sends the auth request and reads the answer whole.
    async fn ask(&self, url: &str, facts: &Facts<'_>) -> Result<Response<bytes::Bytes>, String> {
        let parsed = Url::parse(url)?;
        let (authority, path) = (parsed.authority, parsed.path);
        let (endpoint, transport) = self.outbound.target(&parsed).await?;
        let mut headers = HeaderMap::with_capacity(facts.headers.len() + 12);
        for (name, value) in facts.headers {
            if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING && name != header::HOST {
                headers.append(name, value.clone());
            }
        }
        crate::headers::strip_hop_by_hop(&mut headers, false);
        let request_uri = facts.request_uri();
        let scheme = facts.scheme();
        let client = facts.client.to_canonical().to_string();
        let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        set(&mut headers, "host", authority);
        set(&mut headers, "x-original-url", &format!("{scheme}://{}{request_uri}", facts.host));
        set(&mut headers, "x-original-uri", request_uri);
        set(&mut headers, "x-original-method", facts.method.as_str());
        set(&mut headers, "x-sent-from", "nginx-ingress-controller");
        set(&mut headers, "x-real-ip", &client);
        set(&mut headers, "x-forwarded-for", &client);
        set(&mut headers, "x-forwarded-host", facts.host);
        set(&mut headers, "x-scheme", scheme);
        set(&mut headers, "x-auth-request-redirect", self.auth.request_redirect.as_deref().unwrap_or(request_uri));
        for (name, value) in &self.set_headers {
            if let Ok(value) = HeaderValue::from_str(&expand(value, facts)) {
                headers.insert(name.clone(), value);
            }
        }
        let mut request = Request::new(full(bytes::Bytes::new()));
        *request.method_mut() = self.method.clone().unwrap_or_else(|| facts.method.clone());
        *request.uri_mut() = path.parse().map_err(|e| format!("{url}: {e}"))?;
        *request.headers_mut() = headers;
        let answer = facts
            .pool
            .send(&mut Attempts::one(endpoint), &transport, request, None, self.timeouts)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = answer.into_parts();
        let body = http_body_util::Limited::new(body, MAX_ANSWER).collect().await.map_err(|e| e.to_string())?;
        Ok(Response::from_parts(parts, body.to_bytes()))
    }
}
