//! Certificates chosen by SNI, swapped with the runtime.
//!
//! Each runtime carries a [`CertStore`] built from its snapshot: certificates by exact host and by
//! wildcard suffix. A rustls [`ResolvesServerCert`] reads the current runtime on every handshake,
//! so a new certificate is served from the next handshake on, without touching listeners.
//! Unknown names, and hosts whose Secret does not hold a usable certificate, get a self-signed
//! default certificate generated at start.
//!
//! Client certificates: the handshake of a name whose routes verify them (`auth-tls-*`) asks
//! the client for one, without requiring it, and checks only that the client holds its key;
//! each request's route then verifies the chain against its own CA
//! (`crate::policy`), so that a certificate that does not verify gets nginx's 400, and a
//! request for one host over a handshake made for another proves nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tidegate_snapshot::{Certificate, HostMatch, Routing};

use crate::Shared;

/// Certificates of one runtime, by host.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For names nothing claims (`--default-ssl-certificate`); the self-signed one when absent.
    default: Option<Arc<CertifiedKey>>,
    /// Every certificate parsed, by id, with a hash of its PEM text, for the next build to
    /// reuse: parsing is the costly part, and most builds change few certificates.
    parsed: HashMap<String, (u64, Result<Arc<CertifiedKey>, String>)>,
    /// Hosts whose handshake asks for a client certificate: exact names, wildcard suffixes,
    /// and whether the routes without a host do (then every name does).
    ask_exact: HashSet<String>,
    ask_wildcard: HashSet<String>,
    ask_any: bool,
}

fn pem_hash(certificate: &Certificate) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&certificate.cert_pem, &certificate.key_pem).hash(&mut hasher);
    hasher.finish()
}

impl CertStore {
    /// Parses the certificates a routing uses. A certificate that does not parse, or whose key
    /// does not match, is left out (its hosts get the default certificate) and described in the
    /// returned warnings; nothing else is affected.
    pub fn build(routing: &Routing, previous: &CertStore) -> (CertStore, Vec<String>) {
        let mut warnings = Vec::new();
        let mut store = CertStore::default();
        for certificate in &routing.certificates {
            let hash = pem_hash(certificate);
            let key = match previous.parsed.get(&certificate.id) {
                Some((before, key)) if *before == hash => key.clone(),
                _ => certified_key(certificate).map(Arc::new),
            };
            if let Err(why) = &key {
                warnings.push(format!("Secret {}: {why}; its hosts get the default certificate", certificate.id));
            }
            store.parsed.insert(certificate.id.clone(), (hash, key));
        }
        let parsed: HashMap<&str, Option<Arc<CertifiedKey>>> =
            store.parsed.iter().map(|(id, (_, key))| (id.as_str(), key.as_ref().ok().cloned())).collect();
        if let Some(id) = routing.default_certificate.as_deref() {
            store.default = parsed.get(id).cloned().flatten();
        }
        for vhost in &routing.virtual_hosts {
            if vhost.routes.iter().any(|r| r.action.policies.client_certificate.is_some()) {
                match &vhost.host {
                    HostMatch::Exact(h) => {
                        store.ask_exact.insert(h.clone());
                    }
                    HostMatch::Wildcard(s) => {
                        store.ask_wildcard.insert(s.clone());
                    }
                    HostMatch::Any => store.ask_any = true,
                }
            }
        }
        for vhost in &routing.virtual_hosts {
            let Some(id) = vhost.tls.as_deref() else { continue };
            let Some(Some(key)) = parsed.get(id) else { continue };
            match &vhost.host {
                HostMatch::Exact(h) => {
                    store.exact.insert(h.clone(), Arc::clone(key));
                }
                HostMatch::Wildcard(s) => {
                    store.wildcard.insert(s.clone(), Arc::clone(key));
                }
                HostMatch::Any => {}
            }
        }
        (store, warnings)
    }

    /// The configured default certificate, if any.
    pub fn default_certificate(&self) -> Option<&Arc<CertifiedKey>> {
        self.default.as_ref()
    }

    /// Whether the handshake for `server_name` asks for a client certificate.
    pub(crate) fn asks_client_certificate(&self, server_name: Option<&str>) -> bool {
        if self.ask_any {
            return true;
        }
        let Some(name) = server_name else { return false };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.ask_exact.contains(&name)
            || name.split_once('.').is_some_and(|(_, suffix)| self.ask_wildcard.contains(suffix))
    }

