//! LuaRoutes into routes with Lua handlers, and the Lua an Ingress attaches.
//!
//! - Every Lua field is compiled (never run); a field that does not compile makes the whole
//!   LuaRoute invalid, reported as `LuaSyntaxError` on the field with the Lua line.
//! - A route's handlers for a phase are the LuaRoute's `spec.lua` handler, then the route's own.
//! - A route without a backend is answered by its `content` handler.
//! - An Ingress annotated `tidegate.dev/lua-route: NAME` runs that LuaRoute's `spec.lua`
//!   handlers on all its paths; if the LuaRoute is missing or invalid the Ingress is not served
//!   (fail closed: the handler may be an access check).

use tidegate_snapshot::{
    HeaderMatch, HostMatch, LuaHandlers, PathKind, PathMatch, Policies, Refusal, Route, RouteAction, Timeouts,
};

use std::collections::BTreeMap;

use super::annotations;
use super::configmap::Global;
use super::index::{Index, PortRef};
use super::policies;
use super::upstream;
use super::{Builder, Candidate, FieldAt, Phase, host_match};
use crate::luaroute::{self, LuaPathType, LuaRoute};
use crate::objects::{name_of, namespace_of};
use crate::status::{ObjectStatus, Reason};
use crate::validate::check_port_number;

/// A LuaRoute as an Ingress may attach it.
#[derive(Clone, Debug)]
pub(super) enum Attachable {
    Valid { handlers: Option<luaroute::LuaHandlers>, cpu_budget_ms: Option<u64> },
    Invalid(String),
}

/// What validation found: whether the routes can be built at all (`schema`), and whether all
/// of the Lua compiles (`lua`): without it, the routes still match but answer 500. Policies are
/// read per route when it is translated (`route_policies`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Validity {
    pub(super) schema: bool,
    pub(super) lua: bool,
}

fn error_count(status: &ObjectStatus) -> usize {
    status.problems.iter().filter(|p| p.severity == crate::Severity::Error).count()
}

/// Validates a LuaRoute, compiling its Lua.
pub(super) fn validate(route: &LuaRoute, status: &mut ObjectStatus) -> Validity {
    let before = error_count(status);
    luaroute::validate(route, status);
    let schema = error_count(status) == before;
    let mut fields: Vec<(String, &luaroute::LuaHandlers)> = Vec::new();
    if let Some(lua) = &route.spec.lua {
        fields.push(("spec.lua".into(), lua));
    }
    for (i, rule) in route.spec.routes.iter().enumerate() {
        if let Some(lua) = &rule.lua {
            fields.push((format!("spec.routes[{i}].lua"), lua));
        }
    }
    if route.spec.ssl_certificate.is_some() && route.spec.hosts.is_empty() {
        status.error(Reason::Invalid, "spec.sslCertificate", "needs spec.hosts: the names whose handshakes it serves");
    }
    if let Some(cache) = &route.spec.ssl_certificate_cache
        && let Err(e) = luaroute::parse_duration_ms(cache)
    {
        status.error(Reason::Invalid, "spec.sslCertificateCache", e);
    }
    for (field, source) in [
        ("spec.init", &route.spec.init),
        ("spec.initWorker", &route.spec.init_worker),
        ("spec.sslCertificate", &route.spec.ssl_certificate),
    ] {
        if let Some(source) = source
            && let Err(e) = tidegate_lua::check(source)
        {
            status.error(Reason::LuaSyntaxError, field, e.to_string());
        }
    }
    for (prefix, handlers) in fields {
        for phase in Phase::ALL {
            if let Some(source) = handlers.get(phase)
                && let Err(e) = tidegate_lua::check(source)
            {
                status.error(Reason::LuaSyntaxError, format!("{prefix}.{}", phase.field()), e.to_string());
            }
        }
    }
    Validity { schema, lua: error_count(status) == before || !schema && lua_errors_only(status, before) }
}

/// Whether every error after `before` is a Lua syntax error (schema errors came first).
fn lua_errors_only(status: &ObjectStatus, before: usize) -> bool {
    status
        .problems
        .iter()
        .filter(|p| p.severity == crate::Severity::Error)
        .skip(before)
        .all(|p| p.reason == Reason::LuaSyntaxError)
}

/// What an Ingress can attach from a LuaRoute that passed (or failed) validation.
pub(super) fn attachable(route: &LuaRoute, validity: Validity) -> Attachable {
    if !(validity.schema && validity.lua) {
        return Attachable::Invalid("it has errors (see its status)".into());
    }
    let cpu_budget_ms = route.spec.cpu_budget.as_deref().and_then(|b| luaroute::parse_duration_ms(b).ok());
    Attachable::Valid { handlers: route.spec.lua.clone(), cpu_budget_ms }
}

/// The script name of a LuaRoute field, shared by the LuaRoute's routes and attaching Ingresses
/// so that both use one compiled script.
pub(super) fn script_name(namespace: &str, name: &str, field: &str) -> String {
    format!("LuaRoute {namespace}/{name} {field}")
}

