//! The global ConfigMap (`--configmap NAMESPACE/NAME`), with ingress-nginx's keys.
//!
//! One table, [`KEYS`], says what each key does:
//! - **route default**: the key has an annotation's name and meaning (`proxy-body-size`,
//!   `ssl-redirect`, the `proxy-*-timeout` keys...). It is read by that annotation's own parser
//!   into the settings every Ingress and LuaRoute route starts from; their annotations still win.
//! - **own**: read into [`Global`]: the limits' statuses, global auth, the `block-*` lists, the
//!   ConfigMaps of headers (`add-headers`, `proxy-set-headers`), snippets.
//!
//! Any other key gets a warning naming it (`data["key"]`). A value that does not read is an error
//! naming the key. When the key protects routes (`block-*`, `global-auth-*`, `whitelist-source-
//! range`, the limits), the routes it would protect answer 503 rather than be served without it;
//! any other key keeps its default.
//!
//! The ConfigMap is an input of translation like any object: a change applies as one does.

use tidegate_snapshot::{Blocked, Cidr, ClientAddress, ExternalAuth, SetHeader};

use super::annotations::{self, Handling, Settings};
use super::index::Index;
use crate::objects::{Inputs, ObjectRef};
use crate::status::{ObjectStatus, Reason};

/// What the global ConfigMap (and the flags it can stand in for) says for every route.
#[derive(Clone, Debug, Default)]
pub(super) struct Global {
    /// What every route's settings start from.
    pub(super) defaults: Settings,
    /// The external auth of every route without its own: the ConfigMap's `global-auth-url`
    /// and its keys, else the `--global-auth-*` flags.
    pub(super) auth: Option<ExternalAuth>,
    /// Why every route answers 503: a key that protects them all cannot be honoured.
    pub(super) refusal: Option<String>,
    /// Why the routes that global auth would protect answer 503.
    pub(super) auth_refusal: Option<String>,
    /// `block-cidrs`: clients refused (403) on every route.
    pub(super) block_cidrs: Vec<Cidr>,
    /// `block-user-agents` and `block-referers`.
    pub(super) blocked: Blocked,
    /// `add-headers`: the headers of that ConfigMap, set on every response.
    pub(super) response_headers: Vec<SetHeader>,
    /// `proxy-set-headers`: the headers of that ConfigMap, set on every upstream request.
    pub(super) upstream_headers: Vec<SetHeader>,
    /// `global-allowed-response-headers`: the headers `custom-headers` may set (lower case).
    pub(super) allowed_response_headers: Vec<String>,
    /// `allow-snippet-annotations`, when the ConfigMap sets it (else the flag decides).
    pub(super) allow_snippets: Option<bool>,
    /// `log-format-upstream`, `log-format-escape-json`, `log-format-escape-none`.
    pub(super) log_format: Option<String>,
    pub(super) log_escape: tidegate_snapshot::LogEscape,
    /// `annotations-risk-level: Critical`: annotations of Critical risk (the snippets) may be
    /// used. ingress-nginx's default, `High`, refuses them even where snippets are allowed.
    pub(super) critical_annotations: bool,
    /// `use-proxy-protocol`, `use-forwarded-headers` and the keys of the client's address.
    pub(super) client_address: ClientAddress,
    /// `hsts`, `hsts-max-age`, `hsts-include-subdomains`, `hsts-preload`, when any is set.
    pub(super) hsts: Option<HstsKeys>,
    /// `http2-max-concurrent-streams`.
    pub(super) http2_streams: Option<u32>,
    /// `keep-alive`, `keep-alive-requests`, `client-header-timeout`, `client-body-timeout`.
    pub(super) client_connections: tidegate_snapshot::ClientConnections,
    /// `ssl-protocols`.
    pub(super) client_tls_versions: Vec<tidegate_snapshot::TlsVersion>,
    /// `ssl-ciphers`: TLS 1.2 suites by IANA name.
    pub(super) client_tls12_ciphers: Vec<String>,
    /// `upstream-keepalive-connections`, `-timeout`, `-requests`.
    pub(super) upstream_connections: tidegate_snapshot::UpstreamConnections,
}

