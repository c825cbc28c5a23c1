//! Ingress annotations tidegate understands, under its own prefix and under ingress-nginx's so
//! that existing Ingresses keep their meaning.
//!
//! One table, [`KEYS`], says what happens to each key under either prefix:
//! - **parsed**: read into the Ingress's [`Settings`]; a value that does not parse is a field
//!   error naming the key, and the key keeps its default.
//! - **restricts**: the key limits who may reach a route, or how much, and tidegate does not
//!   honour it yet. Serving the route without it would open what it guards, so the Ingress's
//!   routes answer 503 and the Ingress gets an `UnsupportedAnnotation` error naming the key.
//!
//! Any other key under either prefix is ignored with an `UnsupportedAnnotation` warning (and a
//! Warning Event): it changes how a route behaves, never who may reach it.

use std::collections::BTreeMap;

use tidegate_snapshot::{Cidr, IpRules, Phase, Template, Timeouts, TlsVersion, UpstreamProtocol};

use crate::status::{ObjectStatus, Reason};
use crate::validate::parse_size;

pub(crate) const OURS: &str = "tidegate.dev/";
pub(crate) const NGINX: &str = "nginx.ingress.kubernetes.io/";

/// The settings an Ingress's annotations select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Settings {
    /// Redirect plain HTTP to HTTPS on hosts with TLS (`ssl-redirect`, default true).
    pub(super) ssl_redirect: bool,
    /// Redirect plain HTTP to HTTPS even on hosts without TLS of their own
    /// (`force-ssl-redirect`, default false): TLS ends in front of the proxy, or the default
    /// certificate serves the host.
    pub(super) force_ssl_redirect: bool,
    /// `proxy-connect-timeout`, `proxy-read-timeout` and `proxy-send-timeout`, in seconds.
    pub(super) timeouts: Timeouts,
    /// `tidegate.dev/lua-route`: the LuaRoute whose handlers run on this Ingress's paths.
    pub(super) lua_route: Option<String>,
    /// `tidegate.dev/<phase>-by-lua` inline handlers: (phase, annotation key, source).
    pub(super) snippets: Vec<(Phase, String, String)>,
    /// The annotations that held nginx configuration (`configuration-snippet`,
    /// `server-snippet`): they need `allow-snippet-annotations`.
    pub(super) snippet_keys: Vec<String>,
    /// Headers their `more_set_headers`, `add_header` and `proxy_set_header` set.
    pub(super) snippet_response_headers: Vec<tidegate_snapshot::SetHeader>,
    pub(super) snippet_upstream_headers: Vec<tidegate_snapshot::SetHeader>,
    /// A snippet's `return 3xx URL`.
    pub(super) snippet_redirect: Option<tidegate_snapshot::Redirect>,
    /// A snippet's `allow` and `deny` lines, in order.
    pub(super) snippet_ip_rules: Vec<tidegate_snapshot::IpRule>,
    /// `ssl-passthrough`.
    pub(super) ssl_passthrough: bool,
    /// `whitelist-source-range` / `allowlist-source-range` and `denylist-source-range`.
    pub(super) ip: IpRules,
    /// `proxy-body-size`, in bytes: 1 MiB (ingress-nginx's default) unless set; `0` (`None`)
    /// for no limit.
    pub(super) max_body_bytes: Option<u64>,
    /// `limit-rps`, `limit-rpm`, `limit-burst-multiplier`, `limit-connections`, and the clients
    /// exempt from them.
    pub(super) limits: LimitKeys,
    /// `enable-cors` and the `cors-*` keys.
    pub(super) cors: CorsKeys,
    /// `auth-url` and the keys of external auth.
    pub(super) external_auth: ExternalAuthKeys,
    /// `satisfy: any`.
    pub(super) satisfy_any: bool,
    /// The `auth-tls-*` keys.
    pub(super) client_cert: ClientCertKeys,
    /// `enable-global-auth` (true by default): the controller's global external auth applies
    /// to this Ingress when it has no `auth-url` of its own.
    pub(super) global_auth: bool,
    /// `upstream-vhost` and `x-forwarded-prefix`.
    pub(super) upstream_host: Option<String>,
    /// `connection-proxy-header`: the `Connection` header upstream requests carry.
    pub(super) connection_header: Option<String>,
    pub(super) forwarded_prefix: Option<String>,
    /// `auth-type`, `auth-secret`, `auth-secret-type` and `auth-realm`: resolved against the
    /// Secret by [`super::ingress`].
    pub(super) basic_auth: BasicAuthKeys,
    /// `backend-protocol` and the `proxy-ssl-*` keys: resolved with the Service port's
    /// `appProtocol` and the Secret by [`super::upstream`].
    pub(super) upstream: UpstreamKeys,
    /// `service-upstream`: the Service's cluster IP instead of its endpoints.
    pub(super) service_upstream: bool,
    /// `app-root`.
    pub(super) app_root: Option<String>,
    /// `mirror-target`, `mirror-host`, `mirror-request-body`.
    pub(super) mirror_target: Option<Template>,
    pub(super) mirror_host: Option<String>,
    pub(super) mirror_body: bool,
    /// `enable-access-log` (true by default).
    pub(super) access_log: bool,
    /// `relative-redirects`.
    pub(super) relative_redirects: bool,
    /// `permanent-redirect` and `temporal-redirect`, with their codes.
    pub(super) permanent_redirect: Option<Template>,
    pub(super) permanent_code: u16,
    pub(super) temporal_redirect: Option<Template>,
    pub(super) temporal_code: u16,
    /// `canary: "true"` and the `canary-*` keys.
    pub(super) canary: CanaryKeys,
    /// `rewrite-target`: the URI the upstream gets, with the path expression's captures.
    pub(super) rewrite_target: Option<String>,
    /// `custom-http-errors`, `default-backend` and `disable-proxy-intercept-errors`.
    pub(super) error_codes: Vec<u16>,
    pub(super) default_backend: Option<String>,
    pub(super) only_proxy_errors: bool,
    /// `server-alias`: more hosts the Ingress's rules serve.
    pub(super) aliases: Vec<String>,
    /// `from-to-www-redirect`: `www.` of each rule host (or the host without it) redirects.
    pub(super) www_redirect: bool,
    /// `proxy-redirect-from` and `proxy-redirect-to`.
    pub(super) redirect_from: Option<String>,
    pub(super) redirect_to: Option<String>,
    /// `custom-headers`: the ConfigMap (`name` or `namespace/name`) of headers set on every
    /// response, resolved by [`super::configmap`].
    pub(super) custom_headers: Option<String>,
    /// The keys as written (with their prefix), by name: problems found later name them.
    pub(super) written: BTreeMap<String, String>,
    /// Keys that restrict access and that tidegate does not honour (or whose value it cannot
    /// read): while any is set, the Ingress's routes answer 503.
    pub(super) unhonoured: Vec<String>,
}

impl Settings {
    /// The field of annotation `name` as the Ingress wrote it (ingress-nginx's prefix when it
    /// did not write it).
    pub(super) fn field(&self, name: &str) -> String {
        let key = self.written.get(name).cloned().unwrap_or_else(|| format!("{NGINX}{name}"));
        format!("metadata.annotations[{key:?}]")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ssl_redirect: true,
            force_ssl_redirect: false,
            timeouts: Timeouts::default(),
            lua_route: None,
            snippets: Vec::new(),
            snippet_keys: Vec::new(),
            snippet_response_headers: Vec::new(),
            snippet_upstream_headers: Vec::new(),
            snippet_redirect: None,
            snippet_ip_rules: Vec::new(),
            ssl_passthrough: false,
            ip: IpRules::default(),
            max_body_bytes: Some(DEFAULT_MAX_BODY),
            basic_auth: BasicAuthKeys::default(),
            cors: CorsKeys::default(),
            limits: LimitKeys::default(),
            external_auth: ExternalAuthKeys::default(),
            satisfy_any: false,
            client_cert: ClientCertKeys::default(),
            global_auth: true,
            upstream_host: None,
            connection_header: None,
            forwarded_prefix: None,
            upstream: UpstreamKeys::default(),
            canary: CanaryKeys::default(),
            custom_headers: None,
            rewrite_target: None,
            aliases: Vec::new(),
            error_codes: Vec::new(),
            default_backend: None,
            only_proxy_errors: false,
            www_redirect: false,
            redirect_from: None,
            redirect_to: None,
            service_upstream: false,
            app_root: None,
            mirror_target: None,
            mirror_host: None,
            mirror_body: true,
            access_log: true,
            relative_redirects: false,
            permanent_redirect: None,
            permanent_code: 301,
            temporal_redirect: None,
            temporal_code: 302,
            written: BTreeMap::new(),
            unhonoured: Vec::new(),
        }
    }
}

/// A canary Ingress's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CanaryKeys {
    pub(super) enabled: bool,
    pub(super) header: Option<String>,
    pub(super) header_value: Option<String>,
    pub(super) header_pattern: Option<String>,
    pub(super) cookie: Option<String>,
    pub(super) weight: u32,
    pub(super) weight_total: u32,
    /// `affinity-canary-behavior: legacy`.
    pub(super) legacy_affinity: bool,
}

impl Default for CanaryKeys {
    fn default() -> Self {
        CanaryKeys {
            enabled: false,
            header: None,
            header_value: None,
            header_pattern: None,
            cookie: None,
            weight: 0,
            weight_total: 100,
            legacy_affinity: false,
        }
    }
}

/// How to reach the backend: `backend-protocol` and the `proxy-ssl-*` keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct UpstreamKeys {
    /// `None` when not set: the Service port's `appProtocol` decides, else HTTP/1.1.
    pub(super) protocol: Option<UpstreamProtocol>,
    /// `proxy-ssl-secret`: `namespace/name` (or `name`) of a Secret with `ca.crt` and/or
    /// `tls.crt` and `tls.key`.
    pub(super) secret: Option<String>,
    pub(super) verify: bool,
    pub(super) name: Option<String>,
    pub(super) sni: bool,
    pub(super) depth: u8,
    pub(super) versions: Vec<TlsVersion>,
    pub(super) ciphers: Vec<String>,
    /// `load-balance: ewma`.
    pub(super) ewma: bool,
    /// `upstream-hash-by`, `upstream-hash-by-subset` and `-subset-size`.
    pub(super) hash_by: Option<Template>,
    pub(super) subset: bool,
    pub(super) subset_size: u32,
    /// `proxy-next-upstream`, `-tries` and `-timeout`.
    pub(super) retry: tidegate_snapshot::Retry,
    /// `affinity: cookie` turns the `session-cookie-*` keys on.
    pub(super) affinity: bool,
    pub(super) session: tidegate_snapshot::Affinity,
}

