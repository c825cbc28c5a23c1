//! Request heads: parsed with `httparse` from the connection's buffer into `http` types whose
//! header values share the bytes read (no copy), plus what the connection needs to know: how the
//! body is framed, whether the connection may be kept, whether the client waits for
//! `100 Continue` and whether it asks to switch protocols.
//!
//! Framing follows RFC 9112 §6: `Transfer-Encoding` must end in `chunked`; differing or
//! malformed `Content-Length` values, and both headers at once, are refused (the ambiguities
//! request smuggling lives on).

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri, Version};

use crate::headers::Said;

/// Header lines a request (or a response) may have.
pub(crate) const MAX_HEADERS: usize = 128;
/// Bytes a request line and its headers may take.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) parts: Parts,
    pub(crate) framing: Framing,
    pub(crate) keep_alive: bool,
    pub(crate) expect_continue: bool,
    pub(crate) upgrade: bool,
}

/// Why a head was refused; each becomes a status and the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// 400, with what was wrong.
    Malformed(&'static str),
    /// 431: more than [`MAX_HEAD`] bytes or [`MAX_HEADERS`] lines.
    TooLarge,
    /// Not HTTP/1 at all but the HTTP/2 connection preface (h2c with prior knowledge).
    Http2Preface,
}

const HTTP2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Where a piece of a head lies in its bytes (offset, length).
type Span = (usize, usize);

thread_local! {
    /// Kept between heads, so that recording the spans allocates nothing.
    static SPANS: std::cell::RefCell<Vec<(Span, Span)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Header lines just parsed from the front of a read buffer, remembered by position: the lines
/// borrow the buffer, which the head's bytes are taken from before the map is built, so that
/// the values can share those bytes.
pub(crate) struct Lines {
    base: usize,
}

impl Lines {
    /// Remembers where `lines` lie in `buf`.
    pub(crate) fn record(buf: &[u8], lines: &[httparse::Header<'_>]) -> Lines {
        let lines_of = Lines { base: buf.as_ptr() as usize };
        SPANS.with_borrow_mut(|spans| {
            spans.clear();
            spans.extend(lines.iter().map(|line| (lines_of.span(line.name.as_bytes()), lines_of.span(line.value))));
        });
        lines_of
    }

    /// Where `piece` (a slice of the same buffer) lies.
    pub(crate) fn span(&self, piece: &[u8]) -> Span {
        (piece.as_ptr() as usize - self.base, piece.len())
    }

    /// The header map of the head whose bytes are `bytes`, with room for `extra` more headers,
    /// of the lines whose names `keep` accepts; `invalid` is the error for a name, or a kept
    /// line's value, that `http` refuses. Lines named in `left_out` (lowercase) are left out
    /// before their names are parsed.
    pub(crate) fn headers<E: Copy>(
        &self,
        bytes: &Bytes,
        extra: usize,
        invalid: (E, E),
        left_out: &[&str],
        keep: impl Fn(&HeaderName) -> bool,
    ) -> Result<HeaderMap, E> {
        SPANS.with_borrow(|spans| {
            let mut headers = super::spare::take_headers(spans.len() + extra);
            for &(name, value) in spans {
                let name = &bytes[name.0..name.0 + name.1];
                if left_out.iter().any(|out| crate::headers::is_named(name, out.as_bytes())) {
                    continue;
                }
                let name = HeaderName::from_bytes(name).map_err(|_| invalid.0)?;
                if keep(&name) {
                    let value = HeaderValue::from_maybe_shared(slice(bytes, value)).map_err(|_| invalid.1)?;
                    headers.append(name, value);
                }
            }
            Ok(headers)
        })
    }
}

/// The bytes at `span` of a head, sharing its allocation.
pub(crate) fn slice(bytes: &Bytes, (start, len): Span) -> Bytes {
    bytes.slice(start..start + len)
}

/// Uninitialized header slots for httparse: 128 of them are 4 KiB, and setting them all took a
/// tenth of a small head's parsing.
pub(crate) fn header_slots<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Parses a head from the front of `buf`, removing its bytes; `Ok(None)` when more are needed.
pub(crate) fn parse(buf: &mut BytesMut) -> Result<Option<Head>, Refused> {
    let mut slots = header_slots();
    let mut request = httparse::Request::new(&mut []);
    let length = match request.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(Refused::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooLarge),
        Err(httparse::Error::Version) if buf.starts_with(HTTP2_PREFACE_START) => return Err(Refused::Http2Preface),
        Err(e) => return Err(Refused::Malformed(reason(e))),
    };
    if length > MAX_HEAD {
        return Err(Refused::TooLarge);
    }
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refused::Malformed("invalid method"))?;
    let version = if request.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let said = Said::read(request.headers);
    let lines = Lines::record(buf, request.headers);
    let target = lines.span(request.path.unwrap_or_default().as_bytes());

    let bytes = take_head(buf, length);
    let uri =
        Uri::from_maybe_shared(slice(&bytes, target)).map_err(|_| Refused::Malformed("invalid request target"))?;
    // Room for a header or two that Lua may add.
    let invalid = (Refused::Malformed("invalid header name"), Refused::Malformed("invalid header value"));
    let headers = lines.headers(&bytes, 2, invalid, &[], |_| true)?;

    let framing = framing(&said, version)?;
    host(&said, version)?;
    let keep_alive = !said.close && (version == Version::HTTP_11 || said.keep_alive);
    let http11 = version == Version::HTTP_11;
    let expect_continue = http11 && said.expect_continue == Some(true);
    let upgrade = http11 && said.upgrade && said.connection_upgrade;
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head { parts, framing, keep_alive, expect_continue, upgrade }))
}

