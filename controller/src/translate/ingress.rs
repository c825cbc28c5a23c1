//! One Ingress into candidate routes, TLS claims and a default backend.

use std::fmt::{self, Display};

use k8s_openapi::api::networking::v1::{HTTPIngressPath, Ingress, IngressBackend};
use tidegate_snapshot::{
    Canary, HostMatch, LuaHandlers, PathKind, PathMatch, Policies, Refusal, Route, RouteAction, Upstream,
};

use super::annotations::{self, Settings};
use super::configmap::Global;
use super::index::{Index, PortRef};
use super::lua::{self, Attachable};
use super::policies;
use super::upstream;
use super::{Builder, Candidate, FieldAt, host_match};
use crate::objects::{ObjectRef, Options, name_of, namespace_of};
use crate::status::{ObjectStatus, Reason};
use crate::validate::{check_host, check_path_value, check_port_number};

/// Adds what an Ingress of ours serves to `out`, recording problems in `status`.
/// `rank` is the Ingress's place in precedence order (oldest first).
pub(super) fn translate(
    ingress: &Ingress,
    rank: usize,
    index: &Index<'_>,
    options: &Options,
    global: &Global,
    out: &mut Builder,
    status: &mut ObjectStatus,
) {
    if !validate(ingress, &out.regex_hosts, status) {
        status.accepted = false;
        return;
    }
    let settings = annotations::read(ingress.metadata.annotations.as_ref(), &global.defaults, status);
    if !settings.error_codes.is_empty()
        && settings.default_backend.is_none()
        && options.default_backend_service.is_none()
    {
        status.warning(
            Reason::Unsupported,
            settings.field("custom-http-errors"),
            "custom-http-errors needs the default-backend annotation or the controller's --default-backend-service; ignored",
        );
    }
    // When the Lua it asks for cannot run, or it asks for a protection tidegate does not
    // honour, its paths still match but answer 500 or 503: serving them without it could skip
    // an access check, and dropping them would let requests fall through to a less specific
    // route.
    let (lua, mut refusal) = match attached_lua(ingress, &settings, options, out, status) {
        Ok(lua) => (lua, None),
        Err(()) => (None, Some(Refusal::misconfigured(format!("{} asks for Lua that cannot run", status.object)))),
    };
    let (policies, unhonoured) = policies::resolve(&settings, namespace_of(&ingress.metadata), index, global, status);
    if refusal.is_none() {
        refusal = unhonoured;
    }
    if refusal.is_some() {
        status.accepted = false;
    }
    let canary = settings.canary.enabled;
    let fallback = options.default_backend_service.clone();
    if settings.ssl_passthrough && !options.enable_ssl_passthrough {
        status.warning(
            Reason::Unsupported,
            settings.field("ssl-passthrough"),
            "ssl-passthrough needs the controller's --enable-ssl-passthrough (as in ingress-nginx); ignored, TLS ends in tidegate",
        );
    }
    let passthrough = settings.ssl_passthrough && options.enable_ssl_passthrough;
    let mut ctx =
        Context { ingress, index, settings, lua, policies, refusal, upstreams: Vec::new(), out, status, fallback };
    if canary {
        // A canary Ingress is no route of its own: its paths offer another backend to the
        // routes of other Ingresses for the same host and path.
        ctx.canaries();
        return;
    }
    ctx.default_backend();
    ctx.rules(rank);
    ctx.tls();
    if passthrough {
        ctx.passthrough();
    }
}