/// Adds the handlers of `layers` (in order) to `handlers`, registering their scripts.
pub(super) fn add_layers(out: &mut Builder, handlers: &mut LuaHandlers, layers: &[(String, &luaroute::LuaHandlers)]) {
    for phase in Phase::ALL {
        for (prefix, layer) in layers {
            if let Some(source) = layer.get(phase) {
                let id = out.script(&format!("{prefix}.{}", phase.field()), source);
                handlers.phase_mut(phase).push(id);
            }
        }
    }
}

/// The policies of one route of a LuaRoute: `spec.policies` overlaid with the route's own,
/// read as the annotations they stand for, by the same parsers, so that both mean the same;
/// a problem names the LuaRoute's field. The refusal is set when something that protects the
/// route cannot be honoured (503).
fn route_policies(
    spec: &luaroute::LuaRouteSpec,
    rule: &luaroute::LuaRouteRule,
    r: usize,
    index: &Index<'_>,
    global: &Global,
    status: &mut ObjectStatus,
) -> (Policies, Option<Refusal>) {
    let at = if rule.policies.is_some() { format!("spec.routes[{r}].policies") } else { "spec.policies".into() };
    let fields = spec.policies.clone().unwrap_or_default().overlaid(rule.policies.as_ref()).annotations(&at);
    let annotations: BTreeMap<String, String> =
        fields.iter().map(|(key, value, _)| (annotations::prefixed(key), value.clone())).collect();
    let mut found = ObjectStatus::new(status.object.clone());
    let settings = annotations::read(Some(&annotations), &global.defaults, &mut found);
    let namespace = status.object.namespace.clone().unwrap_or_default();
    let resolved = policies::resolve(&settings, &namespace, index, global, &mut found);
    report_as_fields(found, &fields, status);
    resolved
}

