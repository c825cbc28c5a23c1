//! Where tenant Lua may not connect: address ranges that cosockets refuse after resolving a
//! name, before any packet is sent.
//!
//! By default the link-local ranges, which hold the cloud providers' instance metadata services
//! (`169.254.169.254`) and their credentials. Operators add their own (the Kubernetes API
//! server, the node network, the proxy's admin port's address) with `--lua-socket-deny`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address range: `ADDRESS/PREFIX`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// What cosockets refuse unless told otherwise: IPv4 and IPv6 link-local.
    pub fn default_denied() -> Vec<Network> {
        ["169.254.0.0/16", "fe80::/10"].iter().filter_map(|n| n.parse().ok()).collect()
    }

    /// Whether `address` is in this range. An IPv4-mapped IPv6 address counts as its IPv4 one.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => same_prefix(&net.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(a)) => same_prefix(&net.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn same_prefix(network: &[u8], address: &[u8], prefix: u8) -> bool {
    let (whole, rest) = (usize::from(prefix / 8), prefix % 8);
    if network[..whole] != address[..whole] {
        return false;
    }
    rest == 0 || (network[whole] ^ address[whole]) >> (8 - rest) == 0
}

/// Why a range does not parse.
#[derive(Debug)]
pub struct BadNetwork(String);

impl fmt::Display for BadNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not an address range (like 10.0.0.0/8, fd00::/8 or 192.0.2.1)", self.0)
    }
}

impl std::error::Error for BadNetwork {}

impl FromStr for Network {
    type Err = BadNetwork;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadNetwork(text.to_owned());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= bits).ok_or_else(bad)?,
            None => bits,
        };
        Ok(Network { address, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Network {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn ranges_contain_their_addresses_only() {
        assert!(net("169.254.0.0/16").contains(ip("169.254.169.254")));
        assert!(net("169.254.0.0/16").contains(ip("::ffff:169.254.169.254")), "IPv4-mapped IPv6");
        assert!(!net("169.254.0.0/16").contains(ip("169.255.0.1")));
        assert!(net("10.0.0.0/9").contains(ip("10.127.255.255")));
        assert!(!net("10.0.0.0/9").contains(ip("10.128.0.0")));
        assert!(net("fe80::/10").contains(ip("febf::1")));
        assert!(!net("fe80::/10").contains(ip("fec0::1")));
        assert!(net("192.0.2.1").contains(ip("192.0.2.1")) && !net("192.0.2.1").contains(ip("192.0.2.2")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")) && !net("0.0.0.0/0").contains(ip("::1")));
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn bad_ranges_are_refused() {
        for text in ["10.0.0.0/33", "fe80::/129", "10.0.0/8", "example.com", "10.0.0.0/x", ""] {
            assert!(text.parse::<Network>().is_err(), "{text:?}");
        }
    }
}
