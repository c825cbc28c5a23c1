//! Finds the route for a request: `find(host, path) -> Option<&Route>`.
//!
//! A request picks one virtual host, the most specific that matches its host: the exact host,
//! else the `*.suffix` wildcard one label up, else the virtual host of rules without a host. Only
//! that host's routes are tried, in the precedence order the snapshot gives them; a route
//! matches when its path does and so do its methods and headers, if it has any. A request
//! matching no route goes to the default backend, if there is one.
//!
//! Regular-expression paths (ingress-nginx's `use-regex`) run on the `regex` crate: matching
//! takes time linear in the path's length whatever the pattern, and each is compiled once per
//! route, bounded in size ([`REGEX_SIZE_LIMIT`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tidegate_lua::{Phase, Script};

use crate::policy::Filters;
use tidegate_snapshot::{HostMatch, LuaHandlers, PathKind, PathMatch, Route, RouteAction, Routing};

/// The most memory one route's compiled path expression may take.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The router of one runtime, built once per routing change.
#[derive(Debug, Default)]
pub struct Router {
    // Hosts are looked up on every request: foldhash, not SipHash (the keys are configuration).
    exact: foldhash::HashMap<String, Arc<VirtualHost>>,
    wildcard: foldhash::HashMap<String, Arc<VirtualHost>>,
    any: Option<Arc<VirtualHost>>,
    default_backend: Option<Target>,
    /// The path expressions in use, by pattern, for the next build to reuse.
    regexes: HashMap<String, regex::Regex>,
}

/// What building a router's targets uses: the compiled scripts, the counters, and the path
/// expressions by pattern. Routes that share a pattern share its compiled program (thousands of
/// Ingresses often carry the same paths: one application in every tenant), and the last
/// build's programs are reused.
struct Build<'a> {
    scripts: &'a HashMap<String, Arc<Script>>,
    counters: CounterFactory<'a>,
    previous: &'a HashMap<String, regex::Regex>,
    now: HashMap<String, regex::Regex>,
}

impl Build<'_> {
    fn regex(&mut self, pattern: &str) -> Result<regex::Regex, regex::Error> {
        if let Some(regex) = self.now.get(pattern) {
            return Ok(regex.clone());
        }
        let regex = match self.previous.get(pattern) {
            Some(regex) => regex.clone(),
            None => compile_path(pattern)?,
        };
        self.now.insert(pattern.to_owned(), regex.clone());
        Ok(regex)
    }

    /// Keeps the expressions of a virtual host reused as it was.
    fn keep(&mut self, vhost: &VirtualHost) {
        for (route, target) in vhost.routes.iter().zip(&vhost.targets) {
            if let Some(regex) = &target.path_regex {
                self.now.entry(route.path.value.clone()).or_insert_with(|| regex.clone());
            }
        }
    }
}

/// The request counters of one route, by status class (1xx to 5xx), created once per runtime
/// build so that counting a request allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct RouteCounters(pub [prometheus_client::metrics::counter::Counter; 5]);

impl RouteCounters {
    /// Counts a response status.
    pub fn count(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(counter) = self.0.get(class) {
            counter.inc();
        }
    }
}

/// A route's action with its Lua handlers resolved to compiled scripts.
#[derive(Debug)]
pub struct Target {
    /// Route name, for metrics and logs.
    pub name: Arc<str>,
    /// Virtual host pattern, for metrics and logs (empty for the default backend).
    pub host: Arc<str>,
    pub counters: RouteCounters,
    pub action: RouteAction,
    pub lua: Option<Arc<LuaChain>>,
    /// The route's policies, compiled.
    pub(crate) filters: Filters,
    /// How the route reaches its backend's endpoints.
    pub(crate) transport: crate::upstream::Transport,
    /// The backend that takes some of the route's requests instead (a canary Ingress's).
    pub(crate) canary: Option<Box<crate::upstream::CanaryRule>>,
    /// The backend's tag in session cookies (with `affinity: cookie`).
    pub(crate) affinity_tag: Box<str>,
    pub ssl_redirect: bool,
    /// The path's regular expression (for [`PathKind::Regex`] routes): what matches, and whose
    /// captures `rewrite-target` puts into the upstream URI.
    path_regex: Option<regex::Regex>,
}