/// Moves the problems found reading `fields` as annotations into `status`, each naming the
/// LuaRoute field it came from; routes of one LuaRoute often share their fields, so each
/// problem is told once.
fn report_as_fields(found: ObjectStatus, fields: &[(&'static str, String, String)], status: &mut ObjectStatus) {
    for mut problem in found.problems {
        if let Some((_, _, field)) = fields
            .iter()
            .find(|(key, _, _)| problem.field == format!("metadata.annotations[{:?}]", annotations::prefixed(key)))
        {
            problem.field.clone_from(field);
        }
        if !status.problems.contains(&problem) {
            status.problems.push(problem);
        }
    }
}

/// How a route's requests reach its Service: its `backend.upstream` fields, read as the
/// annotations they stand for by the same parsers, and the Service port's `appProtocol`.
/// `Err` when the route must not be served; problems name the fields.
fn backend_upstream(
    backend: &luaroute::LuaBackend,
    port: PortRef<'_>,
    path: &str,
    at: &str,
    index: &Index<'_>,
    global: &Global,
    status: &mut ObjectStatus,
) -> Result<tidegate_snapshot::Upstream, ()> {
    let fields = backend.upstream.as_ref().map(|u| u.annotations(at)).unwrap_or_default();
    let annotations: BTreeMap<String, String> =
        fields.iter().map(|(key, value, _)| (annotations::prefixed(key), value.clone())).collect();
    let mut found = ObjectStatus::new(status.object.clone());
    let settings = annotations::read(Some(&annotations), &global.defaults, &mut found);
    let namespace = status.object.namespace.clone().unwrap_or_default();
    let app_protocol = index.app_protocol(&namespace, &backend.service.name, port);
    let unhonoured = !settings.unhonoured.is_empty();
    let resolved = upstream::resolve(&settings, &namespace, &backend.service.name, app_protocol, index, &mut found);
    report_as_fields(found, &fields, status);
    let mut resolved = resolved?;
    if unhonoured {
        return Err(());
    }
    if let Some(affinity) = resolved.affinity.as_mut() {
        affinity.path.get_or_insert_with(|| path.to_owned());
    }
    Ok(resolved)
}

/// Adds the routes of a LuaRoute of ours to `out`. `rank` orders it after Ingresses. With
/// `misconfigured` (its Lua does not compile) the routes still match, and answer 500.
pub(super) fn translate(
    route: &LuaRoute,
    rank: usize,
    misconfigured: Option<&str>,
    index: &Index<'_>,
    global: &Global,
    out: &mut Builder,
    status: &mut ObjectStatus,
) {
    let namespace = namespace_of(&route.metadata);
    let name = name_of(&route.metadata);
    let spec = &route.spec;
    let hosts: Vec<HostMatch> = if spec.hosts.is_empty() {
        vec![HostMatch::Any]
    } else {
        spec.hosts.iter().map(|h| host_match(Some(h))).collect()
    };
    let cpu_budget_ms = spec.cpu_budget.as_deref().and_then(|b| luaroute::parse_duration_ms(b).ok());
    for (i, dict) in spec.shared_dicts.iter().enumerate() {
        if let Ok(size) = luaroute::parse_quantity(&dict.size) {
            out.offer_shared_dict(namespace, &dict.name, size, status.object.clone(), format!("spec.sharedDicts[{i}]"));
        }
    }
    if let (Some(init), None) = (&spec.init, misconfigured) {
        let id = out.script(&script_name(namespace, name, "spec.init"), init);
        out.lua.add_init(namespace, id);
    }
    if let (Some(init_worker), None) = (&spec.init_worker, misconfigured) {
        let id = out.script(&script_name(namespace, name, "spec.initWorker"), init_worker);
        out.lua.add_init_worker(namespace, id);
    }
    if let (Some(source), None, false) = (&spec.ssl_certificate, misconfigured, spec.hosts.is_empty()) {
        let script = out.script(&script_name(namespace, name, "spec.sslCertificate"), source);
        let cache_ms =
            spec.ssl_certificate_cache.as_deref().and_then(|c| luaroute::parse_duration_ms(c).ok()).unwrap_or(60_000);
        out.lua_certificates.push(tidegate_snapshot::LuaCertificate {
            hosts: hosts.clone(),
            namespace: namespace.to_owned(),
            name: format!("{namespace}/{name}"),
            script,
            cache_ms,
            cpu_budget_ms,
        });
    }

    if let Some(tls) = &spec.tls {
        match index.certificate(namespace, &tls.secret_name) {
            Ok(certificate) => {
                let id = certificate.id.clone();
                out.certificates.insert(id.clone(), certificate);
                for host in hosts.iter().filter(|h| **h != HostMatch::Any) {
                    out.offer_tls(host.clone(), id.clone(), status.object.clone(), "spec.tls".into());
                }
            }
            Err((reason, message)) => status.error(
                reason,
                "spec.tls.secretName",
                format!("{message}; the default certificate is served instead"),
            ),
        }
    }

    let owner = std::rc::Rc::new(status.object.clone());
    for (r, rule) in spec.routes.iter().enumerate() {
        let field = format!("spec.routes[{r}]");
        let mut lua = LuaHandlers { cpu_budget_ms, namespace: namespace.to_owned(), ..LuaHandlers::default() };
        let mut layers = Vec::new();
        if let Some(top) = &spec.lua {
            layers.push((script_name(namespace, name, "spec.lua"), top));
        }
        if let Some(own) = &rule.lua {
            layers.push((script_name(namespace, name, &format!("{field}.lua")), own));
        }
        if misconfigured.is_none() {
            add_layers(out, &mut lua, &layers);
        }
        let (policies, unhonoured) = route_policies(spec, rule, r, index, global, status);
        if unhonoured.is_some() {
            status.accepted = false;
        }

        let mut upstream = tidegate_snapshot::Upstream::default();
        let mut upstream_refusal = None;
        let backend = match &rule.backend {
            Some(backend) => {
                let port = match (backend.service.port.number, backend.service.port.name.as_deref()) {
                    (Some(n), _) => check_port_number(n).ok().map(PortRef::Number),
                    (None, Some(n)) => Some(PortRef::Name(n)),
                    (None, None) => None,
                };
                let Some(port) = port else { continue };
                let (id, problem) = out.backend(index, namespace, &backend.service.name, port);
                if let Some((reason, message)) = problem {
                    status.error(reason, format!("{field}.backend.service"), format!("{message}; requests get 503"));
                }
                let at = format!("{field}.backend.upstream");
                match backend_upstream(backend, port, &rule.matches.path.value, &at, index, global, status) {
                    Ok(settings) => upstream = settings,
                    Err(()) => {
                        status.accepted = false;
                        let why = format!("{} asks for a way to its backend that cannot be set up", status.object);
                        upstream_refusal = Some(Refusal::unhonoured(why));
                    }
                }
                Some(id)
            }
            None => None,
        };
        let kind = match rule.matches.path.kind {
            LuaPathType::Exact => PathKind::Exact,
            LuaPathType::Prefix => PathKind::Prefix,
        };
        let mut methods: Vec<String> = rule.matches.methods.clone();
        methods.sort();
        methods.dedup();
        let mut headers: Vec<HeaderMatch> = rule
            .matches
            .headers
            .iter()
            .map(|h| HeaderMatch { name: h.name.to_ascii_lowercase(), value: h.value.clone() })
            .collect();
        headers.sort();
        for host in &hosts {
            out.routes.push(Candidate {
                host: host.clone(),
                route: Route {
                    name: format!("{namespace}/{name}/{}", rule.name),
                    path: PathMatch { kind, value: rule.matches.path.value.clone() },
                    methods: methods.clone(),
                    headers: headers.clone(),
                    action: RouteAction {
                        backend: backend.clone(),
                        timeouts: Timeouts::default(),
                        lua: misconfigured.is_none().then(|| lua.clone()),
                        policies: policies.clone(),
                        upstream: upstream.clone(),
                        canary: None,
                        refusal: misconfigured
                            .map(Refusal::misconfigured)
                            .or_else(|| unhonoured.clone())
                            .or_else(|| upstream_refusal.clone()),
                    },
                    ssl_redirect: false,
                },
                wants_ssl_redirect: true,
                forces_ssl_redirect: false,
                rank: (rank, r, 0),
                owner: std::rc::Rc::clone(&owner),
                field: FieldAt::Text(field.clone()),
            });
        }
    }
}
