//! Lookups translation needs: Services, their EndpointSlices and Secrets by namespace and name,
//! and the resolution of a Service port to ready endpoints.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tidegate_snapshot::{BackendId, Certificate, Endpoint};

use crate::objects::{Inputs, name_of, namespace_of};
use crate::status::Reason;

/// Label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type Key<'a> = (&'a str, &'a str);

pub(super) struct Index<'a> {
    services: HashMap<Key<'a>, &'a Service>,
    slices: HashMap<Key<'a>, Vec<&'a EndpointSlice>>,
    secrets: HashMap<Key<'a>, &'a Secret>,
    config_maps: HashMap<Key<'a>, &'a ConfigMap>,
}

/// `namespace/service:port`, the port as written (number or name).
pub(super) fn backend_id(namespace: &str, service: &str, port: PortRef<'_>) -> BackendId {
    BackendId(format!("{namespace}/{service}:{port}"))
}

/// A Service port as an Ingress names it: by number or by name.
#[derive(Clone, Copy, Debug)]
pub(super) enum PortRef<'a> {
    Number(u16),
    Name(&'a str),
}

impl std::fmt::Display for PortRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

impl<'a> Index<'a> {
    pub(super) fn new(inputs: &'a Inputs) -> Self {
        let services =
            inputs.services.iter().map(|s| ((namespace_of(&s.metadata), name_of(&s.metadata)), &**s)).collect();
        let mut slices: HashMap<Key<'a>, Vec<&'a EndpointSlice>> = HashMap::new();
        for slice in &inputs.endpoint_slices {
            let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let Some(service) = service {
                slices.entry((namespace_of(&slice.metadata), service.as_str())).or_default().push(&**slice);
            }
        }
        let secrets =
            inputs.secrets.iter().map(|s| ((namespace_of(&s.metadata), name_of(&s.metadata)), &**s)).collect();
        let config_maps =
            inputs.config_maps.iter().map(|c| ((namespace_of(&c.metadata), name_of(&c.metadata)), &**c)).collect();
        Index { services, slices, secrets, config_maps }
    }

