//! A route's policies compiled into filters, once per route when a runtime is built, never per
//! request.
//!
//! The snapshot says what a route asks of each request ([`tidegate_snapshot::Policies`]); here
//! each policy becomes a filter of the phase it runs in, and the filters of a phase run in a
//! fixed order, before the route's Lua handlers of that phase (as nginx's access phase runs
//! `allow`/`deny` and `auth_*` before `access_by_lua`):
//!
//! | phase   | built-in filters, in order                                      | then          |
//! |---------|-----------------------------------------------------------------|---------------|
//! | rewrite | headers with variables (`add-headers`, `proxy-set-headers`,     | Lua `rewrite` |
//! |         | `custom-headers`); client certificate (`auth-tls-*`): 400;      |               |
//! |         | `block-user-agents` / `block-referers`: 403; CORS (`enable-    |               |
//! |         | cors`): 204; `app-root`: 302 for `/`; `permanent-` / `temporal- |               |
//! |         | redirect`                                                        |               |
//! | access  | limits (`limit-rps`, `-rpm`, `-connections`): 503; the shared  | Lua `access`  |
//! |         | limit (`global-rate-limit`): 429; IP rules                      |               |
//! |         | (`*-source-range`): 403; Basic auth (`auth-type`): 401;         |               |
//! |         | external auth (`auth-url`): 401, 302 to sign in, 403, 500        |               |
//!
//! In the body_filter step, `limit-rate` paces the response body ([`Filters::body_filter`]).
//! In the upstream step, a mirror (`mirror-target`) sends a copy of the request elsewhere
//! without delaying it ([`Filters::mirror`]).
//! The body limit (`proxy-body-size`) is checked against the declared length in the route step
//! ([`Filters::body_too_large`]), as nginx does when it picks the location, and caps the body as
//! it streams to the upstream ([`Filters::max_body`]). A
//! filter that lets a request go on may leave [`Effects`]: headers its response must carry
//! (CORS), which the pipeline adds to whatever response leaves, as nginx's `more_set_headers`
//! does; and places it holds (a client's requests in progress) until the response is done.
//! The limits run first in the access step, as nginx's preaccess phase runs `limit_req` and
//! `limit_conn` before its access phase. With `satisfy: any`, the checks after them (IP rules,
//! Basic auth, external auth) let a request on as soon as one of them does, as nginx's
//! `satisfy any`.
//!
//! A filter either lets the request go on or answers it; an answer ends the request's way to
//! the content or upstream step, but the header_filter, body_filter and log steps still run on
//! it (as nginx runs `header_filter_by_lua` on its own error pages). A route with no policies
//! has no filters, and the pipeline skips them with one length check.

mod basic_auth;
mod blocked;
mod body_size;
mod client_cert;
mod cors;
mod external_auth;
mod ip;
mod limit;
mod mirror;
mod outbound;
mod password;
mod redirect;
mod set_headers;
pub(crate) mod shared_limit;
mod variables;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, Uri};
use tidegate_snapshot::{Phase, Policies, Timeouts};

use crate::body::LocalBody;
use crate::connection::Connection;
use crate::upstream::Pool;
pub(crate) use variables::expand;

/// nginx's `$remote_user`: the user of the request's Basic credentials, checked or not.
pub(crate) fn remote_user(headers: &HeaderMap) -> String {
    basic_auth::credentials(headers).map(|(user, _)| user).unwrap_or_default()
}

/// What a filter sees of a request: the client and the request head as earlier steps left it.
#[derive(Clone, Copy)]
pub(crate) struct Facts<'a> {
    /// The client's address: the connection's peer.
    pub(crate) client: IpAddr,
    /// The port the client connected to, and whether over TLS.
    pub(crate) port: u16,
    pub(crate) tls: bool,
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    /// The request's host, without port.
    pub(crate) host: &'a str,
    pub(crate) headers: &'a HeaderMap,
    /// The worker's upstream pool, for filters that ask other services.
    pub(crate) pool: &'a Rc<Pool>,
    /// The connection: its client certificate, and what it proved.
    pub(crate) conn: &'a Connection,
}