/// The `hsts*` keys, with ingress-nginx's defaults for those not set.
#[derive(Clone, Debug)]
pub(super) struct HstsKeys {
    enabled: bool,
    max_age: u64,
    include_subdomains: bool,
    preload: bool,
}

impl Default for HstsKeys {
    fn default() -> Self {
        HstsKeys { enabled: true, max_age: 31_536_000, include_subdomains: true, preload: false }
    }
}

impl Global {
    /// The `Strict-Transport-Security` value the ConfigMap asks for (`Some("")`: none); `None`
    /// when it sets no `hsts*` key, and the proxies' own setting applies.
    pub(super) fn hsts(&self) -> Option<String> {
        let keys = self.hsts.as_ref()?;
        if !keys.enabled {
            return Some(String::new());
        }
        let mut value = format!("max-age={}", keys.max_age);
        if keys.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if keys.preload {
            value.push_str("; preload");
        }
        Some(value)
    }
}

/// A ConfigMap key's value read into what the ConfigMap says; `Err` says what is wrong.
type Parser = fn(&str, &mut Reading) -> Result<(), String>;

/// What is read before the named ConfigMaps are resolved.
#[derive(Default)]
struct Reading {
    global: Global,
    /// `use-forwarded-headers` / `enable-real-ip`, `forwarded-for-header`, `proxy-real-ip-cidr`:
    /// made into [`Global::client_address`] once all are read.
    real_ip: bool,
    forwarded_for_header: Option<String>,
    real_ip_cidrs: Option<Vec<Cidr>>,
    auth: Vec<(String, String)>,
    add_headers: Option<String>,
    proxy_set_headers: Option<String>,
}

/// What tidegate does with one key.
#[derive(Clone, Copy, Debug)]
enum ConfigHandling {
    /// The annotation of the same name, as every route's default.
    RouteDefault,
    /// Read by its own parser; the default applies when the value does not read.
    Own(Parser),
    /// Read by its own parser, and protects routes: a value that does not read refuses them.
    Guards(Parser),
    /// Read into the global external auth (`global-auth-X` is `auth-X`).
    GlobalAuth,
    /// Known, and changes nothing here: tidegate does this without being told.
    Accepted,
}

/// One row of the ConfigMap table.
#[derive(Clone, Copy, Debug)]
struct ConfigKey {
    key: &'static str,
    handling: ConfigHandling,
    /// ingress-nginx's default, as its documentation gives it.
    default: &'static str,
}

const fn route(key: &'static str, default: &'static str) -> ConfigKey {
    ConfigKey { key, handling: ConfigHandling::RouteDefault, default }
}

const fn own(key: &'static str, default: &'static str, parser: Parser) -> ConfigKey {
    ConfigKey { key, handling: ConfigHandling::Own(parser), default }
}

const fn guards(key: &'static str, default: &'static str, parser: Parser) -> ConfigKey {
    ConfigKey { key, handling: ConfigHandling::Guards(parser), default }
}

const fn auth(key: &'static str, default: &'static str) -> ConfigKey {
    ConfigKey { key, handling: ConfigHandling::GlobalAuth, default }
}

