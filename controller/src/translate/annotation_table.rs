//! The annotation table the README shows: every key of ingress-nginx's annotation reference and
//! tidegate's own, with what tidegate does with it. Made from [`super::annotations::KEYS`], so
//! that it cannot say other than the code does (a test compares it with the README).

use super::annotations::{Handling, KEYS, NGINX, OURS, Pattern};

/// The keys of ingress-nginx's annotation reference (`nginx.ingress.kubernetes.io/` + key), as
/// its documentation lists them, retired ones included: migrating Ingresses still carry them.
pub(crate) const INGRESS_NGINX_KEYS: &[&str] = &[
    "affinity",
    "affinity-canary-behavior",
    "affinity-mode",
    "allowlist-source-range",
    "app-root",
    "auth-always-set-cookie",
    "auth-cache-duration",
    "auth-cache-key",
    "auth-keepalive",
    "auth-keepalive-requests",
    "auth-keepalive-share-vars",
    "auth-keepalive-timeout",
    "auth-method",
    "auth-proxy-set-headers",
    "auth-realm",
    "auth-request-redirect",
    "auth-response-headers",
    "auth-secret",
    "auth-secret-type",
    "auth-signin",
    "auth-signin-redirect-param",
    "auth-snippet",
    "auth-tls-error-page",
    "auth-tls-match-cn",
    "auth-tls-pass-certificate-to-upstream",
    "auth-tls-secret",
    "auth-tls-verify-client",
    "auth-tls-verify-depth",
    "auth-type",
    "auth-url",
    "backend-protocol",
    "canary",
    "canary-by-cookie",
    "canary-by-header",
    "canary-by-header-pattern",
    "canary-by-header-value",
    "canary-weight",
    "canary-weight-total",
    "client-body-buffer-size",
    "configuration-snippet",
    "connection-proxy-header",
    "cors-allow-credentials",
    "cors-allow-headers",
    "cors-allow-methods",
    "cors-allow-origin",
    "cors-expose-headers",
    "cors-max-age",
    "custom-headers",
    "custom-http-errors",
    "default-backend",
    "denylist-source-range",
    "disable-proxy-intercept-errors",
    "enable-access-log",
    "enable-cors",
    "enable-global-auth",
    "enable-influxdb",
    "enable-modsecurity",
    "enable-opentelemetry",
    "enable-opentracing",
    "enable-owasp-core-rules",
    "enable-rewrite-log",
    "force-ssl-redirect",
    "from-to-www-redirect",
    "global-rate-limit",
    "global-rate-limit-ignored-cidrs",
    "global-rate-limit-key",
    "global-rate-limit-window",
    "http2-push-preload",
    "influxdb-host",
    "influxdb-measurement",
    "influxdb-port",
    "influxdb-server-name",
    "limit-allowlist",
    "limit-burst-multiplier",
    "limit-connections",
    "limit-rate",
    "limit-rate-after",
    "limit-rpm",
    "limit-rps",
    "limit-whitelist",
    "load-balance",
    "mirror-host",
    "mirror-request-body",
    "mirror-target",
    "modsecurity-snippet",
    "modsecurity-transaction-id",
    "opentelemetry-operation-name",
    "opentelemetry-trust-incoming-span",
    "opentracing-trust-incoming-span",
    "permanent-redirect",
    "permanent-redirect-code",
    "preserve-trailing-slash",
    "proxy-body-size",
    "proxy-buffer-size",
    "proxy-buffering",
    "proxy-buffers-number",
    "proxy-connect-timeout",
    "proxy-cookie-domain",
    "proxy-cookie-path",
    "proxy-http-version",
    "proxy-max-temp-file-size",
    "proxy-next-upstream",
    "proxy-next-upstream-timeout",
    "proxy-next-upstream-tries",
    "proxy-read-timeout",
    "proxy-redirect-from",
    "proxy-redirect-to",
    "proxy-request-buffering",
    "proxy-send-timeout",
    "proxy-ssl-ciphers",
    "proxy-ssl-name",
    "proxy-ssl-protocols",
    "proxy-ssl-secret",
    "proxy-ssl-server-name",
    "proxy-ssl-verify",
    "proxy-ssl-verify-depth",
    "relative-redirects",
    "rewrite-target",
    "satisfy",
    "server-alias",
    "server-snippet",
    "service-upstream",
    "session-cookie-change-on-failure",
    "session-cookie-conditional-samesite-none",
    "session-cookie-domain",
    "session-cookie-expires",
    "session-cookie-max-age",
    "session-cookie-name",
    "session-cookie-path",
    "session-cookie-samesite",
    "session-cookie-secure",
    "ssl-ciphers",
    "ssl-passthrough",
    "ssl-prefer-server-ciphers",
    "ssl-redirect",
    "stream-snippet",
    "temporal-redirect",
    "temporal-redirect-code",
    "upstream-hash-by",
    "upstream-hash-by-subset",
    "upstream-hash-by-subset-size",
    "upstream-vhost",
    "use-regex",
    "whitelist-source-range",
    "x-forwarded-prefix",
];