impl UpstreamKeys {
    /// How endpoints are chosen: a hash key wins over `load-balance`, as in ingress-nginx.
    pub(super) fn balance(&self) -> tidegate_snapshot::Balance {
        use tidegate_snapshot::Balance;
        match &self.hash_by {
            Some(key) => Balance::Hash { key: key.clone(), subset_size: self.subset.then_some(self.subset_size) },
            None if self.ewma => Balance::Ewma,
            None => Balance::RoundRobin,
        }
    }
}

impl Default for UpstreamKeys {
    fn default() -> Self {
        UpstreamKeys {
            protocol: None,
            secret: None,
            verify: false,
            name: None,
            sni: false,
            depth: 1,
            versions: Vec::new(),
            ciphers: Vec::new(),
            ewma: false,
            hash_by: None,
            subset: false,
            subset_size: 3,
            retry: tidegate_snapshot::Retry::default(),
            affinity: false,
            session: tidegate_snapshot::Affinity::default(),
        }
    }
}

/// ingress-nginx's `proxy-body-size` when an Ingress does not set it: 1m.
pub(crate) const DEFAULT_MAX_BODY: u64 = 1 << 20;

/// The client-certificate keys; `auth-tls-secret` turns them on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ClientCertKeys {
    /// `namespace/name` or `name` of a Secret with `ca.crt`.
    pub(super) secret: Option<String>,
    /// `None` for `off`.
    pub(super) verify: Option<tidegate_snapshot::ClientVerify>,
    pub(super) depth: u8,
    pub(super) error_page: Option<String>,
    pub(super) pass_to_upstream: bool,
    pub(super) match_subject: Option<String>,
}

impl Default for ClientCertKeys {
    fn default() -> Self {
        ClientCertKeys {
            secret: None,
            verify: Some(tidegate_snapshot::ClientVerify::On),
            depth: 1,
            error_page: None,
            pass_to_upstream: false,
            match_subject: None,
        }
    }
}

/// The external-auth keys; `auth-url` turns them on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExternalAuthKeys {
    pub(super) url: Option<Template>,
    pub(super) method: Option<String>,
    pub(super) signin: Option<Template>,
    pub(super) signin_redirect_param: String,
    pub(super) response_headers: Vec<String>,
    pub(super) request_redirect: Option<String>,
    pub(super) always_set_cookie: bool,
    /// `auth-proxy-set-headers`: the ConfigMap of headers for the auth request, resolved with
    /// the Ingress's namespace by [`super::policies`].
    pub(super) proxy_set_headers: Option<String>,
    /// `auth-cache-key` and `auth-cache-duration`.
    pub(super) cache_key: Option<Template>,
    pub(super) cache_durations: Vec<tidegate_snapshot::CacheDuration>,
}

impl Default for ExternalAuthKeys {
    fn default() -> Self {
        ExternalAuthKeys {
            url: None,
            method: None,
            signin: None,
            signin_redirect_param: "rd".into(),
            response_headers: Vec::new(),
            request_redirect: None,
            always_set_cookie: false,
            proxy_set_headers: None,
            cache_key: None,
            cache_durations: vec![tidegate_snapshot::CacheDuration { statuses: vec![200, 202, 401], seconds: 300 }],
        }
    }
}

impl ExternalAuthKeys {
    pub(super) fn typed(&self) -> Option<tidegate_snapshot::ExternalAuth> {
        Some(tidegate_snapshot::ExternalAuth {
            url: self.url.clone()?,
            method: self.method.clone(),
            signin: self.signin.clone(),
            signin_redirect_param: self.signin_redirect_param.clone(),
            response_headers: self.response_headers.clone(),
            request_redirect: self.request_redirect.clone(),
            always_set_cookie: self.always_set_cookie,
            set_headers: Vec::new(),
            cache: self
                .cache_key
                .clone()
                .map(|key| tidegate_snapshot::AuthCache { key, durations: self.cache_durations.clone() }),
        })
    }
}

/// The controller's global external auth (`--global-auth-url` and the other `--global-auth-*`
/// flags, ingress-nginx's `global-auth-*` ConfigMap keys), read by the same parsers as the
/// annotations of the same names. `Err` names the first flag that does not read.
pub fn global_auth(settings: &[(&str, &str)]) -> Result<Option<tidegate_snapshot::ExternalAuth>, String> {
    let annotations: BTreeMap<String, String> =
        settings.iter().map(|(name, value)| (format!("{NGINX}{name}"), (*value).to_owned())).collect();
    let mut status = ObjectStatus::new(crate::objects::ObjectRef::cluster("Flag", "--global-auth-url"));
    let read = read(Some(&annotations), &Settings::default(), &mut status);
    match status.problems.first() {
        Some(problem) => Err(format!(
            "--global-{}: {}",
            problem.field.trim_start_matches(&format!("metadata.annotations[\"{NGINX}")).trim_end_matches("\"]"),
            problem.message
        )),
        None => Ok(read.external_auth.typed()),
    }
}

/// An auth URL: `http://` or `https://`, with nginx variables.
fn auth_url(value: &str) -> Result<Template, String> {
    let value = value.trim();
    if !value.starts_with("http://") && !value.starts_with("https://") {
        return Err(format!("{value:?} is not an http:// or https:// URL"));
    }
    value.parse()
}

/// The limit keys as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LimitKeys {
    pub(super) rps: Option<u32>,
    pub(super) rpm: Option<u32>,
    /// `limit-burst-multiplier`: the burst is the rate times this (5 by default).
    pub(super) burst_multiplier: u32,
    pub(super) connections: Option<u32>,
    /// `limit-whitelist` / `limit-allowlist`.
    pub(super) exempt: Vec<Cidr>,
    /// `limit-rate` and `limit-rate-after`, in kilobytes (per second): 0 for no pace.
    pub(super) rate_kb: u64,
    pub(super) rate_after_kb: u64,
    /// The statuses of refused requests (the ConfigMap's `limit-req-status-code` and
    /// `limit-conn-status-code`; 503 by default).
    pub(super) rate_status: u16,
    pub(super) connections_status: u16,
    /// `tidegate.dev/limit-key`: what the limits count by instead of the client address.
    pub(super) key: Option<Template>,
    /// `global-rate-limit` and its keys: a rate shared by all proxies.
    pub(super) shared: SharedLimitKeys,
}

/// The `global-rate-limit*` keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SharedLimitKeys {
    pub(super) requests: Option<u32>,
    /// `global-rate-limit-window`, in seconds.
    pub(super) window_seconds: Option<u32>,
    pub(super) key: Template,
    pub(super) ignored: Vec<Cidr>,
    /// The global ConfigMap's `global-rate-limit-status-code` (429 by default).
    pub(super) status: u16,
}

impl Default for SharedLimitKeys {
    fn default() -> Self {
        SharedLimitKeys {
            requests: None,
            window_seconds: None,
            key: "$remote_addr".parse().unwrap_or_else(|_| unreachable!("a known variable")),
            ignored: Vec::new(),
            status: 429,
        }
    }
}

impl SharedLimitKeys {
    /// The typed limit for the object `id`; `Err` names the key missing for the other.
    pub(super) fn typed(&self, id: String) -> Result<Option<tidegate_snapshot::SharedLimit>, &'static str> {
        match (self.requests, self.window_seconds) {
            (None, None) => Ok(None),
            (Some(requests), Some(window_seconds)) => Ok(Some(tidegate_snapshot::SharedLimit {
                id,
                requests,
                window_seconds,
                key: self.key.clone(),
                ignored: self.ignored.clone(),
                status: self.status,
            })),
            (Some(_), None) => Err("global-rate-limit needs global-rate-limit-window"),
            (None, Some(_)) => Err("global-rate-limit-window needs global-rate-limit"),
        }
    }
}

impl Default for LimitKeys {
    fn default() -> Self {
        LimitKeys {
            rps: None,
            rpm: None,
            burst_multiplier: 5,
            connections: None,
            exempt: Vec::new(),
            rate_kb: 0,
            rate_after_kb: 0,
            rate_status: 503,
            connections_status: 503,
            key: None,
            shared: SharedLimitKeys::default(),
        }
    }
}

impl LimitKeys {
    /// The typed limits; `None` when no limit is set.
    pub(super) fn typed(&self) -> Option<tidegate_snapshot::Limits> {
        let rate = |requests: u32, per_seconds| tidegate_snapshot::RateLimit {
            requests,
            per_seconds,
            burst: requests.saturating_mul(self.burst_multiplier),
        };
        let rates: Vec<_> =
            [self.rps.map(|r| rate(r, 1)), self.rpm.map(|r| rate(r, 60))].into_iter().flatten().collect();
        if rates.is_empty() && self.connections.is_none() {
            return None;
        }
        Some(tidegate_snapshot::Limits {
            rates,
            concurrent: self.connections,
            exempt: self.exempt.clone(),
            status: self.rate_status,
            concurrent_status: self.connections_status,
            key: self.key.clone(),
        })
    }
}

impl LimitKeys {
    /// The response pace, when `limit-rate` is set.
    pub(super) fn response_rate(&self) -> Option<tidegate_snapshot::ResponseRate> {
        (self.rate_kb > 0).then(|| tidegate_snapshot::ResponseRate {
            bytes_per_second: self.rate_kb.saturating_mul(1024),
            after_bytes: self.rate_after_kb.saturating_mul(1024),
        })
    }
}

/// A whole number of kilobytes (0 allowed).
fn kilobytes(value: &str) -> Result<u64, String> {
    value.trim().parse::<u64>().map_err(|_| format!("{value:?} is not a whole number of kilobytes"))
}

/// A positive whole number.
fn count(value: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{value:?} is not a whole number above 0")),
    }
}

/// The CORS keys, with ingress-nginx's defaults; `enable-cors: "true"` turns them on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CorsKeys {
    pub(super) enabled: bool,
    pub(super) cors: tidegate_snapshot::Cors,
}

impl Default for CorsKeys {
    fn default() -> Self {
        CorsKeys {
            enabled: false,
            cors: tidegate_snapshot::Cors {
                allow_origins: Vec::new(),
                allow_methods: "GET, PUT, POST, DELETE, PATCH, OPTIONS".into(),
                allow_headers: "DNT,X-CustomHeader,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Authorization".into(),
                expose_headers: String::new(),
                allow_credentials: true,
                max_age: 1_728_000,
            },
        }
    }
}

/// The basic-auth keys as written; `auth-type: basic` turns them on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct BasicAuthKeys {
    /// `auth-type: basic` was set (`digest` is refused when read).
    pub(super) enabled: bool,
    /// `auth-secret`: `name` or `namespace/name`.
    pub(super) secret: Option<String>,
    /// `auth-secret-type`: the Secret holds an htpasswd file under key `auth` (false, the
    /// default), or one key per user (`auth-map`).
    pub(super) map: bool,
    /// `auth-realm`.
    pub(super) realm: String,
}

