//! IP rules (`whitelist-source-range` / `allowlist-source-range`, `denylist-source-range`), as
//! nginx's `deny` lines then `allow` lines then `deny all` that ingress-nginx writes: a client in
//! the denylist gets 403; else, with an allowlist, a client outside it gets 403.

use std::net::IpAddr;

use http::StatusCode;
use tidegate_snapshot::{Cidr, IpRules};

use super::Verdict;
use crate::respond::error_response;

/// The rules compiled as nginx's access module keeps them: per family, an address and a mask
/// to compare with, so that a check is one canonical form of the client, then a masked compare
/// per network of its family.
#[derive(Debug)]
pub(super) struct IpFilter {
    allow: Networks,
    deny: Networks,
    /// Whether there is an allowlist (a client outside it is refused).
    allowlist: bool,
    /// A snippet's `allow` and `deny` lines, in order: the first that holds the client decides.
    ordered: Vec<(bool, Networks)>,
}

#[derive(Debug, Default)]
struct Networks {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Networks {
    fn new(cidrs: &[Cidr]) -> Networks {
        let mut networks = Networks::default();
        for cidr in cidrs {
            match cidr.network {
                IpAddr::V4(net) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(cidr.prefix)).unwrap_or(0);
                    networks.v4.push((u32::from(net) & mask, mask));
                }
                IpAddr::V6(net) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(cidr.prefix)).unwrap_or(0);
                    networks.v6.push((u128::from(net) & mask, mask));
                }
            }
        }
        networks
    }

    /// Whether `client` (in canonical form: IPv4-mapped addresses as IPv4) is in one of them.
    fn contain(&self, client: IpAddr) -> bool {
        match client {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|&(net, mask)| a & mask == net)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|&(net, mask)| a & mask == net)
            }
        }
    }
}

impl IpFilter {
    pub(super) fn new(rules: &IpRules) -> IpFilter {
        IpFilter {
            allow: Networks::new(&rules.allow),
            deny: Networks::new(&rules.deny),
            allowlist: !rules.allow.is_empty(),
            ordered: rules.ordered.iter().map(|r| (r.allow, Networks::new(&[r.network]))).collect(),
        }
    }

    pub(super) fn check(&self, client: IpAddr) -> Verdict {
        // `::ffff:10.1.2.3`, as a dual-stack listener reports IPv4 clients, is 10.1.2.3.
        let client = client.to_canonical();
        let denied = self.deny.contain(client)
            || (self.allowlist && !self.allow.contain(client))
            || self.ordered.iter().find(|(_, n)| n.contain(client)).is_some_and(|(allow, _)| !allow);
        if denied { Verdict::Answer(error_response(StatusCode::FORBIDDEN)) } else { Verdict::Continue }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> IpFilter {
        let list = |l: &[&str]| l.iter().map(|c| c.parse().expect("cidr")).collect();
        IpFilter::new(&IpRules { allow: list(allow), deny: list(deny), ordered: Vec::new() })
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
    fn ordered_rules_take_the_first_match_as_nginx() {
        use tidegate_snapshot::IpRule;
        let rule = |allow, c: &str| IpRule { allow, network: c.parse().expect("cidr") };
        let f = IpFilter::new(&IpRules {
            ordered: vec![
                rule(false, "10.1.0.0/16"),
                rule(true, "10.0.0.0/8"),
                rule(false, "0.0.0.0/0"),
                rule(false, "::/0"),
            ],
            ..IpRules::default()
        });
        assert!(
            allowed(&f, "10.2.0.1") && !allowed(&f, "10.1.0.1") && !allowed(&f, "192.0.2.1") && !allowed(&f, "::1")
        );
        let f = IpFilter::new(&IpRules { ordered: vec![rule(false, "192.0.2.0/24")], ..IpRules::default() });
        assert!(allowed(&f, "10.0.0.1") && !allowed(&f, "192.0.2.9"), "no match goes on");
    }

    #[test]
    fn denylist_refuses_its_networks_and_wins_over_the_allowlist() {
        let f = filter(&[], &["127.0.0.0/8"]);
        assert!(!allowed(&f, "127.0.0.1") && allowed(&f, "10.0.0.1"));
        let f = filter(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(allowed(&f, "10.2.0.1") && !allowed(&f, "10.1.0.1"));
    }
}
