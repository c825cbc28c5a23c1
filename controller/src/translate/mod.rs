//! `translate`: Kubernetes objects in, a [`Snapshot`] and per-object statuses out.
//!
//! A pure function: no clock, no I/O, and sorted output, so the same objects always give the
//! same snapshot. Every Ingress v1 rule lives here:
//!
//! - **Ours**: see [`class`] for which Ingresses and LuaRoutes belong to tidegate.
//! - **Paths**: `Exact` matches the path exactly and case-sensitively. `Prefix` matches
//!   element-wise on `/`-separated elements, so `/aaa` matches `/aaa`, `/aaa/` and `/aaa/ccc` but
//!   not `/aaaccc`, and a trailing `/` in the rule is insignificant. On a host where an Ingress of
//!   ours sets `use-regex` or `rewrite-target`, every Ingress path is a regular expression
//!   instead ([`regex_hosts`]). `ImplementationSpecific` is
//!   treated as `Prefix`.
//! - **Precedence** within a host: Exact before Prefix, then the longer path, then the older
//!   Ingress (`creationTimestamp`, then namespace/name), then rule and path order. A route with
//!   the same type and path as an earlier one is shadowed and reported as a `Conflict`.
//! - **Hosts**: exact hosts, and `*.suffix` wildcards that match exactly one more DNS label. A
//!   request picks the most specific virtual host (exact, then wildcard, then the rules without a
//!   host) and only that host's routes. Several Ingresses naming the same host are merged.
//! - **Default backend**: a request that matches no route goes to the `defaultBackend` of the
//!   oldest Ingress that has one (others are reported as conflicts); without one the proxy answers
//!   404.
//! - **Backends**: Service ports by number or name, resolved through the Service to the ready
//!   endpoints of its EndpointSlices. A missing Service or port keeps the route (503) and is
//!   reported; resource backends are reported as unsupported. ExternalName Services are
//!   backends by name, which the proxies resolve.
//! - **TLS**: `spec.tls` Secrets bind certificates to hosts (the first Ingress wins a host);
//!   hosts with a certificate redirect plain HTTP to HTTPS unless `ssl-redirect: "false"`.

mod annotation_table;
mod annotations;
mod class;
mod configmap;
mod index;
mod ingress;
mod lua;
pub mod lua_modules;
mod policies;
mod snippet;
#[cfg(test)]
mod tests;
mod upstream;

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::rc::Rc;

use k8s_openapi::api::networking::v1::Ingress;
use tidegate_snapshot::{
    BackendId, Certificate, Endpoint, HostMatch, LuaScript, PathKind, Route, RouteAction, Routing, Snapshot,
    VirtualHost,
};

pub use annotation_table::annotation_table;
pub(crate) use annotation_table::instead;
pub(crate) use snippet::{Line as SnippetLine, Taken};

/// How each directive of an nginx snippet is taken (for the migration report).
pub(crate) fn snippet_lines(text: &str) -> Vec<SnippetLine> {
    snippet::lines(text)
}
pub use annotations::global_auth;
pub use configmap::configmap_table;
pub(crate) use tidegate_snapshot::Phase;

use crate::luaroute::{self, LuaRoute};
use crate::objects::{Inputs, ObjectRef, Options, name_of, namespace_of};
use crate::status::{ObjectStatus, Reason};

/// The result of translation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    /// What the proxies serve; `version` is left 0 for the publisher to stamp.
    pub snapshot: Snapshot,
    /// One entry per object of ours (Ingresses and LuaRoutes), sorted by object.
    pub statuses: Vec<ObjectStatus>,
    /// Problems with the settings rather than an object (`--default-ssl-certificate`).
    pub problems: Vec<String>,
}

