//! The contract between tidegate's controller and its proxies.
//!
//! A [`Snapshot`] is everything a proxy needs to serve traffic: virtual hosts with their routes in
//! precedence order, the TLS certificates they present, and the endpoints of every backend. It
//! holds no Kubernetes types and does no I/O, so it can be produced by a pure function, compared
//! for equality, serialized onto the config stream, and built into a proxy runtime elsewhere.
//!
//! The snapshot is split in two on purpose:
//! - [`Routing`] changes when an Ingress, a LuaRoute or a Secret changes; a proxy rebuilds its
//!   router and TLS resolver for it.
//! - [`Snapshot::endpoints`] changes when pods come and go; a proxy only swaps its endpoint lists
//!   and reuses everything else (endpoint churn is cheap).
//!
//! # Ordering
//! Every list is sorted by the producer, so the same inputs always serialize to the same bytes.
//! Routes inside a [`VirtualHost`] are in precedence order: a proxy takes the first that matches.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod stream;

/// The steps of a request that route settings attach to, in the order a proxy runs them (see
/// the proxy's `request` module for each step's contract). Content and the upstream are
/// alternatives: a route answered by Lua `content` handlers never reaches its backend.
/// `Balancer` runs within the upstream step, once for each try: it picks the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    Rewrite,
    Access,
    Content,
    Balancer,
    HeaderFilter,
    BodyFilter,
    Log,
}

impl Phase {
    /// Every phase, in the order they run.
    pub const ALL: [Phase; 7] = [
        Phase::Rewrite,
        Phase::Access,
        Phase::Content,
        Phase::Balancer,
        Phase::HeaderFilter,
        Phase::BodyFilter,
        Phase::Log,
    ];

    /// OpenResty's name: `header_filter`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::Content => "content",
            Phase::Balancer => "balancer",
            Phase::HeaderFilter => "header_filter",
            Phase::BodyFilter => "body_filter",
            Phase::Log => "log",
        }
    }

    /// The field name in a LuaRoute: `headerFilter`.
    pub fn field(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::Content => "content",
            Phase::Balancer => "balancer",
            Phase::HeaderFilter => "headerFilter",
            Phase::BodyFilter => "bodyFilter",
            Phase::Log => "log",
        }
    }
}

/// The version of the snapshot format; bumped on incompatible changes.
///
/// Version 2 replaced `misconfigured` with [`RouteAction::refusal`]. From version 2 on, what a
/// route asks for ([`Route`], [`RouteAction`], [`LuaHandlers`]) is read with unknown fields
/// denied: a proxy older than its controller refuses a snapshot holding a route setting it does
/// not know, and keeps serving the last one it could, rather than serve that route without it.
pub const FORMAT_VERSION: u32 = 2;

/// A complete, self-contained proxy configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Monotonic version stamped by the publisher (0 until published).
    pub version: u64,
    /// What the snapshot holds, as [`Snapshot::content_id`] tells: controller replicas that
    /// translate the same objects give the same id, whatever their version stamps, so that what
    /// a proxy acknowledged to one replica counts for the others (0: not told).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub content: u64,
    /// Hosts, routes, certificates: a change here rebuilds the proxy's router.
    pub routing: Routing,
    /// Ready endpoints of every backend, keyed by [`BackendId`]; a change here alone only swaps
    /// upstream endpoint lists.
    pub endpoints: BTreeMap<BackendId, Vec<Endpoint>>,
    /// Backends known by a DNS name (ExternalName Services): each proxy resolves the name,
    /// off its workers, and follows it as it changes; until it resolves, the backend has no
    /// endpoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub names: BTreeMap<BackendId, NamedEndpoint>,
}

impl Snapshot {
    /// A hash of the routing, the endpoints and the named backends, never 0. The same in every
    /// process of the same build: translation is pure and sorted, and the hasher has fixed keys.
    pub fn content_id(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        #[allow(deprecated)]
        let mut hasher = std::hash::SipHasher::new();
        self.routing.hash(&mut hasher);
        self.endpoints.hash(&mut hasher);
        self.names.hash(&mut hasher);
        hasher.finish().max(1)
    }
}

/// An endpoint by DNS name and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedEndpoint {
    pub name: String,
    pub port: u16,
}

/// Hosts, routes and certificates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// Virtual hosts sorted by host; at most one per host pattern.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Where requests go that match no route of any virtual host; the proxy answers 404 without.
    pub default_backend: Option<RouteAction>,
    /// Certificates referenced by [`VirtualHost::tls`], sorted by id.
    pub certificates: Vec<Certificate>,
    /// Lua sources referenced by [`LuaHandlers`], sorted by id; each is compiled once per
    /// proxy, whatever number of routes use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripts: Vec<LuaScript>,
    /// `ngx.shared` dictionaries, sorted by namespace and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_dicts: Vec<SharedDict>,
    /// The Lua of each namespace that is not a handler (its modules, its module-level code),
    /// sorted by namespace; [`CLUSTER_WIDE`] holds what every namespace may `require`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lua_namespaces: Vec<LuaNamespace>,
    /// `ssl_certificate` handlers: Lua that chooses the certificate of handshakes for its hosts,
    /// in the order of the objects that declare them (the first whose hosts match serves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lua_certificates: Vec<LuaCertificate>,
    /// The certificate (by [`Certificate::id`]) for names no virtual host claims; the proxy's
    /// self-signed one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_certificate: Option<String>,
    /// Who the client is when a load balancer stands in front (the global ConfigMap's
    /// `use-proxy-protocol`, `use-forwarded-headers` and related keys).
    #[serde(default, skip_serializing_if = "ClientAddress::is_default")]
    pub client_address: ClientAddress,
    /// `Strict-Transport-Security` on TLS responses, as the global ConfigMap's `hsts*` keys
    /// set it: `Some("")` for none; the proxy's `--hsts-max-age` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<String>,
    /// The streams one HTTP/2 client connection may have open at once (the global ConfigMap's
    /// `http2-max-concurrent-streams`); the proxy's `--http2-max-concurrent-streams` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_concurrent_streams: Option<u32>,
    /// How long HTTP/1 client connections may wait and how many requests they may carry (the
    /// global ConfigMap's `keep-alive`, `keep-alive-requests`, `client-header-timeout`); the
    /// proxy's defaults where absent.
    #[serde(default, skip_serializing_if = "ClientConnections::is_default")]
    pub client_connections: ClientConnections,
    /// Idle upstream connections each proxy worker keeps (the global ConfigMap's
    /// `upstream-keepalive-connections`, `-timeout`, `-requests`); the proxy's defaults where
    /// absent.
    #[serde(default, skip_serializing_if = "UpstreamConnections::is_default")]
    pub upstream_connections: UpstreamConnections,
    /// The TLS versions clients may use (the global ConfigMap's `ssl-protocols`); both when
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_tls_versions: Vec<TlsVersion>,
    /// The TLS 1.2 cipher suites clients may use, by IANA name, in the server's order of
    /// preference (the global ConfigMap's `ssl-ciphers`, as nginx's `ssl_ciphers`, which leaves
    /// TLS 1.3 alone); rustls' defaults when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_tls12_ciphers: Vec<String>,
    /// The access log's line, as nginx's `log_format` (the global ConfigMap's
    /// `log-format-upstream`); the proxy's JSON lines when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_format: Option<AccessLogFormat>,
    /// Hosts whose TLS connections go to a backend undecrypted (`ssl-passthrough`), sorted by
    /// host: the server name a client's TLS handshake asks for picks one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<Passthrough>,
}

