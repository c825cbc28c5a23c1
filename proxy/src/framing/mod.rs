//! HTTP/1 pieces both sides use: the client connections (`crate::http1`) and the upstream
//! client (`crate::upstream`) decode chunked bodies the same way, and take their buffers and
//! header maps from the same per-worker spares.

pub(crate) mod chunked;
pub(crate) mod spare;