/// The parts of a request a filter sees.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head<'a> {
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) host: &'a str,
    pub(crate) headers: &'a HeaderMap,
    /// The client: the connection's peer, or who a trusted peer says it is.
    pub(crate) client: IpAddr,
}

impl<'a> Facts<'a> {
    pub(crate) fn of(conn: &'a Connection, head: Head<'a>, pool: &'a Rc<Pool>) -> Facts<'a> {
        Facts {
            client: head.client,
            port: conn.local_port,
            tls: conn.tls,
            method: head.method,
            uri: head.uri,
            host: head.host,
            headers: head.headers,
            pool,
            conn,
        }
    }

    pub(crate) fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The path and query as the client sent them.
    pub(crate) fn request_uri(&self) -> &'a str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }
}

/// What filters that let a request go on leave for the rest of it.
#[derive(Default)]
pub(crate) struct Effects {
    /// Headers its response carries, whoever makes it.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// Places the request holds until its response is done (dropping them frees them).
    pub(crate) holds: Vec<limit::InProgress>,
    /// Headers the request to the upstream carries (an auth service's `auth-response-headers`).
    pub(crate) upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Cookies an auth service set, for the client: with a 2xx or 3xx final response, or with
    /// any when `cookies_always`.
    pub(crate) cookies: Vec<HeaderValue>,
    pub(crate) cookies_always: bool,
    /// The client's `Host`, when the route sent the upstream another (`upstream-vhost`).
    pub(crate) client_host: Option<HeaderValue>,
}

impl Effects {
    /// The effects of `slot`, made when first needed: most requests leave none.
    pub(crate) fn of(slot: &mut Option<Box<Effects>>) -> &mut Effects {
        slot.get_or_insert_with(Box::default)
    }

    /// Whether the auth service's cookies go out with a response of `status`
    /// (ingress-nginx's list).
    pub(crate) fn cookies_for(&self, status: http::StatusCode) -> bool {
        self.cookies_always || [200, 201, 204, 206, 301, 302, 303, 304, 307, 308].contains(&status.as_u16())
    }
}

/// One compiled policy.
#[derive(Debug)]
enum Filter {
    SetHeaders(set_headers::SetHeadersFilter),
    ClientCert(client_cert::ClientCertFilter),
    Blocked(blocked::BlockedFilter),
    Cors(cors::CorsFilter),
    AppRoot(redirect::AppRoot),
    Redirect(redirect::RedirectFilter),
    Limit(limit::LimitFilter),
    SharedLimit(shared_limit::SharedLimitFilter),
    Ip(ip::IpFilter),
    BasicAuth(basic_auth::BasicAuthFilter),
    ExternalAuth(Box<external_auth::ExternalAuthFilter>),
}

/// What running a step's filters came to: decided at once (filters that cannot wait), or
/// checks still waiting (on another service, or on a slow hash off the worker), whose output is
/// the answer that ends the request, if any. The caller awaits only the second, so that what it
/// holds across the wait is a pointer, never a decided response.
pub(crate) enum Ran<'a> {
    Decided(Option<Response<LocalBody>>),
    Waiting(Pin<Box<dyn Future<Output = Option<Response<LocalBody>>> + 'a>>),
}

/// What a filter decided.
enum Verdict {
    Continue,
    Answer(Response<LocalBody>),
}

impl Filter {
    /// Whether checking may wait (on another service, or on a slow hash off the worker).
    fn waits(&self) -> bool {
        matches!(self, Filter::BasicAuth(_) | Filter::ExternalAuth(_))
    }

    async fn check(&self, facts: &Facts<'_>, effects: &mut Option<Box<Effects>>) -> Verdict {
        match self {
            Filter::BasicAuth(auth) => auth.check(facts.headers).await,
            Filter::ExternalAuth(auth) => auth.check(facts, effects).await,
            other => other.check_now(facts, effects),
        }
    }