/// What tidegate does with one key, as the table says it.
/// What to write instead of the keys tidegate does not honour (by prefix, first match), for the
/// table and the migration report.
const INSTEAD: &[(&str, &str)] = &[
    ("auth-snippet", "an `access` Lua handler (a LuaRoute, or `tidegate.dev/access-by-lua`)"),
    ("enable-modsecurity", "no WAF: checks in an `access` Lua handler, or a WAF in front of tidegate"),
    ("enable-owasp-core-rules", "no WAF: checks in an `access` Lua handler, or a WAF in front of tidegate"),
    ("modsecurity-", "no WAF: checks in an `access` Lua handler, or a WAF in front of tidegate"),
    (
        "ssl-passthrough",
        "the controller's `--enable-ssl-passthrough` (the chart's `enableSslPassthrough`), as in ingress-nginx; or TLS ends in tidegate: the host's certificate in `spec.tls`, and `backend-protocol: HTTPS`",
    ),
    ("enable-opentelemetry", "the request ID (`X-Request-ID`) in the access log, and the metrics at `/metrics`"),
    ("opentelemetry-", "the request ID (`X-Request-ID`) in the access log, and the metrics at `/metrics`"),
    ("enable-opentracing", "the request ID (`X-Request-ID`) in the access log, and the metrics at `/metrics`"),
    ("opentracing-", "the request ID (`X-Request-ID`) in the access log, and the metrics at `/metrics`"),
    ("enable-influxdb", "the Prometheus metrics on the admin port (`/metrics`)"),
    ("influxdb-", "the Prometheus metrics on the admin port (`/metrics`)"),
    ("proxy-cookie-", "a `headerFilter` Lua handler rewriting `Set-Cookie`"),
    ("enable-rewrite-log", "the access log, and `RUST_LOG=debug`"),
    ("http2-push-preload", "nothing: browsers no longer take HTTP/2 push"),
    ("stream-snippet", "nothing: TCP and UDP services are not proxied"),
    ("ssl-ciphers", "the ConfigMap's `ssl-protocols`; the cipher suites are rustls' safe defaults"),
    ("ssl-prefer-server-ciphers", "nothing: rustls prefers the server's order"),
    ("configuration-snippet", "annotations or a LuaRoute handler for the refused lines (see each line)"),
    ("server-snippet", "annotations or a LuaRoute handler for the refused lines (see each line)"),
];

/// What to write instead of annotation `name` (without prefix), when the table has advice.
pub(crate) fn instead(name: &str) -> Option<&'static str> {
    INSTEAD
        .iter()
        .find(|(key, _)| if key.ends_with('-') { name.starts_with(key) } else { name == *key })
        .map(|(_, what)| *what)
}

fn verdict(name: &str, ours: bool) -> (&'static str, &'static str) {
    let row = KEYS.iter().find(|k| k.pattern.covers(name) && (ours || !k.ours_only));
    match row.map(|k| (k.handling, k.default)) {
        Some((Handling::Parsed(_), default)) => ("honoured", default),
        Some((Handling::Guards(_), default)) => ("honoured; a value that does not read answers 503", default),
        Some((Handling::Restricts, _)) => ("**not yet: answers 503** (restricts access)", ""),
        None => ("not yet: ignored, with a warning", ""),
    }
}

/// The Markdown table, one row per key, sorted; and the count of ingress-nginx keys honoured.
pub fn annotation_table() -> String {
    let mut rows = Vec::new();
    let mut honoured = 0;
    for name in INGRESS_NGINX_KEYS {
        let (what, default) = verdict(name, false);
        honoured += usize::from(what.starts_with("honoured"));
        let default = if default.is_empty() { String::new() } else { format!("`{default}`") };
        let what = match instead(name) {
            Some(instead) if !what.starts_with("honoured") => format!("{what}; instead: {instead}"),
            _ => what.to_owned(),
        };
        rows.push(format!("| `{name}` | {what} | {default} |"));
    }
    let ours_only = KEYS.iter().filter(|k| k.ours_only).filter_map(|k| match k.pattern {
        Pattern::Exact(name) => Some(name),
        _ => None,
    });
    let mut own = Vec::new();
    for name in ours_only {
        own.push(format!("| `{OURS}{name}` | honoured (tidegate's own) | |"));
    }
    format!(
        "{honoured} of ingress-nginx's {} annotation keys are honoured. Each key is read under `{NGINX}` and under \
         `{OURS}` alike.\n\n| key | tidegate | default |\n|---|---|---|\n{}\n{}\n",
        INGRESS_NGINX_KEYS.len(),
        rows.join("\n"),
        own.join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key not honoured has advice.
    #[test]
    fn keys_not_honoured_say_what_to_write_instead() {
        for name in INGRESS_NGINX_KEYS {
            if !verdict(name, false).0.starts_with("honoured") {
                assert!(instead(name).is_some(), "{name}: no advice");
            }
        }
    }

    #[test]
    fn keys_are_sorted_and_unique() {
        let mut sorted = INGRESS_NGINX_KEYS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, INGRESS_NGINX_KEYS, "sorted, no repeats");
    }

    /// Every exact key of the parser table is one of ingress-nginx's, or tidegate's own.
    #[test]
    fn every_parsed_key_is_known() {
        for key in KEYS {
            if let Pattern::Exact(name) = key.pattern {
                assert!(key.ours_only || INGRESS_NGINX_KEYS.contains(&name), "{name}");
            }
        }
    }
}