/// Translates objects into a snapshot. See the module documentation for the rules.
pub fn translate(inputs: &Inputs) -> Translation {
    let index = index::Index::new(inputs);
    let classes = class::Classes::new(inputs);
    let mut out = Builder::default();
    let mut statuses = BTreeMap::new();
    let (global, configmap_status) = configmap::Global::read(inputs, &index);
    if let Some(status) = configmap_status {
        statuses.insert(status.object.clone(), status);
    }
    let options = Options {
        // Allowed by the ConfigMap, they also need its annotations-risk-level at Critical, as in
        // ingress-nginx; the flag is the operator's own decision.
        allow_snippet_annotations: match global.allow_snippets {
            Some(allowed) => allowed && global.critical_annotations,
            None => inputs.options.allow_snippet_annotations,
        },
        ..inputs.options.clone()
    };

    // LuaRoutes first: Ingresses may attach them, so their validity must be known.
    let mut lua_routes: Vec<&LuaRoute> = inputs.lua_routes.iter().map(|r| &**r).collect();
    lua_routes.sort_by(|a, b| lua_age_key(a).cmp(&lua_age_key(b)));
    let mut servable_lua_routes = Vec::new();
    for route in lua_routes {
        let object = ObjectRef::namespaced(luaroute::KIND, namespace_of(&route.metadata), name_of(&route.metadata));
        let mut status = ObjectStatus::new(object.clone());
        let validity = lua::validate(route, &mut status);
        let key = (namespace_of(&route.metadata).to_owned(), name_of(&route.metadata).to_owned());
        out.attachable.insert(key, lua::attachable(route, validity));
        let class = route.spec.ingress_class_name.as_deref().unwrap_or(&inputs.options.ingress_class);
        if classes.is_ours_name(Some(class)) {
            status.accepted = validity.schema && validity.lua;
            // Routes whose Lua does not compile still match (and answer 500): skipping them
            // would let their requests reach a less specific route without the Lua's checks.
            if validity.schema {
                servable_lua_routes.push((route, validity.lua));
            }
            statuses.insert(object, status);
        }
    }

    let mut ours: Vec<&Ingress> = inputs.ingresses.iter().map(|i| &**i).filter(|i| classes.is_ours(i)).collect();
    ours.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
    out.regex_hosts = regex_hosts(ours.iter().copied());
    out.rule_hosts = ours
        .iter()
        .flat_map(|i| i.spec.as_ref().and_then(|s| s.rules.as_deref()).unwrap_or_default())
        .map(|r| host_match(r.host.as_deref()))
        .collect();
    let ingress_count = ours.len();
    out.routes.reserve(
        ours.iter()
            .filter_map(|i| i.spec.as_ref()?.rules.as_ref())
            .flatten()
            .filter_map(|r| r.http.as_ref())
            .map(|h| h.paths.len())
            .sum(),
    );
    for (rank, ingress) in ours.into_iter().enumerate() {
        let object = ObjectRef::namespaced("Ingress", namespace_of(&ingress.metadata), name_of(&ingress.metadata));
        let mut status = ObjectStatus::new(object.clone());
        ingress::translate(ingress, rank, &index, &options, &global, &mut out, &mut status);
        statuses.insert(object, status);
    }

    // LuaRoutes rank after Ingresses for contested paths.
    for (i, (route, lua_ok)) in servable_lua_routes.into_iter().enumerate() {
        let object = ObjectRef::namespaced(luaroute::KIND, namespace_of(&route.metadata), name_of(&route.metadata));
        let misconfigured = (!lua_ok).then(|| format!("{object} has Lua that does not compile"));
        if let Some(status) = statuses.get_mut(&object) {
            lua::translate(route, ingress_count + i, misconfigured.as_deref(), &index, &global, &mut out, status);
        }
    }

    lua_modules::translate(inputs, &mut out, &mut statuses);

    let mut problems = Vec::new();
    let default_certificate = inputs.options.default_certificate.as_ref().and_then(|(namespace, name)| {
        match index.certificate(namespace, name) {
            Ok(certificate) => {
                let id = certificate.id.clone();
                out.certificates.insert(id.clone(), certificate);
                Some(id)
            }
            Err((_, message)) => {
                problems.push(format!(
                    "--default-ssl-certificate: {message}; the proxies' self-signed certificate is served instead"
                ));
                None
            }
        }
    });
    // No Ingress's spec.defaultBackend: the controller's default backend Service, if any,
    // answers what no route matches.
    if out.default_backend.is_none()
        && let Some((namespace, name)) = &inputs.options.default_backend_service
    {
        match index.first_port(namespace, name) {
            Some(port) => {
                let (backend, problem) = out.backend(&index, namespace, name, index::PortRef::Number(port));
                if let Some((_, message)) = problem {
                    problems.push(format!("--default-backend-service: {message}"));
                }
                out.default_backend = Some(tidegate_snapshot::RouteAction {
                    backend: Some(backend),
                    timeouts: tidegate_snapshot::Timeouts::default(),
                    lua: None,
                    policies: tidegate_snapshot::Policies::default(),
                    upstream: tidegate_snapshot::Upstream::default(),
                    canary: None,
                    refusal: None,
                });
            }
            None => problems.push(format!(
                "--default-backend-service: Service {namespace}/{name} not found, or it has no port; unmatched requests get 404"
            )),
        }
    }
    for (name, size) in &inputs.options.shared_dicts {
        let owner = ObjectRef::cluster("Flag", "--shared-dict");
        out.offer_shared_dict(tidegate_snapshot::CLUSTER_WIDE, name, *size, owner, String::new());
    }
    let mut snapshot = out.finish(&mut statuses, default_certificate);
    snapshot.routing.client_address = global.client_address.clone();
    snapshot.routing.hsts = global.hsts();
    snapshot.routing.http2_max_concurrent_streams = global.http2_streams;
    snapshot.routing.client_connections = global.client_connections.clone();
    snapshot.routing.client_tls_versions = global.client_tls_versions.clone();
    snapshot.routing.client_tls12_ciphers = global.client_tls12_ciphers.clone();
    snapshot.routing.upstream_connections = global.upstream_connections.clone();
    snapshot.routing.access_log_format = global
        .log_format
        .clone()
        .map(|format| tidegate_snapshot::AccessLogFormat { format, escape: global.log_escape });
    Translation { snapshot, statuses: statuses.into_values().collect(), problems }
}

