//! Header rules of a proxy hop: hop-by-hop headers stay on their hop, and the upstream learns
//! who the client was.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// What the `Server` header says.
pub(crate) const SERVER_NAME: &str = "tidegate";

/// The `Date` header value, formatted once per second per worker.
pub(crate) fn http_date() -> HeaderValue {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != second {
            let formatted = httpdate::fmt_http_date(now);
            *cache = (second, HeaderValue::from_str(&formatted).unwrap_or_else(|_| HeaderValue::from_static("")));
        }
        cache.1.clone()
    })
}

/// Whether `name` is a hop-by-hop header: one that describes one connection, never forwarded
/// (RFC 9110 §7.6.1), the non-standard `Proxy-Connection` and `Keep-Alive`, and `Upgrade`.
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
    let text = is_text(value);
    value.split(|b| *b == b',').filter(move |_| text).map(<[u8]>::trim_ascii)
}

/// Whether a value is visible ASCII, spaces and tabs: what `HeaderValue::to_str` accepts.
pub(crate) fn is_text(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`.
pub(crate) fn ends_in_chunked(value: &[u8]) -> bool {
    list_items(value).next_back().is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
}

/// What a message's framing and connection headers say, read from its lines as parsed, before
/// its header map is built (requests in `http1::head`, responses in `upstream::wire`). Values
/// are read as the map would give them: one with other than visible ASCII says no token or
/// coding (`list_items`), nor a length.
#[derive(Debug, Default)]
pub(crate) struct Said {
    /// Whether there is a `Transfer-Encoding` line, and whether the last one ends in `chunked`.
    pub(crate) last_coding_chunked: Option<bool>,
    /// How many `chunked` codings all `Transfer-Encoding` lines name: RFC 9112 §6.1 forbids
    /// applying it more than once, and a message that does is refused rather than decoded once.
    pub(crate) chunked_codings: usize,
    pub(crate) content_length: ContentLength,
    /// `Connection` tokens.
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) connection_upgrade: bool,
    /// Headers the `Connection` header names (other than `close` and `keep-alive`): they
    /// describe this hop only.
    pub(crate) named: Vec<HeaderName>,
    /// An `Upgrade` line.
    pub(crate) upgrade: bool,
    /// Whether the first `Expect` line says `100-continue`; `None` without one.
    pub(crate) expect_continue: Option<bool>,
    /// How many `Host` lines there are, and whether every one is a valid host (RFC 9112 §3.2).
    pub(crate) host_lines: usize,
    pub(crate) host_invalid: bool,
}

impl Said {
    pub(crate) fn read(lines: &[httparse::Header<'_>]) -> Said {
        let mut said = Said::default();
        for line in lines {
            let (name, value) = (line.name.as_bytes(), line.value);
            if is_named(name, b"content-length") {
                said.content_length.add(value);
            } else if is_named(name, b"transfer-encoding") {
                said.last_coding_chunked = Some(ends_in_chunked(value));
                said.chunked_codings += list_items(value).filter(|c| c.eq_ignore_ascii_case(b"chunked")).count();
            } else if is_named(name, b"connection") {
                for token in list_items(value) {
                    if is_named(token, b"close") {
                        said.close = true;
                    } else if is_named(token, b"keep-alive") {
                        said.keep_alive = true;
                    } else if let Ok(name) = HeaderName::from_bytes(token) {
                        said.connection_upgrade |= name == header::UPGRADE;
                        said.named.push(name);
                    }
                }
            } else if is_named(name, b"upgrade") {
                said.upgrade = true;
            } else if is_named(name, b"expect") && said.expect_continue.is_none() {
                said.expect_continue = Some(value.eq_ignore_ascii_case(b"100-continue"));
            } else if is_named(name, b"host") {
                said.host_lines += 1;
                said.host_invalid |= !valid_host(value);
            }
        }
        said
    }
}

/// Whether a `Host` value is a host with an optional port (RFC 3986's `reg-name`, an IPv4
/// address or an IP literal in brackets): what nginx's host check lets through. No path,
/// user info, spaces or control bytes, and no leading dot or `..` (which would make a name
/// outside of its zone).
pub(crate) fn valid_host(value: &[u8]) -> bool {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(b);
    !value.is_empty() && value[0] != b'.' && value.iter().all(allowed) && !value.windows(2).any(|w| w == b"..")
}

/// Whether `text`, a header name or an item of a list value (no control bytes), is `lower`, a
/// lowercase word of letters and `-`, in any case. Setting a byte's 0x20 bit lowercases a
/// letter and leaves `-` alone, and turns nothing else but control bytes into either: one pass
/// without branches, where comparing case-insensitively byte by byte took a fifth of reading a
/// response's lines.
pub(crate) fn is_named(text: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|b| b.is_ascii_lowercase() || *b == b'-'));
    text.len() == lower.len() && text.iter().zip(lower).fold(0, |differ, (t, l)| differ | ((t | 0x20) ^ l)) == 0
}

/// What `Content-Length` lines say, added up one line at a time. Malformed values and differing
/// ones (in one line or several) are errors; repeats of one value are not.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ContentLength(Result<Option<u64>, &'static str>);

impl Default for ContentLength {
    fn default() -> Self {
        ContentLength(Ok(None))
    }
}

impl ContentLength {
    pub(crate) fn add(&mut self, value: &[u8]) {
        if let Ok(length) = &mut self.0
            && let Err(e) = add_length(length, value)
        {
            self.0 = Err(e);
        }
    }

    /// The length; `None` without a line.
    pub(crate) fn value(self) -> Result<Option<u64>, &'static str> {
        self.0
    }

    /// Whether there was a line, valid or not.
    pub(crate) fn seen(self) -> bool {
        !matches!(self.0, Ok(None))
    }
}

fn add_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), &'static str> {
    const INVALID: &str = "invalid Content-Length";
    if !is_text(value) {
        return Err(INVALID);
    }
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(INVALID);
        }
        // Digits only (checked above); too many for a u64 is as invalid as a letter.
        let n = item
            .iter()
            .try_fold(0u64, |n, &digit| n.checked_mul(10)?.checked_add(u64::from(digit - b'0')))
            .ok_or(INVALID)?;
        if length.is_some_and(|l| l != n) {
            return Err("differing Content-Length values");
        }
        *length = Some(n);
    }
    Ok(())
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
    // are distinct, so at most the nine hop-by-hop ones are found.
    let mut found: [Option<HeaderName>; 9] = Default::default();
    let mut count = 0;
    for name in headers.keys() {
        if is_hop_by_hop(name) && !(keep_upgrade && name == header::UPGRADE) {
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
///
/// Written by the upstream request's encoder (`upstream::wire::encode_request`), as nginx's
/// `proxy_set_header` is applied: they never enter the request's header map, so Lua in any
/// phase sees the headers the client sent, and setting them costs no map insertions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forwarded<'a> {
    /// The client address, formatted once per connection.
    pub(crate) client_ip: &'a HeaderValue,
    pub(crate) https: bool,
    /// The port the client connected to.
    pub(crate) port: u16,
    /// The host the client asked for, when the request's `Host` was replaced on its way
    /// (`upstream-vhost`): `X-Forwarded-Host` tells the client's.
    pub(crate) host: Option<&'a HeaderValue>,
    /// What a trusted peer sent (`use-forwarded-headers`): `X-Forwarded-For` (else
    /// `client_ip`), `X-Forwarded-Proto` and `X-Forwarded-Port` (else the connection's).
    pub(crate) forwarded_for: Option<&'a HeaderValue>,
    pub(crate) proto: Option<&'a HeaderValue>,
    pub(crate) port_value: Option<&'a HeaderValue>,
}

impl Forwarded<'_> {
    /// Whether `name` is one of the headers this replaces.
    pub(crate) fn replaces(name: &HeaderName) -> bool {
        // Standard names are none of them; a custom name is compared only when it could be.
        let name = name.as_str();
        name.len() >= 9
            && name.starts_with("x-")
            && matches!(
                name,
                "x-forwarded-for" | "x-real-ip" | "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-port"
            )
    }

    /// Writes the header lines, with the client's host, or else `host` (the request's `Host`),
    /// as `X-Forwarded-Host`.
    pub(crate) fn write(&self, buf: &mut Vec<u8>, host: Option<&HeaderValue>) {
        let host = self.host.or(host);
        let ip = self.client_ip.as_bytes();
        write_line(buf, b"x-forwarded-for", self.forwarded_for.map_or(ip, HeaderValue::as_bytes));
        write_line(buf, b"x-real-ip", ip);
        let scheme: &[u8] = if self.https { b"https" } else { b"http" };
        write_line(buf, b"x-forwarded-proto", self.proto.map_or(scheme, HeaderValue::as_bytes));
        if let Some(host) = host {
            write_line(buf, b"x-forwarded-host", host.as_bytes());
        }
        match self.port_value {
            Some(port) => write_line(buf, b"x-forwarded-port", port.as_bytes()),
            None => write_line(buf, b"x-forwarded-port", port_text(self.port, &mut [0; 5])),
        }
    }
}

impl Forwarded<'_> {
    /// Puts the headers into a header map (HTTP/2 upstreams), replacing the client's.
    pub(crate) fn insert(&self, headers: &mut HeaderMap, host: Option<&HeaderValue>) {
        let host = self.host.or(host);
        let forwarded_for = self.forwarded_for.unwrap_or(self.client_ip);
        headers.insert(HeaderName::from_static("x-forwarded-for"), forwarded_for.clone());
        headers.insert(HeaderName::from_static("x-real-ip"), self.client_ip.clone());
        let proto = HeaderValue::from_static(if self.https { "https" } else { "http" });
        headers.insert(HeaderName::from_static("x-forwarded-proto"), self.proto.cloned().unwrap_or(proto));
        match host {
            Some(host) => headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone()),
            None => headers.remove("x-forwarded-host"),
        };
        let port = self.port_value.cloned().unwrap_or_else(|| HeaderValue::from(self.port));
        headers.insert(HeaderName::from_static("x-forwarded-port"), port);
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

/// A host without its port: `a.com:8080` → `a.com`, `[::1]:80` → `[::1]`.
pub(crate) fn strip_port(authority: &str) -> &str {
    let bytes = authority.as_bytes();
    // A host is short: a plain scan beats a searcher's setup.
    let end = if bytes.first() == Some(&b'[') {
        bytes.iter().position(|&b| b == b']').map(|i| i + 1)
    } else {
        bytes.iter().position(|&b| b == b':')
    };
    &authority[..end.unwrap_or(bytes.len())]
}

/// Writes one header line of a head: `name: value` and its line end.
pub(crate) fn write_line(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.extend_from_slice(name);
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// The client address as a header value (IPv4-mapped IPv6 shown as IPv4).
pub(crate) fn client_ip_value(client: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&client.ip().to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A port's decimal digits, written into `digits`.
fn port_text(port: u16, digits: &mut [u8; 5]) -> &[u8] {
    let mut at = digits.len();
    let mut rest = port;
    loop {
        at -= 1;
        // A digit: `rest % 10` is below 10.
        digits[at] = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        rest /= 10;
        if rest == 0 {
            return &digits[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.com:8080"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn names_match_in_any_case_and_nothing_else() {
        for (text, lower, same) in [
            ("Content-Length", "content-length", true),
            ("CONNECTION", "connection", true),
            ("keep-alive", "keep-alive", true),
            ("Keep-Alive ", "keep-alive", false),
            ("keep_alive", "keep-alive", false),
            ("keep\talive", "keep-alive", false),
            ("close", "closed", false),
            ("clos@", "close", false),
            ("", "close", false),
        ] {
            assert_eq!(is_named(text.as_bytes(), lower.as_bytes()), same, "{text:?}");
            assert_eq!(text.eq_ignore_ascii_case(lower), same, "{text:?}");
        }
        // Every byte that is neither a letter nor `-` nor a control byte (but a tab, which list
        // values may hold) differs from all of them.
        for b in (0x20..=0xffu8).chain([b'\t']).filter(|b| !b.is_ascii_alphabetic() && *b != b'-') {
            for l in b"abcdefghijklmnopqrstuvwxyz-" {
                assert!(!is_named(&[b], &[*l]), "{b:#x} taken for {}", *l as char);
            }
        }
    }

    #[test]
    fn content_lengths_are_digits_that_fit_and_agree() {
        let read = |lines: &[&str]| {
            let mut length = ContentLength::default();
            for line in lines {
                length.add(line.as_bytes());
            }
            length.value()
        };
        assert_eq!(read(&[]), Ok(None));
        assert_eq!(read(&["0"]), Ok(Some(0)));
        assert_eq!(read(&[" 42 "]), Ok(Some(42)));
        assert_eq!(read(&["7, 7", "7"]), Ok(Some(7)));
        assert_eq!(read(&["18446744073709551615"]), Ok(Some(u64::MAX)));
        assert_eq!(read(&["18446744073709551616"]), Err("invalid Content-Length"));
        assert_eq!(read(&["99999999999999999999999"]), Err("invalid Content-Length"));
        for bad in ["", "+1", "-1", "1a", "0x10", "1 2", "1,", "\u{661}"] {
            assert_eq!(read(&[bad]), Err("invalid Content-Length"), "{bad:?}");
        }
        assert_eq!(read(&["1", "2"]), Err("differing Content-Length values"));
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
        let listed = [
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
            header::PROXY_AUTHENTICATE,
            header::PROXY_AUTHORIZATION,
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
        ];
        for name in listed.iter().chain([&header::UPGRADE]) {
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
    fn forwarded_lines_name_the_client_and_what_it_asked_for() {
        let client: SocketAddr = "[::ffff:127.0.0.9]:5000".parse().expect("addr");
        let ip = client_ip_value(client);
        let mut buf = Vec::new();
        Forwarded {
            client_ip: &ip,
            https: true,
            port: 8443,
            host: None,
            forwarded_for: None,
            proto: None,
            port_value: None,
        }
        .write(&mut buf, Some(&HeaderValue::from_static("a.com")));
        assert_eq!(
            String::from_utf8_lossy(&buf),
            "x-forwarded-for: 127.0.0.9\r\nx-real-ip: 127.0.0.9\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: a.com\r\nx-forwarded-port: 8443\r\n"
        );
        for port in [0, 7, 80, 65535] {
            assert_eq!(port_text(port, &mut [0; 5]), port.to_string().as_bytes());
        }
        for name in ["x-forwarded-for", "X-Real-IP", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port"] {
            assert!(Forwarded::replaces(&HeaderName::from_bytes(name.as_bytes()).expect("name")), "{name}");
        }
        for name in ["x-forwarded", "forwarded", "host", "x-forwarded-fo"] {
            assert!(!Forwarded::replaces(&HeaderName::from_bytes(name.as_bytes()).expect("name")), "{name}");
        }
    }
}