/// Every ConfigMap key tidegate knows, sorted.
const KEYS: &[ConfigKey] = &[
    own("add-headers", "", |v, r| annotations::object_name(v, "ConfigMap").map(|n| r.add_headers = Some(n))),
    own("allow-snippet-annotations", "false", |v, r| {
        annotations::boolean(v).map(|b| r.global.allow_snippets = Some(b))
    }),
    // ingress-nginx rates each annotation's risk; the snippets (configuration-, server-,
    // auth-, stream- and modsecurity-snippet) are Critical. tidegate tells Critical from the
    // rest only: a level below High, which would refuse keys it cannot tell, closes every route.
    guards("annotations-risk-level", "High", |v, r| match v.trim() {
        "Critical" => {
            r.global.critical_annotations = true;
            Ok(())
        }
        "High" => {
            r.global.critical_annotations = false;
            Ok(())
        }
        "Medium" | "Low" => Err(format!(
            "{v:?}: tidegate knows which annotations are Critical (the snippets), not which are High; \
             it cannot refuse exactly those"
        )),
        _ => Err(format!("{v:?} is not Critical, High, Medium or Low")),
    }),
    guards("block-cidrs", "", |v, r| {
        let mut found = Settings::default();
        parse_as_annotation("denylist-source-range", v, &mut found)?;
        r.global.block_cidrs = found.ip.deny;
        Ok(())
    }),
    guards("block-referers", "", |v, r| header_patterns(v).map(|p| r.global.blocked.referers = p)),
    guards("block-user-agents", "", |v, r| header_patterns(v).map(|p| r.global.blocked.user_agents = p)),
    route("client-body-buffer-size", "8k"),
    own("compute-full-forwarded-for", "false", |v, r| {
        annotations::boolean(v).map(|b| r.global.client_address.full_forwarded_for = b)
    }),
    route("custom-http-errors", ""),
    own("enable-real-ip", "false", |v, r| annotations::boolean(v).map(|b| r.real_ip |= b)),
    own("forwarded-for-header", "X-Forwarded-For", |v, r| {
        let name = v.trim();
        http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
        r.forwarded_for_header = Some(name.to_ascii_lowercase());
        Ok(())
    }),
    own("global-allowed-response-headers", "", |v, r| {
        let mut names = Vec::new();
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))?;
            names.push(name.to_ascii_lowercase());
        }
        r.global.allowed_response_headers = names;
        Ok(())
    }),
    auth("global-auth-always-set-cookie", "false"),
    auth("global-auth-cache-duration", "200 202 401 5m"),
    auth("global-auth-cache-key", ""),
    auth("global-auth-method", ""),
    auth("global-auth-request-redirect", ""),
    auth("global-auth-response-headers", ""),
    auth("global-auth-signin", ""),
    // nginx configuration for the auth location, which tidegate does not run: read as
    // `auth-snippet` is, so the routes global auth protects answer 503 rather than go without.
    auth("global-auth-snippet", ""),
    auth("global-auth-signin-redirect-param", "rd"),
    auth("global-auth-url", ""),
    guards("global-rate-limit-status-code", "429", |v, r| {
        limit_status(v).map(|s| r.global.defaults.limits.shared.status = s)
    }),
    route("limit-rate", "0"),
    route("limit-rate-after", "0"),
    guards("limit-conn-status-code", "503", |v, r| {
        limit_status(v).map(|s| r.global.defaults.limits.connections_status = s)
    }),
    guards("limit-req-status-code", "503", |v, r| limit_status(v).map(|s| r.global.defaults.limits.rate_status = s)),
    route("load-balance", "round_robin"),
    route("proxy-body-size", "1m"),
    route("proxy-buffer-size", "4k"),
    route("proxy-buffering", "off"),
    route("proxy-buffers-number", "4"),
    route("proxy-connect-timeout", "5"),
    route("proxy-http-version", "1.1"),
    route("proxy-next-upstream", "error timeout"),
    route("proxy-next-upstream-timeout", "0"),
    route("proxy-next-upstream-tries", "3"),
    route("proxy-read-timeout", "60"),
    route("proxy-request-buffering", "on"),
    route("proxy-send-timeout", "60"),
    own("proxy-real-ip-cidr", "0.0.0.0/0", |v, r| {
        let mut found = Settings::default();
        parse_as_annotation("denylist-source-range", v, &mut found)?;
        r.real_ip_cidrs = Some(found.ip.deny);
        Ok(())
    }),
    own("proxy-set-headers", "", |v, r| {
        annotations::object_name(v, "ConfigMap").map(|n| r.proxy_set_headers = Some(n))
    }),
    route("ssl-redirect", "true"),
    own("use-forwarded-headers", "false", |v, r| annotations::boolean(v).map(|b| r.real_ip |= b)),
    own("use-proxy-protocol", "false", |v, r| {
        annotations::boolean(v).map(|b| r.global.client_address.proxy_protocol = b)
    }),
    route("force-ssl-redirect", "false"),
    own("http2-max-concurrent-streams", "128", |v, r| match v.trim().parse::<u32>() {
        Ok(n) if n > 0 => {
            r.global.http2_streams = Some(n);
            Ok(())
        }
        _ => Err(format!("{v:?} is not a number above 0")),
    }),
    own("upstream-keepalive-connections", "128", |v, r| {
        v.trim()
            .parse::<u32>()
            .map(|n| r.global.upstream_connections.idle_per_endpoint = Some(n))
            .map_err(|_| format!("{v:?} is not a number"))
    }),
    own("upstream-keepalive-timeout", "30", |v, r| {
        seconds(v).map(|s| r.global.upstream_connections.idle_seconds = Some(s))
    }),
    own("upstream-keepalive-requests", "", |v, r| match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => {
            r.global.upstream_connections.requests = Some(n);
            Ok(())
        }
        _ => Err(format!("{v:?} is not a number above 0")),
    }),
    own("ssl-protocols", "TLSv1.2 TLSv1.3", |v, r| {
        annotations::tls_versions(v).map(|list| r.global.client_tls_versions = list)
    }),
    // OpenSSL's names; the suites rustls has (ECDHE with AES-GCM or ChaCha20-Poly1305) are
    // kept in the list's order, the others (CBC, DHE, RSA key exchange) left out, as rustls
    // does not offer them. TLS 1.3's suites are not in this list, as with nginx.
    own(
        "ssl-ciphers",
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
        |v, r| {
            let known: Vec<String> = v
                .split([':', ',', ' '])
                .filter_map(|name| TLS12_SUITES.iter().find(|(openssl, _)| *openssl == name.trim()))
                .map(|(_, iana)| (*iana).to_owned())
                .collect();
            if known.is_empty() {
                return Err(format!(
                    "{v:?} names no TLS 1.2 cipher suite rustls offers (ECDHE with AES-GCM or CHACHA20-POLY1305)"
                ));
            }
            r.global.client_tls12_ciphers = known;
            Ok(())
        },
    ),
    own("keep-alive", "75", |v, r| seconds(v).map(|s| r.global.client_connections.keep_alive_seconds = Some(s))),
    own("keep-alive-requests", "1000", |v, r| match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => {
            r.global.client_connections.keep_alive_requests = Some(n);
            Ok(())
        }
        _ => Err(format!("{v:?} is not a number above 0")),
    }),
    own("client-header-timeout", "30", |v, r| match seconds(v) {
        Ok(s) if s > 0 => {
            r.global.client_connections.header_seconds = Some(s);
            Ok(())
        }
        Ok(_) => Err(format!("{v:?} is not a time above 0")),
        Err(e) => Err(e),
    }),
    own("client-body-timeout", "60", |v, r| match seconds(v) {
        Ok(s) if s > 0 => {
            r.global.client_connections.body_seconds = Some(s);
            Ok(())
        }
        Ok(_) => Err(format!("{v:?} is not a time above 0")),
        Err(e) => Err(e),
    }),
    own("log-format-upstream", "", |v, r| {
        tidegate_snapshot::nginx_pieces(v)?;
        let unknown: Vec<&str> = tidegate_snapshot::AccessLogFormat::variables(v)
            .into_iter()
            .filter(|name| !tidegate_snapshot::AccessLogFormat::VARIABLES.contains(name) && !name.starts_with("http_"))
            .collect();
        if !unknown.is_empty() {
            return Err(format!("${} is not a variable tidegate logs", unknown.join(", $")));
        }
        r.global.log_format = Some(v.trim_end_matches('\n').to_owned());
        Ok(())
    }),
    own("log-format-escape-json", "false", |v, r| {
        annotations::boolean(v).map(|b| {
            if b {
                r.global.log_escape = tidegate_snapshot::LogEscape::Json;
            }
        })
    }),
    own("log-format-escape-none", "false", |v, r| {
        annotations::boolean(v).map(|b| {
            if b && r.global.log_escape != tidegate_snapshot::LogEscape::Json {
                r.global.log_escape = tidegate_snapshot::LogEscape::None;
            }
        })
    }),
    // tidegate's `Server` header never names its version (`server_tokens off`).
    own("server-tokens", "false", |v, _| match annotations::boolean(v)? {
        false => Ok(()),
        true => Err("tidegate's Server header never carries its version".to_owned()),
    }),
    own("hsts", "true", |v, r| annotations::boolean(v).map(|b| r.global.hsts.get_or_insert_default().enabled = b)),
    own("hsts-include-subdomains", "true", |v, r| {
        annotations::boolean(v).map(|b| r.global.hsts.get_or_insert_default().include_subdomains = b)
    }),
    own("hsts-max-age", "31536000", |v, r| {
        let age = v.trim().parse::<u64>().map_err(|_| format!("{v:?} is not a number of seconds"))?;
        r.global.hsts.get_or_insert_default().max_age = age;
        Ok(())
    }),
    own("hsts-preload", "false", |v, r| {
        annotations::boolean(v).map(|b| r.global.hsts.get_or_insert_default().preload = b)
    }),
    route("whitelist-source-range", ""),
    // Where ingress-nginx keeps global-rate-limit's counts; tidegate adds them up in the
    // controller instead.
    ConfigKey {
        key: "global-rate-limit-memcached-connect-timeout",
        handling: ConfigHandling::Accepted,
        default: "50ms",
    },
    ConfigKey { key: "global-rate-limit-memcached-host", handling: ConfigHandling::Accepted, default: "" },
    ConfigKey {
        key: "global-rate-limit-memcached-max-idle-timeout",
        handling: ConfigHandling::Accepted,
        default: "10000",
    },
    ConfigKey { key: "global-rate-limit-memcached-pool-size", handling: ConfigHandling::Accepted, default: "50" },
    ConfigKey { key: "global-rate-limit-memcached-port", handling: ConfigHandling::Accepted, default: "11211" },
    // nginx's own tuning, which has no counterpart: the proxy's --workers flag sets this.
    ConfigKey { key: "worker-processes", handling: ConfigHandling::Accepted, default: "auto" },
];

