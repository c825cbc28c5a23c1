//! The `LuaRoute` custom resource (`tidegate.dev/v1alpha1`): routes with Lua handlers.
//!
//! This module defines the type and the checks a schema cannot express. Its Lua is compiled and
//! run by the proxy's Lua runtime; until a LuaRoute's handlers can run, its routes are never
//! served, because serving a route whose `access` handler is skipped would open what it guards.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::{ObjectStatus, Reason};
use crate::validate::{check_host, check_path_value, check_port_number};

pub const API_VERSION: &str = "tidegate.dev/v1alpha1";
pub const KIND: &str = "LuaRoute";
pub const GROUP: &str = "tidegate.dev";
pub const VERSION: &str = "v1alpha1";
pub const PLURAL: &str = "luaroutes";

/// A LuaRoute object.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaRoute {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: LuaRouteSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

// The CustomResourceDefinition is generated from this type (`tidegate crd`, checked against
// `crds/` by a test): its schema rejects what a schema can, `validate` the rest. Doc comments
// here are what `kubectl explain` shows.
/// Routes with Lua handlers, and handlers that Ingresses attach with the
/// `tidegate.dev/lua-route` annotation.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema, CustomResource)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "tidegate.dev",
    version = "v1alpha1",
    kind = "LuaRoute",
    root = "LuaRouteResource",
    doc = "LuaRoute: routes with Lua handlers (OpenResty phases) served by tidegate.",
    namespaced,
    status = "LuaRouteStatus",
    shortname = "lr",
    category = "tidegate",
    printcolumn = r#"{"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Programmed", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct LuaRouteSpec {
    /// The IngressClass this LuaRoute belongs to; ours when absent.
    #[serde(default)]
    pub ingress_class_name: Option<String>,
    /// Exact hosts or `*.example.com`; every host when empty.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub tls: Option<LuaRouteTls>,
    /// `ngx.shared.NAME` dictionaries, scoped to this namespace.
    #[serde(default)]
    pub shared_dicts: Vec<SharedDict>,
    /// Handlers that run for every route below and for Ingresses that attach this LuaRoute.
    #[serde(default)]
    pub lua: Option<LuaHandlers>,
    /// Lua time allowed per request (`50ms`, `1s`); the proxy's default when absent.
    #[serde(default)]
    #[schemars(pattern(r"^[0-9]+(ms|s)?$"))]
    pub cpu_budget: Option<String>,
    /// What every request to this LuaRoute's own routes must pass before its Lua runs; a
    /// route's own `policies` replace these field by field.
    #[serde(default)]
    pub policies: Option<RoutePolicies>,
    /// Routes of its own; may be empty when the LuaRoute only provides `spec.lua` for
    /// Ingresses to attach.
    #[serde(default)]
    pub routes: Vec<LuaRouteRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaRouteTls {
    /// A `kubernetes.io/tls` Secret in the LuaRoute's namespace.
    pub secret_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedDict {
    /// The Lua name: `ngx.shared.NAME`.
    #[schemars(pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// A Kubernetes quantity: `10Mi`, `512k`, `1048576`.
    #[schemars(pattern(r"^[0-9]+(Ki|Mi|Gi|k|M|G)?$"))]
    pub size: String,
}

/// Lua source for each OpenResty phase, in the order they run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaHandlers {
    pub rewrite: Option<String>,
    pub access: Option<String>,
    pub content: Option<String>,
    pub header_filter: Option<String>,
    pub body_filter: Option<String>,
    pub log: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaRouteRule {
    /// Unique within the LuaRoute.
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    #[serde(default)]
    pub backend: Option<LuaBackend>,
    #[serde(default)]
    pub lua: Option<LuaHandlers>,
    /// This route's policies; each field set here replaces the LuaRoute's.
    #[serde(default)]
    pub policies: Option<RoutePolicies>,
}

/// Built-in checks that run before the route's Lua, with the semantics of ingress-nginx's
/// annotations of the same purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicies {
    /// Client networks (`10.0.0.0/8`, `2001:db8::/32`, or an address) that may reach the
    /// routes; others get 403 (`whitelist-source-range`). Any client when absent.
    #[serde(default)]
    pub ip_allowlist: Option<Vec<String>>,
    /// Client networks that get 403 even when the allowlist holds them
    /// (`denylist-source-range`).
    #[serde(default)]
    pub ip_denylist: Option<Vec<String>>,
    /// The largest request body accepted (`proxy-body-size`): bytes, or with `k`, `m` or `g`;
    /// `0` or absent for no limit. A larger one gets 413.
    #[serde(default)]
    #[schemars(pattern(r"^[0-9]+[kKmMgG]?$"))]
    pub max_body_size: Option<String>,
}