/// An access log line as nginx's `log_format` writes it: text with `$variables`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogFormat {
    pub format: String,
    pub escape: LogEscape,
}

/// How values are escaped in a log line (nginx's `log_format ... escape=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LogEscape {
    /// `"`, `\` and bytes outside printable ASCII as `\xHH`.
    #[default]
    Default,
    /// As JSON strings do (`log-format-escape-json`).
    Json,
    /// Unchanged (`log-format-escape-none`).
    None,
}

impl AccessLogFormat {
    /// The variables a format may use besides `http_NAME` (a request header): what
    /// ingress-nginx's default `log-format-upstream` and common formats use.
    pub const VARIABLES: &'static [&'static str] = &[
        "remote_addr",
        "remote_user",
        "time_local",
        "time_iso8601",
        "msec",
        "request",
        "request_method",
        "request_uri",
        "uri",
        "args",
        "server_protocol",
        "scheme",
        "host",
        "status",
        "body_bytes_sent",
        "bytes_sent",
        "request_time",
        "request_length",
        "upstream_addr",
        "upstream_response_time",
        "upstream_status",
        "proxy_upstream_name",
        "proxy_alternative_upstream_name",
        "upstream_response_length",
        "req_id",
        "request_id",
        "namespace",
        "ingress_name",
        "service_name",
        "service_port",
    ];

    /// The variable names `format` uses, in order: `$name` and `${name}`.
    pub fn variables(format: &str) -> Vec<&str> {
        nginx_pieces(format)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| match p {
                Piece::Variable(name) if !name.is_empty() => Some(name),
                _ => None,
            })
            .collect()
    }
}

/// A host whose TLS connections are passed to its backend as they are: the backend does the
/// handshake, with its own certificate (ingress-nginx's `ssl-passthrough`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Passthrough {
    /// The exact server name, lower case.
    pub host: String,
    pub backend: BackendId,
}

/// Upstream keep-alive, as nginx's `keepalive`, `keepalive_timeout` and `keepalive_requests` in
/// an upstream block. `None`: the proxy's default (128 idle per endpoint, 30 s, no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConnections {
    /// Idle connections kept per endpoint on each worker; 0 keeps none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_per_endpoint: Option<u32>,
    /// Seconds an idle connection is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<u64>,
    /// Requests one connection carries before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
}

impl UpstreamConnections {
    pub fn is_default(&self) -> bool {
        *self == UpstreamConnections::default()
    }
}

/// Client connection limits, as nginx's `keepalive_timeout`, `keepalive_requests` and
/// `client_header_timeout`. `None`: the proxy's default (75 s, 1,000 requests, 30 s).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConnections {
    /// Seconds an idle keep-alive connection is kept; 0 closes each after its response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_seconds: Option<u64>,
    /// Requests one connection may carry; the last response says `Connection: close`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_requests: Option<u64>,
    /// Seconds a client has to send a request head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_seconds: Option<u64>,
    /// Seconds a client may send nothing while sending a request body (between two reads,
    /// not for the whole body); then 408.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_seconds: Option<u64>,
}

impl ClientConnections {
    pub fn is_default(&self) -> bool {
        *self == ClientConnections::default()
    }
}

/// How the proxy learns the client's address behind a load balancer, as ingress-nginx's
/// ConfigMap keys set nginx's `proxy_protocol` and `real_ip` modules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientAddress {
    /// Every connection starts with a PROXY protocol header (v1 or v2), whose source address is
    /// the client's (`use-proxy-protocol`); a connection without one is closed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// The request header that names the client when the peer is trusted
    /// (`use-forwarded-headers` or `enable-real-ip`, with `forwarded-for-header`), lower case.
    /// Its addresses are read right to left, skipping trusted ones (nginx's
    /// `real_ip_recursive on`). `X-Forwarded-Proto`, `-Host` and `-Port` from a trusted peer are
    /// passed on too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The peers whose header is believed (`proxy-real-ip-cidr`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted: Vec<Cidr>,
    /// `X-Forwarded-For` to the upstream keeps the addresses the client's carried, with the
    /// peer's appended (`compute-full-forwarded-for`); otherwise it is the client's address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_forwarded_for: bool,
}

impl ClientAddress {
    pub fn is_default(&self) -> bool {
        self == &ClientAddress::default()
    }
}

/// The namespace of dictionaries every namespace's Lua reaches (`--shared-dict`).
pub const CLUSTER_WIDE: &str = "";

/// A dictionary Lua of one namespace can reach as `ngx.shared.NAME`; with namespace
/// [`CLUSTER_WIDE`], Lua of every namespace can, unless its namespace declares the same name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedDict {
    pub namespace: String,
    pub name: String,
    /// Capacity in bytes.
    pub size: u64,
}

/// The Lua of one namespace besides its handlers. Its scripts are in [`Routing::scripts`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaNamespace {
    pub namespace: String,
    /// What `require` finds before the built-in modules (and, in a namespace, before the
    /// cluster-wide ones), sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<LuaModule>,
    /// Module-level code (OpenResty's `init_by_lua`), by script id, in order: runs once per
    /// worker and version, before the namespace's first handler; the globals it sets are what
    /// the namespace's handlers read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init: Vec<String>,
    /// OpenResty's `init_worker_by_lua`, by script id, in order: runs once on each worker for
    /// each new version, after `init`, where it may start timers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_worker: Vec<String>,
}

/// A LuaRoute's `sslCertificate` handler (OpenResty's `ssl_certificate_by_lua`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaCertificate {
    /// The names whose handshakes it serves: its LuaRoute's hosts.
    pub hosts: Vec<HostMatch>,
    pub namespace: String,
    /// `namespace/name` of its LuaRoute, for logs.
    pub name: String,
    /// Its source, by [`LuaScript::id`].
    pub script: String,
    /// How long a certificate it chose serves its name before it runs again.
    pub cache_ms: u64,
    /// Lua time allowed per handshake; the proxy's request budget when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_budget_ms: Option<u64>,
}

/// A module `require "NAME"` loads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaModule {
    /// Dotted, as `require` takes it: `resty.redis`.
    pub name: String,
    /// Its source, by [`LuaScript::id`].
    pub script: String,
}

/// A host pattern with its routes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    pub host: HostMatch,
    /// Routes in precedence order: the first that matches a request wins.
    pub routes: Vec<Route>,
    /// The certificate presented for this host, by [`Certificate::id`].
    pub tls: Option<String>,
}

/// Which `Host` a virtual host serves.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HostMatch {
    /// Exactly this (lower-case) host name.
    Exact(String),
    /// `*.suffix`: any host of exactly one more DNS label in front of `suffix` (stored without
    /// the leading `*.`).
    Wildcard(String),
    /// Any host: rules without a host.
    Any,
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Wildcard(s) => write!(f, "*.{s}"),
            HostMatch::Any => f.write_str("*"),
        }
    }
}

/// One route: a request match and what to do with it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Stable, human-readable name used in metrics and logs: `namespace/name/rule/path`.
    pub name: String,
    pub path: PathMatch,
    /// Methods the route accepts; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Headers the request must carry with exactly these values; names in lower case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    pub action: RouteAction,
    /// Answer plain-HTTP requests with a 308 redirect to HTTPS instead of proxying them.
    pub ssl_redirect: bool,
}

/// How a route matches the request path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    pub kind: PathKind,
    /// Starts with `/`. For [`PathKind::Prefix`] the trailing `/` is insignificant.
    pub value: String,
}