/// OpenSSL's names of the TLS 1.2 suites rustls offers, with their IANA names.
const TLS12_SUITES: &[(&str, &str)] = &[
    ("ECDHE-ECDSA-AES128-GCM-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    ("ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    ("ECDHE-RSA-AES256-GCM-SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    ("ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
];

/// Reads `value` with the parser of annotation `name` into `settings`.
fn parse_as_annotation(name: &str, value: &str, settings: &mut Settings) -> Result<(), String> {
    let row = annotations::KEYS.iter().find(|k| k.pattern.covers(name) && !k.ours_only);
    match row.map(|k| k.handling) {
        Some(Handling::Parsed(parse) | Handling::Guards(parse)) => parse(value, settings),
        _ => Err(format!("{name} has no parser")),
    }
}

/// Whether the annotation of `name` protects routes (a value that does not read refuses them).
fn annotation_guards(name: &str) -> bool {
    annotations::KEYS
        .iter()
        .find(|k| k.pattern.covers(name) && !k.ours_only)
        .is_some_and(|k| matches!(k.handling, Handling::Guards(_)))
}

/// nginx's `limit_req_status`: 400 to 599.
fn limit_status(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(status) if (400..=599).contains(&status) => Ok(status),
        _ => Err(format!("{value:?} is not a status from 400 to 599")),
    }
}

/// A comma-separated list of header patterns: whole strings, or `~regex` / `~*regex`.
fn header_patterns(value: &str) -> Result<Vec<String>, String> {
    let mut patterns = Vec::new();
    for pattern in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(regex) = pattern.strip_prefix("~*").or_else(|| pattern.strip_prefix('~')) {
            regex::Regex::new(regex)
                .map_err(|e| format!("{pattern:?} is not a regular expression tidegate reads: {e}"))?;
        }
        patterns.push(pattern.to_owned());
    }
    Ok(patterns)
}