/// Which keys an entry of [`KEYS`] covers (the name after the prefix).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pattern {
    Exact(&'static str),
    /// Every key starting with this: `auth-`.
    Prefix(&'static str),
    /// Every key ending with this: `-source-range`.
    Suffix(&'static str),
}

impl Pattern {
    pub(crate) fn covers(self, name: &str) -> bool {
        match self {
            Pattern::Exact(key) => name == key,
            Pattern::Prefix(prefix) => name.starts_with(prefix),
            Pattern::Suffix(suffix) => name.ends_with(suffix),
        }
    }
}

/// Reads a value into the settings; `Err` says what is wrong with it.
type Parser = fn(&str, &mut Settings) -> Result<(), String>;

/// What tidegate does with the keys of one entry of [`KEYS`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Handling {
    /// Honoured: read by this parser; the key's default applies when the value does not parse.
    Parsed(Parser),
    /// Honoured, and restricts access: a value that does not parse refuses the Ingress's routes
    /// (503), as its default would serve them open.
    Guards(Parser),
    /// Restricts who may reach a route, or how much, and is not honoured yet: the routes of an
    /// Ingress that sets it answer 503.
    Restricts,
}

/// One row of the annotation table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Key {
    pub(crate) pattern: Pattern,
    pub(crate) handling: Handling,
    /// What applies when the key is absent, as ingress-nginx documents it (empty: nothing).
    pub(crate) default: &'static str,
    /// Only under `tidegate.dev/`.
    pub(crate) ours_only: bool,
}

const fn parsed(name: &'static str, default: &'static str, parser: Parser) -> Key {
    Key { pattern: Pattern::Exact(name), handling: Handling::Parsed(parser), default, ours_only: false }
}

const fn guards(name: &'static str, default: &'static str, parser: Parser) -> Key {
    Key { pattern: Pattern::Exact(name), handling: Handling::Guards(parser), default, ours_only: false }
}

const fn restricts(pattern: Pattern) -> Key {
    Key { pattern, handling: Handling::Restricts, default: "", ours_only: false }
}

