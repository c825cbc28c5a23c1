//! Incremental decoding of a chunked body (RFC 9112 §7.1): chunk sizes in hex, chunk
//! extensions skipped, trailer fields read and dropped. Lines and trailers are bounded, so a
//! client cannot make the decoder buffer without end.

use bytes::{Bytes, BytesMut};

/// Bytes a chunk-size line (with extensions) or the whole trailer section may take.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, with this much left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one; the count is bytes seen so far.
    Trailers(usize),
    Done,
}

/// What one step of decoding gives.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The buffer holds no complete next piece: read more.
    NeedMore,
    End,
}

#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Decoder { state: State::Size }
    }

    /// Takes what it can from the front of `buf`: data up to `max` bytes, or the end.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, max: usize) -> Result<Decoded, &'static str> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Size => {
                    let Some(line) = take_line(buf, MAX_LINE, "chunk size line too long")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let digits = line[..].split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
                        return Err("invalid chunk size");
                    }
                    let text = std::str::from_utf8(digits).map_err(|_| "invalid chunk size")?;
                    let size = u64::from_str_radix(text, 16).map_err(|_| "invalid chunk size")?;
                    self.state = if size == 0 { State::Trailers(0) } else { State::Data(size) };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = buf.len().min(max).min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    let _ = buf.split_to(2);
                    self.state = State::Size;
                }
                State::Trailers(seen) => {
                    let Some(line) = take_line(buf, MAX_TRAILERS - seen, "trailers too long")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    self.state = if line.is_empty() { State::Done } else { State::Trailers(seen + line.len() + 2) };
                }
            }
        }
    }
}

/// Removes one CRLF-terminated line from `buf` and returns it without the CRLF.
fn take_line(buf: &mut BytesMut, max: usize, too_long: &'static str) -> Result<Option<BytesMut>, &'static str> {
    match buf.iter().position(|&b| b == b'\n') {
        None if buf.len() > max => Err(too_long),
        None => Ok(None),
        Some(end) if end > max => Err(too_long),
        Some(end) => {
            if end == 0 || buf[end - 1] != b'\r' {
                return Err("bare LF in chunked body");
            }
            let mut line = buf.split_to(end + 1);
            line.truncate(end - 1);
            Ok(Some(line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes.
    fn decode_in_steps(input: &[u8], step: usize) -> Result<Vec<u8>, &'static str> {
        let mut decoder = Decoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pieces = input.chunks(step);
        loop {
            match decoder.decode(&mut buf, 7)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End => return Ok(out),
                Decoded::NeedMore => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err("truncated"),
                },
            }
        }
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers_whatever_the_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n, chunked world!\r\n0\r\nX-Trailer: t\r\n\r\n";
        for step in [1, 2, 3, 5, 64] {
            assert_eq!(decode_in_steps(body, step).expect("decoded"), b"hello, chunked world!", "step {step}");
        }
    }

    #[test]
    fn refuses_malformed_framing() {
        for bad in [&b"x\r\n"[..], b"5\r\nhelloXX", b"5\nhello\r\n0\r\n\r\n", b"fffffffffffffffff\r\n", b"\r\n"] {
            assert!(decode_in_steps(bad, 64).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_LINE + 1));
        assert_eq!(decode_in_steps(long.as_bytes(), 64).expect_err("refused"), "chunk size line too long");
    }

    #[test]
    fn leaves_what_follows_the_body() {
        let mut decoder = Decoder::new();
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nGET /next"[..]);
        assert_eq!(decoder.decode(&mut buf, 64).expect("decoded"), Decoded::Data(Bytes::from_static(b"abc")));
        assert_eq!(decoder.decode(&mut buf, 64).expect("decoded"), Decoded::End);
        assert_eq!(&buf[..], b"GET /next");
    }
}
