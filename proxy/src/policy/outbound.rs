//! Requests the proxy makes itself to a URL a route names (external auth, mirrors): the URL
//! split into where to connect and what to ask, host names resolved without blocking the
//! worker and remembered for a while, and TLS made once per host.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::upstream::Transport;

/// How long a resolved host name is trusted.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// An `http://` or `https://` URL taken apart.
pub(super) struct Url<'a> {
    /// `host[:port]` as written.
    pub(super) authority: &'a str,
    /// The path and query (`/` when the URL has none).
    pub(super) path: &'a str,
    pub(super) tls: bool,
}

impl<'a> Url<'a> {
    pub(super) fn parse(url: &'a str) -> Result<Url<'a>, String> {
        let (rest, tls) = match url.strip_prefix("https://") {
            Some(rest) => (rest, true),
            None => {
                (url.strip_prefix("http://").ok_or_else(|| format!("{url}: not an http:// or https:// URL"))?, false)
            }
        };
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        Ok(Url { authority, path, tls })
    }

    /// The host, without port or brackets.
    pub(super) fn host(&self) -> &'a str {
        crate::headers::strip_port(self.authority).trim_start_matches('[').trim_end_matches(']')
    }
}

/// Where a route's own requests go: addresses and TLS settings by host, shared by the
/// proxy's workers.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    resolved: Mutex<HashMap<String, (SocketAddr, Instant)>>,
    /// TLS by host (nginx's `proxy_pass https://` defaults: the certificate not verified).
    https: Mutex<HashMap<String, Transport>>,
}

impl Outbound {
    /// Where to connect for `url`, and over what.
    pub(super) async fn target(&self, url: &Url<'_>) -> Result<(SocketAddr, Transport), String> {
        let endpoint = self.resolve(url.authority, if url.tls { 443 } else { 80 }).await?;
        let transport = if url.tls { self.https_to(url.host())? } else { Transport::plain() };
        Ok((endpoint, transport))
    }

    /// TLS to `host`, made once per host.
    fn https_to(&self, host: &str) -> Result<Transport, String> {
        let mut cache = self.https.lock().map_err(|_| "the TLS settings cache is poisoned")?;
        if let Some(transport) = cache.get(host) {
            return Ok(transport.clone());
        }
        let transport = Transport::https_unverified(host)?;
        cache.insert(host.to_owned(), transport.clone());
        Ok(transport)
    }

    /// The address of `authority` (`host[:port]`, `default_port` when absent): an IP address as
    /// it is, a name through the resolver (on tokio's blocking pool), remembered for a while.
    async fn resolve(&self, authority: &str, default_port: u16) -> Result<SocketAddr, String> {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("{authority}: not a port"))?)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        if let Ok(cache) = self.resolved.lock()
            && let Some((addr, at)) = cache.get(authority)
            && at.elapsed() < RESOLVED_FOR
        {
            return Ok(*addr);
        }
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        if let Ok(mut cache) = self.resolved.lock() {
            cache.insert(authority.to_owned(), (addr, Instant::now()));
        }
        Ok(addr)
    }
}
