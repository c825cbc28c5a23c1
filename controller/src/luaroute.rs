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
    /// Module-level code of the namespace (OpenResty's `init_by_lua`): runs once per proxy
    /// worker and version, before the namespace's first handler, and may `require` the
    /// namespace's modules. The globals it sets are what the namespace's handlers read (a
    /// request's own global writes stay its own).
    #[serde(default)]
    pub init: Option<String>,
    /// OpenResty's `init_worker_by_lua`: runs on each proxy worker once for each new version of
    /// the namespace's Lua, after `init`, without a request; it may start `ngx.timer`s (the
    /// background jobs of the namespace).
    #[serde(default)]
    pub init_worker: Option<String>,
    /// OpenResty's `ssl_certificate_by_lua`: runs in TLS handshakes for this LuaRoute's hosts
    /// (which it then needs) and may choose their certificate with `require "ngx.ssl"`; it may
    /// wait (cosockets), the handshake with it.
    #[serde(default)]
    pub ssl_certificate: Option<String>,
    /// How long a certificate `sslCertificate` chose serves its name before the handler runs
    /// again (`60s` by default).
    #[serde(default)]
    #[schemars(pattern(r"^[0-9]+(ms|s)?$"))]
    pub ssl_certificate_cache: Option<String>,
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
///
/// The schema keeps fields it does not know (`x-kubernetes-preserve-unknown-fields`), so that
/// a misspelt phase reaches the controller, which reports it as a field error and does not
/// serve the route, rather than being pruned by the API server (`kubectl apply
/// --validate=false`) and the route served without that handler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct LuaHandlers {
    pub rewrite: Option<String>,
    pub access: Option<String>,
    pub content: Option<String>,
    /// OpenResty's `balancer_by_lua`: runs for each try of the upstream and picks its peer
    /// with `ngx.balancer.set_current_peer`; a route with one needs no `backend`.
    pub balancer: Option<String>,
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
/// annotations of the same purpose (each field says which).
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
    /// HTTP Basic authentication (`auth-type: basic`).
    #[serde(default)]
    pub basic_auth: Option<BasicAuthPolicy>,
    /// An external service that decides each request (`auth-url`).
    #[serde(default)]
    pub external_auth: Option<ExternalAuthPolicy>,
    /// Client certificates (`auth-tls-*`).
    #[serde(default)]
    pub client_certificate: Option<ClientCertificatePolicy>,
    /// `any`: passing the IP rules or either authentication is enough (`satisfy`).
    #[serde(default)]
    pub satisfy: Option<Satisfy>,
    /// Request rates and concurrency per client, and the response pace (`limit-*`).
    #[serde(default)]
    pub limits: Option<LimitsPolicy>,
    /// Cross-origin resource sharing (`enable-cors`, `cors-*`).
    #[serde(default)]
    pub cors: Option<CorsPolicy>,
    /// The `Host` the backend gets (`upstream-vhost`).
    #[serde(default)]
    pub upstream_host: Option<String>,
    /// `X-Forwarded-Prefix` for the backend (`x-forwarded-prefix`).
    #[serde(default)]
    pub forwarded_prefix: Option<String>,
    /// Whether the controller's global external auth (`--global-auth-url`) applies when no
    /// `externalAuth` is set (`enable-global-auth`, true when absent).
    #[serde(default)]
    pub global_auth: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BasicAuthPolicy {
    /// A Secret in the LuaRoute's namespace: an htpasswd file under `auth`, or one key per user.
    pub secret_name: String,
    /// `auth-file` (default) or `auth-map`.
    #[serde(default)]
    #[schemars(pattern(r"^(auth-file|auth-map)$"))]
    pub secret_type: Option<String>,
    #[serde(default)]
    pub realm: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalAuthPolicy {
    /// `http://...`, nginx variables allowed.
    pub url: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub signin: Option<String>,
    #[serde(default)]
    pub signin_redirect_param: Option<String>,
    #[serde(default)]
    pub response_headers: Vec<String>,
    #[serde(default)]
    pub request_redirect: Option<String>,
    #[serde(default)]
    pub always_set_cookie: bool,
    /// A ConfigMap in the LuaRoute's namespace whose entries are headers (nginx variables
    /// allowed) set on the auth request (`auth-proxy-set-headers`).
    #[serde(default)]
    pub proxy_set_headers: Option<String>,
    /// Answers are kept per this key, nginx variables allowed (`auth-cache-key`).
    #[serde(default)]
    pub cache_key: Option<String>,
    /// How long answers are kept, by status: `200 202 401 5m` when absent
    /// (`auth-cache-duration`).
    #[serde(default)]
    pub cache_duration: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientCertificatePolicy {
    /// A Secret in the LuaRoute's namespace with the CA bundle under `ca.crt`.
    pub secret_name: String,
    /// `on` (default), `optional` or `optional_no_ca`.
    #[serde(default)]
    #[schemars(pattern(r"^(on|optional|optional_no_ca)$"))]
    pub verify: Option<String>,
    #[serde(default)]
    pub error_page: Option<String>,
    #[serde(default)]
    pub pass_to_upstream: bool,
    /// A regular expression the subject must match, or 403.
    #[serde(default)]
    pub match_subject: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Satisfy {
    All,
    Any,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsPolicy {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub rps: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub rpm: Option<u32>,
    /// The burst is the rate times this (5 by default).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub burst_multiplier: Option<u32>,
    /// A client's requests in progress at once.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub connections: Option<u32>,
    /// Networks the limits do not apply to.
    #[serde(default)]
    pub exempt: Vec<String>,
    /// The response pace, in kilobytes a second, after `rateAfterKilobytes`.
    #[serde(default)]
    pub rate_kilobytes: Option<u64>,
    #[serde(default)]
    pub rate_after_kilobytes: Option<u64>,
    /// What the limits count by instead of the client address, nginx variables allowed:
    /// `$http_x_api_key`, `$cookie_session` (`tidegate.dev/limit-key`). A request for which it
    /// is empty is counted by its address.
    #[serde(default)]
    pub key: Option<String>,
    /// A rate shared by all proxies of a controller (`global-rate-limit`).
    #[serde(default)]
    pub shared: Option<SharedLimitPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedLimitPolicy {
    /// Requests per window, per key (`global-rate-limit`).
    #[schemars(range(min = 1))]
    pub requests: u32,
    /// The window: `30s`, `1m`, `1h` (`global-rate-limit-window`).
    pub window: String,
    /// What is counted by, `$remote_addr` when absent (`global-rate-limit-key`).
    #[serde(default)]
    pub key: Option<String>,
    /// Networks not counted (`global-rate-limit-ignored-cidrs`).
    #[serde(default)]
    pub ignored_cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// `*` when empty.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    #[serde(default)]
    pub max_age: Option<u64>,
}

impl RoutePolicies {
    /// These, with each field `over` sets replacing ours.
    pub(crate) fn overlaid(&self, over: Option<&RoutePolicies>) -> RoutePolicies {
        let Some(over) = over else { return self.clone() };
        fn pick<T: Clone>(over: &Option<T>, base: &Option<T>) -> Option<T> {
            over.clone().or_else(|| base.clone())
        }
        RoutePolicies {
            ip_allowlist: pick(&over.ip_allowlist, &self.ip_allowlist),
            ip_denylist: pick(&over.ip_denylist, &self.ip_denylist),
            max_body_size: pick(&over.max_body_size, &self.max_body_size),
            basic_auth: pick(&over.basic_auth, &self.basic_auth),
            external_auth: pick(&over.external_auth, &self.external_auth),
            client_certificate: pick(&over.client_certificate, &self.client_certificate),
            satisfy: pick(&over.satisfy, &self.satisfy),
            limits: pick(&over.limits, &self.limits),
            cors: pick(&over.cors, &self.cors),
            upstream_host: pick(&over.upstream_host, &self.upstream_host),
            forwarded_prefix: pick(&over.forwarded_prefix, &self.forwarded_prefix),
            global_auth: pick(&over.global_auth, &self.global_auth),
        }
    }

    /// The ingress-nginx annotations (without prefix) these fields stand for, each with its
    /// value and the field (below `at`) it came from: translation reads them with the parsers
    /// of the annotations themselves, so both mean exactly the same.
    pub(crate) fn annotations(&self, at: &str) -> Vec<(&'static str, String, String)> {
        let mut out: Vec<(&'static str, String, String)> = Vec::new();
        let mut put = |key: &'static str, value: String, field: String| out.push((key, value, field));
        let list = |values: &[String]| values.join(",");
        if let Some(allow) = &self.ip_allowlist {
            put("whitelist-source-range", list(allow), format!("{at}.ipAllowlist"));
        }
        if let Some(deny) = &self.ip_denylist {
            put("denylist-source-range", list(deny), format!("{at}.ipDenylist"));
        }
        // A LuaRoute has no body limit unless it sets one.
        put("proxy-body-size", self.max_body_size.clone().unwrap_or_else(|| "0".into()), format!("{at}.maxBodySize"));
        if let Some(auth) = &self.basic_auth {
            let f = |name: &str| format!("{at}.basicAuth.{name}");
            put("auth-type", "basic".into(), f("secretName"));
            put("auth-secret", auth.secret_name.clone(), f("secretName"));
            if let Some(kind) = &auth.secret_type {
                put("auth-secret-type", kind.clone(), f("secretType"));
            }
            if let Some(realm) = &auth.realm {
                put("auth-realm", realm.clone(), f("realm"));
            }
        }
        if let Some(auth) = &self.external_auth {
            let f = |name: &str| format!("{at}.externalAuth.{name}");
            put("auth-url", auth.url.clone(), f("url"));
            let optional = [
                ("auth-method", &auth.method, "method"),
                ("auth-signin", &auth.signin, "signin"),
                ("auth-signin-redirect-param", &auth.signin_redirect_param, "signinRedirectParam"),
                ("auth-request-redirect", &auth.request_redirect, "requestRedirect"),
                ("auth-proxy-set-headers", &auth.proxy_set_headers, "proxySetHeaders"),
                ("auth-cache-key", &auth.cache_key, "cacheKey"),
                ("auth-cache-duration", &auth.cache_duration, "cacheDuration"),
            ];
            for (key, value, name) in optional {
                if let Some(value) = value {
                    put(key, value.clone(), f(name));
                }
            }
            if !auth.response_headers.is_empty() {
                put("auth-response-headers", list(&auth.response_headers), f("responseHeaders"));
            }
            put("auth-always-set-cookie", auth.always_set_cookie.to_string(), f("alwaysSetCookie"));
        }
        if let Some(certificate) = &self.client_certificate {
            let f = |name: &str| format!("{at}.clientCertificate.{name}");
            put("auth-tls-secret", certificate.secret_name.clone(), f("secretName"));
            put("auth-tls-verify-client", certificate.verify.clone().unwrap_or_else(|| "on".into()), f("verify"));
            if let Some(page) = &certificate.error_page {
                put("auth-tls-error-page", page.clone(), f("errorPage"));
            }
            put("auth-tls-pass-certificate-to-upstream", certificate.pass_to_upstream.to_string(), f("passToUpstream"));
            if let Some(pattern) = &certificate.match_subject {
                put("auth-tls-match-cn", pattern.clone(), f("matchSubject"));
            }
        }
        if let Some(satisfy) = self.satisfy {
            let value = if satisfy == Satisfy::Any { "any" } else { "all" };
            put("satisfy", value.into(), format!("{at}.satisfy"));
        }
        if let Some(limits) = &self.limits {
            let f = |name: &str| format!("{at}.limits.{name}");
            let numbers = [
                ("limit-rps", limits.rps.map(u64::from), "rps"),
                ("limit-rpm", limits.rpm.map(u64::from), "rpm"),
                ("limit-burst-multiplier", limits.burst_multiplier.map(u64::from), "burstMultiplier"),
                ("limit-connections", limits.connections.map(u64::from), "connections"),
                ("limit-rate", limits.rate_kilobytes, "rateKilobytes"),
                ("limit-rate-after", limits.rate_after_kilobytes, "rateAfterKilobytes"),
            ];
            for (key, value, name) in numbers {
                if let Some(value) = value {
                    put(key, value.to_string(), f(name));
                }
            }
            if !limits.exempt.is_empty() {
                put("limit-whitelist", list(&limits.exempt), f("exempt"));
            }
            if let Some(key) = &limits.key {
                put("limit-key", key.clone(), f("key"));
            }
            if let Some(shared) = &limits.shared {
                let g = |name: &str| format!("{at}.limits.shared.{name}");
                put("global-rate-limit", shared.requests.to_string(), g("requests"));
                put("global-rate-limit-window", shared.window.clone(), g("window"));
                if let Some(key) = &shared.key {
                    put("global-rate-limit-key", key.clone(), g("key"));
                }
                if !shared.ignored_cidrs.is_empty() {
                    put("global-rate-limit-ignored-cidrs", list(&shared.ignored_cidrs), g("ignoredCidrs"));
                }
            }
        }
        if let Some(cors) = &self.cors {
            let f = |name: &str| format!("{at}.cors.{name}");
            put("enable-cors", "true".into(), format!("{at}.cors"));
            let lists = [
                ("cors-allow-origin", &cors.allow_origins, "allowOrigins"),
                ("cors-allow-methods", &cors.allow_methods, "allowMethods"),
                ("cors-allow-headers", &cors.allow_headers, "allowHeaders"),
                ("cors-expose-headers", &cors.expose_headers, "exposeHeaders"),
            ];
            for (key, values, name) in lists {
                if !values.is_empty() {
                    put(key, list(values), f(name));
                }
            }
            if let Some(credentials) = cors.allow_credentials {
                put("cors-allow-credentials", credentials.to_string(), f("allowCredentials"));
            }
            if let Some(age) = cors.max_age {
                put("cors-max-age", age.to_string(), f("maxAge"));
            }
        }
        if let Some(host) = &self.upstream_host {
            put("upstream-vhost", host.clone(), format!("{at}.upstreamHost"));
        }
        if let Some(prefix) = &self.forwarded_prefix {
            put("x-forwarded-prefix", prefix.clone(), format!("{at}.forwardedPrefix"));
        }
        if let Some(global) = self.global_auth {
            put("enable-global-auth", global.to_string(), format!("{at}.globalAuth"));
        }
        out
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
    /// How requests reach the Service: ingress-nginx's backend keys as typed fields.
    #[serde(default)]
    pub upstream: Option<BackendSettings>,
}

/// How a route's requests reach its Service, with the semantics of ingress-nginx's annotations
/// of the same purpose (each field says which).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSettings {
    /// `HTTP`, `HTTPS`, `GRPC` (h2c), `GRPCS` or `AUTO_HTTP` (`backend-protocol`); the
    /// Service port's `appProtocol` decides when absent.
    #[serde(default)]
    #[schemars(regex(pattern = r"^(HTTP|HTTPS|GRPC|GRPCS|AUTO_HTTP)$"))]
    pub protocol: Option<String>,
    /// TLS to the Service (`proxy-ssl-*`).
    #[serde(default)]
    pub tls: Option<BackendTls>,
    /// `round_robin` (the default) or `ewma` (`load-balance`).
    #[serde(default)]
    #[schemars(regex(pattern = r"^(round_robin|ewma)$"))]
    pub load_balance: Option<String>,
    /// A key of nginx variables that always reaches the same endpoint (`upstream-hash-by`).
    #[serde(default)]
    pub hash_by: Option<String>,
    /// Spread each key over a subset of this many endpoints (`upstream-hash-by-subset-size`).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub hash_by_subset_size: Option<u32>,
    /// Sticky sessions by cookie (`affinity: cookie` and `session-cookie-*`).
    #[serde(default)]
    pub affinity: Option<CookieAffinity>,
    /// When a request goes on to another endpoint (`proxy-next-upstream*`).
    #[serde(default)]
    pub retries: Option<Retries>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTls {
    /// Verify the Service's certificate (`proxy-ssl-verify`, off when absent).
    #[serde(default)]
    pub verify: Option<bool>,
    /// A Secret in this namespace with `ca.crt` and/or `tls.crt` and `tls.key`
    /// (`proxy-ssl-secret`).
    #[serde(default)]
    pub secret_name: Option<String>,
    /// The name checked and sent (`proxy-ssl-name`); `NAME.NAMESPACE.svc` when absent.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Send the name as SNI (`proxy-ssl-server-name`).
    #[serde(default)]
    pub sni: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieAffinity {
    /// `session-cookie-name` (`INGRESSCOOKIE` when absent).
    #[serde(default)]
    pub cookie_name: Option<String>,
    /// `balanced` (the default) or `persistent` (`affinity-mode`).
    #[serde(default)]
    #[schemars(regex(pattern = r"^(balanced|persistent)$"))]
    pub mode: Option<String>,
    /// `session-cookie-path`; the route's path when absent.
    #[serde(default)]
    pub path: Option<String>,
    /// `session-cookie-max-age`, seconds.
    #[serde(default)]
    pub max_age_seconds: Option<u64>,
    /// `None`, `Lax` or `Strict` (`session-cookie-samesite`).
    #[serde(default)]
    pub same_site: Option<String>,
    /// `session-cookie-secure`.
    #[serde(default)]
    pub secure: Option<bool>,
    /// `session-cookie-change-on-failure`.
    #[serde(default)]
    pub change_on_failure: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// `error`, `timeout`, `invalid_header`, `http_500`... `non_idempotent`, or `off`
    /// (`proxy-next-upstream`; `error timeout` when absent).
    #[serde(default)]
    pub on: Option<Vec<String>>,
    /// Endpoints tried at most, the first included (`proxy-next-upstream-tries`, 3).
    #[serde(default)]
    pub tries: Option<u32>,
    /// No other endpoint after this many seconds (`proxy-next-upstream-timeout`).
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
}

impl BackendSettings {
    /// The annotation each field stands for: (key, value, field path under `at`).
    pub(crate) fn annotations(&self, at: &str) -> Vec<(&'static str, String, String)> {
        let mut out: Vec<(&'static str, String, String)> = Vec::new();
        let mut put = |key: &'static str, value: String, field: String| out.push((key, value, field));
        if let Some(protocol) = &self.protocol {
            put("backend-protocol", protocol.clone(), format!("{at}.protocol"));
        }
        if let Some(tls) = &self.tls {
            let at = format!("{at}.tls");
            if let Some(verify) = tls.verify {
                put("proxy-ssl-verify", if verify { "on" } else { "off" }.into(), format!("{at}.verify"));
            }
            if let Some(secret) = &tls.secret_name {
                put("proxy-ssl-secret", secret.clone(), format!("{at}.secretName"));
            }
            if let Some(name) = &tls.server_name {
                put("proxy-ssl-name", name.clone(), format!("{at}.serverName"));
            }
            if let Some(sni) = tls.sni {
                put("proxy-ssl-server-name", if sni { "on" } else { "off" }.into(), format!("{at}.sni"));
            }
        }
        if let Some(balance) = &self.load_balance {
            put("load-balance", balance.clone(), format!("{at}.loadBalance"));
        }
        if let Some(key) = &self.hash_by {
            put("upstream-hash-by", key.clone(), format!("{at}.hashBy"));
        }
        if let Some(size) = self.hash_by_subset_size {
            put("upstream-hash-by-subset", "true".into(), format!("{at}.hashBySubsetSize"));
            put("upstream-hash-by-subset-size", size.to_string(), format!("{at}.hashBySubsetSize"));
        }
        if let Some(affinity) = &self.affinity {
            let at = format!("{at}.affinity");
            put("affinity", "cookie".into(), at.clone());
            let fields: [(&'static str, Option<String>, &str); 7] = [
                ("session-cookie-name", affinity.cookie_name.clone(), "cookieName"),
                ("affinity-mode", affinity.mode.clone(), "mode"),
                ("session-cookie-path", affinity.path.clone(), "path"),
                ("session-cookie-max-age", affinity.max_age_seconds.map(|n| n.to_string()), "maxAgeSeconds"),
                ("session-cookie-samesite", affinity.same_site.clone(), "sameSite"),
                ("session-cookie-secure", affinity.secure.map(|b| b.to_string()), "secure"),
                (
                    "session-cookie-change-on-failure",
                    affinity.change_on_failure.map(|b| b.to_string()),
                    "changeOnFailure",
                ),
            ];
            for (key, value, name) in fields {
                if let Some(value) = value {
                    put(key, value, format!("{at}.{name}"));
                }
            }
        }
        if let Some(retries) = &self.retries {
            let at = format!("{at}.retries");
            if let Some(on) = &retries.on {
                put("proxy-next-upstream", on.join(" "), format!("{at}.on"));
            }
            if let Some(tries) = retries.tries {
                put("proxy-next-upstream-tries", tries.to_string(), format!("{at}.tries"));
            }
            if let Some(seconds) = retries.timeout_seconds {
                put("proxy-next-upstream-timeout", seconds.to_string(), format!("{at}.timeoutSeconds"));
            }
        }
        out
    }
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
                let has = |pick: fn(&LuaHandlers) -> &Option<String>| {
                    rule.lua.as_ref().is_some_and(|l| pick(l).is_some())
                        || route.spec.lua.as_ref().is_some_and(|l| pick(l).is_some())
                };
                if !has(|l| &l.content) && !has(|l| &l.balancer) {
                    status.error(
                        Reason::Invalid,
                        format!("{at}.backend"),
                        "required when no lua.content answers and no lua.balancer picks the peer",
                    );
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
            Phase::Balancer => self.balancer.as_deref(),
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