    /// Resolves `namespace/service:port` to the ready endpoints serving it, or says why it
    /// cannot (the route still exists and answers 503).
    pub(super) fn resolve(
        &self,
        namespace: &str,
        service: &str,
        port: PortRef<'_>,
    ) -> Result<Vec<Endpoint>, (Reason, String)> {
        let Some(svc) = self.services.get(&(namespace, service)) else {
            return Err((Reason::BackendNotFound, format!("Service {namespace}/{service} not found")));
        };
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            // Resolved by the proxies: see `external_name`.
            return Ok(Vec::new());
        }
        let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let found = ports.iter().find(|p| match port {
            PortRef::Number(n) => p.port == i32::from(n),
            PortRef::Name(n) => p.name.as_deref() == Some(n),
        });
        let Some(service_port) = found else {
            return Err((Reason::BackendNotFound, format!("Service {namespace}/{service} has no port {port}")));
        };
        let mut endpoints = self.ready_endpoints(namespace, service, service_port);
        endpoints.sort();
        endpoints.dedup();
        Ok(endpoints)
    }

    /// The Service's own address and port (`service-upstream`): its cluster IP, which
    /// kube-proxy balances, instead of its endpoints. `Err` for a headless Service.
    pub(super) fn cluster_ip(&self, namespace: &str, service: &str, port: PortRef<'_>) -> Result<Endpoint, String> {
        let spec = self.services.get(&(namespace, service)).and_then(|s| s.spec.as_ref());
        let ip = spec.and_then(|s| s.cluster_ip.as_deref()).filter(|ip| !ip.is_empty() && *ip != "None");
        let Some(ip) = ip else {
            return Err(format!("Service {namespace}/{service} has no cluster IP (headless, or not yet given one)"));
        };
        let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let found = ports.iter().find(|p| match port {
            PortRef::Number(n) => p.port == i32::from(n),
            PortRef::Name(n) => p.name.as_deref() == Some(n),
        });
        let number = found
            .and_then(|p| u16::try_from(p.port).ok())
            .ok_or_else(|| format!("Service {namespace}/{service} has no port {port}"))?;
        Ok(Endpoint { address: ip.to_owned(), port: number })
    }

    /// The name and port of an ExternalName Service, for the proxies to resolve: the port the
    /// Ingress names (by number, or the Service port of that name). `None` for other Services.
    pub(super) fn external_name(
        &self,
        namespace: &str,
        service: &str,
        port: PortRef<'_>,
    ) -> Option<Result<tidegate_snapshot::NamedEndpoint, String>> {
        let spec = self.services.get(&(namespace, service))?.spec.as_ref()?;
        if spec.type_.as_deref() != Some("ExternalName") {
            return None;
        }
        let Some(name) = spec.external_name.as_deref().filter(|n| !n.is_empty()) else {
            return Some(Err(format!("Service {namespace}/{service} is of type ExternalName without externalName")));
        };
        let number = match port {
            PortRef::Number(n) => Some(n),
            PortRef::Name(wanted) => spec
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(wanted))
                .and_then(|p| u16::try_from(p.port).ok()),
        };
        Some(match number {
            Some(port) => Ok(tidegate_snapshot::NamedEndpoint { name: name.trim_end_matches('.').to_owned(), port }),
            None => Err(format!("Service {namespace}/{service} has no port {port}")),
        })
    }

    /// A Service's first port, as ingress-nginx picks the port of a `default-backend`.
    pub(super) fn first_port(&self, namespace: &str, service: &str) -> Option<u16> {
        let spec = self.services.get(&(namespace, service))?.spec.as_ref()?;
        u16::try_from(spec.ports.as_deref()?.first()?.port).ok()
    }

    /// The `appProtocol` a Service declares for one of its ports.
    pub(super) fn app_protocol(&self, namespace: &str, service: &str, port: PortRef<'_>) -> Option<&str> {
        let spec = self.services.get(&(namespace, service))?.spec.as_ref()?;
        let found = spec.ports.as_deref()?.iter().find(|p| match port {
            PortRef::Number(n) => p.port == i32::from(n),
            PortRef::Name(n) => p.name.as_deref() == Some(n),
        })?;
        found.app_protocol.as_deref()
    }

    /// Ready endpoints of the EndpointSlices of a Service for one of its ports. A nil `ready`
    /// condition counts as ready, as the EndpointSlice API asks of consumers. When none is
    /// ready, the terminating ones that still serve (`serving: true, terminating: true`) take
    /// the traffic, as kube-proxy does: a rollout's last pods finishing are better than none.
    fn ready_endpoints(&self, namespace: &str, service: &str, service_port: &ServicePort) -> Vec<Endpoint> {
        let port_name = service_port.name.as_deref().unwrap_or("");
        let mut ready = Vec::new();
        let mut still_serving = Vec::new();
        for slice in self.slices.get(&(namespace, service)).map(Vec::as_slice).unwrap_or_default() {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let port = slice
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.name.as_deref().unwrap_or("") == port_name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok());
            let Some(port) = port else { continue };
            for endpoint in &slice.endpoints {
                let conditions = endpoint.conditions.as_ref();
                let list = if conditions.and_then(|c| c.ready).unwrap_or(true) {
                    &mut ready
                } else if conditions.is_some_and(|c| c.serving == Some(true) && c.terminating == Some(true)) {
                    &mut still_serving
                } else {
                    continue;
                };
                for address in &endpoint.addresses {
                    if address.parse::<std::net::IpAddr>().is_ok() {
                        list.push(Endpoint { address: address.clone(), port });
                    }
                }
            }
        }
        if ready.is_empty() { still_serving } else { ready }
    }

    /// The text entries of a Secret (`stringData` over `data`), by key; entries that are not
    /// UTF-8 are left out.
    pub(super) fn secret_text(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, (Reason, String)> {
        let Some(secret) = self.secrets.get(&(namespace, name)) else {
            return Err((Reason::SecretNotFound, format!("Secret {namespace}/{name} not found")));
        };
        let mut entries: std::collections::BTreeMap<String, String> = secret
            .data
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
            .collect();
        entries.extend(secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
        Ok(entries)
    }

    /// A ConfigMap's `data`.
    pub(super) fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<&'a std::collections::BTreeMap<String, String>, (Reason, String)> {
        static EMPTY: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        match self.config_maps.get(&(namespace, name)) {
            Some(map) => Ok(map.data.as_ref().unwrap_or(&EMPTY)),
            None => Err((Reason::ConfigMapNotFound, format!("ConfigMap {namespace}/{name} not found"))),
        }
    }

    /// Reads a TLS Secret into a certificate. The proxy parses the PEM and checks that the key
    /// matches; here we check what can be seen without cryptography.
    pub(super) fn certificate(&self, namespace: &str, name: &str) -> Result<Certificate, (Reason, String)> {
        let Some(secret) = self.secrets.get(&(namespace, name)) else {
            return Err((Reason::SecretNotFound, format!("Secret {namespace}/{name} not found")));
        };
        let field = |key: &str| -> Option<String> {
            if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
                return Some(v.clone());
            }
            let bytes = secret.data.as_ref().and_then(|d| d.get(key))?;
            String::from_utf8(bytes.0.clone()).ok()
        };
        let bad = |why: String| Err((Reason::InvalidCertificate, format!("Secret {namespace}/{name}: {why}")));
        let (Some(cert_pem), Some(key_pem)) = (field("tls.crt"), field("tls.key")) else {
            return bad("needs tls.crt and tls.key (type kubernetes.io/tls)".into());
        };
        if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return bad("tls.crt holds no PEM certificate".into());
        }
        if !key_pem.contains("PRIVATE KEY-----") {
            return bad("tls.key holds no PEM private key".into());
        }
        Ok(Certificate { id: format!("{namespace}/{name}"), cert_pem, key_pem })
    }
}