/// Every key tidegate knows, under either prefix; the first row that covers a key decides.
pub(crate) const KEYS: &[Key] = &[
    parsed("ssl-redirect", "true", |v, s| boolean(v).map(|b| s.ssl_redirect = b)),
    parsed("force-ssl-redirect", "false", |v, s| boolean(v).map(|b| s.force_ssl_redirect = b)),
    parsed("ssl-passthrough", "false", |v, s| boolean(v).map(|b| s.ssl_passthrough = b)),
    parsed("proxy-connect-timeout", "5", |v, s| seconds(v).map(|ms| s.timeouts.connect_ms = ms)),
    parsed("proxy-read-timeout", "60", |v, s| seconds(v).map(|ms| s.timeouts.read_ms = ms)),
    parsed("proxy-send-timeout", "60", |v, s| seconds(v).map(|ms| s.timeouts.send_ms = ms)),
    Key {
        pattern: Pattern::Exact("lua-route"),
        handling: Handling::Parsed(|v, s| {
            s.lua_route = Some(v.to_owned());
            Ok(())
        }),
        default: "",
        ours_only: true,
    },
    parsed("proxy-body-size", "1m", |v, s| parse_size(v).map(|n| s.max_body_bytes = (n > 0).then_some(n))),
    // tidegate streams request bodies to the upstream as they arrive and holds no body buffer
    // to size; these are read, so that a typo is reported, and change nothing.
    parsed("client-body-buffer-size", "", |v, _| parse_size(v).map(drop)),
    parsed("proxy-request-buffering", "on", |v, _| match v.trim() {
        "on" | "off" => Ok(()),
        other => Err(format!("{other:?} is not on or off")),
    }),
    // tidegate streams responses to the client as they arrive and keeps no buffers or temp
    // files to size; these are read, so that a typo is reported, and change nothing.
    parsed("proxy-buffering", "off", |v, _| match v.trim() {
        "on" | "off" => Ok(()),
        other => Err(format!("{other:?} is not on or off")),
    }),
    parsed("proxy-buffer-size", "4k", |v, _| parse_size(v).map(drop)),
    parsed("proxy-buffers-number", "4", |v, _| count(v).map(drop)),
    parsed("proxy-max-temp-file-size", "1024m", |v, _| parse_size(v).map(drop)),
    parsed("proxy-http-version", "1.1", |v, _| match v.trim() {
        "1.1" => Ok(()),
        "1.0" => Err("tidegate speaks HTTP/1.1 to HTTP backends (as nginx with keep-alive upstreams)".into()),
        other => Err(format!("{other:?} is not 1.0 or 1.1")),
    }),
    parsed("enable-cors", "false", |v, s| boolean(v).map(|b| s.cors.enabled = b)),
    parsed("cors-allow-origin", "*", |v, s| origins(v).map(|list| s.cors.cors.allow_origins = list)),
    parsed("cors-allow-methods", "GET, PUT, POST, DELETE, PATCH, OPTIONS", |v, s| {
        token_list(v, |c| c.is_ascii_alphabetic()).map(|list| s.cors.cors.allow_methods = list)
    }),
    parsed(
        "cors-allow-headers",
        "DNT,X-CustomHeader,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Authorization",
        |v, s| {
            token_list(v, |c| c.is_ascii_alphanumeric() || c == '_' || c == '-').map(|l| s.cors.cors.allow_headers = l)
        },
    ),
    parsed("cors-expose-headers", "", |v, s| {
        token_list(v, |c| c.is_ascii_alphanumeric() || "_-*".contains(c)).map(|l| s.cors.cors.expose_headers = l)
    }),
    parsed("cors-allow-credentials", "true", |v, s| boolean(v).map(|b| s.cors.cors.allow_credentials = b)),
    parsed("cors-max-age", "1728000", |v, s| {
        v.trim()
            .parse::<u64>()
            .map(|n| s.cors.cors.max_age = n)
            .map_err(|_| format!("{v:?} is not a number of seconds"))
    }),
    parsed("upstream-vhost", "", |v, s| header_text(v).map(|t| s.upstream_host = Some(t))),
    parsed("connection-proxy-header", "", |v, s| {
        let value = header_text(v)?;
        value.parse::<Template>()?;
        s.connection_header = Some(value);
        Ok(())
    }),
    parsed("x-forwarded-prefix", "", |v, s| header_text(v).map(|t| s.forwarded_prefix = Some(t))),
    parsed("enable-global-auth", "true", |v, s| boolean(v).map(|b| s.global_auth = b)),
    // How to reach the backend. A value that cannot be read refuses the routes: guessing would
    // send in the clear what was meant to go over TLS.
    guards("backend-protocol", "HTTP", |v, s| {
        s.upstream.protocol = Some(match v.trim().to_ascii_uppercase().as_str() {
            "HTTP" => UpstreamProtocol::Http1,
            "HTTPS" => UpstreamProtocol::Https,
            "GRPC" => UpstreamProtocol::H2c,
            "GRPCS" => UpstreamProtocol::H2,
            "AUTO_HTTP" => UpstreamProtocol::Negotiated,
            "FCGI" => return Err("FastCGI backends are not supported".into()),
            other => return Err(format!("{other:?} is not HTTP, HTTPS, GRPC, GRPCS or AUTO_HTTP")),
        });
        Ok(())
    }),
    guards("proxy-ssl-secret", "", |v, s| {
        let v = v.trim();
        if v.is_empty() || v.split('/').count() > 2 {
            return Err(format!("{v:?} is not a Secret name or namespace/name"));
        }
        s.upstream.secret = Some(v.to_owned());
        Ok(())
    }),
    guards("proxy-ssl-verify", "off", |v, s| match v.trim() {
        "on" => {
            s.upstream.verify = true;
            Ok(())
        }
        "off" => {
            s.upstream.verify = false;
            Ok(())
        }
        other => Err(format!("{other:?} is not on or off")),
    }),
    guards("proxy-ssl-verify-depth", "1", |v, s| match v.trim().parse::<u8>() {
        Ok(n) if n > 0 => {
            s.upstream.depth = n;
            Ok(())
        }
        _ => Err(format!("{v:?} is not a depth from 1 to 255")),
    }),
    guards("proxy-ssl-name", "", |v, s| {
        let name = v.trim();
        if name.is_empty() || rustls::pki_types::ServerName::try_from(name).is_err() {
            return Err(format!("{name:?} is not a DNS name or IP address"));
        }
        s.upstream.name = Some(name.to_owned());
        Ok(())
    }),
    parsed("proxy-ssl-server-name", "off", |v, s| match v.trim() {
        "on" => {
            s.upstream.sni = true;
            Ok(())
        }
        "off" => {
            s.upstream.sni = false;
            Ok(())
        }
        other => Err(format!("{other:?} is not on or off")),
    }),
    guards("proxy-ssl-protocols", "TLSv1.2 TLSv1.3", |v, s| tls_versions(v).map(|list| s.upstream.versions = list)),
    parsed("proxy-ssl-ciphers", "DEFAULT", |v, s| cipher_suites(v).map(|list| s.upstream.ciphers = list)),
    parsed("load-balance", "round_robin", |v, s| match v.trim() {
        "round_robin" => {
            s.upstream.ewma = false;
            Ok(())
        }
        "ewma" => {
            s.upstream.ewma = true;
            Ok(())
        }
        other => Err(format!("{other:?} is not round_robin or ewma")),
    }),
    parsed("upstream-hash-by", "", |v, s| {
        let key: Template = v.trim().parse()?;
        s.upstream.hash_by = Some(key);
        Ok(())
    }),
    parsed("upstream-hash-by-subset", "false", |v, s| boolean(v).map(|b| s.upstream.subset = b)),
    parsed("upstream-hash-by-subset-size", "3", |v, s| match v.trim().parse::<u32>() {
        Ok(n) if n > 0 => {
            s.upstream.subset_size = n;
            Ok(())
        }
        _ => Err(format!("{v:?} is not a positive number")),
    }),
    parsed("service-upstream", "false", |v, s| boolean(v).map(|b| s.service_upstream = b)),
    parsed("enable-access-log", "true", |v, s| boolean(v).map(|b| s.access_log = b)),
    parsed("relative-redirects", "false", |v, s| boolean(v).map(|b| s.relative_redirects = b)),
    parsed("app-root", "", |v, s| {
        let path = v.trim();
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(format!("{path:?} is not a path"));
        }
        s.app_root = Some(path.to_owned());
        Ok(())
    }),
    parsed("mirror-target", "", |v, s| auth_url(v).map(|t| s.mirror_target = Some(t))),
    parsed("mirror-host", "", |v, s| {
        let host = v.trim();
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
            return Err(format!("{host:?} is not a host"));
        }
        s.mirror_host = Some(host.to_owned());
        Ok(())
    }),
    parsed("mirror-request-body", "on", |v, s| match v.trim() {
        "on" => {
            s.mirror_body = true;
            Ok(())
        }
        "off" => {
            s.mirror_body = false;
            Ok(())
        }
        other => Err(format!("{other:?} is not on or off")),
    }),
    parsed("permanent-redirect", "", |v, s| v.trim().parse().map(|to| s.permanent_redirect = Some(to))),
    parsed("permanent-redirect-code", "301", |v, s| redirect_code(v).map(|code| s.permanent_code = code)),
    parsed("temporal-redirect", "", |v, s| v.trim().parse().map(|to| s.temporal_redirect = Some(to))),
    parsed("temporal-redirect-code", "302", |v, s| redirect_code(v).map(|code| s.temporal_code = code)),
    parsed("canary", "false", |v, s| boolean(v).map(|b| s.canary.enabled = b)),
    parsed("canary-by-header", "", |v, s| {
        http::HeaderName::from_bytes(v.trim().as_bytes())
            .map(|name| s.canary.header = Some(name.as_str().to_owned()))
            .map_err(|_| format!("{v:?} is not a header name"))
    }),
    parsed("canary-by-header-value", "", |v, s| header_text(v).map(|t| s.canary.header_value = Some(t))),
    parsed("canary-by-header-pattern", "", |v, s| {
        regex::Regex::new(v.trim()).map_err(|e| format!("not a regular expression: {e}"))?;
        s.canary.header_pattern = Some(v.trim().to_owned());
        Ok(())
    }),
    parsed("canary-by-cookie", "", |v, s| {
        let name = v.trim();
        if name.is_empty() || name.contains([';', '=', ' ']) {
            return Err(format!("{name:?} is not a cookie name"));
        }
        s.canary.cookie = Some(name.to_owned());
        Ok(())
    }),
    parsed("canary-weight", "0", |v, s| {
        v.trim().parse::<u32>().map(|n| s.canary.weight = n).map_err(|_| format!("{v:?} is not a weight"))
    }),
    parsed("canary-weight-total", "100", |v, s| match v.trim().parse::<u32>() {
        Ok(n) if n > 0 => {
            s.canary.weight_total = n;
            Ok(())
        }
        _ => Err(format!("{v:?} is not a positive weight")),
    }),
    parsed("affinity-canary-behavior", "sticky", |v, s| match v.trim() {
        "sticky" => {
            s.canary.legacy_affinity = false;
            Ok(())
        }
        "legacy" => {
            s.canary.legacy_affinity = true;
            Ok(())
        }
        other => Err(format!("{other:?} is not sticky or legacy")),
    }),
    parsed("affinity", "", |v, s| match v.trim() {
        "cookie" => {
            s.upstream.affinity = true;
            Ok(())
        }
        other => Err(format!("{other:?} is not cookie")),
    }),
    parsed("affinity-mode", "balanced", |v, s| match v.trim() {
        "balanced" => {
            s.upstream.session.persistent = false;
            Ok(())
        }
        "persistent" => {
            s.upstream.session.persistent = true;
            Ok(())
        }
        other => Err(format!("{other:?} is not balanced or persistent")),
    }),
    parsed("session-cookie-name", "INGRESSCOOKIE", |v, s| {
        let name = v.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
            return Err(format!("{name:?} is not a cookie name"));
        }
        s.upstream.session.cookie = name.to_owned();
        Ok(())
    }),
    parsed("session-cookie-path", "", |v, s| cookie_attribute(v).map(|p| s.upstream.session.path = Some(p))),
    parsed("session-cookie-domain", "", |v, s| cookie_attribute(v).map(|d| s.upstream.session.domain = Some(d))),
    parsed("session-cookie-max-age", "", |v, s| {
        v.trim()
            .parse::<u64>()
            .map(|n| s.upstream.session.max_age = Some(n))
            .map_err(|_| format!("{v:?} is not seconds"))
    }),
    parsed("session-cookie-expires", "", |v, s| {
        v.trim()
            .parse::<u64>()
            .map(|n| s.upstream.session.expires = Some(n))
            .map_err(|_| format!("{v:?} is not seconds"))
    }),
    parsed("session-cookie-samesite", "", |v, s| {
        let value = match v.trim().to_ascii_lowercase().as_str() {
            "none" => "None",
            "lax" => "Lax",
            "strict" => "Strict",
            _ => return Err(format!("{v:?} is not None, Lax or Strict")),
        };
        s.upstream.session.same_site = Some(value.to_owned());
        Ok(())
    }),
    parsed("session-cookie-conditional-samesite-none", "false", |v, s| {
        boolean(v).map(|b| s.upstream.session.conditional_same_site_none = b)
    }),
    parsed("session-cookie-secure", "false", |v, s| boolean(v).map(|b| s.upstream.session.secure = b)),
    parsed("session-cookie-change-on-failure", "false", |v, s| {
        boolean(v).map(|b| s.upstream.session.change_on_failure = b)
    }),
    parsed("proxy-next-upstream", "error timeout", |v, s| next_upstream(v, &mut s.upstream.retry)),
    parsed("proxy-next-upstream-tries", "3", |v, s| {
        v.trim().parse::<u32>().map(|n| s.upstream.retry.tries = n).map_err(|_| format!("{v:?} is not a number"))
    }),
    parsed("proxy-next-upstream-timeout", "0", |v, s| {
        let digits = v.trim().strip_suffix('s').unwrap_or(v.trim());
        digits
            .parse::<u64>()
            .map(|n| s.upstream.retry.timeout_ms = n * 1000)
            .map_err(|_| format!("{v:?} is not a number of seconds"))
    }),
    guards("satisfy", "all", |v, s| match v.trim() {
        "any" => {
            s.satisfy_any = true;
            Ok(())
        }
        "all" => {
            s.satisfy_any = false;
            Ok(())
        }
        other => Err(format!("{other:?} is not any or all")),
    }),
    guards("auth-tls-secret", "", |v, s| {
        let v = v.trim();
        if v.is_empty() || v.split('/').count() > 2 {
            return Err(format!("{v:?} is not a Secret namespace/name"));
        }
        s.client_cert.secret = Some(v.to_owned());
        Ok(())
    }),
    guards("auth-tls-verify-client", "on", |v, s| {
        use tidegate_snapshot::ClientVerify;
        s.client_cert.verify = match v.trim() {
            "on" => Some(ClientVerify::On),
            "optional" => Some(ClientVerify::Optional),
            "optional_no_ca" => Some(ClientVerify::OptionalNoCa),
            "off" => None,
            other => return Err(format!("{other:?} is not on, off, optional or optional_no_ca")),
        };
        Ok(())
    }),
    parsed("auth-tls-verify-depth", "1", |v, s| match v.trim().parse::<u8>() {
        Ok(n) if n > 0 => {
            s.client_cert.depth = n;
            Ok(())
        }
        _ => Err(format!("{v:?} is not a depth from 1 to 255")),
    }),
    parsed("auth-tls-error-page", "", |v, s| header_text(v).map(|p| s.client_cert.error_page = Some(p))),
    parsed("auth-tls-pass-certificate-to-upstream", "false", |v, s| {
        boolean(v).map(|b| s.client_cert.pass_to_upstream = b)
    }),
    guards("auth-tls-match-cn", "", |v, s| {
        regex::Regex::new(v.trim()).map_err(|e| format!("not a regular expression: {e}"))?;
        s.client_cert.match_subject = Some(v.trim().to_owned());
        Ok(())
    }),
    guards("auth-url", "", |v, s| auth_url(v).map(|t| s.external_auth.url = Some(t))),
    guards("auth-method", "", |v, s| {
        let v = v.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("{v:?} is not an HTTP method"));
        }
        s.external_auth.method = Some(v.to_owned());
        Ok(())
    }),
    guards("auth-signin", "", |v, s| v.trim().parse().map(|t| s.external_auth.signin = Some(t))),
    parsed("auth-signin-redirect-param", "rd", |v, s| {
        token_list(v, |c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            .map(|p| s.external_auth.signin_redirect_param = p)
    }),
    guards("auth-response-headers", "", |v, s| {
        token_list(v, |c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            .map(|l| s.external_auth.response_headers = l.split(", ").map(str::to_ascii_lowercase).collect())
    }),
    parsed("auth-request-redirect", "", |v, s| {
        s.external_auth.request_redirect = Some(v.trim().to_owned()).filter(|r| !r.is_empty());
        Ok(())
    }),
    guards("auth-always-set-cookie", "false", |v, s| boolean(v).map(|b| s.external_auth.always_set_cookie = b)),
    guards("auth-proxy-set-headers", "", |v, s| {
        object_name(v, "ConfigMap").map(|name| s.external_auth.proxy_set_headers = Some(name))
    }),
    guards("auth-cache-key", "", |v, s| v.trim().parse().map(|t| s.external_auth.cache_key = Some(t))),
    guards("auth-cache-duration", "200 202 401 5m", |v, s| {
        cache_durations(v).map(|d| s.external_auth.cache_durations = d)
    }),
    // Which hosts' paths are regular expressions is decided across Ingresses (see
    // `translate::regex_hosts`); the value is checked here.
    parsed("use-regex", "false", |v, _| boolean(v).map(drop)),
    parsed("rewrite-target", "", |v, s| {
        let v = v.trim();
        if v.is_empty() || v.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'#') {
            return Err(format!("{v:?} is not a URI path"));
        }
        s.rewrite_target = Some(v.to_owned());
        Ok(())
    }),
    parsed("custom-http-errors", "", |v, s| {
        let mut codes = Vec::new();
        for code in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match code.parse::<u16>() {
                Ok(status) if (400..=599).contains(&status) => codes.push(status),
                _ => return Err(format!("{code:?} is not a status from 400 to 599")),
            }
        }
        s.error_codes = codes;
        Ok(())
    }),
    parsed("default-backend", "", |v, s| {
        let name = v.trim();
        if name.is_empty() || name.contains('/') || crate::validate::check_host(name).is_err() {
            return Err(format!("{name:?} is not the name of a Service in the Ingress's namespace"));
        }
        s.default_backend = Some(name.to_owned());
        Ok(())
    }),
    parsed("disable-proxy-intercept-errors", "false", |v, s| boolean(v).map(|b| s.only_proxy_errors = b)),
    parsed("server-alias", "", |v, s| {
        let mut hosts = Vec::new();
        for host in v.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let host = host.to_ascii_lowercase();
            crate::validate::check_host(&host)?;
            hosts.push(host);
        }
        s.aliases = hosts;
        Ok(())
    }),
    parsed("from-to-www-redirect", "false", |v, s| boolean(v).map(|b| s.www_redirect = b)),
    parsed("proxy-redirect-from", "off", |v, s| {
        s.redirect_from = Some(v.trim().to_owned()).filter(|v| !v.is_empty() && v != "off");
        Ok(())
    }),
    parsed("proxy-redirect-to", "", |v, s| {
        s.redirect_to = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        Ok(())
    }),
    // tidegate's redirects to HTTPS keep the path exactly as the client sent it, which is what
    // this asks; read so that a typo is reported.
    parsed("preserve-trailing-slash", "false", |v, _| boolean(v).map(drop)),
    parsed("custom-headers", "", |v, s| object_name(v, "ConfigMap").map(|name| s.custom_headers = Some(name))),
    // Connections to the auth service are pooled per worker like every upstream's; these are
    // read, so that a typo is reported, and change nothing.
    parsed("auth-keepalive", "0", |v, _| {
        v.trim().parse::<u32>().map(drop).map_err(|_| format!("{v:?} is not a number"))
    }),
    parsed("auth-keepalive-requests", "1000", |v, _| {
        v.trim().parse::<u32>().map(drop).map_err(|_| format!("{v:?} is not a number"))
    }),
    parsed("auth-keepalive-timeout", "60", |v, _| {
        v.trim().parse::<u32>().map(drop).map_err(|_| format!("{v:?} is not a number"))
    }),
    parsed("auth-keepalive-share-vars", "false", |v, _| boolean(v).map(drop)),
    guards("limit-rps", "", |v, s| count(v).map(|n| s.limits.rps = Some(n))),
    guards("limit-rpm", "", |v, s| count(v).map(|n| s.limits.rpm = Some(n))),
    guards("limit-burst-multiplier", "5", |v, s| count(v).map(|n| s.limits.burst_multiplier = n)),
    guards("limit-connections", "", |v, s| count(v).map(|n| s.limits.connections = Some(n))),
    guards("limit-whitelist", "", |v, s| cidrs(v).map(|list| s.limits.exempt = list)),
    guards("limit-allowlist", "", |v, s| cidrs(v).map(|list| s.limits.exempt = list)),
    guards("limit-rate", "0", |v, s| kilobytes(v).map(|n| s.limits.rate_kb = n)),
    guards("limit-rate-after", "0", |v, s| kilobytes(v).map(|n| s.limits.rate_after_kb = n)),
    Key {
        pattern: Pattern::Exact("limit-key"),
        handling: Handling::Guards(|v, s| v.trim().parse().map(|t| s.limits.key = Some(t))),
        default: "$remote_addr",
        ours_only: true,
    },
    guards("global-rate-limit", "", |v, s| count(v).map(|n| s.limits.shared.requests = Some(n))),
    guards("global-rate-limit-window", "", |v, s| match nginx_seconds(v.trim()) {
        Some(seconds) if seconds > 0 => {
            s.limits.shared.window_seconds = Some(u32::try_from(seconds).unwrap_or(u32::MAX));
            Ok(())
        }
        _ => Err(format!("{v:?} is not a time such as 30s, 1m or 1h")),
    }),
    guards("global-rate-limit-key", "$remote_addr", |v, s| v.trim().parse().map(|t| s.limits.shared.key = t)),
    guards("global-rate-limit-ignored-cidrs", "", |v, s| cidrs(v).map(|list| s.limits.shared.ignored = list)),
    guards("whitelist-source-range", "", |v, s| allow(v, "allowlist-source-range", &mut s.ip.allow)),
    guards("allowlist-source-range", "", |v, s| allow(v, "whitelist-source-range", &mut s.ip.allow)),
    guards("denylist-source-range", "", |v, s| cidrs(v).map(|list| s.ip.deny = list)),
    guards("auth-type", "", |v, s| match v.trim() {
        "basic" => {
            s.basic_auth.enabled = true;
            Ok(())
        }
        "digest" => Err("digest authentication is not supported".into()),
        other => Err(format!("{other:?} is not \"basic\"")),
    }),
    guards("auth-secret", "", |v, s| object_name(v, "Secret").map(|name| s.basic_auth.secret = Some(name))),
    guards("auth-secret-type", "auth-file", |v, s| match v.trim() {
        "auth-file" => {
            s.basic_auth.map = false;
            Ok(())
        }
        "auth-map" => {
            s.basic_auth.map = true;
            Ok(())
        }
        other => Err(format!("{other:?} is not auth-file or auth-map")),
    }),
    parsed("auth-realm", "", |v, s| {
        s.basic_auth.realm = v.to_owned();
        Ok(())
    }),
    // Who may reach a route: IP rules, every kind of authentication, global auth, WAF rules.
    restricts(Pattern::Suffix("-source-range")),
    restricts(Pattern::Prefix("denylist-")),
    restricts(Pattern::Prefix("auth-")),
    restricts(Pattern::Exact("enable-modsecurity")),
    restricts(Pattern::Exact("enable-owasp-core-rules")),
    restricts(Pattern::Prefix("modsecurity-")),
    // How much: request and connection rates, bandwidth.
    restricts(Pattern::Prefix("limit-")),
    // nginx configuration: its Lua blocks and header directives are translated; any other
    // directive (allow, deny, auth_basic, return...) closes the routes.
    guards("configuration-snippet", "", |v, s| nginx_snippet("configuration-snippet", v, s)),
    guards("server-snippet", "", |v, s| nginx_snippet("server-snippet", v, s)),
];

