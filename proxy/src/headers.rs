//! Header rules of a proxy hop: hop-by-hop headers stay on their hop, and the upstream learns
//! who the client was.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the
/// non-standard `Proxy-Connection` and `Keep-Alive`.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether a map's `Connection` headers say `close`, and whether they say `keep-alive`.
pub(crate) fn connection_says(headers: &HeaderMap) -> (bool, bool) {
    connection_tokens(headers).fold((false, false), |(close, keep), token| {
        (close || token.eq_ignore_ascii_case(b"close"), keep || token.eq_ignore_ascii_case(b"keep-alive"))
    })
}

/// Whether `name` is a hop-by-hop header (`Upgrade` included).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The comma-separated items of a list-valued header (`Connection`, `Transfer-Encoding`),
/// trimmed. A value with other than visible ASCII has none: `HeaderValue::to_str` refuses it,
/// and no token or coding is read from it.
pub(crate) fn list_items(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    let text = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    value.split(|b| *b == b',').filter(move |_| text).map(<[u8]>::trim_ascii)
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`.
pub(crate) fn ends_in_chunked(value: &[u8]) -> bool {
    list_items(value).next_back().is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
}

/// The tokens of a map's `Connection` headers.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers.get_all(header::CONNECTION).into_iter().flat_map(|v| list_items(v.as_bytes()))
}

/// Whether a request asks to switch protocols (WebSocket) over HTTP/1.1.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

/// Removes hop-by-hop headers and those the `Connection` header names. With `keep_upgrade`,
/// `Upgrade` and `Connection: upgrade` survive so a protocol switch can pass through.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One look at the few names present, rather than a lookup of every hop-by-hop name. Names
    // are distinct, so at most the eight hop-by-hop ones and `Upgrade` are found.
    let mut found: [Option<HeaderName>; 9] = Default::default();
    let mut count = 0;
    for name in headers.keys() {
        if HOP_BY_HOP.contains(name) || (!keep_upgrade && name == header::UPGRADE) {
            found[count] = Some(name.clone());
            count += 1;
        }
    }
    // `close` and `keep-alive`, the usual tokens, name nothing left to remove: no list then.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in named.iter().chain(found.iter().flatten()) {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What the upstream is told about the client. tidegate sits at the edge, so client-sent
/// `X-Forwarded-*` and `X-Real-IP` headers are replaced, not trusted.
pub(crate) struct Forwarded<'a> {
    /// The client address, formatted once per connection.
    pub(crate) client_ip: &'a HeaderValue,
    pub(crate) https: bool,
    /// The `Host` the client asked for.
    pub(crate) host: Option<HeaderValue>,
    pub(crate) port: u16,
}

/// The client address as a header value (IPv4-mapped IPv6 shown as IPv4).
pub(crate) fn client_ip_value(client: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&client.ip().to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A port as a header value, formatted once per port and worker: a worker listens on a few
/// ports, and cloning a static value costs nothing where formatting one allocates.
fn port_value(port: u16) -> HeaderValue {
    thread_local! {
        static PORTS: std::cell::RefCell<Vec<(u16, HeaderValue)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PORTS.with(|ports| {
        let mut ports = ports.borrow_mut();
        if let Some((_, value)) = ports.iter().find(|(p, _)| *p == port) {
            return value.clone();
        }
        // Leaked once per port, and only for the first few: the listening ports.
        let value = if ports.len() < 16 {
            HeaderValue::from_static(Box::leak(port.to_string().into_boxed_str()))
        } else {
            return HeaderValue::from(port);
        };
        ports.push((port, value.clone()));
        value
    })
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

pub(crate) fn set_forwarded(headers: &mut HeaderMap, f: Forwarded<'_>) {
    headers.insert(X_FORWARDED_FOR, f.client_ip.clone());
    headers.insert(X_REAL_IP, f.client_ip.clone());
    let proto = if f.https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = f.host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_FORWARDED_PORT, port_value(f.port));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "1"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn list_items_are_trimmed_and_read_only_from_visible_ascii() {
        assert_eq!(list_items(b" keep-alive ,\tX-A,").collect::<Vec<_>>(), [&b"keep-alive"[..], b"X-A", b""]);
        assert_eq!(list_items(b"close\xff").count(), 0);
        assert!(ends_in_chunked(b"gzip, Chunked "));
        assert!(!ends_in_chunked(b"chunked, gzip") && !ends_in_chunked(b"") && !ends_in_chunked(b"x\xff, chunked"));
    }

    #[test]
    fn hop_by_hop_names_are_the_listed_ones_and_upgrade() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [header::HOST, header::CONTENT_LENGTH, HeaderName::from_static("x-te")] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
    }

    #[test]
    fn keeps_upgrade_for_protocol_switches() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").map(HeaderValue::as_bytes), Some(&b"websocket"[..]));
        assert_eq!(h.get("connection").map(HeaderValue::as_bytes), Some(&b"upgrade"[..]));
    }

    #[test]
    fn forwarded_headers_replace_client_values() {
        let mut h = map(&[("x-forwarded-for", "6.6.6.6")]);
        let client: SocketAddr = "[::ffff:127.0.0.9]:5000".parse().expect("addr");
        let ip = client_ip_value(client);
        set_forwarded(
            &mut h,
            Forwarded { client_ip: &ip, https: true, host: Some(HeaderValue::from_static("a.com")), port: 8443 },
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
        assert_eq!(h["x-real-ip"], "127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.com");
        assert_eq!(h["x-forwarded-port"], "8443");
    }
}