/// The Lua handlers an Ingress runs: its LuaRoute's `spec.lua`, then inline snippets (only with
/// `--allow-snippet-annotations`). `Err` when the Ingress must not be served.
fn attached_lua(
    ingress: &Ingress,
    settings: &Settings,
    options: &Options,
    out: &mut Builder,
    status: &mut ObjectStatus,
) -> Result<Option<LuaHandlers>, ()> {
    let namespace = namespace_of(&ingress.metadata);
    let mut handlers = LuaHandlers { namespace: namespace.to_owned(), ..LuaHandlers::default() };
    let mut any = false;
    if let Some(name) = &settings.lua_route {
        let field = "metadata.annotations[\"tidegate.dev/lua-route\"]";
        match out.attachable.get(&(namespace.to_owned(), name.clone())).cloned() {
            None => {
                status.error(
                    Reason::BackendNotFound,
                    field,
                    format!("LuaRoute {namespace}/{name} not found; the Ingress is not served"),
                );
                return Err(());
            }
            Some(Attachable::Invalid(why)) => {
                status.error(
                    Reason::Invalid,
                    field,
                    format!("LuaRoute {namespace}/{name} cannot be attached: {why}; the Ingress is not served"),
                );
                return Err(());
            }
            Some(Attachable::Valid { handlers: source, cpu_budget_ms }) => {
                handlers.cpu_budget_ms = cpu_budget_ms;
                match source {
                    Some(source) => {
                        lua::add_layers(
                            out,
                            &mut handlers,
                            &[(lua::script_name(namespace, name, "spec.lua"), &source)],
                        );
                        any = true;
                    }
                    None => status.warning(
                        Reason::Invalid,
                        field,
                        format!("LuaRoute {namespace}/{name} has no spec.lua handlers to attach"),
                    ),
                }
            }
        }
    }
    let mut failed = false;
    // nginx configuration in annotations, whatever it holds, only when allowed.
    if !options.allow_snippet_annotations {
        for key in &settings.snippet_keys {
            status.error(
                Reason::Unsupported,
                format!("metadata.annotations[{key:?}]"),
                "snippet annotations are disabled (allow-snippet-annotations, and in the ConfigMap \
                 annotations-risk-level: Critical); the routes answer 500",
            );
            failed = true;
        }
    }
    if settings.snippets.is_empty() {
        return if failed { Err(()) } else { Ok(any.then_some(handlers)) };
    }
    for (phase, key, source) in &settings.snippets {
        let field = format!("metadata.annotations[{key:?}]");
        if !options.allow_snippet_annotations {
            if !settings.snippet_keys.contains(key) {
                status.error(
                    Reason::Unsupported,
                    field,
                    "inline Lua annotations are disabled (--allow-snippet-annotations); the Ingress is not served",
                );
            }
            failed = true;
            continue;
        }
        if let Err(e) = tidegate_lua::check(source) {
            status.error(Reason::LuaSyntaxError, field, e.to_string());
            failed = true;
            continue;
        }
        let id = out.script(&format!("Ingress {namespace}/{} {field}", name_of(&ingress.metadata)), source);
        handlers.phase_mut(*phase).push(id);
        any = true;
    }
    if failed { Err(()) } else { Ok(any.then_some(handlers)) }
}

struct Context<'i, 'o> {
    ingress: &'i Ingress,
    index: &'i Index<'i>,
    settings: Settings,
    lua: Option<LuaHandlers>,
    policies: Policies,
    refusal: Option<Refusal>,
    /// The upstream resolved for each Service port, so that each problem is reported once.
    upstreams: Vec<(String, String, Result<Upstream, ()>)>,
    out: &'o mut Builder,
    status: &'o mut ObjectStatus,
    /// The controller's `--default-backend-service`, for error pages without the annotation.
    fallback: Option<(String, String)>,
}

impl Context<'_, '_> {
    fn namespace(&self) -> &str {
        namespace_of(&self.ingress.metadata)
    }

    fn owner(&self) -> ObjectRef {
        self.status.object.clone()
    }

    fn default_backend(&mut self) {
        let Some(backend) = self.ingress.spec.as_ref().and_then(|s| s.default_backend.as_ref()) else { return };
        if let Some(action) = self.action(backend, &"spec.defaultBackend") {
            self.out.offer_default_backend(action, self.owner());
        }
    }