/// A snippet annotation `name`'s nginx configuration, translated into the route's Lua and headers
/// (see [`super::snippet`]).
fn nginx_snippet(name: &str, value: &str, s: &mut Settings) -> Result<(), String> {
    let snippet = super::snippet::read(value)?;
    let key = s.written.get(name).cloned().unwrap_or_else(|| format!("{NGINX}{name}"));
    s.snippets.extend(snippet.lua.into_iter().map(|(phase, source)| (phase, key.clone(), source)));
    s.snippet_response_headers.extend(snippet.response_headers);
    s.snippet_upstream_headers.extend(snippet.upstream_headers);
    if snippet.redirect.is_some() {
        s.snippet_redirect = snippet.redirect;
    }
    s.snippet_ip_rules.extend(snippet.ip_rules);
    // Directives with an annotation's meaning, read as that annotation.
    for (name, value) in &snippet.keys {
        let parse = KEYS.iter().find(|k| k.pattern.covers(name)).and_then(|k| match k.handling {
            Handling::Parsed(parse) | Handling::Guards(parse) => Some(parse),
            Handling::Restricts => None,
        });
        match parse {
            Some(parse) => parse(value, s).map_err(|e| format!("{name}: {e}"))?,
            None => return Err(format!("{name} is not honoured")),
        }
    }
    s.snippet_keys.push(key);
    Ok(())
}

/// An object named by an annotation: `name` or `namespace/name`.
pub(super) fn object_name(value: &str, kind: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() || v.split('/').count() > 2 || v.split('/').any(str::is_empty) {
        return Err(format!("{v:?} is not a {kind} name or namespace/name"));
    }
    Ok(v.to_owned())
}

/// nginx's `proxy_cache_valid` list, comma-separated: `200 202 10m, 401 5m`. Statuses before
/// the time (`any` for every status; 200, 301 and 302 when none is given), then the time in
/// nginx's units (`30s`, `5m`, `1h`, `1d`; a bare number is seconds).
pub(super) fn cache_durations(value: &str) -> Result<Vec<tidegate_snapshot::CacheDuration>, String> {
    let mut durations = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let words: Vec<&str> = entry.split_whitespace().collect();
        let (time, codes) = words.split_last().ok_or_else(|| format!("{entry:?} has no time"))?;
        let seconds = nginx_seconds(time).ok_or_else(|| format!("{time:?} is not a time such as 30s, 5m or 1h"))?;
        let mut statuses = Vec::new();
        for code in codes {
            if *code == "any" {
                statuses.clear();
                break;
            }
            match code.parse::<u16>() {
                Ok(status) if (100..=599).contains(&status) => statuses.push(status),
                _ => return Err(format!("{code:?} is not an HTTP status")),
            }
        }
        if codes.is_empty() {
            statuses = vec![200, 301, 302];
        }
        durations.push(tidegate_snapshot::CacheDuration { statuses, seconds });
    }
    if durations.is_empty() {
        return Err(format!("{value:?} names no time"));
    }
    Ok(durations)
}

/// An nginx time: whole units of `s`, `m`, `h`, `d`, `w`, `M` (30 days) or `y` (365 days),
/// summed (`1h30m`), or bare seconds.
pub(super) fn nginx_seconds(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(seconds);
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            'M' => 2_592_000,
            'y' => 31_536_000,
            _ => return None,
        };
        total = total.checked_add(digits.parse::<u64>().ok()?.checked_mul(unit)?)?;
        digits.clear();
    }
    digits.is_empty().then_some(total)
}

/// A redirect status: 300 to 308.
fn redirect_code(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(code) if (300..=308).contains(&code) => Ok(code),
        _ => Err(format!("{value:?} is not a redirect status (300 to 308)")),
    }
}

/// A cookie attribute's value: printable, without `;`.
fn cookie_attribute(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';') {
        return Err(format!("{value:?} cannot be a cookie attribute"));
    }
    Ok(value.to_owned())
}

/// nginx's `proxy_next_upstream` list: `error`, `timeout`, `invalid_header`, `http_NNN`,
/// `non_idempotent`, or `off` alone.
fn next_upstream(value: &str, retry: &mut tidegate_snapshot::Retry) -> Result<(), String> {
    let mut read = tidegate_snapshot::Retry { tries: retry.tries, timeout_ms: retry.timeout_ms, ..Default::default() };
    read.on_error = false;
    read.on_timeout = false;
    for word in value.split_whitespace() {
        match word {
            "off" => {}
            "error" => read.on_error = true,
            "timeout" => read.on_timeout = true,
            "invalid_header" => read.on_invalid_header = true,
            "non_idempotent" => read.non_idempotent = true,
            "http_500" | "http_502" | "http_503" | "http_504" | "http_403" | "http_404" | "http_429" => {
                read.on_statuses.push(word[5..].parse().unwrap_or(502));
            }
            other => return Err(format!("{other:?} is not a proxy-next-upstream condition")),
        }
    }
    if value.split_whitespace().any(|w| w == "off") && value.split_whitespace().count() > 1 {
        return Err("off cannot be combined with other conditions".into());
    }
    read.on_statuses.sort_unstable();
    read.on_statuses.dedup();
    *retry = read;
    Ok(())
}