/// Path match kinds of Ingress v1 (`ImplementationSpecific` arrives here as `Prefix`), and
/// ingress-nginx's regular expressions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathKind {
    /// The path equals the value, case-sensitively.
    Exact,
    /// The value's `/`-separated elements are a prefix of the path's elements.
    Prefix,
    /// The value is a regular expression the path must match from its start, ignoring case,
    /// as ingress-nginx's `location ~* "^VALUE"` (`use-regex`, `rewrite-target`). Routes of this
    /// kind are tried in their order (longest value first), the first match wins.
    Regex,
}

/// A header a request must carry for a route to match.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub value: String,
}

/// What a route does with a matched request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteAction {
    /// The backend to proxy to; `None` when a Lua `content` handler answers.
    pub backend: Option<BackendId>,
    pub timeouts: Timeouts,
    /// Lua handlers that run on matched requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lua: Option<LuaHandlers>,
    /// What each request must pass before it is served: built-in filters, which run in their
    /// phase before the route's Lua.
    #[serde(default, skip_serializing_if = "Policies::is_empty")]
    pub policies: Policies,
    /// How the proxy speaks to the backend: protocol and TLS (`backend-protocol`,
    /// `proxy-ssl-*`, the Service port's `appProtocol`). Plain HTTP/1.1 when absent.
    #[serde(default, skip_serializing_if = "Upstream::is_plain")]
    pub upstream: Upstream,
    /// Another backend that takes some of the route's requests (a canary Ingress's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Box<Canary>>,
    /// Set when the route must not be served as written: the route still matches, so requests
    /// do not fall through to a less specific route, and they get the refusal's status without
    /// reaching the backend or running any handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// A route's policies: typed settings the proxy compiles into filters once per route, never per
/// request. A route without any pays nothing for them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policies {
    /// Request-rate and concurrency limits per client address (`limit-rps`, `limit-rpm`,
    /// `limit-connections`), checked before the IP rules, as nginx's preaccess phase runs
    /// `limit_req` and `limit_conn` before its access phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// A request rate shared by all proxies (`global-rate-limit`), after `limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_limit: Option<SharedLimit>,
    /// The pace of the response body (`limit-rate`, `limit-rate-after`), as nginx's
    /// `limit_rate`: no faster than this once the first bytes have gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_rate: Option<ResponseRate>,
    /// Client address rules: the first check of the access phase, as nginx's `allow`/`deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpRules>,
    /// Client certificates (`auth-tls-*`): checked before any other step, as nginx checks
    /// them when it reads the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,
    /// The largest request body the route accepts, in bytes (`proxy-body-size`); unlimited
    /// when absent. A request declaring more gets 413 before anything else runs, as nginx's
    /// `client_max_body_size`; one that sends more without declaring it is cut there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Cross-origin resource sharing (`enable-cors`): preflights answered by the proxy, and the
    /// `Access-Control-*` headers on responses to allowed origins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// HTTP Basic authentication against a list of users (`auth-type: basic`), after the IP
    /// rules, as nginx's `auth_basic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    /// An external service that decides each request (`auth-url`), after Basic auth, as
    /// nginx's `auth_request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_auth: Option<ExternalAuth>,
    /// The `Host` the upstream gets instead of the client's (`upstream-vhost`); the client's
    /// still goes as `X-Forwarded-Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
    /// `X-Forwarded-Prefix` for the upstream (`x-forwarded-prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_prefix: Option<String>,
    /// Every request answered with a redirect instead of going upstream
    /// (`permanent-redirect`, `temporal-redirect`), after the client certificate and CORS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// The route's requests are left out of the access log (`enable-access-log: "false"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_access_log: bool,
    /// A `Location` that is a path stays as it is (`relative-redirects: "true"`, nginx's
    /// `absolute_redirect off`); otherwise, as nginx, the response step makes it absolute with
    /// the request's scheme and host (and the listener's port unless 80 or 443).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relative_redirects: bool,
    /// The URI the upstream gets instead of the client's (`rewrite-target`): `$1`... are the
    /// captures of the route's regular expression on the path; the client's query string is
    /// kept (appended after `&` when the target has one of its own), as nginx's `rewrite ...
    /// break`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_target: Option<String>,
    /// `Location` and `Refresh` headers of the upstream's responses that start with the first
    /// get it replaced by the second (`proxy-redirect-from`, `proxy-redirect-to`), as nginx's
    /// `proxy_redirect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_rewrite: Option<(String, String)>,
    /// Error responses answered by another Service instead (`custom-http-errors` with the
    /// `default-backend` annotation), as ingress-nginx's `error_page` to its default backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_pages: Option<ErrorPages>,
    /// A request for `/` redirected (302) to this path on the same host (`app-root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_root: Option<String>,
    /// `satisfy: any`: a request that passes the IP rules or either authentication goes on
    /// (nginx's `satisfy any`); otherwise it must pass them all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub satisfy_any: bool,
    /// Requests refused (403) for their `User-Agent` or `Referer` (the ConfigMap's
    /// `block-user-agents` and `block-referers`), first in the access step, as ingress-nginx
    /// checks them before the location's rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Blocked>,
    /// Headers set on every response of the route, whoever makes it (`custom-headers`, the
    /// ConfigMap's `add-headers`), as nginx's `more_set_headers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers: Vec<SetHeader>,
    /// A copy of each request sent to another server, whose answer is thrown away
    /// (`mirror-target`), as nginx's `mirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Headers set on the request to the upstream (the ConfigMap's `proxy-set-headers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_headers: Vec<SetHeader>,
}

/// Responses with one of `codes` (the upstream's, or the proxy's own 502, 503 and 504) are
/// replaced by what `backend` answers to `GET /` with the headers ingress-nginx's custom error
/// pages get: `X-Code`, `X-Format`, `X-Original-URI`, `X-Namespace`, `X-Ingress-Name`,
/// `X-Service-Name`, `X-Service-Port` and `X-Request-ID`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ErrorPages {
    pub codes: Vec<u16>,
    pub backend: BackendId,
    pub namespace: String,
    pub ingress: String,
    pub service: String,
    pub service_port: String,
    /// Only the errors the proxy makes itself (`disable-proxy-intercept-errors`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_proxy_errors: bool,
}

/// Where copies of a route's requests go (`mirror-target`, `mirror-host`,
/// `mirror-request-body`). Fire and forget: the copy never delays the request, and when it
/// cannot keep up it is dropped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    /// An `http://` or `https://` URL with nginx variables: `https://test.example$request_uri`.
    pub target: Template,
    /// The copy's `Host`; the target's host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Whether the copy carries the request's body (`mirror-request-body`, on by default).
    pub request_body: bool,
}

/// One header to set, its value with nginx variables expanded per request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetHeader {
    /// The header's name, lower case.
    pub name: String,
    pub value: Template,
}

/// Requests refused for a header's value. Each pattern is a string matched whole and ignoring
/// case, or a regular expression after `~` (`~*`: ignoring case), as nginx's `map` reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Blocked {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_agents: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referers: Vec<String>,
}

/// Auth answers kept for a while (`auth-cache-key`, `auth-cache-duration`), as nginx's
/// `proxy_cache` on the auth location: requests with the same key within the time get the
/// same answer without asking the service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthCache {
    /// The key, with nginx variables (`$remote_user$http_authorization`).
    pub key: Template,
    /// How long answers of each status are kept; a status no entry names is not kept.
    pub durations: Vec<CacheDuration>,
}

/// `200 202 10m`: answers with one of `statuses` (any status when empty, nginx's `any`) are
/// kept `seconds`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheDuration {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<u16>,
    pub seconds: u64,
}