    fn rules(&mut self, rank: usize) {
        let ingress = self.ingress;
        let owner = std::rc::Rc::new(self.owner());
        let rules = ingress.spec.as_ref().and_then(|s| s.rules.as_deref()).unwrap_or_default();
        for (r, rule) in rules.iter().enumerate() {
            let host = host_match(rule.host.as_deref());
            let paths = rule.http.as_ref().map(|h| h.paths.as_slice()).unwrap_or_default();
            for (p, path) in paths.iter().enumerate() {
                let Some(mut action) = self.action(&path.backend, &Field(&PathAt(r, p), ".backend")) else {
                    continue;
                };
                let Some(path_match) = self.path_match(&host, path, PathAt(r, p)) else { continue };
                let value = path_match.value.clone();
                // The session cookie's path is the matched path unless the Ingress says.
                if let Some(affinity) = action.upstream.affinity.as_mut() {
                    affinity.path.get_or_insert_with(|| value.clone());
                }
                let route = Route {
                    name: format!("{}/{}/{r}/{p}", self.namespace(), name_of(&ingress.metadata)),
                    path: path_match,
                    methods: Vec::new(),
                    headers: Vec::new(),
                    action,
                    ssl_redirect: false,
                };
                let candidate = |host: HostMatch, route: Route| Candidate {
                    host,
                    route,
                    wants_ssl_redirect: self.settings.ssl_redirect,
                    forces_ssl_redirect: self.settings.force_ssl_redirect,
                    rank: (rank, r, p),
                    owner: std::rc::Rc::clone(&owner),
                    field: FieldAt::IngressPath(r, p),
                };
                // `server-alias`: the same routes under more names, unless a rule names one.
                for alias in &self.settings.aliases {
                    let alias = host_match(Some(alias));
                    if !self.out.rule_hosts.contains(&alias) {
                        self.out.routes.push(candidate(alias, route.clone()));
                    }
                }
                // `from-to-www-redirect`: the other name of the host redirects to it (308).
                if self.settings.www_redirect
                    && let HostMatch::Exact(name) = &host
                {
                    let other = match name.strip_prefix("www.") {
                        Some(bare) => bare.to_owned(),
                        None => format!("www.{name}"),
                    };
                    let other = HostMatch::Exact(other);
                    if !self.out.rule_hosts.contains(&other)
                        && !self.settings.aliases.iter().any(|a| other.to_string() == *a)
                    {
                        let mut redirect = route.clone();
                        redirect.path = PathMatch { kind: PathKind::Prefix, value: "/".into() };
                        redirect.action.policies.redirect = format!("$scheme://{name}$request_uri")
                            .parse()
                            .ok()
                            .map(|to| tidegate_snapshot::Redirect { to, status: 308 });
                        self.out.routes.push(candidate(other, redirect));
                    }
                }
                self.out.routes.push(candidate(host.clone(), route));
            }
        }
    }

    /// The `default-backend` Service's backend (its first port), or else the controller's
    /// `--default-backend-service`, once per Ingress; `None`, reported, when the Service or its
    /// port cannot be found.
    fn error_backend(&mut self) -> Option<tidegate_snapshot::BackendId> {
        let (namespace, name, field) = match self.settings.default_backend.clone() {
            Some(name) => {
                (namespace_of(&self.ingress.metadata).to_owned(), name, self.settings.field("default-backend"))
            }
            None => {
                let (namespace, name) = self.fallback.clone()?;
                (namespace, name, self.settings.field("custom-http-errors"))
            }
        };
        let Some(port) = self.index.first_port(&namespace, &name) else {
            let message = format!("Service {namespace}/{name} not found, or it has no port; not used");
            if !self.status.problems.iter().any(|p| p.field == field) {
                self.status.warning(Reason::BackendNotFound, field, message);
            }
            return None;
        };
        let (id, problem) = self.out.backend(self.index, &namespace, &name, PortRef::Number(port));
        if let Some((reason, message)) = problem
            && !self.status.problems.iter().any(|p| p.field == field)
        {
            self.status.warning(reason, field, format!("{message}; error pages cannot be served"));
        }
        Some(id)
    }

    /// How a path matches: a regular expression on a host whose paths are (`use-regex`,
    /// `rewrite-target`), else by its type. `None`, with a field error, for an expression that
    /// does not compile: that path is left out, the Ingress's others still serve.
    fn path_match(&mut self, host: &HostMatch, path: &HTTPIngressPath, at: PathAt) -> Option<PathMatch> {
        let value = path.path.clone().unwrap_or_else(|| "/".to_owned());
        if !self.out.regex_hosts.contains(host) {
            let kind = if path.path_type == "Exact" { PathKind::Exact } else { PathKind::Prefix };
            return Some(PathMatch { kind, value });
        }
        // Thousands of Ingresses often share a pattern (one app's paths in every tenant): each
        // is checked once per translation.
        let checked = self.out.checked_regexes.entry(value.clone()).or_insert_with(|| check_regex_path(&value)).clone();
        match checked {
            Ok(()) => Some(PathMatch { kind: PathKind::Regex, value }),
            Err(why) => {
                self.status.error(
                    Reason::Invalid,
                    format!("{at}.path"),
                    format!("{why}; this path is not served (its host's paths are regular expressions)"),
                );
                None
            }
        }
    }

