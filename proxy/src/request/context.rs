//! What one request carries through the pipeline besides the request itself and its
//! connection: what the steps found out that the log step writes.

use std::net::{IpAddr, SocketAddr};
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
    /// The client as a trusted peer names it (`use-forwarded-headers`), when one does.
    pub(crate) forwarded: Option<Box<crate::client_address::Forwarded>>,
}

impl Outcome {
    /// The request's client: as a trusted peer names it, else the connection's.
    pub(crate) fn client(&self, conn: &crate::connection::Connection) -> IpAddr {
        self.forwarded.as_ref().map_or_else(|| conn.remote.ip(), |f| f.client)
    }

    /// Whether the client reached us over TLS: the connection's, or a trusted peer's
    /// `X-Forwarded-Proto: https`.
    pub(crate) fn https(&self, conn: &crate::connection::Connection) -> bool {
        conn.tls || self.forwarded.as_ref().and_then(|f| f.proto.as_ref()).is_some_and(|p| p.as_bytes() == b"https")
    }
}