    /// The certificate for a server name, if one is configured.
    pub fn find(&self, server_name: &str) -> Option<&Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key);
        }
        let (label, suffix) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(suffix)
    }
}

fn certified_key(certificate: &Certificate) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(certificate.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt does not parse: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(certificate.key_pem.as_bytes())
        .map_err(|e| format!("tls.key does not parse: {e}"))?;
    let signing_key = any_supported_type(&key).map_err(|e| format!("tls.key is not a supported key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| format!("certificate does not match its key: {e}"))?;
    Ok(certified)
}

/// A self-signed certificate for names nothing else claims.
pub fn default_certificate() -> Result<Arc<CertifiedKey>, String> {
    let generated =
        rcgen::generate_simple_self_signed(vec!["tidegate-default.invalid".to_owned()]).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).map_err(str::to_owned)?;
    let signing_key = any_supported_type(&key).map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(vec![generated.cert.der().clone()], signing_key)))
}

/// Resolves the certificate of each handshake from the current runtime.
#[derive(Debug)]
pub(crate) struct Resolver {
    pub(crate) shared: Arc<Shared>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let runtime = self.shared.runtime.load();
        // What an `ssl_certificate` handler chose for the name, while it holds.
        if !runtime.routing.lua_certificates.is_empty()
            && let Some(name) = hello.server_name()
            && let Some(handler) = runtime.routing.lua_certificate_for(name)
            && let Some(chosen) = self.shared.lua_chosen.get(name, handler.script.id)
        {
            return Some(chosen);
        }
        let certificates = &runtime.routing.certificates;
        let found = hello.server_name().and_then(|name| certificates.find(name)).or(certificates.default_certificate());
        Some(Arc::clone(found.unwrap_or(&self.shared.default_certificate)))
    }
}

/// The two server configurations of the TLS listeners: SNI resolution, h2 and http/1.1 by ALPN;
/// `asking` also asks the client for a certificate. One pair per set of TLS versions the
/// configuration may allow (`ssl-protocols`), made once: [both, 1.3 only, 1.2 only]. A
/// configuration that narrows the TLS 1.2 cipher suites (`ssl-ciphers`) gets its own set, made
/// at its first handshake and kept until the suites change.
#[derive(Debug, Clone)]
pub(crate) struct ServerConfigs {
    by_versions: ByVersions,
    with_ciphers: Arc<arc_swap::ArcSwapOption<WithCiphers>>,
    shared: Arc<Shared>,
}

type ByVersions = [(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>); 3];

#[derive(Debug)]
struct WithCiphers {
    ciphers: Vec<String>,
    by_versions: ByVersions,
}

pub(crate) fn server_configs(shared: Arc<Shared>) -> ServerConfigs {
    let by_versions = by_versions(&Arc::new(rustls::crypto::ring::default_provider()), &shared);
    ServerConfigs { by_versions, with_ciphers: Arc::default(), shared }
}

fn by_versions(provider: &Arc<rustls::crypto::CryptoProvider>, shared: &Arc<Shared>) -> ByVersions {
    let build = |versions: &[&'static rustls::SupportedProtocolVersion],
                 verifier: Option<Arc<dyn ClientCertVerifier>>| {
        // The ring provider supports every protocol version rustls has, and keeps every TLS 1.3
        // suite, so this cannot fail.
        let builder =
            match rustls::ServerConfig::builder_with_provider(Arc::clone(provider)).with_protocol_versions(versions) {
                Ok(b) => b,
                Err(e) => unreachable!("ring supports TLS 1.2 and 1.3: {e}"),
            };
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Resolver { shared: Arc::clone(shared) }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    };
    let pair = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let asking = build(versions, Some(Arc::new(AskForCertificate { provider: Arc::clone(provider) })));
        (build(versions, None), asking)
    };
    [
        pair(&[&rustls::version::TLS13, &rustls::version::TLS12]),
        pair(&[&rustls::version::TLS13]),
        pair(&[&rustls::version::TLS12]),
    ]
}

