//! Finds the route for a request: `find(host, path) -> Option<&Route>`.
//!
//! A request picks one virtual host, the most specific that matches its host: the exact host,
//! else the `*.suffix` wildcard one label up, else the virtual host of rules without a host. Only
//! that host's routes are tried, in the precedence order the snapshot gives them. A request
//! matching no route goes to the default backend, if there is one.

use std::collections::HashMap;

use tidegate_snapshot::{HostMatch, PathKind, Route, RouteAction, Routing};

/// The router of one runtime, built once per routing change.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, VirtualHost>,
    wildcard: HashMap<String, VirtualHost>,
    any: Option<VirtualHost>,
    default_backend: Option<RouteAction>,
}

#[derive(Debug)]
struct VirtualHost {
    /// The host pattern as written, for metrics and logs.
    name: String,
    exact_paths: HashMap<String, usize>,
    routes: Vec<Route>,
}

/// What the router found for a request.
#[derive(Debug, Clone, Copy)]
pub enum Match<'r> {
    Route { host: &'r str, route: &'r Route },
    DefaultBackend(&'r RouteAction),
    NotFound,
}

impl Router {
    pub fn new(routing: &Routing) -> Self {
        let mut router = Router { default_backend: routing.default_backend.clone(), ..Router::default() };
        for vhost in &routing.virtual_hosts {
            let mut exact_paths = HashMap::new();
            for (i, route) in vhost.routes.iter().enumerate() {
                if route.path.kind == PathKind::Exact {
                    exact_paths.entry(route.path.value.clone()).or_insert(i);
                }
            }
            let built = VirtualHost { name: vhost.host.to_string(), exact_paths, routes: vhost.routes.clone() };
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
        router
    }

    /// `host` is the request's host without port, any case; `path` is the URI path.
    pub fn find<'r>(&'r self, host: &str, path: &str) -> Match<'r> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(vhost) = self.virtual_host(host)
            && let Some(route) = vhost.find(path)
        {
            return Match::Route { host: &vhost.name, route };
        }
        match &self.default_backend {
            Some(action) => Match::DefaultBackend(action),
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
        self.any.as_ref()
    }
}

impl VirtualHost {
    fn find(&self, path: &str) -> Option<&Route> {
        // Exact routes precede every Prefix route, so an exact hit is always the winner.
        if let Some(&i) = self.exact_paths.get(path) {
            return self.routes.get(i);
        }
        self.routes.iter().find(|r| r.path.kind == PathKind::Prefix && prefix_matches(&r.path.value, path))
    }
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
            action: RouteAction { backend: BackendId(backend.into()), timeouts: Timeouts::default() },
            ssl_redirect: false,
        }
    }

    fn host(host: HostMatch, routes: Vec<Route>) -> SnapshotHost {
        SnapshotHost { host, routes, tls: None }
    }

    fn found(router: &Router, host: &str, path: &str) -> Option<String> {
        match router.find(host, path) {
            Match::Route { route, .. } => Some(route.action.backend.0.clone()),
            Match::DefaultBackend(a) => Some(format!("default:{}", a.backend)),
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
            let router =
                Router::new(&Routing { virtual_hosts: vec![host(HostMatch::Any, routes)], ..Routing::default() });
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
        let router = Router::new(&routing);
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
        assert_eq!(found(&Router::new(&with_any), "other.org", "/").as_deref(), Some("any"));
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
            default_backend: Some(RouteAction { backend: BackendId("fallback".into()), timeouts: Timeouts::default() }),
            ..Routing::default()
        };
        let router = Router::new(&routing);
        assert_eq!(found(&router, "a.com", "/y").as_deref(), Some("default:fallback"));
        assert_eq!(found(&router, "b.com", "/y").as_deref(), Some("any"));
    }

    #[test]
    fn nothing_matches_without_default_backend() {
        assert!(matches!(Router::new(&Routing::default()).find("a", "/"), Match::NotFound));
    }
}
