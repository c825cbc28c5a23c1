//! Ingress annotations tidegate understands, under its own prefix and under ingress-nginx's so
//! that existing Ingresses keep their meaning. Annotations under either prefix that tidegate does
//! not implement are reported, never silently ignored.

use std::collections::BTreeMap;

use tidegate_snapshot::Timeouts;

use crate::status::{ObjectStatus, Reason};

pub(super) const OURS: &str = "tidegate.dev/";
pub(super) const NGINX: &str = "nginx.ingress.kubernetes.io/";

/// The settings an Ingress's annotations select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Settings {
    /// Redirect plain HTTP to HTTPS on hosts with TLS (`ssl-redirect`, default true).
    pub(super) ssl_redirect: bool,
    /// `proxy-connect-timeout`, `proxy-read-timeout` and `proxy-send-timeout`, in seconds.
    pub(super) timeouts: Timeouts,
    /// `tidegate.dev/lua-route`: the LuaRoute whose handlers run on this Ingress's paths.
    pub(super) lua_route: Option<String>,
    /// `tidegate.dev/<phase>-by-lua` inline handlers: (phase, annotation key, source).
    pub(super) snippets: Vec<(Phase, String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { ssl_redirect: true, timeouts: Timeouts::default(), lua_route: None, snippets: Vec::new() }
    }
}

/// Lua phases as the snippet annotations name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Rewrite,
    Access,
    Content,
    HeaderFilter,
    BodyFilter,
    Log,
}

impl Phase {
    pub(crate) const ALL: [Phase; 6] =
        [Phase::Rewrite, Phase::Access, Phase::Content, Phase::HeaderFilter, Phase::BodyFilter, Phase::Log];

    /// The annotation name: `access-by-lua`.
    fn annotation(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite-by-lua",
            Phase::Access => "access-by-lua",
            Phase::Content => "content-by-lua",
            Phase::HeaderFilter => "header-filter-by-lua",
            Phase::BodyFilter => "body-filter-by-lua",
            Phase::Log => "log-by-lua",
        }
    }

    /// The field name in a LuaRoute: `headerFilter`.
    pub(crate) fn field(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::Content => "content",
            Phase::HeaderFilter => "headerFilter",
            Phase::BodyFilter => "bodyFilter",
            Phase::Log => "log",
        }
    }
}

/// Reads the annotations, recording a problem for each value that does not parse and each
/// annotation under our prefixes that tidegate does not implement.
pub(super) fn read(annotations: Option<&BTreeMap<String, String>>, status: &mut ObjectStatus) -> Settings {
    let mut settings = Settings::default();
    for (key, value) in annotations.into_iter().flatten() {
        let (prefix, name) = if let Some(name) = key.strip_prefix(OURS) {
            (OURS, name)
        } else if let Some(name) = key.strip_prefix(NGINX) {
            (NGINX, name)
        } else {
            continue;
        };
        let field = format!("metadata.annotations[{key:?}]");
        match name {
            "ssl-redirect" => match value.as_str() {
                "true" => settings.ssl_redirect = true,
                "false" => settings.ssl_redirect = false,
                _ => status.warning(Reason::Invalid, field, format!("{value:?} is not \"true\" or \"false\"; ignored")),
            },
            "proxy-connect-timeout" => match seconds(value) {
                Ok(ms) => settings.timeouts.connect_ms = ms,
                Err(why) => status.warning(Reason::Invalid, field, why),
            },
            "proxy-read-timeout" => match seconds(value) {
                Ok(ms) => settings.timeouts.read_ms = ms,
                Err(why) => status.warning(Reason::Invalid, field, why),
            },
            "proxy-send-timeout" => match seconds(value) {
                Ok(ms) => settings.timeouts.send_ms = ms,
                Err(why) => status.warning(Reason::Invalid, field, why),
            },
            "lua-route" if prefix == OURS => settings.lua_route = Some(value.clone()),
            snippet if prefix == OURS && Phase::ALL.iter().any(|p| p.annotation() == snippet) => {
                let phase = Phase::ALL.into_iter().find(|p| p.annotation() == snippet).unwrap_or(Phase::Access);
                settings.snippets.push((phase, key.clone(), value.clone()));
            }
            _ if prefix == OURS => status.warning(Reason::Invalid, field, "unknown tidegate annotation; ignored"),
            _ => status.warning(
                Reason::Unsupported,
                field,
                "ingress-nginx annotation not supported by tidegate; ignored",
            ),
        }
    }
    settings
}

/// ingress-nginx timeouts are whole seconds; a trailing `s` is accepted.
fn seconds(value: &str) -> Result<u64, String> {
    let digits = value.strip_suffix('s').unwrap_or(value);
    match digits.parse::<u64>() {
        Ok(s) if (1..=86_400).contains(&s) => Ok(s * 1000),
        _ => Err(format!("{value:?} is not a number of seconds between 1 and 86400; ignored")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ObjectRef;

    fn read_one(key: &str, value: &str) -> (Settings, ObjectStatus) {
        let mut status = ObjectStatus::new(ObjectRef::namespaced("Ingress", "ns", "x"));
        let map = BTreeMap::from([(key.to_owned(), value.to_owned())]);
        (read(Some(&map), &mut status), status)
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
        let (_, status) = read_one("nginx.ingress.kubernetes.io/rewrite-target", "/");
        assert_eq!(status.problems[0].reason, Reason::Unsupported);
        let (_, status) = read_one("tidegate.dev/frobnicate", "1");
        assert_eq!(status.problems[0].reason, Reason::Invalid);
        let (_, status) = read_one("kubectl.kubernetes.io/last-applied-configuration", "{}");
        assert!(status.problems.is_empty());
    }
}
