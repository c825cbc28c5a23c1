//! Configuration from the Kubernetes API server, for `tidegate controller` in a cluster.
//!
//! Watchers fill caches ([`tidegate_controller::watch`]); each change wakes the rebuild loop,
//! which waits a short hold-off so a burst of changes (a `kubectl apply` of many objects, a
//! rollout moving endpoints) becomes one rebuild, then translates the whole view with the same
//! pure `translate()` as standalone mode and offers it to the publisher. Nothing is published
//! before every watcher has listed once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Client;
use tidegate_controller::translate;
use tidegate_controller::watch::{SecretData, WatchConfig, Watched};

use crate::manifest_source::{Publishing, Sink, Stamp};

/// Changes that arrive within this time of the first one are translated together.
pub const HOLD_OFF: Duration = Duration::from_millis(50);

/// Follows the API server and feeds `sink` until `stop` completes.
pub async fn run<S: Sink>(client: Client, config: &WatchConfig, sink: S, stop: impl std::future::Future<Output = ()>) {
    let watched = Watched::start(&client, config);
    let mut secrets = SecretData::default();
    let mut publishing = Publishing::new(sink, Stamp::Clock);
    let started = Instant::now();
    let mut stop = std::pin::pin!(stop);
    let mut waiting_logged = false;
    loop {
        tokio::select! {
            () = watched.changed() => {}
            () = &mut stop => return,
            () = tokio::time::sleep(Duration::from_secs(10)), if !waiting_logged => {
                if !watched.synced() {
                    tracing::warn!(counts = ?watched.counts(), "still waiting for the first list of every kind; nothing is published before");
                }
                waiting_logged = true;
                continue;
            }
        }
        tokio::time::sleep(HOLD_OFF).await;
        if !watched.synced() {
            continue;
        }
        let (inputs, invalid) = watched.inputs(&client, &mut secrets).await;
        let load_errors: Vec<String> = invalid
            .iter()
            .map(|((namespace, name), _, error)| format!("LuaRoute {namespace}/{name}: {error} (Invalid)"))
            .collect();
        let translation = translate(&inputs);
        let was_serving = publishing.serving();
        publishing.offer(&translation, &BTreeMap::new(), &load_errors);
        if !was_serving && publishing.serving() {
            tracing::info!(
                after_ms = started.elapsed().as_millis(),
                objects = ?watched.counts(),
                "first configuration from the API server"
            );
        }
    }
}
