//! The certificate authorities Lua cosockets trust in `sslhandshake`: the system's roots plus an
//! optional PEM bundle (OpenResty's `lua_ssl_trusted_certificate`). Read once at start, never on
//! a worker.

use std::path::Path;

/// Loads the system roots (unreadable ones are skipped, with a warning) and then `bundle`.
///
/// # Errors
/// When `bundle` cannot be read or holds no usable certificate.
pub fn lua_trust_store(bundle: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        tracing::warn!("system certificate authorities: {error}");
    }
    let (added, ignored) = roots.add_parsable_certificates(system.certs);
    tracing::debug!(added, ignored, "system certificate authorities loaded for Lua cosockets");
    if let Some(path) = bundle {
        for cert in crate::cluster::certificates(path)? {
            roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(roots)
}