impl Target {
    /// The URI the upstream gets instead of `uri` (`rewrite-target`), when the route rewrites:
    /// `$0` to `$9` are the captures of the path's expression; the query is kept, after the
    /// target's own (joined by `&`) when it has one, as nginx's `rewrite ... break` does.
    pub(crate) fn rewritten(&self, uri: &http::Uri) -> Option<http::Uri> {
        let target = self.action.policies.rewrite_target.as_deref()?;
        let captures = self.path_regex.as_ref()?.captures(uri.path());
        let mut out = String::with_capacity(target.len() + uri.path().len());
        let mut rest = target;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            match after.as_bytes().first().filter(|b| b.is_ascii_digit()) {
                Some(digit) => {
                    let group = usize::from(digit - b'0');
                    if let Some(text) = captures.as_ref().and_then(|c| c.get(group)) {
                        out.push_str(text.as_str());
                    }
                    rest = &after[1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        if let Some(query) = uri.query() {
            out.push(if out.contains('?') { '&' } else { '?' });
            out.push_str(query);
        }
        out.parse().ok()
    }
}

/// Compiles a regular-expression path as ingress-nginx writes it: `~* "^VALUE"`.
pub fn compile_path(value: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^{value}")).case_insensitive(true).size_limit(REGEX_SIZE_LIMIT).build()
}

/// The compiled handlers of a route, by phase.
#[derive(Debug, Default)]
pub struct LuaChain {
    phases: [Vec<Arc<Script>>; 7],
    pub cpu_budget: Option<Duration>,
    /// Whose `ngx.shared` dictionaries the handlers reach.
    pub namespace: Arc<str>,
}

impl LuaChain {
    pub fn phase(&self, phase: Phase) -> &[Arc<Script>] {
        let index = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.phases.get(index).map_or(&[], Vec::as_slice)
    }

    fn resolve(handlers: &LuaHandlers, scripts: &HashMap<String, Arc<Script>>) -> Result<LuaChain, String> {
        let lists = [
            &handlers.rewrite,
            &handlers.access,
            &handlers.content,
            &handlers.balancer,
            &handlers.header_filter,
            &handlers.body_filter,
            &handlers.log,
        ];
        let mut chain = LuaChain {
            cpu_budget: handlers.cpu_budget_ms.map(Duration::from_millis),
            namespace: handlers.namespace.as_str().into(),
            ..LuaChain::default()
        };
        for (slot, ids) in chain.phases.iter_mut().zip(lists) {
            for id in ids {
                slot.push(Arc::clone(
                    scripts
                        .get(id)
                        .ok_or_else(|| format!("route refers to Lua script {id}, which the snapshot does not hold"))?,
                ));
            }
        }
        Ok(chain)
    }
}

#[derive(Debug)]
struct VirtualHost {
    /// Exact routes by path, in precedence order.
    exact_paths: foldhash::HashMap<String, Vec<usize>>,
    routes: Vec<Route>,
    targets: Vec<Target>,
}

/// What the router found for a request.
#[derive(Debug, Clone, Copy)]
pub enum Match<'r> {
    Route(&'r Target),
    DefaultBackend(&'r Target),
    NotFound,
}

/// What a route can match besides host and path.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub headers: &'a HeaderMap,
}

/// Makes the counters of a (host, route) pair.
pub type CounterFactory<'a> = &'a dyn Fn(&str, &str) -> RouteCounters;

fn target(
    host: &str,
    name: &str,
    path: Option<&PathMatch>,
    action: &RouteAction,
    ssl_redirect: bool,
    build: &mut Build<'_>,
) -> Result<Target, String> {
    let (scripts, counters) = (build.scripts, build.counters);
    let lua = match &action.lua {
        Some(handlers) => Some(Arc::new(LuaChain::resolve(handlers, scripts)?)),
        None => None,
    };
    let mut action = action.clone();
    // Settings the backend cannot be reached with close the route rather than the snapshot.
    let transport = crate::upstream::Transport::compile(&action.upstream).unwrap_or_else(|why| {
        tracing::warn!(route = name, "{why}; the route answers 502");
        action.refusal.get_or_insert(tidegate_snapshot::Refusal {
            status: 502,
            reason: format!("the route's TLS settings for its backend cannot be used: {why}"),
        });
        crate::upstream::Transport::plain()
    });
    let canary = action.canary.as_deref().and_then(|c| match crate::upstream::CanaryRule::new(c) {
        Ok(rule) => Some(Box::new(rule)),
        Err(why) => {
            tracing::warn!(route = name, "{why}; the canary is left out");
            None
        }
    });
    let path_regex = match path {
        Some(path) if path.kind == PathKind::Regex => match build.regex(&path.value) {
            Ok(regex) => Some(regex),
            Err(e) => {
                // The controller checked it: a route that cannot match is left unmatched.
                tracing::warn!(route = name, error = %e, "the route's path expression does not compile; it matches nothing");
                None
            }
        },
        _ => None,
    };
    let affinity_tag = match (&action.upstream.affinity, &action.backend) {
        (Some(_), Some(backend)) => crate::upstream::affinity::backend_tag(backend),
        _ => Box::default(),
    };
    Ok(Target {
        affinity_tag,
        path_regex,
        name: name.into(),
        host: host.into(),
        counters: counters(host, name),
        transport,
        canary,
        filters: Filters::compile(&action.policies, action.timeouts),
        action,
        lua,
        ssl_redirect,
    })
}

impl Router {
    /// Builds the router; `scripts` are the compiled Lua sources of the routing, by id. A
    /// virtual host whose routes are the same in `previous` is taken from it as it is, so a
    /// change costs what changed, not the whole configuration (scripts are named by content,
    /// so the same routes mean the same scripts).
    ///
    /// # Errors
    /// When a route names a script that is not in `scripts`.
    pub fn new(
        routing: &Routing,
        scripts: &HashMap<String, Arc<Script>>,
        counters: CounterFactory<'_>,
        previous: &Router,
    ) -> Result<Self, String> {
        let mut build = Build { scripts, counters, previous: &previous.regexes, now: HashMap::new() };
        let default_backend = match &routing.default_backend {
            Some(action) => Some(target("", "default-backend", None, action, false, &mut build)?),
            None => None,
        };
        let mut router = Router { default_backend, ..Router::default() };
        for vhost in &routing.virtual_hosts {
            let before = match &vhost.host {
                HostMatch::Exact(h) => previous.exact.get(h),
                HostMatch::Wildcard(suffix) => previous.wildcard.get(suffix),
                HostMatch::Any => previous.any.as_ref(),
            };
            let built = match before {
                Some(built) if built.routes == vhost.routes => {
                    build.keep(built);
                    Arc::clone(built)
                }
                _ => Arc::new(VirtualHost::build(vhost, &mut build)?),
            };
            match &vhost.host {
                HostMatch::Exact(h) => {
                    router.exact.insert(h.clone(), built);
                }
                HostMatch::Wildcard(suffix) => {
                    router.wildcard.insert(suffix.clone(), built);
                }
                HostMatch::Any => router.any = Some(built),
            }
        }
        router.regexes = build.now;
        Ok(router)
    }

    /// `host` is the request's host without port, any case; `path` is the URI path.
    pub fn find<'r>(&'r self, host: &str, path: &str, facts: RequestFacts<'_>) -> Match<'r> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(vhost) = self.virtual_host(host)
            && let Some(target) = vhost.find(path, facts)
        {
            return Match::Route(target);
        }
        match &self.default_backend {
            Some(target) => Match::DefaultBackend(target),
            None => Match::NotFound,
        }
    }

    fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        if let Some(v) = self.exact.get(host) {
            return Some(v);
        }
        if let Some((label, suffix)) = host.split_once('.')
            && !label.is_empty()
            && let Some(v) = self.wildcard.get(suffix)
        {
            return Some(v);
        }
        self.any.as_deref()
    }
}

impl VirtualHost {
    fn build(vhost: &tidegate_snapshot::VirtualHost, build: &mut Build<'_>) -> Result<Self, String> {
        let host = vhost.host.to_string();
        let mut exact_paths: foldhash::HashMap<String, Vec<usize>> = foldhash::HashMap::default();
        let mut targets = Vec::with_capacity(vhost.routes.len());
        for (i, route) in vhost.routes.iter().enumerate() {
            if route.path.kind == PathKind::Exact {
                exact_paths.entry(route.path.value.clone()).or_default().push(i);
            }
            targets.push(target(&host, &route.name, Some(&route.path), &route.action, route.ssl_redirect, build)?);
        }
        Ok(VirtualHost { exact_paths, routes: vhost.routes.clone(), targets })
    }