    /// `ssl-passthrough`: each rule's host takes TLS connections to the backend of its `/` path
    /// (its first path when it has none), undecrypted; the first Ingress to claim a host has it.
    /// Plain HTTP to the host keeps the Ingress's routes.
    fn passthrough(&mut self) {
        let ingress = self.ingress;
        let rules = ingress.spec.as_ref().and_then(|s| s.rules.as_deref()).unwrap_or_default();
        for (r, rule) in rules.iter().enumerate() {
            let field = format!("spec.rules[{r}].host");
            let Some(host) = rule.host.as_deref().filter(|h| !h.starts_with('*')) else {
                self.status.warning(
                    Reason::Unsupported,
                    field,
                    "ssl-passthrough needs an exact host; not passed through",
                );
                continue;
            };
            let paths = rule.http.as_ref().map(|h| h.paths.as_slice()).unwrap_or_default();
            let Some(path) = paths.iter().find(|p| p.path.as_deref() == Some("/")).or(paths.first()) else { continue };
            let Some(service) = path.backend.service.as_ref() else { continue };
            let port = match service.port.as_ref().map(|p| (p.number, p.name.as_deref())) {
                Some((Some(n), _)) => match check_port_number(n) {
                    Ok(n) => PortRef::Number(n),
                    Err(_) => continue,
                },
                Some((None, Some(name))) => PortRef::Name(name),
                _ => continue,
            };
            let (id, problem) = self.out.backend(self.index, namespace_of(&ingress.metadata), &service.name, port);
            if let Some((reason, message)) = problem {
                self.status.error(reason, field.clone(), format!("{message}; ssl-passthrough connections are refused"));
            }
            let host = host.to_ascii_lowercase();
            match self.out.passthrough.get(&host) {
                Some((_, owner)) if *owner != self.status.object => {
                    let message = format!("ssl-passthrough for {host} is already claimed by {owner}");
                    self.status.warning(Reason::Conflict, field, message);
                }
                Some(_) => {}
                None => {
                    self.out.passthrough.insert(host, (id, self.owner()));
                }
            }
        }
    }

    /// A canary Ingress's paths, offered to the routes they shadow.
    fn canaries(&mut self) {
        let ingress = self.ingress;
        let owner = self.owner();
        let rules = ingress.spec.as_ref().and_then(|s| s.rules.as_deref()).unwrap_or_default();
        let keys = self.settings.canary.clone();
        for (r, rule) in rules.iter().enumerate() {
            let host = host_match(rule.host.as_deref());
            let paths = rule.http.as_ref().map(|h| h.paths.as_slice()).unwrap_or_default();
            for (p, path) in paths.iter().enumerate() {
                let Some(action) = self.action(&path.backend, &Field(&PathAt(r, p), ".backend")) else { continue };
                let Some(backend) = action.backend else { continue };
                let Some(path_match) = self.path_match(&host, path, PathAt(r, p)) else { continue };
                let canary = Canary {
                    backend,
                    upstream: action.upstream,
                    header: keys.header.clone(),
                    header_value: keys.header_value.clone(),
                    header_pattern: keys.header_pattern.clone(),
                    cookie: keys.cookie.clone(),
                    weight: keys.weight.min(keys.weight_total),
                    weight_total: keys.weight_total,
                    legacy_affinity: keys.legacy_affinity,
                };
                self.out.canaries.push(super::CanaryOffer {
                    host: host.clone(),
                    path: path_match,
                    canary,
                    owner: owner.clone(),
                    field: FieldAt::IngressPath(r, p).to_string(),
                });
            }
        }
    }