impl RoutePolicies {
    /// These, with each field `over` sets replacing ours.
    pub(crate) fn overlaid(&self, over: Option<&RoutePolicies>) -> RoutePolicies {
        let Some(over) = over else { return self.clone() };
        RoutePolicies {
            ip_allowlist: over.ip_allowlist.clone().or_else(|| self.ip_allowlist.clone()),
            ip_denylist: over.ip_denylist.clone().or_else(|| self.ip_denylist.clone()),
            max_body_size: over.max_body_size.clone().or_else(|| self.max_body_size.clone()),
        }
    }

    /// The typed policies; `Err` names the field (below `at`) and what is wrong with it.
    pub(crate) fn typed(&self, at: &str) -> Result<tidegate_snapshot::Policies, (String, String)> {
        let list = |name: &str,
                    values: &Option<Vec<String>>|
         -> Result<Vec<tidegate_snapshot::Cidr>, (String, String)> {
            let mut out = Vec::new();
            for (i, value) in values.iter().flatten().enumerate() {
                out.push(value.parse().map_err(|e| (format!("{at}.{name}[{i}]"), e))?);
            }
            if values.as_ref().is_some_and(Vec::is_empty) {
                return Err((format!("{at}.{name}"), "lists no network; leave it out to admit every client".into()));
            }
            Ok(out)
        };
        let ip = tidegate_snapshot::IpRules {
            allow: list("ipAllowlist", &self.ip_allowlist)?,
            deny: list("ipDenylist", &self.ip_denylist)?,
        };
        let any = !ip.allow.is_empty() || !ip.deny.is_empty();
        let max_body_bytes = match &self.max_body_size {
            Some(size) => crate::validate::parse_size(size).map_err(|e| (format!("{at}.maxBodySize"), e))?,
            None => 0,
        };
        Ok(tidegate_snapshot::Policies {
            ip: any.then_some(ip),
            max_body_bytes: (max_body_bytes > 0).then_some(max_body_bytes),
            limits: None,
            response_rate: None,
            cors: None,
            basic_auth: None,
            external_auth: None,
            satisfy_any: false,
            client_certificate: None,
            upstream_host: None,
            forwarded_prefix: None,
        })
    }
}

