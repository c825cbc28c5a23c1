//! A client connection: the facts its requests share (peer, port, TLS), and the guard that counts
//! it as open for as long as it lives, whether served by a task or parked in the reactor.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use http::header::HeaderValue;

use crate::Shared;
use crate::headers::Forwarded;

/// What a request knows about its connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) remote: SocketAddr,
    /// The client address as a header value, formatted once per connection, when a request
    /// first needs it (one going upstream).
    client_ip: std::cell::OnceCell<HeaderValue>,
    pub(crate) local_port: u16,
    pub(crate) tls: bool,
    /// The certificates the client sent in the TLS handshake, end entity first.
    pub(crate) client_certificates: Option<crate::tls::ClientCertificates>,
    /// What they proved against the last CA a request asked about (by the CA's key): a
    /// keep-alive connection verifies once, not per request.
    pub(crate) certificate_check: RefCell<Option<(u64, Rc<CertificateCheck>)>>,
}

/// What a client certificate proved against one CA.
#[derive(Debug)]
pub(crate) struct CertificateCheck {
    /// `Err` says why it does not verify.
    pub(crate) verified: Result<(), String>,
    /// Subject and issuer, RFC 2253 (`CN=client,O=Example`), as nginx's `$ssl_client_s_dn`.
    pub(crate) subject: String,
    pub(crate) issuer: String,
}

impl Connection {
    pub(crate) fn new(
        remote: SocketAddr,
        local_port: u16,
        tls: bool,
        client_certificates: Option<crate::tls::ClientCertificates>,
    ) -> Connection {
        Connection {
            remote,
            client_ip: std::cell::OnceCell::new(),
            local_port,
            tls,
            client_certificates,
            certificate_check: RefCell::new(None),
        }
    }

    /// What the upstream is told of the client (`X-Forwarded-*`).
    pub(crate) fn forwarded(&self) -> Forwarded<'_> {
        let client_ip = self.client_ip.get_or_init(|| crate::headers::client_ip_value(self.remote));
        Forwarded {
            client_ip,
            https: self.tls,
            port: self.local_port,
            host: None,
            forwarded_for: None,
            proto: None,
            port_value: None,
        }
    }
}

/// Counts a connection as open until it ends, however it ends.
pub(crate) struct ConnectionGuard(Arc<Shared>);

impl ConnectionGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.metrics.active_connections.inc();
        shared.open_connections.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ConnectionGuard(Arc::clone(shared))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.metrics.active_connections.dec();
        self.0.open_connections.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