    fn tls(&mut self) {
        let ingress = self.ingress;
        let Some(spec) = ingress.spec.as_ref() else { return };
        for (t, tls) in spec.tls.iter().flatten().enumerate() {
            let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
                // No Secret: these hosts get the default certificate, as with ingress-nginx.
                continue;
            };
            let hosts: Vec<HostMatch> = match tls.hosts.as_deref() {
                Some(hosts) if !hosts.is_empty() => hosts.iter().map(|h| host_match(Some(h))).collect(),
                // No hosts listed: the certificate covers every host of this Ingress's rules.
                _ => spec.rules.iter().flatten().map(|r| host_match(r.host.as_deref())).collect(),
            };
            match self.index.certificate(self.namespace(), secret) {
                Ok(certificate) => {
                    let id = certificate.id.clone();
                    self.out.certificates.insert(id.clone(), certificate);
                    for host in hosts.into_iter().filter(|h| *h != HostMatch::Any) {
                        self.out.offer_tls(host, id.clone(), self.owner(), format!("spec.tls[{t}]"));
                    }
                }
                Err((reason, message)) => {
                    self.status.error(
                        reason,
                        format!("spec.tls[{t}].secretName"),
                        format!("{message}; the default certificate is served instead"),
                    );
                }
            }
        }
    }

    /// Resolves a backend. The route exists even when the Service is missing (it answers 503), so
    /// only a backend kind tidegate cannot proxy to gives `None`.
    fn action(&mut self, backend: &IngressBackend, field: &dyn Display) -> Option<RouteAction> {
        if backend.resource.is_some() {
            self.status.error(
                Reason::Unsupported,
                format!("{field}.resource"),
                "resource backends are not supported; this path is not served",
            );
            return None;
        }
        let service = backend.service.as_ref()?;
        let port = service.port.as_ref()?;
        let port = match (port.number, port.name.as_deref()) {
            (Some(n), _) => PortRef::Number(check_port_number(n).ok()?),
            (None, Some(name)) => PortRef::Name(name),
            (None, None) => return None,
        };
        let namespace = namespace_of(&self.ingress.metadata);
        let (mut id, problem) = self.out.backend(self.index, namespace, &service.name, port);
        let fallback = self.error_backend();
        let no_endpoints = self.out.endpoints.get(&id).is_none_or(Vec::is_empty) && !self.out.names.contains_key(&id);
        if let (true, Some(fallback)) = (no_endpoints, &fallback) {
            // `default-backend` takes the traffic of a Service without endpoints.
            id = fallback.clone();
        } else if let Some((reason, message)) = problem {
            self.status.error(reason, format!("{field}.service"), format!("{message}; requests get 503"));
        } else if self.settings.service_upstream {
            match self.out.service_backend(self.index, namespace, &service.name, port) {
                Ok(service_id) => id = service_id,
                Err(why) => {
                    let field = self.settings.field("service-upstream");
                    self.status.warning(Reason::Invalid, field, format!("{why}; its endpoints are used"));
                }
            }
        }
        let (upstream, refusal) = match self.upstream(&service.name, port) {
            Ok(upstream) => (upstream, self.refusal.clone()),
            Err(()) => {
                let why = format!("{} asks for a way to its backend that cannot be set up", self.status.object);
                (Upstream::default(), self.refusal.clone().or(Some(Refusal::unhonoured(why))))
            }
        };
        let mut policies = self.policies.clone();
        if let Some(backend) = fallback.filter(|_| !self.settings.error_codes.is_empty()) {
            policies.error_pages = Some(tidegate_snapshot::ErrorPages {
                codes: self.settings.error_codes.clone(),
                backend,
                namespace: namespace.to_owned(),
                ingress: name_of(&self.ingress.metadata).to_owned(),
                service: service.name.clone(),
                service_port: port.to_string(),
                only_proxy_errors: self.settings.only_proxy_errors,
            });
        }
        Some(RouteAction {
            backend: Some(id),
            timeouts: self.settings.timeouts,
            lua: self.lua.clone(),
            policies,
            upstream,
            canary: None,
            refusal,
        })
    }

    /// How requests reach one of the Service's ports: resolved once per port.
    fn upstream(&mut self, service: &str, port: PortRef<'_>) -> Result<Upstream, ()> {
        let port_text = port.to_string();
        if let Some((_, _, known)) = self.upstreams.iter().find(|(s, p, _)| s == service && *p == port_text) {
            return known.clone();
        }
        let namespace = namespace_of(&self.ingress.metadata);
        let app_protocol = self.index.app_protocol(namespace, service, port);
        let resolved = upstream::resolve(&self.settings, namespace, service, app_protocol, self.index, self.status);
        if resolved.is_err() {
            self.status.accepted = false;
        }
        self.upstreams.push((service.to_owned(), port_text, resolved.clone()));
        resolved
    }
}

