//! Who the client is behind a load balancer: the PROXY protocol on the listeners
//! (`use-proxy-protocol`) and a trusted forwarding header (`use-forwarded-headers`,
//! `forwarded-for-header`, `proxy-real-ip-cidr`, `compute-full-forwarded-for`), as nginx's
//! `proxy_protocol` and `real_ip` modules do for ingress-nginx.
//!
//! - **PROXY protocol** (v1 text and v2 binary): read before anything else on the connection,
//!   within [`HEADER_TIMEOUT`]; its source address becomes the connection's client. A
//!   connection without a valid header is closed (nginx: "broken header"). `LOCAL` (v2) and
//!   `UNKNOWN` (v1) keep the socket's peer, as health checks send them.
//! - **Forwarding header:** believed only from a peer in the trusted networks. Its addresses are
//!   read right to left, skipping trusted ones, and the first other one is the client (nginx's
//!   `real_ip_recursive on`); when all are trusted, the leftmost. A header that does not read
//!   leaves the peer as the client. IP rules, limits, `ngx.var.remote_addr`, the access log,
//!   `X-Real-IP` and `X-Forwarded-For` all use the result.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use tidegate_snapshot::{Cidr, ClientAddress};

/// How long a new connection has to send its PROXY protocol header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest header accepted: a v1 line is at most 107 bytes; v2 carries TLVs after the
/// addresses (AWS and GCP send a few hundred bytes).
pub(crate) const MAX_HEADER: usize = 4096;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The rules of one configuration, compiled.
#[derive(Debug, Default)]
pub(crate) struct ClientRules {
    pub(crate) proxy_protocol: bool,
    header: Option<HeaderName>,
    trusted: Vec<Cidr>,
    full_forwarded_for: bool,
}

/// What a request from a trusted peer says about its client, for the upstream.
#[derive(Debug, Clone)]
pub(crate) struct Forwarded {
    pub(crate) client: IpAddr,
    /// `X-Real-IP`: the client.
    pub(crate) real_ip: HeaderValue,
    /// `X-Forwarded-For`: the client, or the incoming list with the peer appended.
    pub(crate) forwarded_for: HeaderValue,
    /// `X-Forwarded-Proto`, `-Host` and `-Port` as the trusted peer sent them.
    pub(crate) proto: Option<HeaderValue>,
    pub(crate) host: Option<HeaderValue>,
    pub(crate) port: Option<HeaderValue>,
}

impl ClientRules {
    pub(crate) fn new(settings: &ClientAddress) -> ClientRules {
        ClientRules {
            proxy_protocol: settings.proxy_protocol,
            header: settings.header.as_deref().and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            trusted: settings.trusted.clone(),
            full_forwarded_for: settings.full_forwarded_for,
        }
    }

    /// What a request's headers say of its client, when the peer is trusted to say it.
    pub(crate) fn forwarded(&self, peer: IpAddr, headers: &HeaderMap) -> Option<Forwarded> {
        let name = self.header.as_ref()?;
        if !self.trusted.iter().any(|c| c.contains(peer)) || !headers.contains_key(name) {
            return None;
        }
        let mut listed: Vec<IpAddr> = Vec::new();
        for value in headers.get_all(name) {
            for item in value.to_str().ok()?.split(',') {
                listed.push(parse_address(item.trim())?);
            }
        }
        let client = listed
            .iter()
            .rev()
            .find(|a| !self.trusted.iter().any(|c| c.contains(**a)))
            .or_else(|| listed.first())
            .copied()?
            .to_canonical();
        let real_ip = HeaderValue::from_str(&client.to_string()).ok()?;
        let forwarded_for = if self.full_forwarded_for {
            let incoming: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
            HeaderValue::from_str(&format!("{}, {}", incoming.join(", "), peer.to_canonical())).ok()?
        } else {
            real_ip.clone()
        };
        let pass = |name: &str| headers.get(name).cloned();
        Some(Forwarded {
            client,
            real_ip,
            forwarded_for,
            proto: pass("x-forwarded-proto"),
            host: pass("x-forwarded-host"),
            port: pass("x-forwarded-port"),
        })
    }
}

/// An address as forwarding headers write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]:5678`.
fn parse_address(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    text.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// What the start of a connection says, so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Header {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `length` bytes; the client's address, unless it keeps the peer's.
    Complete { length: usize, source: Option<SocketAddr> },
}

/// Reads a PROXY protocol header (v1 or v2) from the start of `bytes`.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < V2_SIGNATURE.len() && V2_SIGNATURE.starts_with(bytes) && !bytes.is_empty() {
        // Could still be v2 (or v1, which starts differently).
        return Ok(Header::Incomplete);
    }
    if bytes.starts_with(V2_SIGNATURE) {
        return parse_v2(bytes);
    }
    if b"PROXY ".starts_with(&bytes[..bytes.len().min(6)]) {
        return parse_v1(bytes);
    }
    Err("the connection does not start with a PROXY protocol header".into())
}

