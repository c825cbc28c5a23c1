//! What one request carries through the pipeline besides the request itself and its
//! connection: what the steps found out that the log step writes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Filled in while the request is handled, written out when its body is done.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) route: Option<Arc<str>>,
    pub(crate) upstream: Option<SocketAddr>,
    pub(crate) upstream_time: Option<Duration>,
    /// Runs once the response body is done, with the bytes sent (the Lua log phase).
    pub(crate) after: Option<Box<dyn FnOnce(u64)>>,
    /// The request is a gRPC call: answers the proxy makes itself go out as gRPC statuses.
    pub(crate) grpc: bool,
    /// The response is the upstream's own (not one the proxy made).
    pub(crate) from_upstream: bool,
    /// What the route's filters left for the rest of the request, when they left anything.
    pub(crate) effects: Option<Box<crate::policy::Effects>>,
}