/// Older Ingresses win; objects without a creation time (manifests) sort after those with one,
/// then by namespace and name.
fn age_key(ingress: &Ingress) -> (bool, Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>, &str, &str) {
    let created = ingress.metadata.creation_timestamp.as_ref();
    (created.is_none(), created, namespace_of(&ingress.metadata), name_of(&ingress.metadata))
}

fn lua_age_key(route: &LuaRoute) -> (bool, Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>, &str, &str) {
    let created = route.metadata.creation_timestamp.as_ref();
    (created.is_none(), created, namespace_of(&route.metadata), name_of(&route.metadata))
}

/// The host pattern an Ingress host stands for; no host (or an empty one) means any host.
pub(crate) fn host_match(host: Option<&str>) -> HostMatch {
    match host.filter(|h| !h.is_empty()) {
        None => HostMatch::Any,
        Some(h) => match h.strip_prefix("*.") {
            Some(suffix) => HostMatch::Wildcard(suffix.to_owned()),
            None => HostMatch::Exact(h.to_owned()),
        },
    }
}

/// A route before precedence is applied.
struct Candidate {
    host: HostMatch,
    route: Route,
    wants_ssl_redirect: bool,
    /// `force-ssl-redirect`: to HTTPS even when the host has no certificate of its own.
    forces_ssl_redirect: bool,
    /// (Ingress rank, rule index, path index): the tie-breakers after type and length.
    rank: (usize, usize, usize),
    /// Shared by the object's candidates: 20,000 routes were 20,000 copies of their owners.
    owner: Rc<ObjectRef>,
    field: FieldAt,
}

/// Where a candidate route was declared: written out only when it is shadowed, which few are.
#[derive(Clone, Debug)]
enum FieldAt {
    /// An Ingress rule's path (`spec.rules[r].http.paths[p]`).
    IngressPath(usize, usize),
    Text(String),
}