    fn find(&self, path: &str, facts: RequestFacts<'_>) -> Option<&Target> {
        // Exact routes precede every Prefix route, so an exact hit is always the winner.
        if let Some(candidates) = self.exact_paths.get(path)
            && let Some(&i) =
                candidates.iter().find(|&&i| self.routes.get(i).is_some_and(|r| conditions_hold(r, facts)))
        {
            return self.targets.get(i);
        }
        let i = self.routes.iter().zip(&self.targets).position(|(r, t)| {
            let matches = match r.path.kind {
                PathKind::Exact => false,
                PathKind::Prefix => prefix_matches(&r.path.value, path),
                PathKind::Regex => t.path_regex.as_ref().is_some_and(|re| re.is_match(path)),
            };
            matches && conditions_hold(r, facts)
        })?;
        self.targets.get(i)
    }
}

/// Methods and headers a route asks for, if any.
fn conditions_hold(route: &Route, facts: RequestFacts<'_>) -> bool {
    (route.methods.is_empty() || route.methods.iter().any(|m| m == facts.method))
        && route
            .headers
            .iter()
            .all(|h| facts.headers.get_all(h.name.as_str()).iter().any(|v| v.as_bytes() == h.value.as_bytes()))
}

/// Element-wise prefix match: the `/`-separated elements of `prefix` (trailing `/` ignored) are
/// the first elements of `path`. `/aaa` matches `/aaa`, `/aaa/` and `/aaa/ccc`, not `/aaaccc`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use tidegate_snapshot::{BackendId, PathMatch, Timeouts, VirtualHost as SnapshotHost};