/// The headers of a ConfigMap (`header: value`, nginx variables allowed), sorted by name.
pub(super) fn headers(index: &Index<'_>, namespace: &str, name: &str) -> Result<Vec<SetHeader>, (Reason, String)> {
    let data = index.config_map(namespace, name)?;
    let mut headers = Vec::new();
    for (header, value) in data {
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err((Reason::Invalid, format!("ConfigMap {namespace}/{name}: {header:?} is not a header name")));
        }
        let value = value
            .parse()
            .map_err(|why| (Reason::Invalid, format!("ConfigMap {namespace}/{name} key {header:?}: {why}")))?;
        headers.push(SetHeader { name: header.to_ascii_lowercase(), value });
    }
    Ok(headers)
}

impl Global {
    /// Reads the global ConfigMap (when `--configmap` names one), recording its problems in
    /// the returned status. Without one, the defaults and the flags apply.
    pub(super) fn read(inputs: &Inputs, index: &Index<'_>) -> (Global, Option<ObjectStatus>) {
        let flags = Global { auth: inputs.options.global_auth.clone(), ..Global::default() };
        let Some((namespace, name)) = &inputs.options.configmap else {
            return (flags, None);
        };
        let mut status = ObjectStatus::new(ObjectRef::namespaced("ConfigMap", namespace, name));
        let data = match index.config_map(namespace, name) {
            Ok(data) => data,
            Err((reason, message)) => {
                status.warning(reason, "metadata.name", format!("{message}; ingress-nginx's defaults apply"));
                return (flags, Some(status));
            }
        };
        let mut reading = Reading { global: flags, ..Reading::default() };
        for (key, value) in data {
            let field = format!("data[{key:?}]");
            let Some(row) = KEYS.iter().find(|k| k.key == key) else {
                status.warning(Reason::Unsupported, field, "ConfigMap key tidegate does not know; ignored");
                continue;
            };
            let (result, protects) = match row.handling {
                ConfigHandling::RouteDefault => {
                    (parse_as_annotation(key, value, &mut reading.global.defaults), annotation_guards(key))
                }
                ConfigHandling::Own(parse) => (parse(value, &mut reading), false),
                ConfigHandling::Guards(parse) => (parse(value, &mut reading), true),
                ConfigHandling::GlobalAuth => {
                    let name = key.trim_start_matches("global-");
                    reading.auth.push((name.to_owned(), value.clone()));
                    (Ok(()), false)
                }
                ConfigHandling::Accepted => (Ok(()), false),
            };
            if let Err(why) = result {
                if protects {
                    status.error(Reason::Invalid, field, format!("{why}; every route answers 503"));
                    reading
                        .global
                        .refusal
                        .get_or_insert_with(|| format!("ConfigMap {namespace}/{name} sets {key}, which does not read"));
                } else {
                    status.warning(Reason::Invalid, field, format!("{why}; the default applies"));
                }
            }
        }
        let mut global = reading.resolve(namespace, name, index, &mut status);
        global.defaults.written.clear();
        global.defaults.unhonoured.clear();
        (global, Some(status))
    }
}

