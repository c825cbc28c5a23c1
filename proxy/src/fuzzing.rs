//! Entry points for the fuzz targets (`fuzz/`) and for the replay of their seed corpus in
//! `cargo test` (`proxy/tests/fuzz_corpus.rs`): each feeds arbitrary bytes to one of our own
//! parsers and checks what must hold whatever the input. A panic, or a failed check, is a
//! finding. Not an API.

use bytes::BytesMut;

use crate::framing::chunked::{Decoded, Decoder};

/// The request head parser: never more consumed than given, and a parsed head's target is
/// what the bytes say.
pub fn request_head(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let before = buf.len();
    if let Ok(Some(head)) = crate::http1::head::parse(&mut buf) {
        assert!(buf.len() <= before, "consumed more than given");
        let _ = head.parts.uri.path();
    }
}

/// The chunked decoder, fed in pieces whose size the first byte picks: never more data out
/// than bytes in, and the same answer whatever the pieces.
pub fn chunked(data: &[u8]) {
    let Some((&step, body)) = data.split_first() else { return };
    let step = usize::from(step % 16) + 1;
    let whole = decode_in_pieces(body, body.len().max(1));
    let pieces = decode_in_pieces(body, step);
    assert!(whole.0.len() <= body.len(), "more data out than bytes in");
    if whole.1.is_ok() && pieces.1.is_ok() {
        assert_eq!(whole.0, pieces.0, "the pieces changed the data");
    }
}

/// Decodes `body` given `step` bytes at a time: the data, and how it ended.
fn decode_in_pieces(body: &[u8], step: usize) -> (Vec<u8>, Result<bool, &'static str>) {
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in body.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf, 1 << 16) {
                Ok(Decoded::Data(data)) => out.extend_from_slice(&data),
                Ok(Decoded::NeedMore) => break,
                Ok(Decoded::End) => return (out, Ok(true)),
                Err(why) => return (out, Err(why)),
            }
        }
    }
    (out, Ok(false))
}

/// The upstream response head parser, for a `GET` and a `HEAD`.
pub fn response_head(data: &[u8]) {
    for head_request in [false, true] {
        let mut buf = BytesMut::from(data);
        let before = buf.len();
        if let Ok(Some(_)) = crate::upstream::wire::parse_response(&mut buf, head_request) {
            assert!(buf.len() <= before, "consumed more than given");
        }
    }
}

/// The PROXY protocol header parser: a complete header is never longer than the bytes, nor than
/// the limit.
pub fn proxy_protocol(data: &[u8]) {
    if let Ok(crate::client_address::Header::Complete { length, .. }) = crate::client_address::parse_header(data) {
        assert!(length <= data.len() && length <= crate::client_address::MAX_HEADER, "{length} of {}", data.len());
    }
}

/// The bridge between Lua strings and HTTP headers: whatever bytes a handler passes as a header
/// name or value (`ngx.req.set_header`, `ngx.header`, tables of values, clearing, reading back),
/// what reaches the headers that go upstream or to the client is a valid field: no CR, LF or
/// NUL can split a message. The input is a name and a value, split at the first `0xff`.
pub fn lua_headers(data: &[u8]) {
    use std::fmt::Write;
    use std::sync::Arc;

    let split = data.iter().position(|b| *b == 0xff).unwrap_or(data.len());
    let (name, value) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let literal = |bytes: &[u8]| {
        let mut out = String::from("\"");
        for b in bytes {
            let _ = write!(out, "\\{b}");
        }
        out.push('"');
        out
    };
    let source = format!(
        r#"local n, v = {}, {}
pcall(ngx.req.set_header, n, v)
pcall(ngx.req.set_header, n .. "-list", {{v, v}})
pcall(function() ngx.header[n] = v end)
pcall(function() ngx.header[n .. "-list"] = {{v, "x"}} end)
pcall(function() ngx.header["X-" .. n] = v end)
local seen = 0
for _ in pairs(ngx.req.get_headers()) do seen = seen + 1 end
pcall(function() ngx.say(ngx.var["http_" .. n] or "", seen) end)
pcall(ngx.req.clear_header, "X-Keep")"#,
        literal(name),
        literal(value)
    );
    let Ok(script) = tidegate_lua::compile("fuzz", &source) else { return };
    LUA.with(|(runtime, vm)| {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-keep", http::HeaderValue::from_static("1"));
        let head = tidegate_lua::RequestHead {
            method: http::Method::GET,
            request_uri: "/".into(),
            version: http::Version::HTTP_11,
            remote: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            server_port: 80,
            https: false,
            host: "fuzz".into(),
            route: "fuzz".into(),
            namespace: "fuzz".into(),
            request_id: None,
        };
        let Ok(request) = vm.begin(head, headers) else { return };
        let scripts = [Arc::new(script)];
        let local = tokio::task::LocalSet::new();
        local.block_on(runtime, vm.run(&request, tidegate_lua::Phase::Content, &scripts));
        // Each input is a script of its own: the VM forgets it, as it forgets replaced ones.
        vm.retain_scripts(|_| false);
        let upstream = request.state.headers.borrow();
        let response = request.state.response_headers.borrow();
        for (field, value) in upstream.iter().chain(response.iter()) {
            assert!(
                !value.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                "{field}: {value:?} could split a message"
            );
        }
    });
}

thread_local! {
    /// One VM (and the runtime its handlers need) per fuzzing thread: making one per input
    /// would be most of the work.
    static LUA: (tokio::runtime::Runtime, tidegate_lua::Vm) = (
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
        tidegate_lua::Vm::new(tidegate_lua::LuaConfig::default()).expect("vm"),
    );
}
