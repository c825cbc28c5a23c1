//! The request body limit (`proxy-body-size`), as nginx's `client_max_body_size`: a request
//! whose `Content-Length` exceeds it gets 413 in the route step, before any filter or Lua runs
//! (nginx checks it when it picks the location); a body that arrives without a length is counted
//! as it streams and cut there ([`crate::body::Capped`]), which the upstream step answers with
//! 413 when nothing was answered yet.

use http::header::{self, HeaderMap};

/// Whether the request declares a body longer than `limit`.
pub(super) fn declared_over(headers: &HeaderMap, limit: u64) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|length| length > limit)
}