/// A redirect answered for every request of a route.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// The `Location`, with nginx variables.
    pub to: Template,
    /// 301 (`permanent-redirect-code`) or 302 (`temporal-redirect-code`) unless set: a 3xx.
    pub status: u16,
}

/// Each request is first sent, without its body, to an external service: 2xx lets it go on
/// (with headers the service names copied into it), 401 and 403 are passed to the client (401
/// redirected to a sign-in page when one is set), anything else is 500.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalAuth {
    /// `http://host[:port]/path?query`, with nginx variables expanded per request.
    pub url: Template,
    /// The method of the auth request; the client's when absent (`auth-method`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Where a 401 redirects (`auth-signin`), with nginx variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signin: Option<Template>,
    /// The query parameter of the sign-in URL that carries the original URL (`rd`).
    pub signin_redirect_param: String,
    /// Headers of the auth response copied into the request to the upstream (lower case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers: Vec<String>,
    /// `X-Auth-Request-Redirect`; the request's URI when absent (`auth-request-redirect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<String>,
    /// The auth response's `Set-Cookie` goes to the client whatever the status of the final
    /// response; otherwise only with a 2xx or 3xx one (`auth-always-set-cookie`).
    #[serde(default)]
    pub always_set_cookie: bool,
    /// Headers set on the auth request (`auth-proxy-set-headers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set_headers: Vec<SetHeader>,
    /// Answers kept for a while (`auth-cache-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<AuthCache>,
}

/// Text with nginx variables (`$host`, `${request_uri}`), expanded per request. Written and read
/// as that text; only the variables [`Template::VARIABLES`] names, and `$http_NAME`,
/// `$cookie_NAME` and `$arg_NAME`, are accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Template {
    text: String,
    parts: Vec<TemplatePart>,
}

/// A piece of a [`Template`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TemplatePart {
    Text(String),
    /// A variable by name, without the `$`.
    Variable(String),
}

impl Template {
    /// The variables a template may use besides `http_*`, `cookie_*` and `arg_*`.
    pub const VARIABLES: &'static [&'static str] = &[
        "host",
        "scheme",
        "request_uri",
        "escaped_request_uri",
        "uri",
        "args",
        "request_method",
        "remote_addr",
        "remote_user",
        "server_port",
    ];

    pub fn parts(&self) -> &[TemplatePart] {
        &self.parts
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A piece of text written with nginx variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    /// A variable's name, without `$` or braces; empty for a `$` no name follows.
    Variable(&'a str),
}

/// Splits `text` as nginx reads it: literal text, and `$name` or `${name}` references (a name
/// is letters, digits and `_`). `Err` for a `${` that is not closed.
///
/// # Errors
/// An unclosed `${`.
pub fn nginx_pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        if at > 0 {
            pieces.push(Piece::Text(&rest[..at]));
        }
        let after = &rest[at + 1..];
        let (name, next) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| format!("{text:?}: an unclosed ${{"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        pieces.push(Piece::Variable(name));
        rest = next;
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// [`nginx_pieces`] as runs: adjacent text joined, and a `$` no name follows kept as text.
///
/// # Errors
/// An unclosed `${`.
pub fn nginx_runs(text: &str) -> Result<Vec<TemplatePart>, String> {
    let mut runs = Vec::new();
    let mut literal = String::new();
    for piece in nginx_pieces(text)? {
        match piece {
            Piece::Text(t) => literal.push_str(t),
            Piece::Variable("") => literal.push('$'),
            Piece::Variable(name) => {
                if !literal.is_empty() {
                    runs.push(TemplatePart::Text(std::mem::take(&mut literal)));
                }
                runs.push(TemplatePart::Variable(name.to_owned()));
            }
        }
    }
    if !literal.is_empty() {
        runs.push(TemplatePart::Text(literal));
    }
    Ok(runs)
}

impl FromStr for Template {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        for piece in nginx_pieces(text)? {
            let name = match piece {
                Piece::Text(t) => {
                    literal.push_str(t);
                    continue;
                }
                Piece::Variable(name) => name,
            };
            let known = Template::VARIABLES.contains(&name)
                || ["http_", "cookie_", "arg_"].iter().any(|p| name.strip_prefix(p).is_some_and(|n| !n.is_empty()));
            if !known {
                return Err(format!("{text:?}: ${name} is not a variable tidegate knows"));
            }
            if !literal.is_empty() {
                parts.push(TemplatePart::Text(std::mem::take(&mut literal)));
            }
            parts.push(TemplatePart::Variable(name.to_owned()));
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Text(literal));
        }
        Ok(Template { text: text.to_owned(), parts })
    }
}

impl TryFrom<String> for Template {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Template> for String {
    fn from(template: Template) -> String {
        template.text
    }
}

/// Limits per client address (or per `key`), shared by all of a proxy's workers. A request over
/// a limit gets `status`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Request rates, each a leaky bucket as nginx's `limit_req ... nodelay`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rates: Vec<RateLimit>,
    /// Requests of one client in progress at once (`limit-connections`, nginx's `limit_conn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<u32>,
    /// Clients the limits do not apply to (`limit-whitelist` / `limit-allowlist`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt: Vec<Cidr>,
    /// The status of a request over a rate: 503 unless configured (`limit-req-status-code`).
    pub status: u16,
    /// The status of a request over `concurrent`: 503 unless configured
    /// (`limit-conn-status-code`).
    #[serde(default = "service_unavailable")]
    pub concurrent_status: u16,
    /// What the limits count by instead of the client address (`tidegate.dev/limit-key`):
    /// nginx variables, such as `$http_x_api_key` or `$cookie_session`. A request for which it
    /// expands to nothing is counted by its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Template>,
}

/// A request rate shared by every proxy of a controller (ingress-nginx's `global-rate-limit`):
/// at most `requests` per `window_seconds`, per value of `key`, over a sliding window, the
/// counts of all proxies added up through the controller they subscribe to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedLimit {
    /// Names the counts across proxies: the owning object (`namespace/name`).
    pub id: String,
    pub requests: u32,
    pub window_seconds: u32,
    /// What is counted by (`global-rate-limit-key`, `$remote_addr` by default).
    pub key: Template,
    /// Clients not counted (`global-rate-limit-ignored-cidrs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<Cidr>,
    /// The status of a refused request (`global-rate-limit-status-code`, 429).
    pub status: u16,
}

fn service_unavailable() -> u16 {
    503
}

/// Client certificate verification, as ingress-nginx configures nginx's `ssl_verify_client`.
/// The proxy asks for a certificate during the TLS handshake of the hosts whose routes have
/// this, and verifies it against `ca_pem` for each request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientCertificate {
    /// `Secret namespace/name`, for logs and to tell CA bundles apart.
    pub ca_id: String,
    /// The certificate authorities client certificates must chain to, PEM.
    pub ca_pem: String,
    pub verify: ClientVerify,
    /// Intermediate certificates allowed between the client's and the CA (`auth-tls-verify-depth`,
    /// 1 by default: the CA signed the client's certificate).
    pub depth: u8,
    /// Where a request whose certificate fails goes (302) instead of getting 400
    /// (`auth-tls-error-page`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_page: Option<String>,
    /// Send the certificate to the upstream as `ssl-client-cert`, URL-escaped PEM.
    #[serde(default)]
    pub pass_to_upstream: bool,
    /// A regular expression the certificate's subject must match (`auth-tls-match-cn`), or
    /// the request gets 403.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_subject: Option<String>,
}

/// `auth-tls-verify-client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientVerify {
    /// A certificate the CA signed is required: 400 without one, or with another.
    On,
    /// Not required; one that is presented must verify (400 otherwise).
    Optional,
    /// Not required, and not required to verify; the upstream is told the result.
    OptionalNoCa,
}

