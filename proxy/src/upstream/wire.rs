//! The bytes of an upstream exchange: a request head written from `http` parts, and a response
//! head parsed with `httparse` into `http` types whose header values share the head's bytes.
//!
//! Response framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304; chunked when
//! `Transfer-Encoding` ends in it; otherwise `Content-Length`; otherwise (or with another
//! transfer coding) the body ends when the upstream closes. Differing or malformed lengths, and
//! a length alongside a transfer coding, are refused, since an upstream that frames ambiguously
//! cannot be trusted with the next request.

use bytes::BytesMut;
use http::header::{self, HeaderName};
use http::request::Parts;
use http::response::Parts as ResponseParts;
use http::{Method, Response, StatusCode, Version};

use crate::headers::{Forwarded, Said, is_hop_by_hop, write_line};
use crate::http1::head::{Lines, header_slots, take_head};

/// Bytes a status line and its headers may take.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// How a request body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body, and the headers say none.
    Empty,
    Length(u64),
    Chunked,
}

impl RequestFraming {
    /// From what is known of the body: its exact size when known, or none at all. Methods whose
    /// requests usually carry a body say `Content-Length: 0` when theirs is empty.
    pub(crate) fn of(method: &Method, end_of_stream: bool, exact: Option<u64>) -> Self {
        let says_length = !matches!(
            *method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE | Method::CONNECT
        );
        match (end_of_stream, exact) {
            (true, _) | (false, Some(0)) if !says_length => RequestFraming::Empty,
            (true, _) => RequestFraming::Length(0),
            (false, Some(n)) => RequestFraming::Length(n),
            (false, None) => RequestFraming::Chunked,
        }
    }
}