impl Reading {
    /// Resolves what names other objects, and global auth.
    fn resolve(mut self, namespace: &str, name: &str, index: &Index<'_>, status: &mut ObjectStatus) -> Global {
        if !self.auth.is_empty() {
            let pairs: Vec<(&str, &str)> = self.auth.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let has_url = pairs.iter().any(|(k, _)| *k == "auth-url");
            match annotations::global_auth(&pairs) {
                Ok(auth) if has_url => self.global.auth = auth,
                Ok(_) => status.warning(
                    Reason::Invalid,
                    "data[\"global-auth-url\"]",
                    "the global-auth-* keys need global-auth-url; ignored",
                ),
                Err(why) => {
                    let key = why.split(':').next().unwrap_or_default().trim_start_matches("--").to_owned();
                    status.error(
                        Reason::Invalid,
                        format!("data[{key:?}]"),
                        format!("{why}; the routes global auth protects answer 503"),
                    );
                    self.global.auth_refusal =
                        Some(format!("ConfigMap {namespace}/{name} sets {key}, which does not read"));
                }
            }
        }
        let mut named = |value: &Option<String>, key: &str| -> Vec<SetHeader> {
            let Some(value) = value else { return Vec::new() };
            let (ns, n) = value.split_once('/').unwrap_or((namespace, value));
            headers(index, ns, n).unwrap_or_else(|(reason, message)| {
                status.warning(reason, format!("data[{key:?}]"), format!("{message}; no headers are set"));
                Vec::new()
            })
        };
        if self.real_ip {
            let address = &mut self.global.client_address;
            address.header = Some(self.forwarded_for_header.clone().unwrap_or_else(|| "x-forwarded-for".into()));
            address.trusted = self.real_ip_cidrs.clone().unwrap_or_else(|| vec![Cidr::ANY_V4]);
        }
        self.global.response_headers = named(&self.add_headers, "add-headers");
        self.global.upstream_headers = named(&self.proxy_set_headers, "proxy-set-headers");
        self.global
    }
}