impl ServerConfigs {
    /// The configurations for TLS 1.2 suites `ciphers` (IANA names, in order of preference),
    /// with every TLS 1.3 suite.
    fn with_ciphers(&self, ciphers: &[String]) -> Arc<WithCiphers> {
        if let Some(made) = self.with_ciphers.load_full().filter(|made| made.ciphers == ciphers) {
            return made;
        }
        let ring = rustls::crypto::ring::default_provider();
        let tls13 = ring.cipher_suites.iter().filter(|s| s.version() == &rustls::version::TLS13).copied();
        let tls12 = ciphers.iter().filter_map(|name| {
            rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|s| s.version() == &rustls::version::TLS12 && format!("{:?}", s.suite()) == *name)
                .copied()
        });
        let provider = rustls::crypto::CryptoProvider { cipher_suites: tls13.chain(tls12).collect(), ..ring };
        let made = Arc::new(WithCiphers {
            ciphers: ciphers.to_vec(),
            by_versions: by_versions(&Arc::new(provider), &self.shared),
        });
        self.with_ciphers.store(Some(Arc::clone(&made)));
        made
    }
}

/// Certificates that `ssl_certificate` Lua chose, by server name, each with the handler that
/// chose it (a changed handler's choices no longer serve) and until when it serves.
#[derive(Debug, Default)]
pub(crate) struct LuaChosen {
    entries: std::sync::Mutex<HashMap<String, Chosen>>,
}

/// One name's choice: by which handler (its script id), and until when it serves.
#[derive(Debug)]
struct Chosen {
    handler: u64,
    key: Arc<CertifiedKey>,
    until: std::time::Instant,
}

impl LuaChosen {
    /// At most this many names are held; expired ones go first, then any.
    const MAX: usize = 10_000;

    pub(crate) fn get(&self, name: &str, handler: u64) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let chosen = entries.get(&name.to_ascii_lowercase())?;
        (chosen.handler == handler && chosen.until > std::time::Instant::now()).then(|| Arc::clone(&chosen.key))
    }

    pub(crate) fn put(&self, name: &str, handler: u64, key: Arc<CertifiedKey>, ttl: std::time::Duration) {
        let now = std::time::Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= Self::MAX {
            entries.retain(|_, chosen| chosen.until > now);
            if entries.len() >= Self::MAX {
                entries.clear();
            }
        }
        entries.insert(name.to_ascii_lowercase(), Chosen { handler, key, until: now + ttl });
    }
}

/// What runs during a handshake before its certificate is chosen: the `ssl_certificate` Lua
/// of the name's handler, when there is one and nothing it chose still holds.
pub(crate) trait CertificateHook {
    /// Runs the handler for `name` (it may wait); `Err` fails the handshake.
    fn choose<'a>(&'a self, name: &'a str) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;
}

/// A certificate chain and private key (DER) as `ssl_certificate` Lua set them, checked.
pub(crate) fn certified_from_der(chain: Vec<Vec<u8>>, key: Vec<u8>) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let signing_key = [
        PrivateKeyDer::Pkcs8(key.clone().into()),
        PrivateKeyDer::Pkcs1(key.clone().into()),
        PrivateKeyDer::Sec1(key.into()),
    ]
    .iter()
    .find_map(|key| any_supported_type(key).ok())
    .ok_or("the private key is not a supported key")?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| format!("the certificate does not match its key: {e}"))?;
    Ok(Arc::new(certified))
}

/// The client certificate chain a handshake received, end entity first.
pub(crate) type ClientCertificates = Arc<Vec<CertificateDer<'static>>>;

/// Reads the ClientHello, picks the configuration for its server name, and completes the
/// handshake; returns the stream and the client's certificates, when it sent any.
pub(crate) async fn accept<IO>(
    configs: &ServerConfigs,
    io: IO,
    hook: &dyn CertificateHook,
) -> std::io::Result<(tokio_rustls::server::TlsStream<IO>, Option<ClientCertificates>)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
    if !configs.shared.runtime.load().routing.lua_certificates.is_empty()
        && let Some(name) = start.client_hello().server_name().map(str::to_owned)
    {
        hook.choose(&name).await.map_err(std::io::Error::other)?;
    }
    let runtime = configs.shared.runtime.load();
    let asks = runtime.routing.certificates.asks_client_certificate(start.client_hello().server_name());
    let versions = runtime.routing.client_tls_versions as usize;
    let with_ciphers;
    let (plain, asking) = if runtime.routing.client_tls12_ciphers.is_empty() {
        &configs.by_versions[versions]
    } else {
        with_ciphers = configs.with_ciphers(&runtime.routing.client_tls12_ciphers);
        &with_ciphers.by_versions[versions]
    };
    let config = if asks { asking } else { plain };
    let stream = start.into_stream(Arc::clone(config)).await?;
    let certificates = stream
        .get_ref()
        .1
        .peer_certificates()
        .filter(|c| !c.is_empty())
        .map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect()));
    Ok((stream, certificates))
}

