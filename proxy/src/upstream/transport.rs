//! How a route reaches its endpoints, compiled once per route from the snapshot's
//! [`Upstream`]: the protocol, and for TLS a rustls client configuration with the name to
//! check. Connections are pooled by endpoint and [`Transport::id`], so routes that ask for the
//! same thing share them, and a new snapshot that changes nothing about a route keeps them.
//!
//! Verification follows nginx's `proxy_ssl_*`: off by default (any certificate is accepted,
//! but the handshake's signature is still checked), on with a CA bundle, a name and a depth.
//! The depth counts the certificates that may stand between the backend's and a trusted one,
//! plus one, as nginx's `proxy_ssl_verify_depth`: with 1 (the default), the backend's
//! certificate must be signed by a trusted CA directly.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tidegate_snapshot::{TlsVersion, Upstream, UpstreamProtocol, UpstreamTls};
use tokio::net::TcpStream;

use super::UpstreamError;
use super::stream::Io;

/// A route's way to its endpoints.
#[derive(Clone)]
pub(crate) struct Transport {
    pub(crate) protocol: UpstreamProtocol,
    tls: Option<Arc<TlsClient>>,
    /// Identifies what a connection was made for: pooled connections are shared by transports
    /// with the same id. 0 for plain HTTP/1.1.
    pub(crate) id: u64,
}

struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("protocol", &self.protocol).field("id", &self.id).finish_non_exhaustive()
    }
}

impl Default for Transport {
    fn default() -> Self {
        Transport::plain()
    }
}

impl Transport {
    /// Plain HTTP/1.1.
    pub(crate) fn plain() -> Transport {
        Transport { protocol: UpstreamProtocol::Http1, tls: None, id: 0 }
    }

    /// HTTPS as nginx's `proxy_pass https://` by default: HTTP/1.1 over TLS, the certificate not
    /// verified, no SNI (for `auth-url` with `https`).
    pub(crate) fn https_unverified(host: &str) -> Result<Transport, String> {
        let tls = UpstreamTls {
            verify: false,
            ca_pem: None,
            name: host.to_owned(),
            sni: true,
            verify_depth: 1,
            versions: Vec::new(),
            ciphers: Vec::new(),
            client_certificate: None,
        };
        Transport::compile(&Upstream { protocol: UpstreamProtocol::Https, tls: Some(tls), ..Upstream::default() })
    }

    /// Compiles a route's upstream settings; `Err` says why they cannot be used (a CA or client
    /// certificate that does not parse).
    pub(crate) fn compile(upstream: &Upstream) -> Result<Transport, String> {
        let protocol = upstream.protocol;
        if !protocol.tls() {
            let id = if protocol == UpstreamProtocol::Http1 { 0 } else { identity(upstream) };
            return Ok(Transport { protocol, tls: None, id });
        }
        let settings = upstream.tls.as_ref().ok_or("TLS to the backend without TLS settings")?;
        let name = ServerName::try_from(settings.name.clone())
            .map_err(|_| format!("{:?} is not a DNS name or IP address", settings.name))?;
        let config = client_config(settings, protocol)?;
        Ok(Transport { protocol, tls: Some(Arc::new(TlsClient { config, name })), id: identity(upstream) })
    }

    /// The same, once ALPN chose HTTP/1.1: its connections are this one's.
    pub(crate) fn over_http1(&self) -> Transport {
        Transport { protocol: UpstreamProtocol::Https, ..self.clone() }
    }

    /// Opens a connection to `endpoint` (and makes the TLS handshake) within `limit`; for a
    /// negotiated protocol, says whether the backend chose HTTP/2.
    ///
    /// The work is in a box of its own: a handshake's state is large, and a request that
    /// reuses a pooled connection (most do) should not carry room for it.
    pub(crate) async fn connect(&self, endpoint: SocketAddr, limit: Duration) -> Result<(Io, bool), UpstreamError> {
        Box::pin(self.open(endpoint, limit)).await
    }