fn parse_v1(bytes: &[u8]) -> Result<Header, String> {
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= 107 {
            Err("PROXY v1 line longer than 107 bytes".into())
        } else {
            Ok(Header::Incomplete)
        };
    };
    let line = std::str::from_utf8(&bytes[..end]).map_err(|_| "PROXY v1 line is not text")?;
    let words: Vec<&str> = line.split(' ').collect();
    let source = match words.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", "TCP4" | "TCP6", source, _destination, port, _destination_port] => {
            let ip: IpAddr = source.parse().map_err(|_| format!("PROXY v1 source {source:?} is not an address"))?;
            let port: u16 = port.parse().map_err(|_| format!("PROXY v1 source port {port:?} is not a port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(format!("PROXY v1 line {line:?} does not read")),
    };
    Ok(Header::Complete { length: end + 2, source })
}

fn parse_v2(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < 16 {
        return Ok(Header::Incomplete);
    }
    let version_command = bytes[12];
    if version_command >> 4 != 2 {
        return Err(format!("PROXY v2 version {} is not 2", version_command >> 4));
    }
    let length = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if length > MAX_HEADER {
        return Err(format!("PROXY v2 header of {length} bytes is too long"));
    }
    if bytes.len() < length {
        return Ok(Header::Incomplete);
    }
    let body = &bytes[16..length];
    let source = match (version_command & 0x0F, bytes[13]) {
        // LOCAL: the load balancer's own connection (a health check); or UNSPEC or a Unix
        // socket: nothing to say of the client.
        (0, _) | (1, 0x00 | 0x31 | 0x32) => None,
        (1, 0x11 | 0x12) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])))
        }
        (1, 0x21 | 0x22) if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be_bytes([body[32], body[33]])))
        }
        (1, family) => return Err(format!("PROXY v2 address family {family:#04x} does not fit its length")),
        (command, _) => return Err(format!("PROXY v2 command {command} is neither LOCAL nor PROXY")),
    };
    Ok(Header::Complete { length, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_header(line),
            Ok(Header::Complete { length: 42, source: Some("203.0.113.7:51234".parse().expect("addr")) })
        );
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
        assert!(matches!(parse_header(six), Ok(Header::Complete { source: Some(s), .. }) if s.ip().is_ipv6()));
        assert_eq!(parse_header(b"PROXY UNKNOWN\r\n"), Ok(Header::Complete { length: 15, source: None }));
        assert_eq!(parse_header(b"PROXY TCP4 203.0"), Ok(Header::Incomplete));
        assert_eq!(parse_header(b"PRO"), Ok(Header::Incomplete));
        assert!(parse_header(b"GET / HTTP/1.1\r\n").is_err(), "no header: closed");
        assert!(parse_header(b"PROXY TCP4 nope 10.0.0.1 1 2\r\n").is_err());
        assert!(parse_header(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)).is_err(), "no end within 107 bytes");
    }

    #[test]
    fn v2_headers() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0xC0, 0x01, 0, 80]);
        header.extend(b"GET /");
        assert_eq!(
            parse_header(&header),
            Ok(Header::Complete { length: 28, source: Some("198.51.100.9:49153".parse().expect("addr")) })
        );
        assert_eq!(parse_header(&header[..20]), Ok(Header::Incomplete));
        assert_eq!(parse_header(&header[..5]), Ok(Header::Incomplete));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse_header(&local), Ok(Header::Complete { length: 16, source: None }), "LOCAL");
        let mut v1 = V2_SIGNATURE.to_vec();
        v1.extend([0x11, 0x11, 0, 0]);
        assert!(parse_header(&v1).is_err(), "version 1 in a v2 signature");
    }

    #[test]
    fn a_trusted_peer_names_the_client() {
        let rules = |full: bool| {
            ClientRules::new(&ClientAddress {
                proxy_protocol: false,
                header: Some("x-forwarded-for".into()),
                trusted: vec!["10.0.0.0/8".parse().expect("cidr")],
                full_forwarded_for: full,
            })
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1, 203.0.113.7, 10.1.1.1"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let trusted: IpAddr = "10.0.0.2".parse().expect("ip");
        let seen = rules(false).forwarded(trusted, &headers).expect("believed");
        assert_eq!(seen.client, "203.0.113.7".parse::<IpAddr>().expect("ip"), "right to left, trusted skipped");
        assert_eq!(seen.forwarded_for, "203.0.113.7");
        assert_eq!(seen.proto.as_ref().map(HeaderValue::as_bytes), Some(&b"https"[..]));
        let full = rules(true).forwarded(trusted, &headers).expect("believed");
        assert_eq!(full.forwarded_for, "198.51.100.1, 203.0.113.7, 10.1.1.1, 10.0.0.2");
        assert!(rules(false).forwarded("192.0.2.1".parse().expect("ip"), &headers).is_none(), "untrusted peer");
        headers.insert("x-forwarded-for", HeaderValue::from_static("not-an-address"));
        assert!(rules(false).forwarded(trusted, &headers).is_none(), "a header that does not read");
    }
}