/// A response body's pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseRate {
    pub bytes_per_second: u64,
    /// Bytes sent before the pace applies.
    #[serde(default)]
    pub after_bytes: u64,
}

/// A request rate: on average `requests` per `per_seconds`, and up to `burst` more at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    /// 1 for `limit-rps`, 60 for `limit-rpm`.
    pub per_seconds: u32,
    pub burst: u32,
}

/// CORS as ingress-nginx configures it. A request from an allowed origin gets the
/// `Access-Control-*` headers on its response; an `OPTIONS` request from one (a preflight) is
/// answered 204 by the proxy, before authentication (browsers send no credentials with it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cors {
    /// Allowed origins (`https://a.example`, `https://a.example:8443`, `https://*.example`);
    /// empty: any origin, answered `Access-Control-Allow-Origin: *`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<String>,
    /// `Access-Control-Allow-Methods`, as written.
    pub allow_methods: String,
    /// `Access-Control-Allow-Headers`, as written.
    pub allow_headers: String,
    /// `Access-Control-Expose-Headers`, as written; not sent when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expose_headers: String,
    /// `Access-Control-Allow-Credentials: true` is sent.
    pub allow_credentials: bool,
    /// `Access-Control-Max-Age`, in seconds.
    pub max_age: u64,
}

/// Users who may reach a route with HTTP Basic authentication; others get 401 with
/// `WWW-Authenticate: Basic realm="<realm>"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BasicAuth {
    /// `auth-realm`.
    #[serde(default)]
    pub realm: String,
    /// Sorted by user; at most one entry per user.
    pub users: Vec<Credential>,
}

/// One user and the hash of their password.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credential {
    pub user: String,
    pub hash: PasswordHash,
}

impl fmt::Debug for Credential {
    /// Never prints the hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").field("user", &self.user).finish_non_exhaustive()
    }
}

/// A password hash in one of the formats `htpasswd` and `openssl passwd` write, as nginx's
/// `auth_basic_user_file` reads them. Written and read as the hash text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PasswordHash {
    /// `$2a$`, `$2b$`, `$2y$` (`htpasswd -B`).
    Bcrypt(String),
    /// MD5-crypt: `$apr1$salt$hash` (`htpasswd -m`, `openssl passwd -apr1`) and
    /// `$1$salt$hash` (`openssl passwd -1`).
    Md5Crypt(String),
    /// `{SHA}` and the base64 of the password's SHA-1 (`htpasswd -s`).
    Sha1(String),
    /// `$5$` (SHA-256-crypt, `openssl passwd -5`).
    Sha256Crypt(String),
    /// `$6$` (SHA-512-crypt, `openssl passwd -6`).
    Sha512Crypt(String),
}

impl fmt::Debug for PasswordHash {
    /// Names the format, never the hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = match self {
            PasswordHash::Bcrypt(_) => "bcrypt",
            PasswordHash::Md5Crypt(_) => "md5-crypt",
            PasswordHash::Sha1(_) => "sha1",
            PasswordHash::Sha256Crypt(_) => "sha256-crypt",
            PasswordHash::Sha512Crypt(_) => "sha512-crypt",
        };
        write!(f, "PasswordHash({format})")
    }
}

impl PasswordHash {
    /// The hash as written.
    pub fn as_str(&self) -> &str {
        match self {
            PasswordHash::Bcrypt(h)
            | PasswordHash::Md5Crypt(h)
            | PasswordHash::Sha1(h)
            | PasswordHash::Sha256Crypt(h)
            | PasswordHash::Sha512Crypt(h) => h,
        }
    }
}

impl FromStr for PasswordHash {
    type Err = String;

    /// Recognizes the format by its prefix; the rest is checked when a password is verified.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let hash = text.to_owned();
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.starts_with(p)) {
            Ok(PasswordHash::Bcrypt(hash))
        } else if (text.starts_with("$apr1$") || text.starts_with("$1$")) && text.matches('$').count() == 3 {
            Ok(PasswordHash::Md5Crypt(hash))
        } else if let Some(digest) = text.strip_prefix("{SHA}") {
            if digest.len() != 28 {
                return Err("a {SHA} hash is 28 characters of base64".into());
            }
            Ok(PasswordHash::Sha1(hash))
        } else if text.starts_with("$5$") {
            Ok(PasswordHash::Sha256Crypt(hash))
        } else if text.starts_with("$6$") {
            Ok(PasswordHash::Sha512Crypt(hash))
        } else {
            Err("not a password hash tidegate reads (bcrypt $2y$/$2b$/$2a$, $apr1$, $1$, {SHA}, $5$ or $6$); \
                 crypt(3) DES hashes and plain text are refused"
                .into())
        }
    }
}

impl TryFrom<String> for PasswordHash {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<PasswordHash> for String {
    fn from(hash: PasswordHash) -> String {
        hash.as_str().to_owned()
    }
}

impl Policies {
    pub fn is_empty(&self) -> bool {
        self == &Policies::default()
    }
}

/// Which client addresses may reach a route (ingress-nginx's `whitelist-source-range` /
/// `allowlist-source-range` and `denylist-source-range`). A client in `deny` is refused; else,
/// when `allow` is not empty, a client outside it is refused; then `ordered` (a snippet's
/// `allow` and `deny` lines) is checked as nginx checks them: the first network that holds the
/// client decides, and a client none holds goes on. Refused requests get 403.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpRules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ordered: Vec<IpRule>,
}

impl IpRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.ordered.is_empty()
    }
}

/// One `allow` or `deny` line of nginx's access module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpRule {
    pub allow: bool,
    pub network: Cidr,
}

/// An IPv4 or IPv6 network: `10.0.0.0/8`, `2001:db8::/32`; a bare address is a network of one.
/// Written and read as that text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    /// The network's address, with the host bits cleared.
    pub network: IpAddr,
    /// Leading bits that must match: at most 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// Every IPv4 address: `0.0.0.0/0`.
    pub const ANY_V4: Cidr = Cidr { network: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), prefix: 0 };
    /// Every IPv6 address: `::/0`.
    pub const ANY_V6: Cidr = Cidr { network: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), prefix: 0 };

    /// Whether `address` is in the network. IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`, as
    /// a dual-stack listener reports IPv4 clients) count as their IPv4 address.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(a) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `address/prefix` or a bare address; host bits set below the prefix are cleared, as
    /// nginx's `allow` accepts `10.1.2.3/8` for `10.0.0.0/8`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{text:?}: the prefix length must be a number from 0 to {max}")),
            },
        };
        let network = match address {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Cidr { network, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> String {
        cidr.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Why a route answers every request with an error instead of serving it: what it asks for
/// could open what it guards if it were served without it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Refusal {
    /// The status every request gets: [`Refusal::MISCONFIGURED`] or [`Refusal::UNHONOURED`].
    pub status: u16,
    /// Why, for logs: the object and what is wrong with it.
    pub reason: String,
}

impl Refusal {
    /// The object behind the route is invalid (Lua that does not compile, a missing LuaRoute):
    /// 500, as nginx answers a location whose configuration fails.
    pub const MISCONFIGURED: u16 = 500;
    /// The route asks for a protection tidegate does not honour (an access or limit annotation
    /// it does not implement): 503, the route is unavailable rather than open.
    pub const UNHONOURED: u16 = 503;

    pub fn misconfigured(reason: impl Into<String>) -> Self {
        Refusal { status: Self::MISCONFIGURED, reason: reason.into() }
    }

    pub fn unhonoured(reason: impl Into<String>) -> Self {
        Refusal { status: Self::UNHONOURED, reason: reason.into() }
    }
}

/// The Lua handlers of a route, by phase, each list in the order its handlers run (those of a
/// whole LuaRoute before those of one of its routes). Entries are [`LuaScript::id`]s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaHandlers {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrite: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<String>,
    /// Picks the peer of each try (`ngx.balancer`), instead of the route's balancer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub balancer: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_filter: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_filter: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    /// Lua time allowed per request, overriding the proxy's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_budget_ms: Option<u64>,
    /// Namespace the handlers belong to: the `ngx.shared` dictionaries they can reach.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl LuaHandlers {
    /// The handlers of one phase, in the order they run.
    pub fn phase(&self, phase: Phase) -> &[String] {
        match phase {
            Phase::Rewrite => &self.rewrite,
            Phase::Access => &self.access,
            Phase::Content => &self.content,
            Phase::Balancer => &self.balancer,
            Phase::HeaderFilter => &self.header_filter,
            Phase::BodyFilter => &self.body_filter,
            Phase::Log => &self.log,
        }
    }

    pub fn phase_mut(&mut self, phase: Phase) -> &mut Vec<String> {
        match phase {
            Phase::Rewrite => &mut self.rewrite,
            Phase::Access => &mut self.access,
            Phase::Content => &mut self.content,
            Phase::Balancer => &mut self.balancer,
            Phase::HeaderFilter => &mut self.header_filter,
            Phase::BodyFilter => &mut self.body_filter,
            Phase::Log => &mut self.log,
        }
    }
}

/// Lua source of one handler.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LuaScript {
    /// Content hash of `name` and `source`.
    pub id: String,
    /// Where it was written, e.g. `LuaRoute shop/api spec.routes[0].lua.access`; Lua errors
    /// start with it.
    pub name: String,
    pub source: String,
}