impl std::fmt::Display for FieldAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldAt::IngressPath(r, p) => write!(f, "spec.rules[{r}].http.paths[{p}]"),
            FieldAt::Text(text) => f.write_str(text),
        }
    }
}

impl Candidate {
    fn normalized_path(&self) -> &str {
        normalized_path(&self.route)
    }

    /// Precedence within a host: Exact first, longer paths first, then routes with more method
    /// and header conditions (the more specific), then the older object.
    fn precedence(&self) -> impl Ord + '_ {
        let matchers = usize::from(!self.route.methods.is_empty()) + self.route.headers.len();
        (
            self.route.path.kind,
            Reverse(self.normalized_path().len()),
            self.normalized_path(),
            Reverse(matchers),
            self.rank,
        )
    }
}

/// The path with an insignificant trailing `/` removed, so `/a/` and `/a` compare equal.
fn normalized_path(route: &Route) -> &str {
    let value = route.path.value.as_str();
    match route.path.kind {
        PathKind::Prefix if value.len() > 1 => value.trim_end_matches('/'),
        _ => value,
    }
}

/// Two routes of one host that match exactly the same requests.
fn same_match(a: &Route, b: &Route) -> bool {
    a.path.kind == b.path.kind
        && normalized_path(a) == normalized_path(b)
        && a.methods == b.methods
        && a.headers == b.headers
}

struct TlsClaim {
    certificate: String,
    owner: ObjectRef,
}

/// Collects what Ingresses offer, then resolves precedence and conflicts in [`Builder::finish`].
#[derive(Default)]
struct Builder {
    routes: Vec<Candidate>,
    tls: BTreeMap<HostMatch, TlsClaim>,
    certificates: BTreeMap<String, Certificate>,
    endpoints: BTreeMap<BackendId, Vec<Endpoint>>,
    default_backend: Option<RouteAction>,
    conflicts: Vec<(ObjectRef, String, String)>,
    scripts: BTreeMap<String, LuaScript>,
    /// `ngx.shared` dictionaries by (namespace, name): size and declaring object.
    shared_dicts: BTreeMap<(String, String), (u64, ObjectRef)>,
    /// LuaRoutes by (namespace, name), as Ingresses may attach them.
    attachable: HashMap<(String, String), lua::Attachable>,
    /// Backends resolved so far, with their problem: many routes name the same Service port.
    resolved: HashMap<BackendId, Option<(Reason, String)>>,
    /// Canary Ingresses' paths, attached to the routes they match once all routes are known.
    canaries: Vec<CanaryOffer>,
    /// ExternalName backends, for the proxies to resolve.
    names: BTreeMap<BackendId, tidegate_snapshot::NamedEndpoint>,
    /// Hosts whose Ingress paths are regular expressions: an Ingress of ours for the host sets
    /// `use-regex: "true"` or `rewrite-target` (see [`regex_hosts`]).
    regex_hosts: std::collections::HashSet<HostMatch>,
    /// Hosts some Ingress of ours names in a rule: `server-alias` and `from-to-www-redirect`
    /// never take one of these.
    rule_hosts: std::collections::HashSet<HostMatch>,
    /// Regular-expression paths checked so far, with the verdict.
    checked_regexes: HashMap<String, Result<(), String>>,
    /// `ssl-passthrough` hosts: their backend and the Ingress that claimed them first.
    passthrough: BTreeMap<String, (BackendId, ObjectRef)>,
    /// Each namespace's Lua modules and module-level code.
    lua: lua_modules::Namespaces,
    /// LuaRoutes' `sslCertificate` handlers, in object order.
    lua_certificates: Vec<tidegate_snapshot::LuaCertificate>,
}

