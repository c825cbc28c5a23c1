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
