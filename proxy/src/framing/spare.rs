//! One spare read buffer and one spare write buffer per worker thread: a connection that waits
//! gives its buffer back and the next one to read takes it, so the busy path does not allocate
//! a buffer per request and an idle connection holds none.

use std::cell::Cell;

use bytes::BytesMut;
use http::HeaderMap;

/// Write buffers larger than this are not kept.
const MAX_KEPT_WRITE: usize = 64 * 1024;
/// Header maps kept at most: about a kilobyte each.
const KEPT_HEADER_MAPS: usize = 32;
/// Header maps with room for more headers than this are not kept.
const MAX_KEPT_HEADERS: usize = 64;

thread_local! {
    static READ: Cell<Option<BytesMut>> = const { Cell::new(None) };
    static WRITE: Cell<Option<Vec<u8>>> = const { Cell::new(None) };
    static HEADERS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty header map with room for `capacity` headers: one a finished message left when
/// there is one. Making one allocates twice (its index and its entries): 400 instructions.
pub(crate) fn take_headers(capacity: usize) -> HeaderMap {
    match HEADERS.with_borrow_mut(Vec::pop) {
        Some(mut headers) => {
            headers.reserve(capacity);
            headers
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Keeps a message's header map, emptied, once its head is written out.
pub(crate) fn keep_headers(mut headers: HeaderMap) {
    if headers.capacity() <= MAX_KEPT_HEADERS {
        headers.clear();
        HEADERS.with_borrow_mut(|kept| {
            if kept.len() < KEPT_HEADER_MAPS {
                kept.push(headers);
            }
        });
    }
}

/// Room for at least `want.min(1024)` more bytes, up to `want`: a buffer without an
/// allocation starts from the spare.
pub(crate) fn make_room(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want.min(1024) {
        if buf.capacity() == 0 {
            *buf = take_read();
        }
        buf.reserve(want);
    }
}

pub(crate) fn take_read() -> BytesMut {
    READ.take().unwrap_or_default()
}

pub(crate) fn keep_read(mut buf: BytesMut) {
    if buf.capacity() > 0 {
        buf.clear();
        READ.set(Some(buf));
    }
}

pub(crate) fn take_write(capacity: usize) -> Vec<u8> {
    let mut buf = WRITE.take().unwrap_or_default();
    buf.reserve(capacity);
    buf
}

pub(crate) fn keep_write(mut buf: Vec<u8>) {
    if buf.capacity() <= MAX_KEPT_WRITE {
        buf.clear();
        WRITE.set(Some(buf));
    }
}