/// Writes a request head: the request line in origin form, the headers except the framing
/// ones, what `forwarded` says in place of any the client sent of those, then the framing
/// `framing` calls for.
pub(crate) fn encode_request(
    buf: &mut Vec<u8>,
    parts: &Parts,
    forwarded: Option<&Forwarded<'_>>,
    framing: RequestFraming,
) {
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = None;
    for (name, value) in &parts.headers {
        if name == header::HOST {
            host = Some(value);
        } else if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || forwarded.is_some() && Forwarded::replaces(name)
        {
            continue;
        }
        write_line(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(forwarded) = forwarded {
        forwarded.write(buf, host);
    }
    match framing {
        RequestFraming::Empty => {}
        RequestFraming::Length(n) => write_line(buf, b"content-length", n.to_string().as_bytes()),
        RequestFraming::Chunked => write_line(buf, b"transfer-encoding", b"chunked"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    Length(u64),
    Chunked,
    /// Until the upstream closes: the connection cannot be reused.
    UntilClose,
}

/// A parsed response head. Its headers are the end-to-end ones: the hop-by-hop headers, and
/// those `Connection` names, were read for framing and reuse and left out. A `101` keeps them
/// all, for the protocol switch to sort out. `Server` and `Date` are always left out.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) parts: ResponseParts,
    pub(crate) framing: ResponseFraming,
    /// The upstream will take another request on this connection.
    pub(crate) keep_alive: bool,
}

/// Parses a response head from the front of `buf`, removing its bytes; `Ok(None)` when more
/// are needed. `head_request`: the request was `HEAD`, so no body follows whatever the headers
/// say.
pub(crate) fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, &'static str> {
    let mut slots = header_slots();
    let mut response = httparse::Response::new(&mut []);
    let length =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err("response head too large"),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
            Err(_) => return Err("malformed response head"),
        };
    if length > MAX_HEAD {
        return Err("response head too large");
    }
    let status = StatusCode::from_u16(response.code.unwrap_or_default()).map_err(|_| "invalid status code")?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let reason = response.reason.unwrap_or_default();
    let reason = (Some(reason) != status.canonical_reason() && !reason.is_empty()).then(|| reason.as_bytes().to_vec());
    let said = Said::read(response.headers);
    let lines = Lines::record(buf, response.headers);

    // Copied out of the connection's read buffer (unless it is nearly all of it), which then
    // serves the next response instead of living as long as this one's headers.
    let bytes = take_head(buf, length);
    // Room for what every response gets added (`Server`, `Date`, HSTS).
    let invalid = ("invalid response header name", "invalid response header value");
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let keep = |name: &HeaderName| switching || !(is_hop_by_hop(name) || said.named.contains(name));
    // The upstream's `Server` and `Date` are left out, as nginx's `proxy_hide_header` does by
    // default: every response gets tidegate's (`respond::finish_headers`).
    let headers = lines.headers(&bytes, 3, invalid, &["server", "date"], keep)?;
    // Framed two ways at once: refused, as nginx does (RFC 9112 §6.3 lets the coding win, but
    // such an upstream may be reading requests differently too).
    if said.last_coding_chunked.is_some() && said.content_length.seen() {
        return Err("both Transfer-Encoding and Content-Length");
    }
    if said.chunked_codings > 1 {
        return Err("chunked applied more than once");
    }

    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = match said.last_coding_chunked {
        _ if no_body => ResponseFraming::Length(0),
        Some(true) => ResponseFraming::Chunked,
        Some(false) => ResponseFraming::UntilClose,
        None => said.content_length.value()?.map_or(ResponseFraming::UntilClose, ResponseFraming::Length),
    };
    let keep_alive =
        framing != ResponseFraming::UntilClose && !said.close && (version == Version::HTTP_11 || said.keep_alive);

    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    if let Some(reason) = reason
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason)
    {
        parts.extensions.insert(reason);
    }
    Ok(Some(ResponseHead { parts, framing, keep_alive }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parsed(text: &str, head_request: bool) -> Result<Option<ResponseHead>, &'static str> {
        parse_response(&mut BytesMut::from(text), head_request)
    }

    fn head(text: &str) -> ResponseHead {
        parsed(text, false).expect("accepted").expect("complete")
    }

    #[test]
    fn encodes_the_request_line_headers_and_framing() {
        let request = Request::post("http://a.test/p?q=1")
            .header("host", "a.test")
            .header("content-length", "99")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .expect("request");
        let (parts, ()) = request.into_parts();
        let mut buf = Vec::new();
        encode_request(&mut buf, &parts, None, RequestFraming::Length(3));
        assert_eq!(
            String::from_utf8_lossy(&buf),
            "POST /p?q=1 HTTP/1.1\r\nhost: a.test\r\nx-two: 1\r\nx-two: 2\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn request_framing_follows_the_body_and_the_method() {
        assert_eq!(RequestFraming::of(&Method::GET, true, Some(0)), RequestFraming::Empty);
        assert_eq!(RequestFraming::of(&Method::POST, true, Some(0)), RequestFraming::Length(0));
        assert_eq!(RequestFraming::of(&Method::GET, false, Some(4)), RequestFraming::Length(4));
        assert_eq!(RequestFraming::of(&Method::PUT, false, None), RequestFraming::Chunked);
    }

    #[test]
    fn parses_status_headers_and_keeps_what_follows() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nServer: up/1\r\nContent-Length: 4\r\nX-A: b\r\nDate: Sun, 06 Dec 2026 04:00:00 GMT\r\n\r\nbody",
        );
        let head = parse_response(&mut buf, false).expect("accepted").expect("complete");
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(head.parts.headers["x-a"], "b");
        let names: Vec<&str> = head.parts.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length", "x-a"], "the upstream's Server and Date are left out");
        assert_eq!(head.framing, ResponseFraming::Length(4));
        assert!(head.keep_alive);
        assert!(head.parts.extensions.get::<hyper::ext::ReasonPhrase>().is_none());
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn framing_and_reuse_follow_rfc_9112() {
        assert_eq!(head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing, ResponseFraming::Chunked);
        let until_close = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(until_close.framing, ResponseFraming::UntilClose);
        assert!(!until_close.keep_alive);
        assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n").framing, ResponseFraming::Length(0));
        assert_eq!(head("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").framing, ResponseFraming::Length(0));
        let to_head = parsed("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).expect("ok").expect("complete");
        assert_eq!(to_head.framing, ResponseFraming::Length(0));
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n").keep_alive);
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop_but_in_a_protocol_switch() {
        let text = "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\n\
                    Proxy-Connection: x\r\nTrailer: x-t\r\nX-Kept: 2\r\n";
        let ok = head(&format!("HTTP/1.1 200 OK\r\n{text}Transfer-Encoding: gzip, chunked\r\n\r\n"));
        let names: Vec<&str> = ok.parts.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(ok.framing, ResponseFraming::Chunked);
        assert!(ok.keep_alive);
        let switched = head(&format!("HTTP/1.1 101 Switching Protocols\r\n{text}\r\n"));
        assert_eq!(switched.parts.headers.len(), 7, "the switch sorts them out: {:?}", switched.parts.headers);
        // The last coding of the last Transfer-Encoding line decides.
        let until_close = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(until_close.framing, ResponseFraming::UntilClose);
        assert!(!until_close.keep_alive);
        assert!(until_close.parts.headers.is_empty(), "{:?}", until_close.parts.headers);
        // Values with other than visible ASCII are not read for codings or tokens.
        let mut odd = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: close\xff\r\nTransfer-Encoding: x\xff, chunked\r\n\r\n"[..],
        );
        let odd = parse_response(&mut odd, false).expect("accepted").expect("complete");
        assert_eq!(odd.framing, ResponseFraming::UntilClose);
    }

    #[test]
    fn keeps_an_unusual_reason_and_refuses_ambiguous_heads() {
        let head = head("HTTP/1.1 200 Fine Thanks\r\nContent-Length: 0\r\n\r\n");
        let reason = head.parts.extensions.get::<hyper::ext::ReasonPhrase>().expect("reason kept");
        assert_eq!(reason.as_bytes(), b"Fine Thanks");
        assert!(parsed("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n", false).expect("ok").is_none());
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parsed(bad, false).is_err(), "{bad:?}");
        }
    }
}