/// The hosts whose paths match as regular expressions. As in ingress-nginx, once any Ingress
/// for a host sets `use-regex: "true"` or `rewrite-target` (under either prefix), every Ingress
/// path of that host is a case-insensitive regular expression anchored at the start of the
/// path, whichever Ingress defines it.
fn regex_hosts<'a>(ingresses: impl Iterator<Item = &'a Ingress>) -> std::collections::HashSet<HostMatch> {
    let mut hosts = std::collections::HashSet::new();
    for ingress in ingresses {
        let annotations = ingress.metadata.annotations.as_ref();
        let set = |name: &str| {
            [annotations::OURS, annotations::NGINX]
                .iter()
                .filter_map(|prefix| annotations?.get(&format!("{prefix}{name}")))
                .next()
                .map(|v| v.trim().to_owned())
        };
        if set("use-regex").as_deref() == Some("true") || set("rewrite-target").is_some() {
            let rules = ingress.spec.as_ref().and_then(|s| s.rules.as_deref()).unwrap_or_default();
            hosts.extend(rules.iter().map(|r| host_match(r.host.as_deref())));
        }
    }
    hosts
}

/// One path of a canary Ingress: the backend it offers to the route of the same host and path.
struct CanaryOffer {
    host: HostMatch,
    path: tidegate_snapshot::PathMatch,
    canary: tidegate_snapshot::Canary,
    owner: ObjectRef,
    field: String,
}

impl Builder {
    /// Resolves a backend (once per translation) and adds its endpoints; returns its id and
    /// what is wrong with it.
    fn backend(
        &mut self,
        index: &index::Index<'_>,
        namespace: &str,
        service: &str,
        port: index::PortRef<'_>,
    ) -> (BackendId, Option<(Reason, String)>) {
        let id = index::backend_id(namespace, service, port);
        if let Some(problem) = self.resolved.get(&id) {
            return (id, problem.clone());
        }
        let (endpoints, mut problem) = match index.resolve(namespace, service, port) {
            Ok(endpoints) => (endpoints, None),
            Err(problem) => (Vec::new(), Some(problem)),
        };
        match index.external_name(namespace, service, port) {
            Some(Ok(named)) => {
                self.names.insert(id.clone(), named);
            }
            Some(Err(why)) => problem = Some((Reason::Invalid, why)),
            None => {}
        }
        self.endpoints.insert(id.clone(), endpoints);
        self.resolved.insert(id.clone(), problem.clone());
        (id, problem)
    }

    /// A backend of one endpoint, the Service's cluster IP (`service-upstream`); `None` (with
    /// the reason) when the Service has none, and its endpoints serve instead.
    fn service_backend(
        &mut self,
        index: &index::Index<'_>,
        namespace: &str,
        service: &str,
        port: index::PortRef<'_>,
    ) -> Result<BackendId, String> {
        let endpoint = index.cluster_ip(namespace, service, port)?;
        let id = BackendId(format!("{}#service", index::backend_id(namespace, service, port)));
        self.endpoints.insert(id.clone(), vec![endpoint]);
        self.resolved.insert(id.clone(), None);
        Ok(id)
    }

    /// The first declaration of a dictionary wins; a later one with another size is reported.
    fn offer_shared_dict(&mut self, namespace: &str, name: &str, size: u64, owner: ObjectRef, field: String) {
        let key = (namespace.to_owned(), name.to_owned());
        match self.shared_dicts.get(&key) {
            Some((first_size, first)) if *first_size != size && *first != owner => {
                let message = format!(
                    "ngx.shared.{name} is already declared by {first} with size {first_size}; that size is used"
                );
                self.conflicts.push((owner, field, message));
            }
            Some(_) => {}
            None => {
                self.shared_dicts.insert(key, (size, owner));
            }
        }
    }

    /// Registers a Lua source under its name, returning its id.
    fn script(&mut self, name: &str, source: &str) -> String {
        let mut hasher = DefaultHasher::new();
        (name, source).hash(&mut hasher);
        let id = format!("{:016x}", hasher.finish());
        self.scripts.entry(id.clone()).or_insert_with(|| LuaScript {
            id: id.clone(),
            name: name.to_owned(),
            source: source.to_owned(),
        });
        id
    }

    /// Offers come in precedence order, so the first offer wins.
    fn offer_default_backend(&mut self, action: RouteAction, owner: ObjectRef) {
        if self.default_backend.is_some() {
            self.conflicts.push((
                owner,
                "spec.defaultBackend".into(),
                "an older Ingress already sets the default backend; ignored".into(),
            ));
        } else {
            self.default_backend = Some(action);
        }
    }

