//! How a route's requests reach its backend, as the snapshot's typed [`Upstream`]: the protocol
//! (`backend-protocol`, else the Service port's `appProtocol`) and, over TLS, the `proxy-ssl-*`
//! keys with the Secret they name. What cannot be honoured refuses the routes (503): a request
//! meant to go over TLS, or to a verified backend, never goes another way.

use tidegate_snapshot::{ClientIdentity, Upstream, UpstreamProtocol, UpstreamTls};

use super::annotations::Settings;
use super::index::Index;
use crate::status::{ObjectStatus, Reason};

/// The protocol a Service port's `appProtocol` names, as Gateway API implementations read it:
/// `kubernetes.io/h2c`, `kubernetes.io/ws` and `kubernetes.io/wss`, `http` and `https`. Others
/// leave the default (HTTP/1.1).
pub(super) fn app_protocol(value: &str) -> Option<UpstreamProtocol> {
    match value.to_ascii_lowercase().as_str() {
        "kubernetes.io/h2c" | "h2c" => Some(UpstreamProtocol::H2c),
        "kubernetes.io/ws" | "http" => Some(UpstreamProtocol::Http1),
        "kubernetes.io/wss" | "https" => Some(UpstreamProtocol::Https),
        _ => None,
    }
}

/// The upstream `settings` ask for to Service `service` in `namespace`, whose port declares
/// `app_protocol`. `Err` when the routes must not be served; the cause is in `status`.
pub(super) fn resolve(
    settings: &Settings,
    namespace: &str,
    service: &str,
    app_protocol: Option<&str>,
    index: &Index<'_>,
    status: &mut ObjectStatus,
) -> Result<Upstream, ()> {
    let keys = &settings.upstream;
    let protocol = keys.protocol.or_else(|| app_protocol.and_then(self::app_protocol)).unwrap_or_default();
    if !protocol.tls() {
        return Ok(Upstream {
            protocol,
            tls: None,
            balance: keys.balance(),
            retry: keys.retry.clone(),
            affinity: keys.affinity.then(|| keys.session.clone()),
        });
    }
    let refuse = |status: &mut ObjectStatus, reason: Reason, key: &str, why: String| {
        status.error(reason, settings.field(key), format!("{why}; the routes answer 503"));
        Err(())
    };
    let mut tls = UpstreamTls {
        verify: keys.verify,
        ca_pem: None,
        name: keys.name.clone().unwrap_or_else(|| format!("{service}.{namespace}.svc")),
        sni: keys.sni,
        verify_depth: keys.depth,
        versions: keys.versions.clone(),
        ciphers: keys.ciphers.clone(),
        client_certificate: None,
    };
    if let Some(secret) = &keys.secret {
        let (secret_namespace, name) = secret.split_once('/').unwrap_or((namespace, secret));
        if secret_namespace != namespace {
            let why = format!("Secret {secret} is in another namespace, which tidegate does not read");
            return refuse(status, Reason::Invalid, "proxy-ssl-secret", why);
        }
        let entries = match index.secret_text(namespace, name) {
            Ok(entries) => entries,
            Err((reason, message)) => return refuse(status, reason, "proxy-ssl-secret", message),
        };
        let pem = |key: &str| entries.get(key).filter(|v| !v.trim().is_empty()).cloned();
        tls.ca_pem = pem("ca.crt");
        if let Some(ca) = &tls.ca_pem
            && !ca.contains("-----BEGIN CERTIFICATE-----")
        {
            let why = format!("Secret {namespace}/{name} has no PEM certificate under ca.crt");
            return refuse(status, Reason::Invalid, "proxy-ssl-secret", why);
        }
        tls.client_certificate = match (pem("tls.crt"), pem("tls.key")) {
            (Some(cert_pem), Some(key_pem)) => Some(ClientIdentity { cert_pem, key_pem }),
            (None, None) => None,
            _ => {
                let why = format!("Secret {namespace}/{name} has one of tls.crt and tls.key without the other");
                return refuse(status, Reason::Invalid, "proxy-ssl-secret", why);
            }
        };
        if tls.ca_pem.is_none() && tls.client_certificate.is_none() {
            let why = format!("Secret {namespace}/{name} has neither ca.crt nor tls.crt and tls.key");
            return refuse(status, Reason::Invalid, "proxy-ssl-secret", why);
        }
    }
    if tls.verify && tls.ca_pem.is_none() {
        let why = "proxy-ssl-verify on needs the CA under ca.crt of proxy-ssl-secret".to_owned();
        return refuse(status, Reason::Invalid, "proxy-ssl-verify", why);
    }
    Ok(Upstream {
        protocol,
        tls: Some(tls),
        balance: keys.balance(),
        retry: keys.retry.clone(),
        affinity: keys.affinity.then(|| keys.session.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocols_as_gateway_api_reads_them() {
        assert_eq!(app_protocol("kubernetes.io/h2c"), Some(UpstreamProtocol::H2c));
        assert_eq!(app_protocol("kubernetes.io/ws"), Some(UpstreamProtocol::Http1));
        assert_eq!(app_protocol("kubernetes.io/wss"), Some(UpstreamProtocol::Https));
        assert_eq!(app_protocol("HTTPS"), Some(UpstreamProtocol::Https));
        assert_eq!(app_protocol("example.com/custom"), None);
    }
}