/// The status the controller writes.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LuaRouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` and `Programmed`, with the field and Lua line of each problem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    pub path: PathSpec,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathSpec {
    #[serde(rename = "type")]
    pub kind: LuaPathType,
    /// Starts with `/`.
    #[schemars(pattern(r"^/"))]
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum LuaPathType {
    Exact,
    Prefix,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaBackend {
    pub service: ServiceRef,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    pub name: String,
    pub port: PortRef,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRef {
    #[serde(default)]
    #[schemars(range(min = 1, max = 65535))]
    pub number: Option<i32>,
    #[serde(default)]
    pub name: Option<String>,
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// Checks what the schema cannot: hosts, paths, names, ports, sizes. Records every problem found.
pub(crate) fn validate(route: &LuaRoute, status: &mut ObjectStatus) {
    if route.api_version != API_VERSION {
        status.error(Reason::Invalid, "apiVersion", format!("must be {API_VERSION}"));
    }
    for (i, host) in route.spec.hosts.iter().enumerate() {
        if let Err(why) = check_host(host) {
            status.error(Reason::Invalid, format!("spec.hosts[{i}]"), why);
        }
    }
    for (i, dict) in route.spec.shared_dicts.iter().enumerate() {
        if !is_lua_identifier(&dict.name) {
            status.error(Reason::Invalid, format!("spec.sharedDicts[{i}].name"), "must be a Lua identifier");
        }
        if let Err(why) = parse_quantity(&dict.size) {
            status.error(Reason::Invalid, format!("spec.sharedDicts[{i}].size"), why);
        }
    }
    if let Some(budget) = &route.spec.cpu_budget
        && let Err(why) = parse_duration_ms(budget)
    {
        status.error(Reason::Invalid, "spec.cpuBudget", why);
    }
    if route.spec.routes.is_empty() && route.spec.lua.is_none() {
        status.error(
            Reason::Invalid,
            "spec.routes",
            "must name at least one route (or set spec.lua, for Ingresses to attach)",
        );
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, rule) in route.spec.routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if rule.name.is_empty() || !names.insert(rule.name.as_str()) {
            status.error(Reason::Invalid, format!("{at}.name"), "must be non-empty and unique");
        }
        if let Err(why) = check_path_value(&rule.matches.path.value) {
            status.error(Reason::Invalid, format!("{at}.match.path.value"), why);
        }
        for (m, method) in rule.matches.methods.iter().enumerate() {
            if !METHODS.contains(&method.as_str()) {
                status.error(Reason::Invalid, format!("{at}.match.methods[{m}]"), format!("unknown method {method:?}"));
            }
        }
        for (h, header) in rule.matches.headers.iter().enumerate() {
            if http_header_name_invalid(&header.name) {
                status.error(Reason::Invalid, format!("{at}.match.headers[{h}].name"), "not a valid header name");
            }
        }
        match &rule.backend {
            Some(backend) => {
                let port = &backend.service.port;
                match (port.number, &port.name) {
                    (Some(n), None) => {
                        if let Err(why) = check_port_number(n) {
                            status.error(Reason::Invalid, format!("{at}.backend.service.port.number"), why);
                        }
                    }
                    (None, Some(_)) => {}
                    _ => status.error(
                        Reason::Invalid,
                        format!("{at}.backend.service.port"),
                        "set exactly one of number and name",
                    ),
                }
            }
            None => {
                let content = rule.lua.as_ref().and_then(|l| l.content.as_ref()).is_some()
                    || route.spec.lua.as_ref().and_then(|l| l.content.as_ref()).is_some();
                if !content {
                    status.error(Reason::Invalid, format!("{at}.backend"), "required when no lua.content answers");
                }
            }
        }
    }
}

fn is_lua_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl LuaHandlers {
    /// The source of one phase.
    pub(crate) fn get(&self, phase: tidegate_snapshot::Phase) -> Option<&str> {
        use tidegate_snapshot::Phase;
        match phase {
            Phase::Rewrite => self.rewrite.as_deref(),
            Phase::Access => self.access.as_deref(),
            Phase::Content => self.content.as_deref(),
            Phase::HeaderFilter => self.header_filter.as_deref(),
            Phase::BodyFilter => self.body_filter.as_deref(),
            Phase::Log => self.log.as_deref(),
        }
    }
}

/// The `LuaRoute` CustomResourceDefinition as YAML, as `crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = LuaRouteResource::crd();
    let yaml = serde_saphyr::to_string(&crd).unwrap_or_else(|e| panic!("a CRD always serializes: {e}"));
    format!("# Generated by `tidegate crd`; do not edit.\n{yaml}")
}

/// Parses a CPU budget: `50ms`, `1s`, `250` (milliseconds).
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration like 50ms or 1s"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.saturating_mul(1000),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms or s)")),
    };
    if (1..=60_000).contains(&ms) { Ok(ms) } else { Err(format!("{s:?} must be between 1ms and 60s")) }
}

/// Parses a Kubernetes quantity of bytes (`10Mi`, `512k`, `1G`, `4096`).
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{s:?} is not a quantity like 10Mi"))?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown suffix {suffix:?} (use Ki, Mi, Gi, k, M or G)")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10Mi"), Ok(10 << 20));
        assert_eq!(parse_quantity("512k"), Ok(512_000));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        assert!(parse_quantity("10MB").is_err());
        assert!(parse_quantity("Mi").is_err());
    }

    #[test]
    fn lua_identifiers() {
        assert!(is_lua_identifier("cache_1"));
        assert!(!is_lua_identifier("1cache"));
        assert!(!is_lua_identifier("my-cache"));
    }
}
