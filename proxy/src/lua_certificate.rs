//! The `ssl_certificate` phase: during a TLS handshake for a name a LuaRoute's
//! `sslCertificate` handler serves, the handler runs on the worker that accepted the
//! connection (it may wait: a cosocket fetches the certificate, a shared dictionary holds it),
//! and the certificate it sets with `ngx.ssl` serves the handshake. What it chose is kept per
//! name, for every worker, for the handler's cache time; a handler that sets nothing leaves the
//! name to the usual certificates, and one that fails (or clears the certificate and sets none)
//! fails the handshake.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;

use crate::tls::{CertificateHook, certified_from_der};
use crate::worker::Worker;

/// The hook of one connection's handshake.
pub(crate) struct Handshake<'a> {
    pub(crate) worker: &'a Rc<Worker>,
    pub(crate) remote: SocketAddr,
}

impl CertificateHook for Handshake<'_> {
    fn choose<'a>(&'a self, name: &'a str) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>> {
        Box::pin(async move {
            let runtime = self.worker.current_runtime();
            let Some(handler) = runtime.routing.lua_certificate_for(name) else { return Ok(()) };
            let shared = &self.worker.shared;
            if shared.lua_chosen.get(name, handler.script.id).is_some() {
                return Ok(());
            }
            let chosen = self
                .worker
                .vm
                .ssl_certificate(
                    handler.namespace.clone(),
                    handler.name.clone(),
                    &handler.script,
                    name,
                    self.remote,
                    handler.budget,
                )
                .await
                .map_err(|message| {
                    tracing::error!(
                        route = &*handler.name,
                        server_name = name,
                        "Lua ssl_certificate handler failed: {message}"
                    );
                    message
                })?;
            let Some(chosen) = chosen else { return Ok(()) };
            let (Some(chain), Some(key)) = (chosen.chain, chosen.key) else {
                let message = "ngx.ssl: no certificate and key set after clear_certs".to_owned();
                tracing::error!(route = &*handler.name, server_name = name, "{message}");
                return Err(message);
            };
            let certified = certified_from_der(chain, key).inspect_err(|message| {
                tracing::error!(route = &*handler.name, server_name = name, "Lua ssl_certificate handler: {message}");
            })?;
            shared.lua_chosen.put(name, handler.script.id, certified, handler.cache);
            Ok(())
        })
    }
}
