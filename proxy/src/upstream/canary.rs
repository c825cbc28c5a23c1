//! A route's canary backend, as ingress-nginx's canary Ingresses decide it: the header first,
//! then the cookie, then the weight. `always` in the header or the cookie sends a request to
//! the canary and `never` keeps it off; with `canary-by-header-value` (or `-pattern`), the
//! header's value must equal (or match) it instead, and other values fall through to the
//! cookie and the weight.
//!
//! Before those, unless `affinity-canary-behavior: legacy`, sessions decide (ingress-nginx's
//! `sticky`, the default): a request whose session cookie belongs to the main backend stays
//! there, and one whose session belongs to the canary goes to it.

use http::HeaderMap;
use tidegate_snapshot::{Affinity, Canary};

use super::balance::random;

/// A canary, its pattern compiled once per route.
#[derive(Debug)]
pub(crate) struct CanaryRule {
    pub(crate) canary: Canary,
    pattern: Option<regex::Regex>,
    /// The canary backend's tag in session cookies.
    pub(crate) tag: Box<str>,
}

impl CanaryRule {
    /// `Err` when the pattern does not compile (the controller checks it; a proxy that gets
    /// one anyway leaves the canary out).
    pub(crate) fn new(canary: &Canary) -> Result<CanaryRule, String> {
        let pattern = match &canary.header_pattern {
            Some(p) => Some(regex::Regex::new(p).map_err(|e| format!("canary header pattern {p:?}: {e}"))?),
            None => None,
        };
        let tag = super::affinity::backend_tag(&canary.backend);
        Ok(CanaryRule { canary: canary.clone(), pattern, tag })
    }

    /// Whether a request with `headers` goes to the canary; `main`: the main backend's session
    /// affinity and tag, when it has one.
    pub(crate) fn takes(&self, headers: &HeaderMap, main: Option<(&Affinity, &str)>) -> bool {
        let c = &self.canary;
        if !c.legacy_affinity {
            if main.is_some_and(|(affinity, tag)| super::affinity::carries(affinity, tag, headers)) {
                return false;
            }
            if c.upstream.affinity.as_ref().is_some_and(|a| super::affinity::carries(a, &self.tag, headers)) {
                return true;
            }
        }
        if let Some(name) = &c.header
            && let Some(value) = headers.get(name.as_str()).and_then(|v| v.to_str().ok())
        {
            match (&c.header_value, &self.pattern) {
                (Some(wanted), _) if value == wanted => return true,
                (None, Some(pattern)) if pattern.is_match(value) => return true,
                (None, None) if value == "always" => return true,
                (None, None) if value == "never" => return false,
                _ => {}
            }
        }
        if let Some(name) = &c.cookie
            && let Some(value) = crate::headers::cookie(headers, name)
        {
            match value {
                "always" => return true,
                "never" => return false,
                _ => {}
            }
        }
        c.weight > 0 && random() % u64::from(c.weight_total.max(1)) < u64::from(c.weight)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use tidegate_snapshot::BackendId;

    use super::*;

    fn rule(f: impl FnOnce(&mut Canary)) -> CanaryRule {
        let mut canary = Canary {
            backend: BackendId("t/canary:80".into()),
            upstream: Default::default(),
            header: None,
            header_value: None,
            header_pattern: None,
            cookie: None,
            weight: 0,
            weight_total: 100,
            legacy_affinity: false,
        };
        f(&mut canary);
        CanaryRule::new(&canary).expect("compiles")
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn header_then_cookie_then_weight() {
        let r = rule(|c| {
            c.header = Some("x-canary".into());
            c.cookie = Some("canary".into());
            c.weight = 100;
        });
        assert!(!r.takes(&headers(&[("x-canary", "never")]), None), "never, whatever the weight");
        assert!(!r.takes(&headers(&[("x-canary", "never"), ("cookie", "canary=always")]), None), "the header first");
        assert!(!r.takes(&headers(&[("cookie", "canary=never")]), None), "the cookie before the weight");
        assert!(r.takes(&headers(&[("x-canary", "other")]), None), "another value falls to the weight");
        let r = rule(|c| {
            c.header = Some("x-region".into());
            c.header_value = Some("eu".into());
        });
        assert!(r.takes(&headers(&[("x-region", "eu")]), None));
        assert!(!r.takes(&headers(&[("x-region", "always")]), None), "with a value, always is just a value");
        let r = rule(|c| {
            c.header = Some("x-user".into());
            c.header_pattern = Some("^beta-".into());
        });
        assert!(r.takes(&headers(&[("x-user", "beta-7")]), None));
        assert!(!r.takes(&headers(&[("x-user", "ga-7")]), None));
    }

    #[test]
    fn weight_is_a_share_of_the_total() {
        let r = rule(|c| {
            c.weight = 30;
            c.weight_total = 100;
        });
        let taken = (0..10_000).filter(|_| r.takes(&HeaderMap::new(), None)).count();
        assert!((2_700..3_300).contains(&taken), "{taken} of 10,000");
    }

    /// `affinity-canary-behavior: sticky` (the default): a session's backend decides before the
    /// header, the cookie and the weight; `legacy` leaves sessions out of it.
    #[test]
    fn sessions_stick_to_their_backend_unless_legacy() {
        let affinity = |cookie: &str| Affinity { cookie: cookie.into(), ..Affinity::default() };
        let main = affinity("INGRESSCOOKIE");
        let main_tag = crate::upstream::affinity::backend_tag(&BackendId("t/main:80".into()));
        let sticky = rule(|c| {
            c.header = Some("x-canary".into());
            c.weight = 0;
            c.upstream.affinity = Some(affinity("INGRESSCOOKIE"));
        });
        let canary_session = format!("INGRESSCOOKIE=abc|{}", sticky.tag);
        let main_session = format!("INGRESSCOOKIE=abc|{main_tag}");
        let with = |cookie: &str, extra: &[(&'static str, &'static str)]| {
            let mut h = headers(extra);
            h.insert(http::header::COOKIE, HeaderValue::from_str(cookie).expect("cookie"));
            h
        };
        let main = Some((&main, &*main_tag));
        assert!(sticky.takes(&with(&canary_session, &[]), main), "a canary session stays on the canary at weight 0");
        assert!(
            !sticky.takes(&with(&main_session, &[("x-canary", "always")]), main),
            "a main session stays off the canary, whatever the header"
        );
        assert!(sticky.takes(&with("INGRESSCOOKIE=abc", &[("x-canary", "always")]), main), "no tag: the rules");
        let legacy = rule(|c| {
            c.weight = 0;
            c.upstream.affinity = Some(affinity("INGRESSCOOKIE"));
            c.legacy_affinity = true;
        });
        let canary_session = format!("INGRESSCOOKIE=abc|{}", legacy.tag);
        assert!(!legacy.takes(&with(&canary_session, &[]), main), "legacy: the weight alone (0)");
    }
}