/// Checks the rules the API server enforces, so that an object from a manifest gets the same
/// verdict as one applied to a cluster. Returns false when the Ingress must not be served at all.
fn validate(ingress: &Ingress, regex_hosts: &std::collections::HashSet<HostMatch>, status: &mut ObjectStatus) -> bool {
    let before = status.problems.len();
    if name_of(&ingress.metadata).is_empty() {
        status.error(Reason::Invalid, "metadata.name", "is required");
    }
    let Some(spec) = ingress.spec.as_ref() else {
        status.error(Reason::Invalid, "spec", "is required");
        return false;
    };
    if spec.rules.as_ref().is_none_or(Vec::is_empty) && spec.default_backend.is_none() {
        status.error(Reason::Invalid, "spec", "needs rules or a defaultBackend");
    }
    if let Some(backend) = &spec.default_backend {
        validate_backend(backend, &"spec.defaultBackend", status);
    }
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        if let Some(host) = rule.host.as_deref().filter(|h| !h.is_empty())
            && let Err(why) = check_host(host)
        {
            status.error(Reason::Invalid, format!("spec.rules[{r}].host"), why);
        }
        let regex = regex_hosts.contains(&host_match(rule.host.as_deref()));
        for (p, path) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
            let at = PathAt(r, p);
            match (path.path_type.as_str(), path.path.as_deref()) {
                // A regular expression: its own check, per path (see `Context::path_match`).
                ("Exact" | "Prefix" | "ImplementationSpecific", Some(_)) if regex => {}
                ("Exact" | "Prefix", None) => {
                    status.error(Reason::Invalid, format!("{at}.path"), "is required for Exact and Prefix");
                }
                ("Exact" | "Prefix" | "ImplementationSpecific", Some(value)) => {
                    if let Err(why) = check_path_value(value) {
                        status.error(Reason::Invalid, format!("{at}.path"), why);
                    }
                }
                ("ImplementationSpecific", None) => {}
                (other, _) => status.error(
                    Reason::Invalid,
                    format!("{at}.pathType"),
                    format!("{other:?} is not one of Exact, Prefix, ImplementationSpecific"),
                ),
            }
            validate_backend(&path.backend, &Field(&at, ".backend"), status);
        }
    }
    for (t, tls) in spec.tls.iter().flatten().enumerate() {
        for (h, host) in tls.hosts.iter().flatten().enumerate() {
            if let Err(why) = check_host(host) {
                status.error(Reason::Invalid, format!("spec.tls[{t}].hosts[{h}]"), why);
            }
        }
    }
    status.problems.len() == before
}

/// A path as a regular expression: starts with `/`, and compiles as the proxy compiles it
/// (`(?i)^PATH`, the `regex` crate: RE2 syntax, which Kubernetes documents for Ingress paths;
/// no backreferences or lookaround). Only the parse and the NFA (where the size limit applies)
/// are built: what the proxy's regex would refuse, without the DFA it builds to run it.
fn check_regex_path(value: &str) -> Result<(), String> {
    use regex_automata::nfa::thompson;
    if !value.starts_with('/') {
        return Err(format!("{value:?} must start with '/'"));
    }
    thompson::Compiler::new()
        .syntax(regex_automata::util::syntax::Config::new().case_insensitive(true))
        .configure(thompson::Config::new().nfa_size_limit(Some(1 << 20)))
        .build(&format!("^{value}"))
        .map(drop)
        .map_err(|e| format!("{value:?} is not a regular expression tidegate runs: {e}"))
}

fn validate_backend(backend: &IngressBackend, field: &dyn Display, status: &mut ObjectStatus) {
    match (&backend.service, &backend.resource) {
        (Some(service), None) => {
            if service.name.is_empty() {
                status.error(Reason::Invalid, format!("{field}.service.name"), "is required");
            }
            let port = service.port.as_ref();
            match port.map(|p| (p.number, p.name.as_deref())) {
                Some((Some(n), None)) => {
                    if let Err(why) = check_port_number(n) {
                        status.error(Reason::Invalid, format!("{field}.service.port.number"), why);
                    }
                }
                Some((None, Some(name))) if !name.is_empty() => {}
                _ => {
                    status.error(
                        Reason::Invalid,
                        format!("{field}.service.port"),
                        "set exactly one of number and name",
                    );
                }
            }
        }
        (None, Some(_)) => {}
        _ => status.error(Reason::Invalid, field.to_string(), "set exactly one of service and resource"),
    }
}

/// `spec.rules[R].http.paths[P]`, written out only when a problem or a route needs it: at
/// 10,000 Ingresses, formatting field paths nobody reads was a tenth of translation.
#[derive(Clone, Copy)]
struct PathAt(usize, usize);

impl Display for PathAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spec.rules[{}].http.paths[{}]", self.0, self.1)
    }
}

/// A field path with a suffix, written out only when needed.
struct Field<'a>(&'a dyn Display, &'static str);

impl Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}