/// Bytes left in a read buffer past its head beyond which the head is copied out rather than
/// shared: the header values live as long as the message, and should not keep a whole read
/// buffer alive with them (10,000 slow requests would hold 40 MiB of mostly empty buffers).
const SHARE_SLACK: usize = 512;

/// The head's bytes, taken from the front of `buf`: shared when they are (nearly) all of its
/// allocation, copied when the allocation is a larger read buffer, which then stays free for
/// what comes next.
pub(crate) fn take_head(buf: &mut BytesMut, length: usize) -> Bytes {
    if buf.capacity() - length <= SHARE_SLACK {
        return buf.split_to(length).freeze();
    }
    let head = Bytes::copy_from_slice(&buf[..length]);
    bytes::Buf::advance(buf, length);
    head
}

/// A request body's framing (RFC 9112 §6.3), from what its lines say.
fn framing(said: &Said, version: Version) -> Result<Framing, Refused> {
    let Some(chunked) = said.last_coding_chunked else {
        return Ok(Framing::Length(said.content_length.value().map_err(Refused::Malformed)?.unwrap_or(0)));
    };
    if said.content_length.seen() {
        return Err(Refused::Malformed("both Transfer-Encoding and Content-Length"));
    }
    if version == Version::HTTP_10 {
        return Err(Refused::Malformed("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if said.chunked_codings > 1 {
        return Err(Refused::Malformed("chunked applied more than once"));
    }
    if chunked { Ok(Framing::Chunked) } else { Err(Refused::Malformed("Transfer-Encoding does not end in chunked")) }
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host` line, and no request has an
/// invalid one (HTTP/1.0 may have none). nginx answers these with 400 too.
fn host(said: &Said, version: Version) -> Result<(), Refused> {
    match said.host_lines {
        0 if version == Version::HTTP_11 => Err(Refused::Malformed("HTTP/1.1 request without Host")),
        0 | 1 if !said.host_invalid => Ok(()),
        0 | 1 => Err(Refused::Malformed("invalid Host")),
        _ => Err(Refused::Malformed("more than one Host")),
    }
}

fn reason(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status | httparse::Error::Token => "invalid request line",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Option<Head>, Refused> {
        parse(&mut BytesMut::from(text))
    }

    fn head(text: &str) -> Head {
        parsed(text).expect("accepted").expect("complete")
    }

    #[test]
    fn parses_a_request_and_leaves_what_follows() {
        let mut buf = BytesMut::from("GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\n\r\nNEXT");
        let head = parse(&mut buf).expect("accepted").expect("complete");
        assert_eq!(head.parts.method, Method::GET);
        assert_eq!(head.parts.uri.path_and_query().expect("a path").as_str(), "/a?b=c");
        assert_eq!(head.parts.headers.get_all("x-two").iter().count(), 2);
        assert_eq!(head.framing, Framing::Length(0));
        assert!(head.keep_alive && !head.expect_continue && !head.upgrade);
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn waits_for_the_rest_of_a_head_and_refuses_one_too_large() {
        assert!(parsed("GET / HTTP/1.1\r\nHost: x\r\n").expect("accepted").is_none());
        let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(parsed(&huge).expect_err("refused"), Refused::TooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            parsed(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")).expect_err("refused"),
            Refused::TooLarge
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nHost: x\r\nConnection: foo, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn framing_refuses_what_smuggling_needs() {
        assert_eq!(head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n").framing, Framing::Length(5));
        assert_eq!(head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n").framing, Framing::Length(5));
        assert_eq!(
            head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parsed(bad), Err(Refused::Malformed(_))), "{bad:?}");
        }
        // A length is read only from visible ASCII, as `HeaderValue::to_str` reads it.
        let mut odd = BytesMut::from(&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\xff\r\n\r\n"[..]);
        assert_eq!(parse(&mut odd).expect_err("refused"), Refused::Malformed("invalid Content-Length"));
    }

    #[test]
    fn recognises_continue_upgrade_and_the_http2_preface() {
        assert!(head("PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").expect_continue);
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(!head("GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(
            !head("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n").upgrade,
            "Connection must say upgrade"
        );
        assert!(
            !head("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n").upgrade,
            "and Upgrade name a protocol"
        );
        // The first `Expect` line decides, as a map lookup would.
        assert!(
            !head("PUT / HTTP/1.1\r\nHost: x\r\nExpect: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
        assert_eq!(parsed("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect_err("refused"), Refused::Http2Preface);
    }

    #[test]
    fn an_http11_request_has_one_valid_host() {
        assert!(head("GET / HTTP/1.0\r\n\r\n").parts.headers.get("host").is_none(), "HTTP/1.0 may have none");
        assert_eq!(head("GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n").parts.headers["host"], "a.example:8080");
        head("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n");
        for (bad, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 request without Host"),
            ("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "more than one Host"),
            ("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", "more than one Host"),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\nHost: ..\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\nHost: .a\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", "invalid Host"),
            ("GET / HTTP/1.1\r\nHost:\r\n\r\n", "invalid Host"),
        ] {
            assert_eq!(parsed(bad).expect_err("refused"), Refused::Malformed(why), "{bad:?}");
        }
    }
}
