//! IP rules (`whitelist-source-range` / `allowlist-source-range`, `denylist-source-range`), as
//! nginx's `deny` lines then `allow` lines then `deny all` that ingress-nginx writes: a client in
//! the denylist gets 403; else, with an allowlist, a client outside it gets 403.

use std::net::IpAddr;

use http::StatusCode;
use tidegate_snapshot::{Cidr, IpRules};

use super::Verdict;
use crate::respond::error_response;

#[derive(Debug)]
pub(super) struct IpFilter {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl IpFilter {
    pub(super) fn new(rules: &IpRules) -> IpFilter {
        IpFilter { allow: rules.allow.clone(), deny: rules.deny.clone() }
    }

    pub(super) fn check(&self, client: IpAddr) -> Verdict {
        let denied = self.deny.iter().any(|c| c.contains(client))
            || (!self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(client)));
        if denied { Verdict::Answer(error_response(StatusCode::FORBIDDEN)) } else { Verdict::Continue }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> IpFilter {
        let list = |l: &[&str]| l.iter().map(|c| c.parse().expect("cidr")).collect();
        IpFilter::new(&IpRules { allow: list(allow), deny: list(deny) })
    }

    fn allowed(filter: &IpFilter, client: &str) -> bool {
        matches!(filter.check(client.parse().expect("ip")), Verdict::Continue)
    }

    #[test]
    fn allowlist_admits_only_its_networks() {
        let f = filter(&["10.0.0.0/8", "2001:db8::/32"], &[]);
        assert!(allowed(&f, "10.1.2.3") && allowed(&f, "2001:db8::5") && allowed(&f, "::ffff:10.9.9.9"));
        assert!(!allowed(&f, "127.0.0.1") && !allowed(&f, "::1"));
    }

    #[test]
    fn denylist_refuses_its_networks_and_wins_over_the_allowlist() {
        let f = filter(&[], &["127.0.0.0/8"]);
        assert!(!allowed(&f, "127.0.0.1") && allowed(&f, "10.0.0.1"));
        let f = filter(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(allowed(&f, "10.2.0.1") && !allowed(&f, "10.1.0.1"));
    }
}