    async fn open(&self, endpoint: SocketAddr, limit: Duration) -> Result<(Io, bool), UpstreamError> {
        let connecting = async {
            let tcp = TcpStream::connect(endpoint).await.map_err(|e| UpstreamError::Connect(endpoint, e))?;
            // Small requests must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok((Io::Tcp(tcp), self.protocol == UpstreamProtocol::H2c));
            };
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
            let stream = connector
                .connect(tls.name.clone(), tcp)
                .await
                .map_err(|e| UpstreamError::Tls(endpoint, e.to_string()))?;
            let h2 = match self.protocol {
                UpstreamProtocol::H2 => true,
                UpstreamProtocol::Negotiated => stream.get_ref().1.alpn_protocol() == Some(b"h2"),
                _ => false,
            };
            Ok((Io::Tls(Box::new(stream)), h2))
        };
        match tokio::time::timeout(limit, connecting).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ConnectTimeout(endpoint)),
        }
    }
}

/// A stable digest of the settings a connection was made with (not how endpoints are chosen).
fn identity(upstream: &Upstream) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (upstream.protocol, &upstream.tls).hash(&mut hasher);
    hasher.finish().max(1)
}

fn client_config(settings: &UpstreamTls, protocol: UpstreamProtocol) -> Result<Arc<ClientConfig>, String> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !settings.ciphers.is_empty() {
        provider.cipher_suites.retain(|suite| settings.ciphers.iter().any(|c| format!("{:?}", suite.suite()) == *c));
        if provider.cipher_suites.is_empty() {
            return Err("none of the cipher suites asked for is available".into());
        }
    }
    let provider = Arc::new(provider);
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = if settings.versions.is_empty() {
        vec![&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        settings
            .versions
            .iter()
            .map(|v| match v {
                TlsVersion::Tls12 => &rustls::version::TLS12,
                TlsVersion::Tls13 => &rustls::version::TLS13,
            })
            .collect()
    };
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions and cipher suites do not fit together: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if settings.verify {
        let pem = settings.ca_pem.as_deref().ok_or("verification asked without a CA")?;
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let certificate = certificate.map_err(|e| format!("ca.crt does not read as PEM: {e}"))?;
            roots.add(certificate).map_err(|e| format!("ca.crt holds a certificate that cannot be trusted: {e}"))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| format!("ca.crt: {e}"))?;
        Arc::new(Verify { webpki, depth: settings.verify_depth })
    } else {
        Arc::new(AcceptAny { provider: Arc::clone(&provider) })
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let mut config = match &settings.client_certificate {
        Some(identity) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("tls.crt does not read as PEM: {e}"))?;
            if chain.is_empty() {
                return Err("tls.crt holds no certificate".into());
            }
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                .map_err(|e| format!("tls.key does not read as a PEM private key: {e}"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("tls.crt and tls.key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = settings.sni;
    config.alpn_protocols = match protocol {
        UpstreamProtocol::H2 => vec![b"h2".to_vec()],
        UpstreamProtocol::Negotiated => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        _ => Vec::new(),
    };
    // Sessions are resumed, as with nginx's `proxy_ssl_session_reuse on` (its default).
    config.resumption = rustls::client::Resumption::in_memory_sessions(256);
    Ok(Arc::new(config))
}

/// `proxy-ssl-verify: on`: the chain must lead to the CA bundle, name the route's name, and
/// hold at most `depth - 1` certificates between the backend's and the trusted one.
#[derive(Debug)]
struct Verify {
    webpki: Arc<WebPkiServerVerifier>,
    depth: u8,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if intermediates.len() >= usize::from(self.depth) {
            return Err(rustls::Error::General(format!(
                "the certificate chain is longer than proxy-ssl-verify-depth {} allows",
                self.depth
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `proxy-ssl-verify: off` (nginx's default): any certificate, the handshake's signature
/// checked against it.
#[derive(Debug)]
struct AcceptAny {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