/// nginx's `ssl_protocols` list: TLS 1.2 and 1.3 are spoken; older versions are left out (a
/// list of nothing else is refused).
pub(super) fn tls_versions(value: &str) -> Result<Vec<TlsVersion>, String> {
    let mut versions = Vec::new();
    for word in value.split_whitespace() {
        match word {
            "TLSv1.2" => versions.push(TlsVersion::Tls12),
            "TLSv1.3" => versions.push(TlsVersion::Tls13),
            "SSLv2" | "SSLv3" | "TLSv1" | "TLSv1.1" => {}
            other => return Err(format!("{other:?} is not a TLS version (TLSv1.2, TLSv1.3)")),
        }
    }
    versions.sort();
    versions.dedup();
    if versions.is_empty() {
        return Err(format!("{value:?} allows neither TLSv1.2 nor TLSv1.3, the versions tidegate speaks"));
    }
    Ok(versions)
}

/// OpenSSL cipher names (`proxy-ssl-ciphers`, colon separated) as the IANA names of the suites
/// tidegate speaks. `DEFAULT` and `HIGH`-style words select them all; names of suites it does
/// not speak (CBC, RSA key exchange) are left out; a list naming none it speaks is an error.
fn cipher_suites(value: &str) -> Result<Vec<String>, String> {
    const SUITES: &[(&str, &str)] = &[
        ("ECDHE-ECDSA-AES128-GCM-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        ("ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
        ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
        ("ECDHE-RSA-AES256-GCM-SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
        ("ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
        ("TLS_AES_128_GCM_SHA256", "TLS13_AES_128_GCM_SHA256"),
        ("TLS_AES_256_GCM_SHA384", "TLS13_AES_256_GCM_SHA384"),
        ("TLS_CHACHA20_POLY1305_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"),
    ];
    let words: Vec<&str> = value.split([':', ' ', ',']).map(str::trim).filter(|w| !w.is_empty()).collect();
    if words.iter().any(|w| matches!(*w, "DEFAULT" | "HIGH" | "ALL")) {
        return Ok(Vec::new());
    }
    let mut suites: Vec<String> = words
        .iter()
        .filter_map(|w| SUITES.iter().find(|(openssl, _)| openssl == w).map(|(_, iana)| (*iana).to_owned()))
        .collect();
    if suites.is_empty() {
        return Err(format!("{value:?} names no cipher suite tidegate speaks (AES-GCM or ChaCha20 with ECDHE)"));
    }
    // TLS 1.3 suites stay available unless the list names some of its own.
    if !suites.iter().any(|s| s.starts_with("TLS13_")) {
        suites.extend(SUITES.iter().filter(|(_, iana)| iana.starts_with("TLS13_")).map(|(_, iana)| (*iana).to_owned()));
    }
    Ok(suites)
}

/// A comma-separated list of CIDR ranges or addresses, spaces allowed; at least one.
fn cidrs(value: &str) -> Result<Vec<Cidr>, String> {
    let list = value.split(',').filter(|c| !c.trim().is_empty()).map(str::parse).collect::<Result<Vec<Cidr>, _>>()?;
    if list.is_empty() {
        return Err("lists no CIDR range".into());
    }
    Ok(list)
}

/// The allowlist, under its two names: both may be set only to the same list.
fn allow(value: &str, other: &str, allow: &mut Vec<Cidr>) -> Result<(), String> {
    let list = cidrs(value)?;
    if !allow.is_empty() && *allow != list {
        return Err(format!("differs from {other}, which is also set; set one of them"));
    }
    *allow = list;
    Ok(())
}

/// Text that can go in a header value: visible ASCII and spaces, not empty.
fn header_text(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("{value:?} cannot be a header value"));
    }
    Ok(value.to_owned())
}

/// A comma-separated list whose items are made of `allowed` characters; kept as written.
fn token_list(value: &str, allowed: fn(char) -> bool) -> Result<String, String> {
    let items: Vec<&str> = value.split(',').map(str::trim).filter(|i| !i.is_empty()).collect();
    match items.iter().find(|i| !i.chars().all(allowed)) {
        Some(bad) => Err(format!("{bad:?} is not allowed in this list")),
        None if items.is_empty() => Err("lists nothing".into()),
        None => Ok(items.join(", ")),
    }
}

/// CORS origins: `*`, or `http(s)://host[:port]` with an optional single-label `*.` wildcard.
fn origins(value: &str) -> Result<Vec<String>, String> {
    let mut list = Vec::new();
    for origin in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if origin == "*" {
            return Ok(Vec::new());
        }
        let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        let host = rest.map(|r| r.strip_prefix("*.").unwrap_or(r));
        let host = host.map(|h| h.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(h, |(h, _)| h));
        match host {
            Some(h) if !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') => {
                list.push(origin.to_owned());
            }
            _ => return Err(format!("{origin:?} is not * or http(s)://host[:port]")),
        }
    }
    if list.is_empty() {
        return Err("lists no origin".into());
    }
    Ok(list)
}

pub(super) fn boolean(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{value:?} is not \"true\" or \"false\"")),
    }
}

/// The annotation naming a phase's inline handler: `access-by-lua`.
fn lua_annotation(phase: Phase) -> &'static str {
    match phase {
        Phase::Rewrite => "rewrite-by-lua",
        Phase::Access => "access-by-lua",
        Phase::Content => "content-by-lua",
        Phase::Balancer => "balancer-by-lua",
        Phase::HeaderFilter => "header-filter-by-lua",
        Phase::BodyFilter => "body-filter-by-lua",
        Phase::Log => "log-by-lua",
    }
}

/// The annotation `name` under the prefix it is read with: tidegate's own keys under
/// `tidegate.dev/`, the others under ingress-nginx's.
pub(super) fn prefixed(name: &str) -> String {
    let ours = KEYS.iter().any(|k| k.ours_only && k.pattern.covers(name));
    format!("{}{name}", if ours { OURS } else { NGINX })
}

/// Reads the annotations, recording a problem for each value that does not parse, each key
/// that restricts access and is not honoured (an error: the Ingress is not served), and each
/// other key under our prefixes that tidegate does not know (a warning).
/// `base` is what applies where no annotation says otherwise: the global ConfigMap's defaults.
pub(super) fn read(
    annotations: Option<&BTreeMap<String, String>>,
    base: &Settings,
    status: &mut ObjectStatus,
) -> Settings {
    let mut settings = base.clone();
    for (key, value) in annotations.into_iter().flatten() {
        let (prefix, name) = if let Some(name) = key.strip_prefix(OURS) {
            (OURS, name)
        } else if let Some(name) = key.strip_prefix(NGINX) {
            (NGINX, name)
        } else {
            continue;
        };
        let field = || format!("metadata.annotations[{key:?}]");
        if prefix == OURS
            && let Some(phase) = Phase::ALL.into_iter().find(|p| lua_annotation(*p) == name)
        {
            settings.snippets.push((phase, key.clone(), value.clone()));
            continue;
        }
        let row = row_for(name, prefix == OURS);
        settings.written.insert(name.to_owned(), key.clone());
        match row.map(|k| k.handling) {
            Some(Handling::Parsed(parse)) => {
                if let Err(why) = parse(value, &mut settings) {
                    status.warning(Reason::Invalid, field(), format!("{why}; the default applies"));
                }
            }
            Some(Handling::Guards(parse)) => {
                if let Err(why) = parse(value, &mut settings) {
                    status.error(Reason::Invalid, field(), format!("{why}; the routes answer 503"));
                    settings.unhonoured.push(key.clone());
                }
            }
            Some(Handling::Restricts) => {
                status.error(
                    Reason::UnsupportedAnnotation,
                    field(),
                    "restricts access to the routes and is not supported by tidegate; they answer 503 \
                     rather than be served without it",
                );
                settings.unhonoured.push(key.clone());
            }
            None if prefix == OURS => status.warning(Reason::Invalid, field(), "unknown tidegate annotation; ignored"),
            None => status.warning(
                Reason::UnsupportedAnnotation,
                field(),
                "ingress-nginx annotation not supported by tidegate; ignored",
            ),
        }
    }
    settings
}

/// The row of [`KEYS`] that decides `name` (the first that covers it), under our prefix or
/// ingress-nginx's. Every annotation of every Ingress is looked up, on every change: the rows
/// of the names the tables know are found once, in a map.
fn row_for(name: &str, ours: bool) -> Option<&'static Key> {
    use std::collections::HashMap;
    use std::sync::LazyLock;
    let scan = |name: &str, ours: bool| KEYS.iter().find(|k| k.pattern.covers(name) && (ours || !k.ours_only));
    static KNOWN: LazyLock<HashMap<(&'static str, bool), Option<&'static Key>>> = LazyLock::new(|| {
        let names = KEYS
            .iter()
            .filter_map(|k| match k.pattern {
                Pattern::Exact(name) => Some(name),
                _ => None,
            })
            .chain(super::annotation_table::INGRESS_NGINX_KEYS.iter().copied());
        let mut known = HashMap::new();
        for name in names {
            for ours in [false, true] {
                known.insert((name, ours), KEYS.iter().find(|k| k.pattern.covers(name) && (ours || !k.ours_only)));
            }
        }
        known
    });
    match KNOWN.get(&(name, ours)) {
        Some(row) => *row,
        None => scan(name, ours),
    }
}