/// The Markdown table of the ConfigMap keys tidegate reads, sorted.
pub fn configmap_table() -> String {
    let mut rows: Vec<String> = KEYS
        .iter()
        .map(|k| {
            let what = match k.handling {
                ConfigHandling::RouteDefault => "every route's default for the annotation of that name",
                ConfigHandling::Own(_) => "honoured",
                ConfigHandling::Guards(_) => "honoured; a value that does not read answers 503",
                ConfigHandling::GlobalAuth => "global external auth (as the `auth-*` annotation of that name)",
                ConfigHandling::Accepted => "accepted, no effect: tidegate does this its own way (see above)",
            };
            let default = if k.default.is_empty() { String::new() } else { format!("`{}`", k.default) };
            format!("| `{}` | {what} | {default} |", k.key)
        })
        .collect();
    rows.sort();
    format!("| key | tidegate | default |\n|---|---|---|\n{}\n", rows.join("\n"))
}

/// nginx time in whole seconds: `75`, `75s`, `2m`, `1h`.
fn seconds(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let (digits, scale) = match v.char_indices().last() {
        Some((i, 's')) => (&v[..i], 1),
        Some((i, 'm')) => (&v[..i], 60),
        Some((i, 'h')) => (&v[..i], 3600),
        _ => (v, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{value:?} is not a time in seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{into_inputs, parse_str};
    use crate::objects::Options;
    use crate::status::Severity;

    fn read(data: &str, options: Options) -> (Global, ObjectStatus) {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: sys}}\ndata:\n{data}\n\
             ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: extra, namespace: sys}}\ndata:\n  X-Frame-Options: DENY\n  X-Host: $host\n"
        );
        let (objects, errors) = parse_str(&yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let options = Options { configmap: Some(("sys".into(), "settings".into())), ..options };
        let inputs = into_inputs(objects, options);
        let index = Index::new(&inputs);
        let (global, status) = Global::read(&inputs, &index);
        (global, status.expect("a status for the ConfigMap"))
    }

    #[test]
    fn keys_are_sorted_unique_and_route_defaults_have_parsers() {
        let mut names: Vec<&str> = KEYS.iter().map(|k| k.key).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KEYS.len(), "no repeats");
        for key in KEYS.iter().filter(|k| matches!(k.handling, ConfigHandling::RouteDefault)) {
            let mut settings = Settings::default();
            assert!(
                parse_as_annotation(key.key, key.default, &mut settings).is_ok() || key.default.is_empty(),
                "{}: the annotation's parser reads the default",
                key.key
            );
        }
    }

    #[test]
    fn route_defaults_and_own_keys() {
        let (global, status) = read(
            "  proxy-body-size: 8m\n  proxy-read-timeout: \"120\"\n  limit-req-status-code: \"429\"\n  \
             limit-conn-status-code: \"430\"\n  block-cidrs: 10.0.0.0/8\n  block-user-agents: \"~*bot, curl/8\"\n  \
             add-headers: extra\n  proxy-set-headers: sys/extra\n  allow-snippet-annotations: \"true\"",
            Options::default(),
        );
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        assert_eq!(global.defaults.max_body_bytes, Some(8 << 20));
        assert_eq!(global.defaults.timeouts.read_ms, 120_000);
        assert_eq!((global.defaults.limits.rate_status, global.defaults.limits.connections_status), (429, 430));
        assert_eq!(global.block_cidrs.len(), 1);
        assert_eq!(global.blocked.user_agents, ["~*bot", "curl/8"]);
        let names: Vec<&str> = global.response_headers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["x-frame-options", "x-host"]);
        assert_eq!(global.upstream_headers.len(), 2);
        assert_eq!(global.allow_snippets, Some(true));
        assert!(global.refusal.is_none() && global.auth_refusal.is_none());
    }

    #[test]
    fn unknown_keys_warn_bad_values_keep_defaults_or_refuse() {
        let (global, status) =
            read("  no-such-key: \"1\"\n  proxy-body-size: huge\n  limit-req-status-code: \"200\"", Options::default());
        let found: Vec<(&str, Severity)> = status.problems.iter().map(|p| (p.field.as_str(), p.severity)).collect();
        assert_eq!(
            found,
            [
                ("data[\"limit-req-status-code\"]", Severity::Error),
                ("data[\"no-such-key\"]", Severity::Warning),
                ("data[\"proxy-body-size\"]", Severity::Warning),
            ]
        );
        assert_eq!(global.defaults.max_body_bytes, Some(1 << 20), "the default applies");
        assert!(global.refusal.as_deref().is_some_and(|r| r.contains("limit-req-status-code")), "every route refused");

        let (global, status) = read("  block-user-agents: \"~(?<=a)b\"", Options::default());
        assert!(global.refusal.is_some(), "a pattern tidegate cannot run refuses: {:?}", status.problems);
    }

    #[test]
    fn global_auth_keys_take_the_place_of_the_flags() {
        let flags = annotations::global_auth(&[("auth-url", "http://flag.internal/")]).expect("flags");
        let options = Options { global_auth: flags, ..Options::default() };
        let (global, _) = read("  proxy-body-size: 1m", options.clone());
        assert_eq!(global.auth.expect("flags apply").url.as_str(), "http://flag.internal/");
        let (global, status) = read(
            "  global-auth-url: http://cm.internal/check\n  global-auth-response-headers: X-User\n  \
             global-auth-cache-key: $http_authorization",
            options.clone(),
        );
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        let auth = global.auth.expect("global auth");
        assert_eq!(
            (auth.url.as_str(), auth.response_headers.as_slice()),
            ("http://cm.internal/check", &["x-user".to_owned()][..])
        );
        assert!(auth.cache.is_some());
        let (global, status) = read("  global-auth-url: ftp://nope", options);
        assert!(global.auth_refusal.is_some(), "routes global auth protects answer 503");
        assert_eq!(status.problems[0].field, "data[\"global-auth-url\"]");
    }

    #[test]
    fn client_address_keys() {
        let (global, status) = read("  use-proxy-protocol: \"true\"", Options::default());
        assert!(status.problems.is_empty());
        assert!(global.client_address.proxy_protocol && global.client_address.header.is_none());
        let (global, status) = read(
            "  use-forwarded-headers: \"true\"\n  forwarded-for-header: X-Real-Client\n  \
             proxy-real-ip-cidr: 10.0.0.0/8, 192.168.0.0/16\n  compute-full-forwarded-for: \"true\"",
            Options::default(),
        );
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        let address = &global.client_address;
        assert_eq!(address.header.as_deref(), Some("x-real-client"));
        assert_eq!((address.trusted.len(), address.full_forwarded_for), (2, true));
        let (global, _) = read("  enable-real-ip: \"true\"", Options::default());
        assert_eq!(global.client_address.header.as_deref(), Some("x-forwarded-for"), "ingress-nginx's default");
        assert_eq!(global.client_address.trusted, [Cidr::ANY_V4], "proxy-real-ip-cidr's default");
        let (global, _) = read("  forwarded-for-header: X-Real-Client", Options::default());
        assert!(global.client_address.header.is_none(), "believed only with use-forwarded-headers");
    }

    #[test]
    fn hsts_keys() {
        let (global, _) = read("  proxy-body-size: 1m", Options::default());
        assert_eq!(global.hsts(), None, "no hsts key: the proxies' own setting");
        let (global, status) = read("  hsts-max-age: \"600\"", Options::default());
        assert!(status.problems.is_empty());
        assert_eq!(global.hsts().as_deref(), Some("max-age=600; includeSubDomains"), "ingress-nginx's defaults");
        let (global, _) = read("  hsts: \"false\"", Options::default());
        assert_eq!(global.hsts().as_deref(), Some(""), "none");
        let (global, _) = read("  hsts-include-subdomains: \"false\"\n  hsts-preload: \"true\"", Options::default());
        assert_eq!(global.hsts().as_deref(), Some("max-age=31536000; preload"));
    }

    #[test]
    fn a_global_auth_snippet_closes_the_routes_global_auth_protects() {
        let (global, status) = read(
            "  global-auth-url: http://auth.internal/\n  global-auth-snippet: \"proxy_set_header X 1;\"",
            Options::default(),
        );
        assert!(global.auth_refusal.is_some(), "{:?}", status.problems);
        assert!(global.refusal.is_none(), "routes without global auth keep serving");
        assert_eq!(status.problems[0].field, "data[\"global-auth-snippet\"]");
    }
}