/// A canary backend, as ingress-nginx's canary Ingresses: a request goes to it when its header
/// says so, else when its cookie says so, else by weight (that order). `always` in the header
/// or the cookie sends it there, `never` keeps it off; the header's other values send it there
/// when they equal `header_value` or match `header_pattern`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    pub backend: BackendId,
    /// The main route's protocol and TLS, with the canary's own balance, affinity and retries.
    #[serde(default, skip_serializing_if = "Upstream::is_plain")]
    pub upstream: Upstream,
    /// `canary-by-header` (lower case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_value: Option<String>,
    /// A regular expression the header's value must match (`canary-by-header-pattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_pattern: Option<String>,
    /// `canary-by-cookie`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// Requests out of `weight_total` that go to the canary (`canary-weight`,
    /// `canary-weight-total`, default 100).
    pub weight: u32,
    pub weight_total: u32,
    /// `affinity-canary-behavior: legacy`: the header, cookie and weight decide even for a
    /// request whose session belongs to one of the backends. `sticky` (the default): a session
    /// stays on the backend that started it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legacy_affinity: bool,
}

/// How a route's requests reach its backend's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upstream {
    pub protocol: UpstreamProtocol,
    /// TLS settings; present exactly when the protocol runs over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// How an endpoint is chosen for each request (`load-balance`, `upstream-hash-by`).
    #[serde(default, skip_serializing_if = "Balance::is_round_robin")]
    pub balance: Balance,
    /// When a request goes on to another endpoint (`proxy-next-upstream*`).
    #[serde(default, skip_serializing_if = "Retry::is_default")]
    pub retry: Retry,
    /// Sticky sessions by cookie (`affinity: cookie` and the `session-cookie-*` keys): a
    /// client's requests keep going to the endpoint its cookie names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// Cookie affinity, as ingress-nginx's: a request without the cookie (or naming an endpoint
/// that is gone) is balanced as usual and its response sets the cookie.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Affinity {
    /// `session-cookie-name` (default `INGRESSCOOKIE`).
    pub cookie: String,
    /// `session-cookie-path`; the route's path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `session-cookie-max-age`, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
    /// `session-cookie-expires`, seconds from the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// `session-cookie-samesite`: `None`, `Lax` or `Strict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_site: Option<String>,
    /// `session-cookie-conditional-samesite-none`: leave `SameSite=None` out for the browsers
    /// known to reject it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conditional_same_site_none: bool,
    /// `session-cookie-secure`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure: bool,
    /// `affinity-mode: persistent`: the cookie names its endpoint, and the session stays there
    /// while it exists. `balanced` (the default): the cookie holds a session id placed on a
    /// consistent-hash ring, so that a change of endpoints moves only some sessions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persistent: bool,
    /// `session-cookie-change-on-failure`: when the session's endpoint fails and the request
    /// goes on to another, the cookie follows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub change_on_failure: bool,
}

impl Default for Affinity {
    /// ingress-nginx's defaults: the cookie `INGRESSCOOKIE`, balanced, no attributes.
    fn default() -> Self {
        Affinity {
            cookie: "INGRESSCOOKIE".into(),
            path: None,
            domain: None,
            max_age: None,
            expires: None,
            same_site: None,
            conditional_same_site_none: false,
            secure: false,
            persistent: false,
            change_on_failure: false,
        }
    }
}

/// How an endpoint is chosen for each request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", deny_unknown_fields)]
pub enum Balance {
    /// Each endpoint in turn (`load-balance: round_robin`, the default).
    #[default]
    RoundRobin,
    /// Peak EWMA of response times with two random choices (`load-balance: ewma`): the
    /// endpoint whose recent latency, weighted by the requests it has in progress, is lower.
    Ewma,
    /// The same key always goes to the same endpoint, on a consistent-hash ring: removing one
    /// of N endpoints moves about 1/N of the keys (`upstream-hash-by`, with nginx variables).
    /// With `subset_size`, the key picks a subset of that many endpoints, and requests spread
    /// over it (`upstream-hash-by-subset`).
    Hash {
        key: Template,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subset_size: Option<u32>,
    },
}

impl Balance {
    pub fn is_round_robin(&self) -> bool {
        *self == Balance::RoundRobin
    }
}

/// When a request that failed on one endpoint is sent to another, as nginx's
/// `proxy_next_upstream`: never once any of the response went to the client; a request that
/// was sent whole (or with a body) only when it may be sent twice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// The connection could not be made or broke before an answer (`error`).
    pub on_error: bool,
    /// The endpoint did not connect or answer in time (`timeout`).
    pub on_timeout: bool,
    /// The answer could not be read (`invalid_header`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_invalid_header: bool,
    /// Answers with these statuses (`http_500`, `http_502`, `http_503`, `http_504`,
    /// `http_403`, `http_404`, `http_429`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_statuses: Vec<u16>,
    /// Requests with non-idempotent methods too (`non_idempotent`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Endpoints tried at most, the first included (`proxy-next-upstream-tries`); 0: all.
    pub tries: u32,
    /// The time after which no other endpoint is tried, in milliseconds
    /// (`proxy-next-upstream-timeout`); 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Default for Retry {
    /// ingress-nginx's: `error timeout`, 3 tries, no time limit.
    fn default() -> Self {
        Retry {
            on_error: true,
            on_timeout: true,
            on_invalid_header: false,
            on_statuses: Vec::new(),
            non_idempotent: false,
            tries: 3,
            timeout_ms: 0,
        }
    }
}

impl Retry {
    pub fn is_default(&self) -> bool {
        *self == Retry::default()
    }
}

impl Upstream {
    pub fn is_plain(&self) -> bool {
        self == &Upstream::default()
    }
}

