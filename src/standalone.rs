//! `tidegate standalone`: configuration from a folder of manifests, served by a proxy in the
//! same process.

use std::path::Path;
use std::time::Duration;

use tidegate_controller::Options;
use tidegate_proxy::{Proxy, ProxyConfig};
use tidegate_snapshot::Snapshot;

use tidegate_controller::source::{Sink, folder};

use crate::error::Error;

/// The local proxy as the place configurations go.
struct Local(Proxy);

impl Sink for Local {
    fn apply(&mut self, snapshot: &Snapshot) -> Result<Vec<String>, String> {
        let applied = self.0.apply(snapshot).map_err(|e| e.to_string())?;
        tracing::info!(
            version = applied.version,
            hosts = snapshot.routing.virtual_hosts.len(),
            backends = snapshot.endpoints.len(),
            routing_rebuilt = applied.routing_rebuilt,
            apply_ms = applied.duration.as_secs_f64() * 1000.0,
            "configuration applied"
        );
        Ok(applied.warnings)
    }

    fn set_status(&self, json: bytes::Bytes, rejected: usize) {
        self.0.set_status(json, rejected);
    }

    fn set_ready(&self) {
        self.0.set_ready();
    }

    fn address(&self) -> String {
        self.0.addresses().http.ip().to_string()
    }

    fn release_memory() -> fn() {
        tidegate_proxy::release_free_memory
    }
}

/// Runs until SIGTERM or SIGINT, then drains: no new connections, open ones finish (for at most
/// `drain_timeout`).
///
/// # Errors
/// Only at start: the folder cannot be read or watched, or a listener cannot be bound.
pub fn run(dir: &Path, proxy_config: &ProxyConfig, options: Options, drain_timeout: Duration) -> Result<(), Error> {
    std::fs::read_dir(dir).map_err(|e| folder::Error::Folder(dir.to_owned(), e))?;
    let proxy = Proxy::start(proxy_config)?;
    let a = proxy.addresses();
    tracing::info!(http = %a.http, https = %a.https, admin = %a.admin, manifests = %dir.display(), "listening");
    let Local(proxy) = folder::run(dir, options, Local(proxy))?;
    tracing::info!(timeout_s = drain_timeout.as_secs_f64(), "draining: no new connections, open ones finish");
    let left = proxy.drain(drain_timeout);
    tracing::info!(connections_cut = left, "stopped");
    Ok(())
}
