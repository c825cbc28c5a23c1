//! The request body limit (`proxy-body-size`), as nginx's `client_max_body_size`: a request
//! whose `Content-Length` exceeds it gets 413 before any other step runs (nginx checks it when it
//! picks the location); a body that arrives without a length is counted as it streams and cut
//! there ([`crate::body::Capped`]), which the upstream step answers with 413 when nothing was
//! answered yet.

use http::StatusCode;
use http::header::{self, HeaderMap};

use super::Verdict;
use crate::respond::error_response;

#[derive(Debug)]
pub(super) struct BodySize {
    pub(super) limit: u64,
}

impl BodySize {
    pub(super) fn check(&self, headers: &HeaderMap) -> Verdict {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match declared {
            Some(length) if length > self.limit => Verdict::Answer(error_response(StatusCode::PAYLOAD_TOO_LARGE)),
            _ => Verdict::Continue,
        }
    }
}