/// ingress-nginx timeouts are whole seconds; a trailing `s` is accepted.
fn seconds(value: &str) -> Result<u64, String> {
    let digits = value.strip_suffix('s').unwrap_or(value);
    match digits.parse::<u64>() {
        Ok(s) if (1..=86_400).contains(&s) => Ok(s * 1000),
        _ => Err(format!("{value:?} is not a number of seconds between 1 and 86400")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ObjectRef;

    fn read_one(key: &str, value: &str) -> (Settings, ObjectStatus) {
        let mut status = ObjectStatus::new(ObjectRef::namespaced("Ingress", "ns", "x"));
        let map = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        (read(Some(&map), &Settings::default(), &mut status), status)
    }

    #[test]
    fn both_prefixes_set_ssl_redirect() {
        assert!(!read_one("nginx.ingress.kubernetes.io/ssl-redirect", "false").0.ssl_redirect);
        assert!(!read_one("tidegate.dev/ssl-redirect", "false").0.ssl_redirect);
        assert!(read_one("tidegate.dev/ssl-redirect", "true").0.ssl_redirect);
    }

    #[test]
    fn timeouts_are_seconds() {
        let (s, _) = read_one("nginx.ingress.kubernetes.io/proxy-send-timeout", "7s");
        assert_eq!(s.timeouts.send_ms, 7000);
        let (s, status) = read_one("nginx.ingress.kubernetes.io/proxy-read-timeout", "3");
        assert_eq!(s.timeouts.read_ms, 3000);
        assert!(status.problems.is_empty());
        let (s, status) = read_one("tidegate.dev/proxy-connect-timeout", "abc");
        assert_eq!(s.timeouts, Timeouts::default());
        assert_eq!(status.problems[0].field, "metadata.annotations[\"tidegate.dev/proxy-connect-timeout\"]");
    }

    #[test]
    fn unknown_annotations_are_reported_and_others_ignored() {
        let (settings, status) = read_one("nginx.ingress.kubernetes.io/enable-opentelemetry", "true");
        assert_eq!(status.problems[0].reason, Reason::UnsupportedAnnotation);
        assert_eq!(status.problems[0].severity, crate::status::Severity::Warning);
        assert!(settings.unhonoured.is_empty(), "does not restrict access: served");
        let (_, status) = read_one("tidegate.dev/frobnicate", "1");
        assert_eq!(status.problems[0].reason, Reason::Invalid);
        let (_, status) = read_one("kubectl.kubernetes.io/last-applied-configuration", "{}");
        assert!(status.problems.is_empty());
        let (_, status) = read_one("nginx.ingress.kubernetes.io/lua-route", "x");
        assert_eq!(status.problems[0].reason, Reason::UnsupportedAnnotation, "lua-route is ours only");
    }

    /// Keys that restrict who may reach a route, or how much, under either prefix: an error
    /// naming the key, and the Ingress is marked unhonoured (its routes answer 503).
    #[test]
    fn access_keys_not_honoured_fail_closed() {
        let keys = [
            ("whitelist-source-range", "10.0.0.0/33"),
            ("allowlist-source-range", ""),
            ("denylist-source-range", "localhost"),
            ("auth-type", "digest"),
            ("auth-secret", "a/b/c"),
            ("auth-url", "ftp://auth.example/check"),
            ("auth-tls-verify-client", "always"),
            ("backend-protocol", "FCGI"),
            ("proxy-ssl-verify", "yes"),
            ("proxy-ssl-secret", "a/b/c"),
            ("proxy-ssl-name", "not a name"),
            ("proxy-ssl-protocols", "TLSv1 TLSv1.1"),
            ("auth-tls-secret", "a/b/c"),
            ("auth-tls-match-cn", "CN=(unclosed"),
            ("satisfy", "some"),
            ("limit-rps", "five"),
            ("limit-connections", "0"),
            ("limit-rate", "fast"),
            ("global-rate-limit", "ten"),
            ("enable-modsecurity", "true"),
            ("modsecurity-snippet", "SecRuleEngine On"),
            ("configuration-snippet", "auth_request /auth;"),
            ("server-snippet", "allow 10.0.0.0/33;"),
        ];
        for prefix in [NGINX, OURS] {
            for (name, value) in keys {
                let key = format!("{prefix}{name}");
                let (settings, status) = read_one(&key, value);
                assert_eq!(settings.unhonoured, vec![key.clone()], "{key} fails closed");
                let problem = &status.problems[0];
                // A key honoured with a value that does not read is Invalid; one not honoured
                // at all is UnsupportedAnnotation.
                let row = KEYS.iter().find(|k| k.pattern.covers(name)).expect("a row");
                let guarded = matches!(row.handling, Handling::Guards(_));
                let reason = if guarded { Reason::Invalid } else { Reason::UnsupportedAnnotation };
                assert_eq!((problem.severity, problem.reason), (crate::status::Severity::Error, reason), "{key}");
                assert_eq!(problem.field, format!("metadata.annotations[{key:?}]"), "the field names the key");
            }
        }
    }

    /// IP rules: CIDR lists with spaces, IPv4 and IPv6, under both names of the allowlist.
    #[test]
    fn source_ranges_are_cidr_lists() {
        let (s, status) =
            read_one("nginx.ingress.kubernetes.io/whitelist-source-range", "10.0.0.0/8, 192.168.1.7 ,::1/128");
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        let text: Vec<String> = s.ip.allow.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]);
        assert!(s.unhonoured.is_empty(), "honoured");
        let (s, _) = read_one("tidegate.dev/allowlist-source-range", "2001:db8::/32");
        assert_eq!(s.ip.allow.len(), 1);
        let (s, _) = read_one("nginx.ingress.kubernetes.io/denylist-source-range", "203.0.113.0/24");
        assert_eq!(s.ip.deny.len(), 1);
        assert!(s.ip.allow.is_empty());
        assert_eq!(Settings::default().ip, IpRules::default(), "no rules by default");

        let mut status = ObjectStatus::new(ObjectRef::namespaced("Ingress", "ns", "x"));
        let both = BTreeMap::from([
            ("nginx.ingress.kubernetes.io/allowlist-source-range".to_owned(), "10.0.0.0/8".to_owned()),
            ("nginx.ingress.kubernetes.io/whitelist-source-range".to_owned(), "11.0.0.0/8".to_owned()),
        ]);
        let s = read(Some(&both), &Settings::default(), &mut status);
        assert_eq!(s.unhonoured.len(), 1, "two different allowlists: refused");
        assert!(status.problems[0].message.contains("allowlist-source-range"), "{:?}", status.problems);
    }

    /// `proxy-body-size`: nginx sizes, 1m when unset, `0` for no limit; a value that does not
    /// read keeps the default limit (never none).
    #[test]
    fn body_size_is_an_nginx_size() {
        assert_eq!(Settings::default().max_body_bytes, Some(1 << 20), "ingress-nginx's default");
        for (value, expected) in
            [("8m", Some(8 << 20)), ("512K", Some(512 << 10)), ("2g", Some(2 << 30)), ("100", Some(100)), ("0", None)]
        {
            let (s, status) = read_one("nginx.ingress.kubernetes.io/proxy-body-size", value);
            assert_eq!(s.max_body_bytes, expected, "{value}");
            assert!(status.problems.is_empty(), "{value}");
        }
        for bad in ["8mb", "-1", "m", "1.5m", ""] {
            let (s, status) = read_one("nginx.ingress.kubernetes.io/proxy-body-size", bad);
            assert_eq!(s.max_body_bytes, Some(1 << 20), "{bad:?}: the default limit stays");
            assert_eq!(status.problems[0].reason, Reason::Invalid, "{bad:?}");
        }
        let (_, status) = read_one("nginx.ingress.kubernetes.io/client-body-buffer-size", "16k");
        assert!(status.problems.is_empty());
        let (_, status) = read_one("nginx.ingress.kubernetes.io/proxy-request-buffering", "sometimes");
        assert_eq!(status.problems[0].reason, Reason::Invalid);
    }

    /// CORS: ingress-nginx's defaults, origin lists with wildcards, and values that do not read
    /// keeping the default.
    #[test]
    fn cors_keys() {
        assert!(!Settings::default().cors.enabled);
        let (s, status) = read_one("nginx.ingress.kubernetes.io/enable-cors", "true");
        assert!(s.cors.enabled && status.problems.is_empty());
        assert!(s.cors.cors.allow_origins.is_empty(), "* by default");
        let (s, _) = read_one(
            "nginx.ingress.kubernetes.io/cors-allow-origin",
            "https://origin-site.com:4443, http://*.origin-site.com,https://example.org",
        );
        assert_eq!(s.cors.cors.allow_origins.len(), 3);
        let (s, status) = read_one("nginx.ingress.kubernetes.io/cors-allow-origin", "origin-site.com");
        assert!(s.cors.cors.allow_origins.is_empty() && status.problems[0].reason == Reason::Invalid);
        let (s, _) = read_one("nginx.ingress.kubernetes.io/cors-allow-methods", "PUT,GET");
        assert_eq!(s.cors.cors.allow_methods, "PUT, GET");
        let (s, status) = read_one("nginx.ingress.kubernetes.io/cors-allow-headers", "X-Ok, Bad Header");
        assert!(s.cors.cors.allow_headers.starts_with("DNT") && !status.problems.is_empty());
        let (s, _) = read_one("nginx.ingress.kubernetes.io/cors-max-age", "600");
        assert_eq!(s.cors.cors.max_age, 600);
    }

    /// Limits: the burst is the rate times the multiplier; exempt networks; nothing when unset.
    #[test]
    fn limit_keys() {
        assert_eq!(Settings::default().limits.typed(), None);
        let mut status = ObjectStatus::new(ObjectRef::namespaced("Ingress", "ns", "x"));
        let keys = BTreeMap::from([
            ("nginx.ingress.kubernetes.io/limit-rps".to_owned(), "5".to_owned()),
            ("nginx.ingress.kubernetes.io/limit-rpm".to_owned(), "100".to_owned()),
            ("nginx.ingress.kubernetes.io/limit-burst-multiplier".to_owned(), "2".to_owned()),
            ("nginx.ingress.kubernetes.io/limit-connections".to_owned(), "3".to_owned()),
            ("nginx.ingress.kubernetes.io/limit-whitelist".to_owned(), "10.0.0.0/8".to_owned()),
        ]);
        let limits = read(Some(&keys), &Settings::default(), &mut status).limits.typed().expect("limits");
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        let rates: Vec<(u32, u32, u32)> = limits.rates.iter().map(|r| (r.requests, r.per_seconds, r.burst)).collect();
        assert_eq!(rates, [(5, 1, 10), (100, 60, 200)]);
        assert_eq!((limits.concurrent, limits.exempt.len(), limits.status), (Some(3), 1, 503));
        let (s, status) = read_one("nginx.ingress.kubernetes.io/limit-rpm", "-1");
        assert_eq!(
            (s.unhonoured.len(), status.problems[0].reason),
            (1, Reason::Invalid),
            "a limit that does not read closes the routes"
        );
    }

    /// `auth-cache-key`, `auth-cache-duration` (nginx's `proxy_cache_valid` list),
    /// `auth-proxy-set-headers` and `custom-headers`: valid, invalid (the key named, and the
    /// routes closed for the ones that guard), default.
    #[test]
    fn auth_cache_and_header_keys() {
        let durations =
            |v: &str| cache_durations(v).map(|d| d.into_iter().map(|d| (d.statuses, d.seconds)).collect::<Vec<_>>());
        assert_eq!(durations("200 202 10m, 401 5m"), Ok(vec![(vec![200, 202], 600), (vec![401], 300)]));
        assert_eq!(durations("any 1h30m"), Ok(vec![(vec![], 5400)]), "any status");
        assert_eq!(durations("30"), Ok(vec![(vec![200, 301, 302], 30)]), "nginx's statuses when none");
        for bad in ["", "200 ten", "700 5m", "200 5x"] {
            assert!(durations(bad).is_err(), "{bad:?}");
        }
        let default = Settings::default().external_auth;
        assert_eq!((default.cache_key.clone(), default.cache_durations.len()), (None, 1), "no cache unless a key");
        assert_eq!(default.cache_durations[0].statuses, [200, 202, 401]);

        let (s, status) = read_one("nginx.ingress.kubernetes.io/auth-cache-key", "$remote_user$http_authorization");
        assert!(status.problems.is_empty() && s.external_auth.cache_key.is_some(), "{:?}", status.problems);
        for (key, value) in [
            ("nginx.ingress.kubernetes.io/auth-cache-key", "$no_such_variable"),
            ("nginx.ingress.kubernetes.io/auth-cache-duration", "soon"),
            ("nginx.ingress.kubernetes.io/auth-proxy-set-headers", "a/b/c"),
        ] {
            let (s, status) = read_one(key, value);
            assert_eq!(s.unhonoured, [key], "{key}: the routes answer 503");
            assert_eq!(status.problems[0].field, format!("metadata.annotations[{key:?}]"));
        }
        let (s, _) = read_one("tidegate.dev/auth-proxy-set-headers", "ns/headers");
        assert_eq!(s.external_auth.proxy_set_headers.as_deref(), Some("ns/headers"));
        let (s, status) = read_one("nginx.ingress.kubernetes.io/custom-headers", "/x");
        assert!(s.custom_headers.is_none() && s.unhonoured.is_empty(), "ignored, with a warning");
        assert_eq!(status.problems[0].severity, crate::status::Severity::Warning);
        let (s, _) = read_one("nginx.ingress.kubernetes.io/custom-headers", "headers");
        assert_eq!(s.custom_headers.as_deref(), Some("headers"));
    }

    /// `tidegate.dev/limit-key` (ours only) and the `global-rate-limit*` keys: valid, invalid
    /// (the routes closed, the key named), defaults.
    #[test]
    fn limit_key_and_global_rate_limit_keys() {
        let (s, status) = read_one("tidegate.dev/limit-key", "$http_x_api_key");
        assert!(status.problems.is_empty());
        assert_eq!(s.limits.key.as_ref().map(Template::as_str), Some("$http_x_api_key"));
        let (s, status) = read_one("nginx.ingress.kubernetes.io/limit-key", "$http_x_api_key");
        assert!(s.limits.key.is_none(), "tidegate's own key, not under ingress-nginx's prefix");
        assert_eq!(status.problems[0].reason, Reason::UnsupportedAnnotation);
        let shared = SharedLimitKeys::default();
        assert_eq!((shared.key.as_str(), shared.status), ("$remote_addr", 429), "ingress-nginx's defaults");
        assert_eq!(shared.typed("ns/a".into()), Ok(None));
        let mut status = ObjectStatus::new(ObjectRef::namespaced("Ingress", "ns", "x"));
        let keys = BTreeMap::from([
            ("nginx.ingress.kubernetes.io/global-rate-limit".to_owned(), "100".to_owned()),
            ("nginx.ingress.kubernetes.io/global-rate-limit-window".to_owned(), "1m".to_owned()),
            ("nginx.ingress.kubernetes.io/global-rate-limit-key".to_owned(), "$http_x_tenant".to_owned()),
            ("nginx.ingress.kubernetes.io/global-rate-limit-ignored-cidrs".to_owned(), "10.0.0.0/8".to_owned()),
        ]);
        let s = read(Some(&keys), &Settings::default(), &mut status);
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        let limit = s.limits.shared.typed("ns/x".into()).expect("both set").expect("a limit");
        assert_eq!((limit.requests, limit.window_seconds, limit.key.as_str()), (100, 60, "$http_x_tenant"));
        assert_eq!((limit.id.as_str(), limit.ignored.len()), ("ns/x", 1));
        for (key, value) in [
            ("nginx.ingress.kubernetes.io/global-rate-limit", "lots"),
            ("nginx.ingress.kubernetes.io/global-rate-limit-window", "soon"),
            ("nginx.ingress.kubernetes.io/global-rate-limit-key", "$nope"),
            ("nginx.ingress.kubernetes.io/global-rate-limit-ignored-cidrs", "10.0.0.0/99"),
            ("tidegate.dev/limit-key", "$nope"),
        ] {
            let (s, _) = read_one(key, value);
            assert_eq!(s.unhonoured, [key], "{key}: the routes answer 503");
        }
        let (s, _) = read_one("nginx.ingress.kubernetes.io/global-rate-limit", "5");
        assert!(s.limits.shared.typed("ns/x".into()).is_err(), "a limit without its window");
    }

    /// `server-alias`, `from-to-www-redirect`, `proxy-redirect-from` / `-to`,
    /// `preserve-trailing-slash`, `use-regex` and `rewrite-target`.
    #[test]
    fn host_and_redirect_keys() {
        let (s, status) = read_one("nginx.ingress.kubernetes.io/server-alias", "B.test, c.test");
        assert!(status.problems.is_empty());
        assert_eq!(s.aliases, ["b.test", "c.test"]);
        let (s, status) = read_one("nginx.ingress.kubernetes.io/server-alias", "not a host");
        assert!(s.aliases.is_empty() && status.problems[0].field.ends_with("server-alias\"]"), "a warning");
        assert!(read_one("nginx.ingress.kubernetes.io/from-to-www-redirect", "true").0.www_redirect);
        let (s, _) = read_one("nginx.ingress.kubernetes.io/proxy-redirect-from", "off");
        assert_eq!(s.redirect_from, None, "ingress-nginx's default");
        let (s, _) = read_one("nginx.ingress.kubernetes.io/proxy-redirect-to", "/app/");
        assert_eq!(s.redirect_to.as_deref(), Some("/app/"));
        assert!(read_one("nginx.ingress.kubernetes.io/preserve-trailing-slash", "yes").1.problems.len() == 1);
        assert!(read_one("nginx.ingress.kubernetes.io/use-regex", "maybe").1.problems.len() == 1);
        let (s, _) = read_one("nginx.ingress.kubernetes.io/rewrite-target", "/$2");
        assert_eq!(s.rewrite_target.as_deref(), Some("/$2"));
        assert!(read_one("nginx.ingress.kubernetes.io/rewrite-target", "/a b").0.rewrite_target.is_none());
    }

    /// `custom-http-errors`, `default-backend`, `disable-proxy-intercept-errors`.
    #[test]
    fn error_page_keys() {
        let (s, status) = read_one("nginx.ingress.kubernetes.io/custom-http-errors", "404, 503,502");
        assert!(status.problems.is_empty());
        assert_eq!(s.error_codes, [404, 503, 502]);
        let (s, status) = read_one("nginx.ingress.kubernetes.io/custom-http-errors", "404,302");
        assert!(s.error_codes.is_empty() && status.problems.len() == 1, "302 is no error");
        let (s, _) = read_one("nginx.ingress.kubernetes.io/default-backend", "error-pages");
        assert_eq!(s.default_backend.as_deref(), Some("error-pages"));
        assert!(read_one("nginx.ingress.kubernetes.io/default-backend", "other/ns").0.default_backend.is_none());
        assert!(read_one("nginx.ingress.kubernetes.io/disable-proxy-intercept-errors", "true").0.only_proxy_errors);
    }

    /// `backend-protocol` and the `proxy-ssl-*` keys, as ingress-nginx spells them.
    #[test]
    fn backend_keys() {
        for (value, protocol) in [
            ("HTTP", UpstreamProtocol::Http1),
            ("HTTPS", UpstreamProtocol::Https),
            ("GRPC", UpstreamProtocol::H2c),
            ("GRPCS", UpstreamProtocol::H2),
            ("AUTO_HTTP", UpstreamProtocol::Negotiated),
            ("grpcs", UpstreamProtocol::H2),
        ] {
            let (settings, status) = read_one("nginx.ingress.kubernetes.io/backend-protocol", value);
            assert!(status.problems.is_empty(), "{value}: {:?}", status.problems);
            assert_eq!(settings.upstream.protocol, Some(protocol), "{value}");
        }
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/proxy-ssl-protocols", "TLSv1 TLSv1.3 TLSv1.2");
        assert_eq!(settings.upstream.versions, vec![TlsVersion::Tls12, TlsVersion::Tls13], "TLSv1 left out");
        let (settings, status) =
            read_one("nginx.ingress.kubernetes.io/proxy-ssl-ciphers", "ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA");
        assert!(status.problems.is_empty());
        assert!(settings.upstream.ciphers.contains(&"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_owned()));
        assert!(settings.upstream.ciphers.iter().any(|c| c.starts_with("TLS13_")), "TLS 1.3 suites stay");
        let (settings, status) = read_one("nginx.ingress.kubernetes.io/proxy-ssl-ciphers", "AES128-SHA:DES-CBC3-SHA");
        assert!(settings.upstream.ciphers.is_empty(), "none it speaks: the default applies");
        assert_eq!(status.problems[0].severity, crate::status::Severity::Warning);
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/proxy-ssl-server-name", "on");
        assert!(settings.upstream.sni);
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/proxy-ssl-verify-depth", "3");
        assert_eq!(settings.upstream.depth, 3);
    }

    /// `load-balance`, `upstream-hash-by*` and `proxy-next-upstream*`.
    #[test]
    fn balance_and_retry_keys() {
        use tidegate_snapshot::{Balance, Retry};
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/load-balance", "ewma");
        assert_eq!(settings.upstream.balance(), Balance::Ewma);
        let (settings, status) = read_one("nginx.ingress.kubernetes.io/load-balance", "least_conn");
        assert_eq!(settings.upstream.balance(), Balance::RoundRobin);
        assert_eq!(status.problems[0].severity, crate::status::Severity::Warning);
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/upstream-hash-by", "$http_x_user$cookie_id");
        assert!(matches!(settings.upstream.balance(), Balance::Hash { subset_size: None, .. }));
        let (settings, _) =
            read_one("nginx.ingress.kubernetes.io/proxy-next-upstream", "error http_502 non_idempotent");
        let retry = &settings.upstream.retry;
        assert!(retry.on_error && !retry.on_timeout && retry.non_idempotent);
        assert_eq!(retry.on_statuses, vec![502]);
        assert_eq!(retry.tries, 3);
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/proxy-next-upstream", "off");
        assert!(!settings.upstream.retry.on_error && !settings.upstream.retry.on_timeout);
        let (settings, status) = read_one("nginx.ingress.kubernetes.io/proxy-next-upstream", "error sometimes");
        assert_eq!(settings.upstream.retry, Retry::default(), "the default applies");
        assert_eq!(status.problems.len(), 1);
        let (settings, _) = read_one("nginx.ingress.kubernetes.io/proxy-next-upstream-timeout", "5");
        assert_eq!(settings.upstream.retry.timeout_ms, 5000);
    }
}
