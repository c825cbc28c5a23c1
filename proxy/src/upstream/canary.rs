//! A route's canary backend, as ingress-nginx's canary Ingresses decide it: the header first,
//! then the cookie, then the weight. `always` in the header or the cookie sends a request to
//! the canary and `never` keeps it off; with `canary-by-header-value` (or `-pattern`), the
//! header's value must equal (or match) it instead, and other values fall through to the
//! cookie and the weight.

use http::HeaderMap;
use tidegate_snapshot::Canary;

use super::balance::random;

/// A canary, its pattern compiled once per route.
#[derive(Debug)]
pub(crate) struct CanaryRule {
    pub(crate) canary: Canary,
    pattern: Option<regex::Regex>,
}

impl CanaryRule {
    /// `Err` when the pattern does not compile (the controller checks it; a proxy that gets
    /// one anyway leaves the canary out).
    pub(crate) fn new(canary: &Canary) -> Result<CanaryRule, String> {
        let pattern = match &canary.header_pattern {
            Some(p) => Some(regex::Regex::new(p).map_err(|e| format!("canary header pattern {p:?}: {e}"))?),
            None => None,
        };
        Ok(CanaryRule { canary: canary.clone(), pattern })
    }

    /// Whether a request with `headers` goes to the canary.
    pub(crate) fn takes(&self, headers: &HeaderMap) -> bool {
        let c = &self.canary;
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
        assert!(!r.takes(&headers(&[("x-canary", "never")])), "never, whatever the weight");
        assert!(!r.takes(&headers(&[("x-canary", "never"), ("cookie", "canary=always")])), "the header first");
        assert!(!r.takes(&headers(&[("cookie", "canary=never")])), "the cookie before the weight");
        assert!(r.takes(&headers(&[("x-canary", "other")])), "another value falls to the weight");
        let r = rule(|c| {
            c.header = Some("x-region".into());
            c.header_value = Some("eu".into());
        });
        assert!(r.takes(&headers(&[("x-region", "eu")])));
        assert!(!r.takes(&headers(&[("x-region", "always")])), "with a value, always is just a value");
        let r = rule(|c| {
            c.header = Some("x-user".into());
            c.header_pattern = Some("^beta-".into());
        });
        assert!(r.takes(&headers(&[("x-user", "beta-7")])));
        assert!(!r.takes(&headers(&[("x-user", "ga-7")])));
    }

    #[test]
    fn weight_is_a_share_of_the_total() {
        let r = rule(|c| {
            c.weight = 30;
            c.weight_total = 100;
        });
        let taken = (0..10_000).filter(|_| r.takes(&HeaderMap::new())).count();
        assert!((2_700..3_300).contains(&taken), "{taken} of 10,000");
    }
}