    use super::*;

    fn route(kind: PathKind, value: &str, backend: &str) -> Route {
        Route {
            name: backend.into(),
            path: PathMatch { kind, value: value.into() },
            methods: Vec::new(),
            headers: Vec::new(),
            action: RouteAction {
                backend: Some(BackendId(backend.into())),
                timeouts: Timeouts::default(),
                lua: None,
                policies: tidegate_snapshot::Policies::default(),
                upstream: Default::default(),
                canary: None,
                refusal: None,
            },
            ssl_redirect: false,
        }
    }

    fn build(routing: &Routing) -> Router {
        Router::new(routing, &HashMap::new(), &|_, _| RouteCounters::default(), &Router::default())
            .expect("router builds")
    }

    #[test]
    fn a_rebuild_reuses_the_virtual_hosts_that_did_not_change() {
        let a = host(HostMatch::Exact("a.test".into()), vec![route(PathKind::Prefix, "/", "a")]);
        let b = host(HostMatch::Exact("b.test".into()), vec![route(PathKind::Prefix, "/", "b")]);
        let first = build(&Routing { virtual_hosts: vec![a.clone(), b], ..Routing::default() });
        let b2 = host(HostMatch::Exact("b.test".into()), vec![route(PathKind::Prefix, "/", "b2")]);
        let routing = Routing { virtual_hosts: vec![a, b2], ..Routing::default() };
        let second = Router::new(&routing, &HashMap::new(), &|_, _| RouteCounters::default(), &first).expect("builds");
        assert!(Arc::ptr_eq(&first.exact["a.test"], &second.exact["a.test"]), "unchanged: reused");
        assert!(!Arc::ptr_eq(&first.exact["b.test"], &second.exact["b.test"]), "changed: rebuilt");
        let headers = HeaderMap::new();
        match second.find("b.test", "/", get(&headers)) {
            Match::Route(target) => assert_eq!(backend(target), "b2"),
            _ => panic!("b.test routes"),
        }
    }