/// The protocol spoken to a backend (ingress-nginx's `backend-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over TCP (`HTTP`).
    #[default]
    Http1,
    /// HTTP/1.1 over TLS (`HTTPS`).
    Https,
    /// HTTP/2 over TCP with prior knowledge (`GRPC`, `appProtocol: kubernetes.io/h2c`).
    H2c,
    /// HTTP/2 over TLS (`GRPCS`).
    H2,
    /// TLS, then HTTP/2 or HTTP/1.1 as the backend picks by ALPN (`AUTO_HTTP`).
    Negotiated,
}

impl UpstreamProtocol {
    /// Whether it runs over TLS.
    pub fn tls(self) -> bool {
        matches!(self, UpstreamProtocol::Https | UpstreamProtocol::H2 | UpstreamProtocol::Negotiated)
    }
}

/// TLS to a backend (ingress-nginx's `proxy-ssl-*` keys, nginx's `proxy_ssl_*`).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamTls {
    /// Verify the backend's certificate against `ca_pem` and `name` (`proxy-ssl-verify`, off
    /// by default as in ingress-nginx: then any certificate is accepted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify: bool,
    /// Trusted CA certificates, PEM (`ca.crt` of `proxy-ssl-secret`); required to verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The name the certificate is checked against, and sent as SNI when `sni` is set
    /// (`proxy-ssl-name`; the Service's `NAME.NAMESPACE.svc` when not set).
    pub name: String,
    /// Send the name as SNI (`proxy-ssl-server-name`, off by default as in nginx).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sni: bool,
    /// How many CA certificates may stand between the backend's certificate and a trusted one,
    /// plus one (`proxy-ssl-verify-depth`, default 1: signed by a trusted CA directly).
    pub verify_depth: u8,
    /// The TLS versions allowed (`proxy-ssl-protocols`); both when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<TlsVersion>,
    /// Cipher suites allowed, by their IANA names (`proxy-ssl-ciphers` mapped from OpenSSL's);
    /// every suite the proxy supports when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ciphers: Vec<String>,
    /// A client certificate chain and key, PEM (`tls.crt` and `tls.key` of
    /// `proxy-ssl-secret`), presented when the backend asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientIdentity>,
}

impl fmt::Debug for UpstreamTls {
    /// Never prints the client key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("verify", &self.verify)
            .field("ca", &self.ca_pem.is_some())
            .field("name", &self.name)
            .field("sni", &self.sni)
            .field("verify_depth", &self.verify_depth)
            .field("versions", &self.versions)
            .field("ciphers", &self.ciphers)
            .field("client_certificate", &self.client_certificate.is_some())
            .finish()
    }
}

/// A TLS version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

/// A certificate chain and its private key, PEM.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Upstream timeouts of one route, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Time allowed to open a connection to an endpoint.
    pub connect_ms: u64,
    /// Time allowed between sending the request and receiving the response headers.
    pub read_ms: u64,
    /// Time allowed between two steps of sending the request (its head, each piece of its
    /// body) before the upstream has all of it.
    #[serde(default = "default_send_ms")]
    pub send_ms: u64,
}

fn default_send_ms() -> u64 {
    Timeouts::default().send_ms
}

impl Default for Timeouts {
    /// ingress-nginx's defaults: 5 s to connect, 60 s to read, 60 s to send.
    fn default() -> Self {
        Timeouts { connect_ms: 5_000, read_ms: 60_000, send_ms: 60_000 }
    }
}

/// Identifies a backend: `namespace/service:port` (the port as written in the Ingress).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendId(pub String);

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One ready endpoint of a backend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// An IPv4 or IPv6 address, as text.
    pub address: String,
    pub port: u16,
}