/// Asks for a client certificate without requiring one, and checks only the handshake's
/// signature (the client holds the certificate's key); which CA it must chain to is the
/// route's to say, per request.
#[derive(Debug)]
struct AskForCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for AskForCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use tidegate_snapshot::VirtualHost;

    use super::*;

    impl CertStore {
        fn build_fresh(routing: &Routing) -> (CertStore, Vec<String>) {
            CertStore::build(routing, &CertStore::default())
        }
    }

    #[test]
    fn a_rebuild_reuses_certificates_whose_pem_did_not_change() {
        let (cert, key) = pem_pair("a.com");
        let certs = vec![Certificate { id: "ns/a".into(), cert_pem: cert, key_pem: key }];
        let routing = routing(certs, vec![(HostMatch::Exact("a.com".into()), "ns/a")]);
        let (first, _) = CertStore::build_fresh(&routing);
        let (second, _) = CertStore::build(&routing, &first);
        assert!(Arc::ptr_eq(first.find("a.com").expect("a"), second.find("a.com").expect("a")));
        let (other_cert, other_key) = pem_pair("a.com");
        let rotated = routing_with(Certificate { id: "ns/a".into(), cert_pem: other_cert, key_pem: other_key });
        let (third, _) = CertStore::build(&rotated, &second);
        assert!(
            !Arc::ptr_eq(second.find("a.com").expect("a"), third.find("a.com").expect("a")),
            "rotated: parsed anew"
        );
    }

    fn routing_with(certificate: Certificate) -> Routing {
        routing(vec![certificate], vec![(HostMatch::Exact("a.com".into()), "ns/a")])
    }

    fn pem_pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("generate");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn routing(certs: Vec<Certificate>, hosts: Vec<(HostMatch, &str)>) -> Routing {
        Routing {
            virtual_hosts: hosts
                .into_iter()
                .map(|(host, id)| VirtualHost { host, routes: vec![], tls: Some(id.into()) })
                .collect(),
            certificates: certs,
            ..Routing::default()
        }
    }

    #[test]
    fn a_configured_default_certificate_is_kept_apart() {
        let (cert, key) = pem_pair("fallback.example");
        let mut routing = routing(vec![Certificate { id: "ns/fallback".into(), cert_pem: cert, key_pem: key }], vec![]);
        assert!(CertStore::build_fresh(&routing).0.default_certificate().is_none());
        routing.default_certificate = Some("ns/fallback".into());
        let (store, warnings) = CertStore::build_fresh(&routing);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(store.default_certificate().is_some());
        assert!(store.find("fallback.example").is_none(), "the default is not a host's certificate");
    }

    #[test]
    fn finds_exact_then_single_label_wildcard() {
        let (a_cert, a_key) = pem_pair("a.com");
        let (w_cert, w_key) = pem_pair("*.w.com");
        let certs = vec![
            Certificate { id: "ns/a".into(), cert_pem: a_cert, key_pem: a_key },
            Certificate { id: "ns/w".into(), cert_pem: w_cert, key_pem: w_key },
        ];
        let (store, warnings) = CertStore::build_fresh(&routing(
            certs,
            vec![(HostMatch::Exact("a.com".into()), "ns/a"), (HostMatch::Wildcard("w.com".into()), "ns/w")],
        ));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(store.find("a.com").is_some());
        assert!(store.find("A.COM").is_some());
        assert!(store.find("x.w.com").is_some());
        assert!(store.find("y.x.w.com").is_none());
        assert!(store.find("w.com").is_none());
        assert!(store.find("b.com").is_none());
    }

    #[test]
    fn mismatched_or_broken_certificates_are_warned_and_skipped() {
        let (a_cert, _) = pem_pair("a.com");
        let (_, other_key) = pem_pair("b.com");
        let certs = vec![
            Certificate { id: "ns/mismatch".into(), cert_pem: a_cert, key_pem: other_key },
            Certificate {
                id: "ns/garbage".into(),
                cert_pem: "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n".into(),
                key_pem: "x".into(),
            },
        ];
        let (store, warnings) = CertStore::build_fresh(&routing(
            certs,
            vec![(HostMatch::Exact("a.com".into()), "ns/mismatch"), (HostMatch::Exact("g.com".into()), "ns/garbage")],
        ));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("ns/mismatch") && w.contains("does not match")));
        assert!(store.find("a.com").is_none());
        assert!(store.find("g.com").is_none());
    }

    #[test]
    fn default_certificate_generates() {
        assert!(default_certificate().is_ok());
    }
}