    /// A filter that does not wait, checked at once (one that waits is never asked this way).
    fn check_now(&self, facts: &Facts<'_>, effects: &mut Option<Box<Effects>>) -> Verdict {
        match self {
            Filter::SetHeaders(headers) => headers.check(facts, effects),
            Filter::ClientCert(certificate) => certificate.check(facts, effects),
            Filter::Blocked(blocked) => blocked.check(facts.headers),
            Filter::Cors(cors) => cors.check(facts.method, facts.headers, effects),
            Filter::AppRoot(root) => root.check(facts),
            Filter::Redirect(redirect) => redirect.check(facts),
            Filter::Limit(limits) => limits.check(facts, effects),
            Filter::SharedLimit(limit) => limit.check(facts),
            Filter::Ip(rules) => rules.check(facts.client),
            Filter::BasicAuth(_) | Filter::ExternalAuth(_) => {
                Verdict::Answer(crate::respond::error_response(http::StatusCode::INTERNAL_SERVER_ERROR))
            }
        }
    }
}

/// `satisfy any`, as nginx: the first check that passes lets the request on; when none does, a
/// 401 (with its challenge) wins over a 403; any other answer ends the request at once.
#[derive(Default)]
struct AnyOf {
    refusal: Option<Response<LocalBody>>,
}

impl AnyOf {
    /// Takes one check's verdict: `Some` when it decides the request (`None` inside: it goes on).
    fn take(&mut self, verdict: Verdict) -> Option<Option<Response<LocalBody>>> {
        match verdict {
            Verdict::Continue => Some(None),
            Verdict::Answer(response) => match response.status() {
                http::StatusCode::UNAUTHORIZED => {
                    self.refusal = Some(response);
                    None
                }
                http::StatusCode::FORBIDDEN => {
                    self.refusal.get_or_insert(response);
                    None
                }
                _ => Some(Some(response)),
            },
        }
    }
}

/// The filters of one route, by phase, in the order they run.
#[derive(Debug, Default)]
pub(crate) struct Filters {
    rewrite: Vec<Filter>,
    /// The access step's filters: the limits (nginx's preaccess phase), then the checks of
    /// who the client is (IP rules, Basic auth, external auth), which `satisfy_any` lets any
    /// one of pass the request.
    access: Vec<Filter>,
    /// How many of `access` are limits, which always all apply.
    limits: usize,
    /// Whether a filter of the rewrite or the access step may wait.
    rewrite_waits: bool,
    access_waits: bool,
    satisfy_any: bool,
    max_body: Option<u64>,
    response_rate: Option<tidegate_snapshot::ResponseRate>,
    /// Headers the upstream request carries, set by the route (`upstream-vhost`,
    /// `x-forwarded-prefix`, `proxy-set-headers` without variables).
    upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers every response of the route carries (`custom-headers` and `add-headers`
    /// without variables).
    response_headers: Vec<(HeaderName, HeaderValue)>,
    /// The route's requests go to the access log (`enable-access-log`).
    access_log: bool,
    /// A `Location` that is a path stays so (`relative-redirects`).
    relative_redirects: bool,
    /// Copies of the route's requests go here too (`mirror-target`).
    mirror: Option<mirror::MirrorFilter>,
}

impl Filters {
    /// Compiles a route's policies.
    /// `timeouts`: the route's, which calls to other services (external auth) keep too.
    pub(crate) fn compile(policies: &Policies, timeouts: Timeouts) -> Filters {
        let mut rewrite = Vec::new();
        let (response_headers, response) = set_headers::split(&policies.response_headers);
        let (fixed_upstream, upstream) = set_headers::split(&policies.upstream_headers);
        if !response.is_empty() || !upstream.is_empty() {
            rewrite.push(Filter::SetHeaders(set_headers::SetHeadersFilter { response, upstream }));
        }
        if let Some(certificate) = &policies.client_certificate {
            rewrite.push(Filter::ClientCert(client_cert::ClientCertFilter::new(certificate)));
        }
        if let Some(blocked) = &policies.blocked {
            rewrite.push(Filter::Blocked(blocked::BlockedFilter::new(blocked)));
        }
        if let Some(cors) = &policies.cors {
            rewrite.push(Filter::Cors(cors::CorsFilter::new(cors)));
        }
        if let Some(path) = &policies.app_root {
            rewrite.push(Filter::AppRoot(redirect::AppRoot { path: path.clone() }));
        }
        if let Some(to) = &policies.redirect {
            rewrite.push(Filter::Redirect(redirect::RedirectFilter { redirect: to.clone() }));
        }
        let mut access = Vec::new();
        if let Some(limits) = &policies.limits {
            access.push(Filter::Limit(limit::LimitFilter::new(limits)));
        }
        if let Some(limit) = &policies.shared_limit {
            access.push(Filter::SharedLimit(shared_limit::SharedLimitFilter::new(limit)));
        }
        let limits = access.len();
        if let Some(rules) = &policies.ip {
            access.push(Filter::Ip(ip::IpFilter::new(rules)));
        }
        if let Some(auth) = &policies.basic_auth {
            access.push(Filter::BasicAuth(basic_auth::BasicAuthFilter::new(auth)));
        }
        if let Some(auth) = &policies.external_auth {
            access.push(Filter::ExternalAuth(Box::new(external_auth::ExternalAuthFilter::new(auth, timeouts))));
        }
        let mut upstream_headers = fixed_upstream;
        let mut set = |name: HeaderName, value: &Option<String>| {
            if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                upstream_headers.push((name, value));
            }
        };
        set(http::header::HOST, &policies.upstream_host);
        set(HeaderName::from_static("x-forwarded-prefix"), &policies.forwarded_prefix);
        Filters {
            upstream_headers,
            response_headers,
            rewrite_waits: rewrite.iter().any(Filter::waits),
            access_waits: access.iter().any(Filter::waits),
            rewrite,
            access,
            limits,
            satisfy_any: policies.satisfy_any,
            max_body: policies.max_body_bytes,
            response_rate: policies.response_rate,
            access_log: !policies.no_access_log,
            relative_redirects: policies.relative_redirects,
            mirror: policies.mirror.as_ref().map(|m| mirror::MirrorFilter::new(m, timeouts)),
        }
    }

