//! Client certificates (`auth-tls-secret`, `auth-tls-verify-client`, `auth-tls-error-page`,
//! `auth-tls-pass-certificate-to-upstream`, `auth-tls-match-cn`), as ingress-nginx configures
//! nginx's `ssl_verify_client`, checked before any other step:
//! - `on`: a certificate that chains to the CA is required; without one, or with another, the
//!   request gets 400 (or a 302 to `auth-tls-error-page`);
//! - `optional`: none is required, but one that is sent must verify;
//! - `optional_no_ca`: none is required and nothing fails; the upstream is told the result.
//!
//! The upstream gets `ssl-client-verify` (`SUCCESS`, `NONE` or `FAILED:<why>`),
//! `ssl-client-subject-dn` and `ssl-client-issuer-dn` (RFC 2253), and with
//! `auth-tls-pass-certificate-to-upstream` `ssl-client-cert` (the URL-escaped PEM).
//!
//! The chain is verified against the route's CA by rustls's WebPKI verifier, once per
//! connection and CA: the handshake only asked for the certificate and checked that the client
//! holds its key (`crate::tls`).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tidegate_snapshot::{ClientCertificate, ClientVerify};

use super::{Effects, Facts, Verdict};
use crate::body::{LocalBody, full};
use crate::connection::{CertificateCheck, Connection};
use crate::respond::error_response;

#[derive(Debug)]
pub(super) struct ClientCertFilter {
    /// `None` when the CA bundle does not read: then no certificate verifies.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Tells this CA (and depth) from others in a connection's cache.
    key: u64,
    /// How many CA certificates may stand between the client's and a trusted one, plus one
    /// (`auth-tls-verify-depth`, nginx's `ssl_verify_depth`).
    depth: u8,
    verify: ClientVerify,
    error_page: Option<HeaderValue>,
    pass_to_upstream: bool,
    /// `Err`: the expression does not compile (the controller checks it), and nothing matches.
    match_subject: Option<Result<regex::Regex, regex::Error>>,
}

impl ClientCertFilter {
    pub(super) fn new(settings: &ClientCertificate) -> ClientCertFilter {
        let mut hasher = DefaultHasher::new();
        (&settings.ca_id, &settings.ca_pem, settings.depth).hash(&mut hasher);
        let verifier = verifier(&settings.ca_pem)
            .map_err(|why| tracing::warn!(ca = settings.ca_id, error = %why, "client CA does not load; no certificate verifies"))
            .ok();
        ClientCertFilter {
            verifier,
            key: hasher.finish(),
            depth: settings.depth.max(1),
            verify: settings.verify,
            error_page: settings.error_page.as_deref().and_then(|p| HeaderValue::from_str(p).ok()),
            pass_to_upstream: settings.pass_to_upstream,
            match_subject: settings.match_subject.as_deref().map(regex::Regex::new),
        }
    }

    pub(super) fn check(&self, facts: &Facts<'_>, slot: &mut Option<Box<Effects>>) -> Verdict {
        let conn = facts.conn;
        let Some(chain) = conn.client_certificates.as_ref().filter(|c| !c.is_empty()) else {
            if self.verify == ClientVerify::On {
                return self.refuse();
            }
            Effects::of(slot)
                .upstream_headers
                .push((HeaderName::from_static("ssl-client-verify"), HeaderValue::from_static("NONE")));
            return Verdict::Continue;
        };
        let check = self.check_of(conn, chain);
        let verify = match &check.verified {
            Ok(()) => "SUCCESS".to_owned(),
            Err(why) if self.verify == ClientVerify::OptionalNoCa => format!("FAILED:{why}"),
            Err(_) => return self.refuse(),
        };
        if check.verified.is_ok()
            && let Some(pattern) = &self.match_subject
            && !pattern.as_ref().is_ok_and(|p| p.is_match(&check.subject))
        {
            return Verdict::Answer(error_response(StatusCode::FORBIDDEN));
        }
        let effects = Effects::of(slot);
        let mut add = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                effects.upstream_headers.push((HeaderName::from_static(name), value));
            }
        };
        add("ssl-client-verify", &verify);
        add("ssl-client-subject-dn", &check.subject);
        add("ssl-client-issuer-dn", &check.issuer);
        if self.pass_to_upstream
            && let Some(end_entity) = chain.first()
        {
            add("ssl-client-cert", &escaped_pem(end_entity));
        }
        Verdict::Continue
    }

    /// What the connection's certificate proves against this CA, verified once per connection.
    fn check_of(&self, conn: &Connection, chain: &[CertificateDer<'static>]) -> Rc<CertificateCheck> {
        if let Some((key, check)) = conn.certificate_check.borrow().as_ref()
            && *key == self.key
        {
            return Rc::clone(check);
        }
        let (end_entity, intermediates) = match chain.split_first() {
            Some(split) => split,
            None => (&CertificateDer::from(Vec::new()), &[][..]),
        };
        let verified = match &self.verifier {
            Some(verifier) => verifier
                .verify_client_cert(end_entity, intermediates, UnixTime::now())
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    // The chain presented: the certificate, then those between it and the CA.
                    if intermediates.len() >= usize::from(self.depth) {
                        return Err(format!("the chain is longer than auth-tls-verify-depth {} allows", self.depth));
                    }
                    Ok(())
                }),
            None => Err("the CA bundle does not load".to_owned()),
        };
        let (subject, issuer) = names(end_entity).unwrap_or_default();
        let check = Rc::new(CertificateCheck { verified, subject, issuer });
        *conn.certificate_check.borrow_mut() = Some((self.key, Rc::clone(&check)));
        check
    }

    /// 400, as nginx answers a missing or failed certificate, or the error page.
    fn refuse(&self) -> Verdict {
        let Some(page) = &self.error_page else { return Verdict::Answer(error_response(StatusCode::BAD_REQUEST)) };
        let mut response: Response<LocalBody> = Response::new(full(bytes::Bytes::new()));
        *response.status_mut() = StatusCode::FOUND;
        response.headers_mut().insert(header::LOCATION, page.clone());
        Verdict::Answer(response)
    }
}

/// rustls's WebPKI client verifier over the CA bundle.
fn verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(certificate.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in ca.crt".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())
}

/// Subject and issuer of a certificate, RFC 2253: last RDN first, `,` between.
fn names(der: &CertificateDer<'_>) -> Option<(String, String)> {
    use x509_parser::prelude::FromDer;
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der.as_ref()).ok()?;
    let rfc2253 = |name: &x509_parser::x509::X509Name<'_>| {
        let registry = x509_parser::objects::oid_registry();
        let mut rdns: Vec<String> = name
            .iter_rdn()
            .map(|rdn| {
                rdn.iter()
                    .map(|atv| {
                        let oid = atv.attr_type();
                        let label = x509_parser::objects::oid2abbrev(oid, registry)
                            .map_or_else(|_| oid.to_id_string(), str::to_owned);
                        format!("{label}={}", atv.as_str().unwrap_or(""))
                    })
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect();
        rdns.reverse();
        rdns.join(",")
    };
    Some((rfc2253(certificate.subject()), rfc2253(certificate.issuer())))
}

/// The certificate as PEM, URL-escaped, as nginx's `$ssl_client_escaped_cert`.
fn escaped_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let mut out = String::with_capacity(pem.len() * 3 / 2);
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
