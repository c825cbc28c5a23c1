//! Clients refused for their `User-Agent` or `Referer` (the global ConfigMap's
//! `block-user-agents` and `block-referers`), 403, as ingress-nginx's `map` on those headers.
//! A pattern is a whole string matched ignoring case, or a regular expression after `~` (`~*`:
//! ignoring case). Regular expressions run on the `regex` crate: linear in the header's length,
//! whatever the pattern.

use http::header::{self, HeaderName};
use http::{HeaderMap, StatusCode};
use regex::RegexSet;
use tidegate_snapshot::Blocked;

use super::Verdict;
use crate::respond::error_response;

#[derive(Debug)]
pub(super) struct BlockedFilter {
    user_agents: Patterns,
    referers: Patterns,
}

#[derive(Debug)]
struct Patterns {
    /// Whole strings, matched ignoring ASCII case.
    strings: Vec<String>,
    /// The regular expressions, all tried in one pass.
    expressions: Option<RegexSet>,
}

impl Patterns {
    fn new(patterns: &[String]) -> Patterns {
        let mut strings = Vec::new();
        let mut expressions = Vec::new();
        for pattern in patterns {
            if let Some(regex) = pattern.strip_prefix("~*") {
                expressions.push(format!("(?i:{regex})"));
            } else if let Some(regex) = pattern.strip_prefix('~') {
                expressions.push(regex.to_owned());
            } else {
                strings.push(pattern.clone());
            }
        }
        // The controller checked each expression; one that still does not compile blocks
        // everyone rather than no one.
        let expressions = (!expressions.is_empty())
            .then(|| RegexSet::new(&expressions).unwrap_or_else(|_| RegexSet::new([""]).expect("empty pattern")));
        Patterns { strings, expressions }
    }

    fn matches(&self, headers: &HeaderMap, name: &HeaderName) -> bool {
        let Some(value) = headers.get(name) else { return false };
        let bytes = value.as_bytes();
        if self.strings.iter().any(|s| s.as_bytes().eq_ignore_ascii_case(bytes)) {
            return true;
        }
        match (&self.expressions, value.to_str()) {
            (Some(set), Ok(text)) => set.is_match(text),
            // A value that is not text is matched as Latin-1, as nginx sees bytes.
            (Some(set), Err(_)) => set.is_match(&bytes.iter().map(|&b| char::from(b)).collect::<String>()),
            (None, _) => false,
        }
    }
}

impl BlockedFilter {
    pub(super) fn new(blocked: &Blocked) -> BlockedFilter {
        BlockedFilter { user_agents: Patterns::new(&blocked.user_agents), referers: Patterns::new(&blocked.referers) }
    }

    pub(super) fn check(&self, headers: &HeaderMap) -> Verdict {
        if self.user_agents.matches(headers, &header::USER_AGENT) || self.referers.matches(headers, &header::REFERER) {
            return Verdict::Answer(error_response(StatusCode::FORBIDDEN));
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn with(name: HeaderName, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn strings_match_whole_ignoring_case_and_expressions_anywhere() {
        let filter = BlockedFilter::new(&Blocked {
            user_agents: vec!["BadBot/1.0".into(), "~*curl".into(), "~^Wget".into()],
            referers: vec!["~*spam\\.example".into()],
        });
        let blocked = |h: HeaderMap| matches!(filter.check(&h), Verdict::Answer(_));
        assert!(blocked(with(header::USER_AGENT, "badbot/1.0")));
        assert!(!blocked(with(header::USER_AGENT, "badbot/1.0 (compatible)")), "a string matches whole");
        assert!(blocked(with(header::USER_AGENT, "Mozilla CURL/8")));
        assert!(blocked(with(header::USER_AGENT, "Wget/1.21")));
        assert!(!blocked(with(header::USER_AGENT, "wget/1.21")), "~ keeps case");
        assert!(blocked(with(header::REFERER, "https://SPAM.example/x")));
        assert!(!blocked(with(header::USER_AGENT, "Mozilla/5.0")));
        assert!(!blocked(HeaderMap::new()), "no header, no match");
    }
}