    /// The route's mirror, when it has one (the upstream step sends the copies).
    pub(crate) fn mirror(&self) -> Option<&mirror::MirrorFilter> {
        self.mirror.as_ref()
    }

    /// The body_filter step's built-in part: paces the response body (`limit-rate`).
    pub(crate) fn body_filter(&self, response: Response<LocalBody>) -> Response<LocalBody> {
        match self.response_rate {
            Some(rate) => response
                .map(|body| LocalBody::new(crate::body::Throttled::new(body, rate.bytes_per_second, rate.after_bytes))),
            None => response,
        }
    }

    /// Whether the route's requests go to the access log.
    pub(crate) fn access_log(&self) -> bool {
        self.access_log
    }

    /// The header_filter step's built-in part for `Location`: a path becomes absolute with the
    /// request's scheme and host, as nginx's `absolute_redirect` (on unless
    /// `relative-redirects`); ingress-nginx leaves the port out (`port_in_redirect off`).
    pub(crate) fn absolute_location(&self, response: &mut Response<LocalBody>, https: bool, host: &str) {
        if self.relative_redirects {
            return;
        }
        if response.extensions().get::<LocationAsSet>().is_some() {
            return;
        }
        let Some(location) = response.headers().get(http::header::LOCATION) else { return };
        if location.as_bytes().first() != Some(&b'/') {
            return;
        }
        let scheme = if https { "https" } else { "http" };
        let absolute = format!("{scheme}://{host}{}", String::from_utf8_lossy(location.as_bytes()));
        if let Ok(value) = HeaderValue::from_str(&absolute) {
            response.headers_mut().insert(http::header::LOCATION, value);
        }
    }