/// A TLS certificate chain and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    /// `namespace/secret-name`.
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Certificate {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("id", &self.id)
            .field("cert_pem_len", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any snapshot survives a JSON round trip unchanged.
    #[test]
    fn round_trips_through_json() {
        let backend = BackendId("shop/api:80".into());
        let snapshot = Snapshot {
            version: 7,
            content: 42,
            routing: Routing {
                virtual_hosts: vec![VirtualHost {
                    host: HostMatch::Wildcard("example.com".into()),
                    routes: vec![Route {
                        name: "shop/api/0/0".into(),
                        path: PathMatch { kind: PathKind::Prefix, value: "/v1".into() },
                        methods: vec!["GET".into()],
                        headers: vec![HeaderMatch { name: "x-canary".into(), value: "1".into() }],
                        action: RouteAction {
                            backend: Some(backend.clone()),
                            timeouts: Timeouts::default(),
                            lua: Some(LuaHandlers { access: vec!["abc".into()], ..LuaHandlers::default() }),
                            policies: Policies {
                                ip: Some(IpRules {
                                    allow: vec!["10.0.0.0/8".parse().expect("cidr")],
                                    deny: vec!["2001:db8::/32".parse().expect("cidr")],
                                    ordered: vec![IpRule { allow: false, network: Cidr::ANY_V6 }],
                                }),
                                max_body_bytes: Some(1 << 20),
                                limits: Some(Limits {
                                    rates: vec![RateLimit { requests: 5, per_seconds: 1, burst: 25 }],
                                    concurrent: Some(10),
                                    exempt: vec!["10.0.0.0/8".parse().expect("cidr")],
                                    status: 503,
                                    concurrent_status: 503,
                                    key: Some("$http_x_api_key".parse().expect("template")),
                                }),
                                shared_limit: Some(SharedLimit {
                                    id: "shop/api".into(),
                                    requests: 100,
                                    window_seconds: 60,
                                    key: "$remote_addr".parse().expect("template"),
                                    ignored: Vec::new(),
                                    status: 429,
                                }),
                                response_rate: Some(ResponseRate { bytes_per_second: 1024, after_bytes: 0 }),
                                external_auth: Some(ExternalAuth {
                                    url: "http://auth.shop/check?u=$escaped_request_uri".parse().expect("template"),
                                    method: None,
                                    signin: None,
                                    signin_redirect_param: "rd".into(),
                                    response_headers: vec!["x-auth-user".into()],
                                    request_redirect: None,
                                    always_set_cookie: false,
                                    set_headers: vec![SetHeader {
                                        name: "x-client".into(),
                                        value: "$remote_addr".parse().expect("template"),
                                    }],
                                    cache: Some(AuthCache {
                                        key: "$http_authorization".parse().expect("template"),
                                        durations: vec![CacheDuration { statuses: vec![200, 401], seconds: 300 }],
                                    }),
                                }),
                                satisfy_any: true,
                                blocked: Some(Blocked { user_agents: vec!["~*curl".into()], referers: Vec::new() }),
                                response_headers: vec![SetHeader {
                                    name: "x-frame-options".into(),
                                    value: "DENY".parse().expect("template"),
                                }],
                                upstream_headers: Vec::new(),
                                mirror: Some(Mirror {
                                    target: "https://shadow.shop$request_uri".parse().expect("template"),
                                    host: Some("shadow.shop".into()),
                                    request_body: false,
                                }),
                                redirect: None,
                                app_root: Some("/app".into()),
                                rewrite_target: Some("/$2".into()),
                                location_rewrite: Some(("http://api.internal/".into(), "/".into())),
                                error_pages: Some(ErrorPages {
                                    codes: vec![404, 503],
                                    backend: BackendId("shop/errors:80".into()),
                                    namespace: "shop".into(),
                                    ingress: "api".into(),
                                    service: "api".into(),
                                    service_port: "80".into(),
                                    only_proxy_errors: false,
                                }),
                                no_access_log: true,
                                relative_redirects: true,
                                client_certificate: Some(ClientCertificate {
                                    ca_id: "shop/ca".into(),
                                    ca_pem: "C".into(),
                                    verify: ClientVerify::On,
                                    depth: 1,
                                    error_page: None,
                                    pass_to_upstream: true,
                                    match_subject: Some("CN=shop".into()),
                                }),
                                upstream_host: Some("api.internal".into()),
                                forwarded_prefix: Some("/shop".into()),
                                cors: Some(Cors {
                                    allow_origins: vec!["https://*.example.com".into()],
                                    allow_methods: "GET, POST".into(),
                                    allow_headers: "Authorization".into(),
                                    expose_headers: String::new(),
                                    allow_credentials: true,
                                    max_age: 600,
                                }),
                                basic_auth: Some(BasicAuth {
                                    realm: "shop".into(),
                                    users: vec![Credential {
                                        user: "ann".into(),
                                        hash: "{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=".parse().expect("hash"),
                                    }],
                                }),
                            },
                            upstream: Default::default(),
                            canary: None,
                            refusal: None,
                        },
                        ssl_redirect: true,
                    }],
                    tls: Some("shop/api-tls".into()),
                }],
                default_backend: None,
                certificates: vec![Certificate {
                    id: "shop/api-tls".into(),
                    cert_pem: "C".into(),
                    key_pem: "K".into(),
                }],
                scripts: vec![LuaScript {
                    id: "abc".into(),
                    name: "LuaRoute shop/api spec.lua.access".into(),
                    source: "ngx.exit(403)".into(),
                }],
                shared_dicts: vec![SharedDict { namespace: "shop".into(), name: "cache".into(), size: 10 << 20 }],
                lua_namespaces: vec![LuaNamespace {
                    namespace: "shop".into(),
                    modules: vec![LuaModule { name: "resty.redis".into(), script: "abc".into() }],
                    init: vec!["abc".into()],
                    init_worker: vec!["abc".into()],
                }],
                lua_certificates: vec![LuaCertificate {
                    hosts: vec![HostMatch::Exact("shop.example.com".into())],
                    namespace: "shop".into(),
                    name: "shop/auto".into(),
                    script: "certs".into(),
                    cache_ms: 60_000,
                    cpu_budget_ms: Some(200),
                }],
                default_certificate: Some("shop/tls".into()),
                hsts: Some("max-age=31536000; includeSubDomains".into()),
                http2_max_concurrent_streams: Some(128),
                client_connections: ClientConnections {
                    keep_alive_seconds: Some(75),
                    keep_alive_requests: Some(1000),
                    header_seconds: Some(60),
                    body_seconds: Some(60),
                },
                client_tls_versions: vec![TlsVersion::Tls13],
                client_tls12_ciphers: vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()],
                upstream_connections: UpstreamConnections {
                    idle_per_endpoint: Some(320),
                    idle_seconds: Some(60),
                    requests: Some(10_000),
                },
                client_address: ClientAddress {
                    proxy_protocol: true,
                    header: Some("x-forwarded-for".into()),
                    trusted: vec![Cidr::ANY_V4],
                    full_forwarded_for: true,
                },
                passthrough: vec![Passthrough { host: "vault.example.com".into(), backend: backend.clone() }],
                access_log_format: Some(AccessLogFormat {
                    format: "$remote_addr - [$time_local] \"$request\" $status".into(),
                    escape: LogEscape::Json,
                }),
            },
            endpoints: BTreeMap::from([(backend, vec![Endpoint { address: "::1".into(), port: 8080 }])]),
            names: BTreeMap::from([(
                BackendId("shop/ext:80".into()),
                NamedEndpoint { name: "api.example.com".into(), port: 443 },
            )]),
        };
        let json = serde_json::to_string(&snapshot).expect("serializes");
        let back: Snapshot = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, snapshot);
    }

    /// A route setting this proxy does not know refuses the snapshot: never served without it.
    #[test]
    fn unknown_route_settings_are_refused() {
        let action = r#"{"backend":"a/b:80","timeouts":{"connectMs":1,"readMs":1},"futurePolicy":{}}"#;
        let error = serde_json::from_str::<RouteAction>(action).expect_err("refused");
        assert!(error.to_string().contains("futurePolicy"), "{error}");
        let known =
            r#"{"backend":"a/b:80","timeouts":{"connectMs":1,"readMs":1},"refusal":{"status":503,"reason":"r"}}"#;
        let action: RouteAction = serde_json::from_str(known).expect("known fields");
        assert_eq!(action.refusal, Some(Refusal::unhonoured("r")));
    }

    #[test]
    fn cidrs_match_their_networks() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap_or_else(|e| panic!("{s}: {e}"));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")), "IPv4-mapped counts as IPv4");
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")), "IPv4 ranges never match IPv6");
        assert!(cidr("192.168.1.7").contains(ip("192.168.1.7")) && !cidr("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert_eq!(cidr(" 10.1.2.3/8 ").to_string(), "10.0.0.0/8", "host bits cleared, spaces trimmed");
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn password_hashes_are_recognized_by_format() {
        let kind = |s: &str| s.parse::<PasswordHash>().map(|h| format!("{:?}", std::mem::discriminant(&h)));
        assert!(matches!("$2y$05$abcdefghijklmnopqrstuu".parse(), Ok(PasswordHash::Bcrypt(_))));
        assert!(matches!("$apr1$salt$hash".parse(), Ok(PasswordHash::Md5Crypt(_))));
        assert!(matches!("$1$salt$hash".parse(), Ok(PasswordHash::Md5Crypt(_))));
        assert!(matches!("{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=".parse(), Ok(PasswordHash::Sha1(_))));
        assert!(matches!("$5$salt$hash".parse(), Ok(PasswordHash::Sha256Crypt(_))));
        assert!(matches!("$6$rounds=5000$salt$hash".parse(), Ok(PasswordHash::Sha512Crypt(_))));
        for refused in ["plaintext", "abJnggxhB/yWI", "{SHA}short", "$1$salt", ""] {
            assert!(kind(refused).is_err(), "{refused:?} is refused");
        }
        let credential =
            Credential { user: "ann".into(), hash: "{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=".parse().expect("hash") };
        assert!(!format!("{credential:?}").contains("qUqP"), "Debug never prints a hash");
    }

    #[test]
    fn templates_split_into_text_and_known_variables() {
        let t: Template =
            "http://auth.svc/check?u=$escaped_request_uri&h=${host}x&c=$cookie_sid".parse().expect("parses");
        let names: Vec<&str> = t
            .parts()
            .iter()
            .filter_map(|p| match p {
                TemplatePart::Variable(v) => Some(v.as_str()),
                TemplatePart::Text(_) => None,
            })
            .collect();
        assert_eq!(names, ["escaped_request_uri", "host", "cookie_sid"]);
        assert_eq!(t.as_str(), "http://auth.svc/check?u=$escaped_request_uri&h=${host}x&c=$cookie_sid");
        for bad in ["http://a/$nope", "http://a/${host", "http://a/$http_"] {
            assert!(bad.parse::<Template>().is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_prints_private_keys() {
        let cert = Certificate { id: "a/b".into(), cert_pem: "C".into(), key_pem: "SECRET".into() };
        assert!(!format!("{cert:?}").contains("SECRET"));
    }

    #[test]
    fn host_match_displays_as_written() {
        assert_eq!(HostMatch::Wildcard("foo.com".into()).to_string(), "*.foo.com");
        assert_eq!(HostMatch::Exact("foo.com".into()).to_string(), "foo.com");
        assert_eq!(HostMatch::Any.to_string(), "*");
    }
}