    fn get<'a>(headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts { method: "GET", headers }
    }

    fn host(host: HostMatch, routes: Vec<Route>) -> SnapshotHost {
        SnapshotHost { host, routes, tls: None }
    }

    fn backend(target: &Target) -> String {
        target.action.backend.as_ref().map_or(String::new(), |b| b.0.clone())
    }

    fn found(router: &Router, host: &str, path: &str) -> Option<String> {
        let headers = HeaderMap::new();
        match router.find(host, path, get(&headers)) {
            Match::Route(target) => Some(backend(target)),
            Match::DefaultBackend(t) => Some(format!("default:{}", backend(t))),
            Match::NotFound => None,
        }
    }

    /// The Ingress v1 path examples (kubernetes.io docs, "Examples" table), as (rule, request, match).
    #[test]
    fn ingress_path_examples() {
        use PathKind::{Exact, Prefix};
        type Case<'a> = (&'a [(PathKind, &'a str)], &'a str, Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (&[(Prefix, "/")], "/anything", Some("/")),
            (&[(Exact, "/foo")], "/foo", Some("/foo")),
            (&[(Exact, "/foo")], "/bar", None),
            (&[(Exact, "/foo")], "/foo/", None),
            (&[(Exact, "/foo/")], "/foo", None),
            (&[(Prefix, "/foo")], "/foo", Some("/foo")),
            (&[(Prefix, "/foo")], "/foo/", Some("/foo")),
            (&[(Prefix, "/foo/")], "/foo", Some("/foo/")),
            (&[(Prefix, "/foo/")], "/foo/", Some("/foo/")),
            (&[(Prefix, "/aaa/bb")], "/aaa/bbb", None),
            (&[(Prefix, "/aaa/bbb")], "/aaa/bbb", Some("/aaa/bbb")),
            (&[(Prefix, "/aaa/bbb/")], "/aaa/bbb", Some("/aaa/bbb/")),
            (&[(Prefix, "/aaa/bbb")], "/aaa/bbb/", Some("/aaa/bbb")),
            (&[(Prefix, "/aaa/bbb")], "/aaa/bbb/ccc", Some("/aaa/bbb")),
            (&[(Prefix, "/aaa/bbb")], "/aaa/bbbxyz", None),
            (&[(Prefix, "/aaa/bbb/"), (Prefix, "/")], "/aaa/ccc", Some("/")),
            (&[(Prefix, "/aaa/bbb"), (Prefix, "/aaa")], "/aaa/ccc", Some("/aaa")),
            (&[(Exact, "/foo"), (Prefix, "/foo")], "/foo", Some("/foo exact")),
            (&[(Prefix, "/foo")], "/FOO", None),
        ];
        for (rules, request, expected) in cases {
            // Routes arrive in precedence order: Exact first, then longer prefixes first.
            let mut routes: Vec<Route> = rules
                .iter()
                .map(|(k, v)| {
                    route(*k, v, &if *k == Exact && rules.len() > 1 { format!("{v} exact") } else { v.to_string() })
                })
                .collect();
            routes.sort_by_key(|r| (r.path.kind, std::cmp::Reverse(r.path.value.trim_end_matches('/').len())));
            let router = build(&Routing { virtual_hosts: vec![host(HostMatch::Any, routes)], ..Routing::default() });
            assert_eq!(found(&router, "h", request).as_deref(), *expected, "rules {rules:?}, request {request}");
        }
    }

    /// Host selection: exact, then single-label wildcard, then the host-less rules.
    #[test]
    fn host_precedence_and_wildcards() {
        let routing = Routing {
            virtual_hosts: vec![
                host(HostMatch::Exact("foo.bar.com".into()), vec![route(PathKind::Prefix, "/", "exact")]),
                host(HostMatch::Wildcard("foo.com".into()), vec![route(PathKind::Prefix, "/", "wildcard")]),
            ],
            ..Routing::default()
        };
        let router = build(&routing);
        let cases = [
            ("foo.bar.com", Some("exact")),
            ("FOO.bar.com", Some("exact")),
            ("foo.bar.com.", Some("exact")),
            ("subdomain.bar.com", None),
            ("bar.foo.com", Some("wildcard")),
            ("baz.bar.foo.com", None),
            ("foo.com", None),
            (".foo.com", None),
        ];
        for (request, expected) in cases {
            assert_eq!(found(&router, request, "/").as_deref(), expected, "host {request}");
        }
        let mut with_any = routing;
        with_any.virtual_hosts.push(host(HostMatch::Any, vec![route(PathKind::Prefix, "/", "any")]));
        assert_eq!(found(&build(&with_any), "other.org", "/").as_deref(), Some("any"));
    }

    /// The most specific host owns the request: its path misses do not fall through to
    /// less specific hosts, only to the default backend.
    #[test]
    fn path_miss_goes_to_default_backend_not_other_hosts() {
        let routing = Routing {
            virtual_hosts: vec![
                host(HostMatch::Exact("a.com".into()), vec![route(PathKind::Exact, "/x", "a")]),
                host(HostMatch::Any, vec![route(PathKind::Prefix, "/", "any")]),
            ],
            default_backend: Some(RouteAction {
                backend: Some(BackendId("fallback".into())),
                timeouts: Timeouts::default(),
                lua: None,
                policies: tidegate_snapshot::Policies::default(),
                upstream: Default::default(),
                canary: None,
                refusal: None,
            }),
            ..Routing::default()
        };
        let router = build(&routing);
        assert_eq!(found(&router, "a.com", "/y").as_deref(), Some("default:fallback"));
        assert_eq!(found(&router, "b.com", "/y").as_deref(), Some("any"));
    }

    /// Methods and headers narrow a route; a request failing them falls to the next route.
    #[test]
    fn methods_and_headers_narrow_routes() {
        let mut canary = route(PathKind::Prefix, "/v1", "canary");
        canary.headers = vec![tidegate_snapshot::HeaderMatch { name: "x-canary".into(), value: "1".into() }];
        let mut posts = route(PathKind::Exact, "/v1/x", "posts");
        posts.methods = vec!["POST".into()];
        let stable = route(PathKind::Prefix, "/v1", "stable");
        let router = build(&Routing {
            virtual_hosts: vec![host(HostMatch::Any, vec![posts, canary, stable])],
            ..Routing::default()
        });
        let find = |method: &str, headers: &HeaderMap, path: &str| match router.find(
            "h",
            path,
            RequestFacts { method, headers },
        ) {
            Match::Route(target) => backend(target),
            _ => String::new(),
        };
        let none = HeaderMap::new();
        let mut flagged = HeaderMap::new();
        flagged.insert("x-canary", "1".parse().expect("value"));
        assert_eq!(find("GET", &none, "/v1/a"), "stable");
        assert_eq!(find("GET", &flagged, "/v1/a"), "canary");
        assert_eq!(find("POST", &none, "/v1/x"), "posts");
        assert_eq!(find("GET", &none, "/v1/x"), "stable", "an exact route whose method fails gives way to prefixes");
    }

    #[test]
    fn nothing_matches_without_default_backend() {
        assert!(matches!(build(&Routing::default()).find("a", "/", get(&HeaderMap::new())), Match::NotFound));
    }

    /// Regular-expression routes match from the start of the path, ignoring case, first match
    /// in order; `rewrite-target` puts their captures into the upstream URI and keeps the query.
    #[test]
    fn regex_routes_match_in_order_and_rewrite() {
        let mut api = route(PathKind::Regex, "/something(/|$)(.*)", "rewrite");
        api.action.policies.rewrite_target = Some("/$2".into());
        let mut tagged = route(PathKind::Regex, "/tag/([a-z]+)", "tagged");
        tagged.action.policies.rewrite_target = Some("/by-tag?t=$1".into());
        let routing = Routing {
            virtual_hosts: vec![host(
                HostMatch::Exact("r.test".into()),
                vec![api, tagged, route(PathKind::Regex, "/", "root")],
            )],
            ..Routing::default()
        };
        let router = build(&routing);
        let headers = HeaderMap::new();
        let found = |path: &str| match router.find("r.test", path, get(&headers)) {
            Match::Route(t) => t,
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(&*found("/SOMETHING/else").name, "rewrite", "ignoring case");
        assert_eq!(&*found("/somethingelse").name, "root", "(/|$) does not match 'e'");
        assert_eq!(&*found("/x/something").name, "root", "anchored at the start");
        let rewritten = |path: &str| {
            let target = found(path.split('?').next().unwrap_or(path));
            target.rewritten(&path.parse().expect("uri")).map(|u| u.to_string())
        };
        assert_eq!(rewritten("/something").as_deref(), Some("/"));
        assert_eq!(rewritten("/something/new/x?a=1").as_deref(), Some("/new/x?a=1"), "query kept");
        assert_eq!(rewritten("/tag/blue?a=1").as_deref(), Some("/by-tag?t=blue&a=1"), "after the target's own");
        assert_eq!(rewritten("/other"), None, "no rewrite-target");
    }
}