    /// Headers the route sets on every response.
    pub(crate) fn response_headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.response_headers
    }

    /// Headers the route sets on its upstream requests.
    pub(crate) fn upstream_headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.upstream_headers
    }

    /// Whether the request declares a body over the route's limit (answered 413 in the route
    /// step).
    pub(crate) fn body_too_large(&self, headers: &HeaderMap) -> bool {
        self.max_body.is_some_and(|limit| body_size::declared_over(headers, limit))
    }

    /// The most body bytes a request may send, when the route limits it.
    pub(crate) fn max_body(&self) -> Option<u64> {
        self.max_body
    }

    /// Whether `phase` has built-in filters.
    pub(crate) fn has(&self, phase: Phase) -> bool {
        !self.of(phase).is_empty()
    }

    fn of(&self, phase: Phase) -> &[Filter] {
        match phase {
            Phase::Rewrite => &self.rewrite,
            Phase::Access => &self.access,
            _ => &[],
        }
    }

    /// Runs the built-in filters of `phase` in order; a response ends the request's way to its
    /// content or upstream. What the others leave for the rest of the request goes to `effects`.
    ///
    /// Filters that cannot wait run to completion here, in plain calls: what comes back is
    /// already decided, and awaiting it costs one check. Those that may wait run in a box of
    /// their own, so that the request's state carries a pointer rather than the largest of
    /// their states (an auth call's).
    ///
    /// `effects` is made only when a filter leaves something: most requests leave nothing, and
    /// carry one empty pointer instead of the lists.
    pub(crate) fn run<'a>(
        &'a self,
        phase: Phase,
        facts: &'a Facts<'_>,
        effects: &'a mut Option<Box<Effects>>,
    ) -> Ran<'a> {
        if !self.waits_in(phase) {
            return Ran::Decided(self.run_now(phase, facts, effects));
        }
        Ran::Waiting(Box::pin(self.checks(phase, facts, effects)))
    }

    fn waits_in(&self, phase: Phase) -> bool {
        match phase {
            Phase::Rewrite => self.rewrite_waits,
            Phase::Access => self.access_waits,
            _ => false,
        }
    }

    /// [`Filters::run`] for a step none of whose filters waits: plain calls, no future.
    fn run_now(
        &self,
        phase: Phase,
        facts: &Facts<'_>,
        effects: &mut Option<Box<Effects>>,
    ) -> Option<Response<LocalBody>> {
        let (always, checks) = self.split(phase);
        for filter in always {
            if let Verdict::Answer(response) = filter.check_now(facts, effects) {
                return Some(response);
            }
        }
        if checks.is_empty() {
            return None;
        }
        let mut any = AnyOf::default();
        for filter in checks {
            if let Some(decided) = any.take(filter.check_now(facts, effects)) {
                return decided;
            }
        }
        any.refusal
    }

    /// The filters of `phase` that must all pass, and those of which one suffices
    /// (`satisfy any`: the access checks after the limits).
    fn split(&self, phase: Phase) -> (&[Filter], &[Filter]) {
        let filters = self.of(phase);
        match phase {
            Phase::Access if self.satisfy_any => filters.split_at(self.limits.min(filters.len())),
            _ => (filters, &[]),
        }
    }

    async fn checks(
        &self,
        phase: Phase,
        facts: &Facts<'_>,
        effects: &mut Option<Box<Effects>>,
    ) -> Option<Response<LocalBody>> {
        let (always, checks) = self.split(phase);
        for filter in always {
            if let Verdict::Answer(response) = filter.check(facts, effects).await {
                return Some(response);
            }
        }
        if checks.is_empty() {
            return None;
        }
        let mut any = AnyOf::default();
        for filter in checks {
            if let Some(decided) = any.take(filter.check(facts, effects).await) {
                return decided;
            }
        }
        any.refusal
    }
}

/// On a response whose `Location` Lua set with `ngx.header`: it goes out as set, not made
/// absolute, as lua-nginx-module leaves such a header out of nginx's redirect handling.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocationAsSet;