    fn offer_tls(&mut self, host: HostMatch, certificate: String, owner: ObjectRef, field: String) {
        match self.tls.get(&host) {
            Some(claim) if claim.certificate != certificate => {
                let message = format!(
                    "host {host} already uses the certificate of {} ({}); ignored",
                    claim.owner, claim.certificate
                );
                self.conflicts.push((owner, field, message));
            }
            Some(_) => {}
            None => {
                self.tls.insert(host, TlsClaim { certificate, owner });
            }
        }
    }

    /// The certificate serving a host: its own, or for an exact host the wildcard covering it.
    fn certificate_for(&self, host: &HostMatch) -> Option<&str> {
        if let Some(claim) = self.tls.get(host) {
            return Some(&claim.certificate);
        }
        let HostMatch::Exact(name) = host else { return None };
        let (_, suffix) = name.split_once('.')?;
        // Wildcards sort after every exact host: without any, no lookup (nor its allocation).
        let first_wildcard = HostMatch::Wildcard(String::new());
        self.tls.range(&first_wildcard..).next().filter(|(h, _)| matches!(h, HostMatch::Wildcard(_)))?;
        self.tls.get(&HostMatch::Wildcard(suffix.to_owned())).map(|c| c.certificate.as_str())
    }

    fn finish(
        mut self,
        statuses: &mut BTreeMap<ObjectRef, ObjectStatus>,
        default_certificate: Option<String>,
    ) -> Snapshot {
        // The order is sorted, not the candidates: moving 20,000 candidates of a few hundred
        // bytes around was a fifth of translating 10,000 Ingresses.
        let mut order: Vec<usize> = (0..self.routes.len()).collect();
        let routes = &self.routes;
        order.sort_by(|&a, &b| {
            let (a, b) = (&routes[a], &routes[b]);
            (&a.host, a.precedence()).cmp(&(&b.host, b.precedence()))
        });
        let mut candidates: Vec<Option<Candidate>> = std::mem::take(&mut self.routes).into_iter().map(Some).collect();

        let mut hosts: BTreeMap<HostMatch, Vec<Route>> = self.tls.keys().map(|h| (h.clone(), Vec::new())).collect();
        // Candidates come grouped by host, best first: each joins its host's routes unless the
        // last one there (its winner) matches the same requests. Routes are moved, not copied.
        struct Group {
            host: HostMatch,
            secured: bool,
            routes: Vec<Route>,
            winner: Option<Rc<ObjectRef>>,
        }
        let mut group: Option<Group> = None;
        for candidate in order.into_iter().filter_map(|i| candidates[i].take()) {
            let current = match &mut group {
                Some(g) if g.host == candidate.host => g,
                _ => {
                    if let Some(done) = group.take() {
                        hosts.insert(done.host, done.routes);
                    }
                    let routes = hosts.remove(&candidate.host).unwrap_or_default();
                    let secured = self.certificate_for(&candidate.host).is_some();
                    group.insert(Group { host: candidate.host.clone(), secured, routes, winner: None })
                }
            };
            if let Some(last) = current.routes.last()
                && same_match(last, &candidate.route)
            {
                let winner = current.winner.as_ref().map(ToString::to_string).unwrap_or_default();
                let message = format!(
                    "{:?} path {} on host {} is already routed by {winner}; shadowed",
                    candidate.route.path.kind,
                    candidate.normalized_path(),
                    candidate.host,
                );
                self.conflicts.push(((*candidate.owner).clone(), candidate.field.to_string(), message));
                continue;
            }
            let Candidate { mut route, wants_ssl_redirect, forces_ssl_redirect, owner, .. } = candidate;
            route.ssl_redirect = forces_ssl_redirect || (wants_ssl_redirect && current.secured);
            current.routes.push(route);
            current.winner = Some(owner);
        }
        if let Some(done) = group {
            hosts.insert(done.host, done.routes);
        }

        // Each canary joins the route its Ingress shadows (the first of each), with that
        // route's protocol and TLS; a canary with no route to join waits for one.
        for offer in std::mem::take(&mut self.canaries) {
            let probe = Route {
                name: String::new(),
                path: offer.path.clone(),
                methods: Vec::new(),
                headers: Vec::new(),
                action: tidegate_snapshot::RouteAction {
                    backend: None,
                    timeouts: Default::default(),
                    lua: None,
                    policies: Default::default(),
                    upstream: Default::default(),
                    canary: None,
                    refusal: None,
                },
                ssl_redirect: false,
            };
            let route = hosts.get_mut(&offer.host).and_then(|routes| routes.iter_mut().find(|r| same_match(r, &probe)));
            let message = match route {
                None => Some(format!(
                    "no Ingress routes {:?} path {} on host {}; the canary waits for one",
                    offer.path.kind,
                    normalized_path(&probe),
                    offer.host
                )),
                Some(route) if route.action.canary.is_some() => {
                    Some(format!("{} already has a canary; this one is not used", route.name))
                }
                Some(route) => {
                    let mut canary = offer.canary;
                    canary.upstream.protocol = route.action.upstream.protocol;
                    canary.upstream.tls = route.action.upstream.tls.clone();
                    route.action.canary = Some(Box::new(canary));
                    None
                }
            };
            if let Some(message) = message {
                self.conflicts.push((offer.owner, offer.field, message));
            }
        }

        for (owner, field, message) in self.conflicts.drain(..) {
            if let Some(status) = statuses.get_mut(&owner) {
                status.warning(Reason::Conflict, field, message);
            }
        }

        let virtual_hosts = hosts
            .into_iter()
            .map(|(host, routes)| VirtualHost { tls: self.certificate_for(&host).map(str::to_owned), host, routes })
            .collect::<Vec<_>>();
        let used: std::collections::BTreeSet<&str> =
            virtual_hosts.iter().filter_map(|v| v.tls.as_deref()).chain(default_certificate.as_deref()).collect();
        let certificates = self.certificates.values().filter(|c| used.contains(c.id.as_str())).cloned().collect();
        // Only scripts some served route uses (an Ingress refused after registering is not one).
        let mut referenced = std::collections::BTreeSet::new();
        let actions =
            virtual_hosts.iter().flat_map(|v| v.routes.iter().map(|r| &r.action)).chain(self.default_backend.as_ref());
        for lua in actions.filter_map(|a| a.lua.as_ref()) {
            for phase in Phase::ALL {
                referenced.extend(lua.phase(phase).iter().cloned());
            }
        }
        referenced.extend(self.lua.scripts().cloned());
        referenced.extend(self.lua_certificates.iter().map(|c| c.script.clone()));
        let scripts = self.scripts.into_values().filter(|s| referenced.contains(&s.id)).collect();
        Snapshot {
            version: 0,
            content: 0,
            routing: Routing {
                virtual_hosts,
                default_backend: self.default_backend,
                certificates,
                scripts,
                shared_dicts: self
                    .shared_dicts
                    .into_iter()
                    .map(|((namespace, name), (size, _))| tidegate_snapshot::SharedDict { namespace, name, size })
                    .collect(),
                lua_namespaces: self.lua.finish(),
                lua_certificates: self.lua_certificates,
                default_certificate,
                client_address: tidegate_snapshot::ClientAddress::default(),
                hsts: None,
                http2_max_concurrent_streams: None,
                client_connections: tidegate_snapshot::ClientConnections::default(),
                client_tls_versions: Vec::new(),
                client_tls12_ciphers: Vec::new(),
                upstream_connections: tidegate_snapshot::UpstreamConnections::default(),
                access_log_format: None,
                passthrough: self
                    .passthrough
                    .into_iter()
                    .map(|(host, (backend, _))| tidegate_snapshot::Passthrough { host, backend })
                    .collect(),
            },
            endpoints: self.endpoints,
            names: self.names,
        }
    }
}
