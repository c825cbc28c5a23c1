//! Configuration from the Kubernetes API server, for `tidegate controller` in a cluster.
//!
//! Watchers fill caches ([`crate::watch`]); each change wakes the rebuild loop,
//! which waits a short hold-off so a burst of changes (a `kubectl apply` of many objects, a
//! rollout moving endpoints) becomes one rebuild, then translates the whole view with the same
//! pure `translate()` as standalone mode and offers it to the publisher. Nothing is published
//! before every watcher has listed once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use tokio::sync::watch;

use super::sink::{Publishing, Sink, Stamp};
use crate::election::{self, ElectionConfig};
use crate::metrics::{ControllerMetrics, KindLabels};
use crate::publish::Publisher;
use crate::replicas;
use crate::status_writer::{self, View, Writer, load_balancer_entries};
use crate::translate;
use crate::watch::{SecretData, WatchConfig, Watched};

/// Changes that arrive within this time of the first one are translated together.
pub const HOLD_OFF: Duration = Duration::from_millis(50);

/// How statuses are written.
#[derive(Clone, Debug)]
pub struct StatusConfig {
    pub election: ElectionConfig,
    /// `--publish-service`: `namespace/name` of the Service whose addresses Ingresses report.
    pub publish_service: Option<(String, String)>,
    /// `--publish-status-address`: addresses Ingresses report (when no Service is named).
    pub addresses: Vec<String>,
}

/// Follows the API server and feeds `sink` until `stop` completes; takes part in the leader
/// election and, while leading, writes statuses.
pub async fn run<S: Sink>(
    client: Client,
    config: &WatchConfig,
    status: StatusConfig,
    publisher: Arc<Publisher>,
    metrics: Arc<ControllerMetrics>,
    sink: S,
    stop: impl std::future::Future<Output = ()>,
) {
    let (stopping, mut stopped) = watch::channel(false);
    let (leading, is_leading) = watch::channel(false);
    let election_stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let election = tokio::spawn(election::run(client.clone(), status.election.clone(), leading, election_stop));
    let (addresses, published_addresses) = watch::channel(load_balancer_entries(&status.addresses));
    if let Some((namespace, name)) = status.publish_service.clone() {
        tokio::spawn(status_writer::follow_service(client.clone(), namespace, name, addresses));
    }
    let e = &status.election;
    let period = (e.lease_duration / 3).max(Duration::from_secs(1));
    let (namespace, lease, identity) = (e.namespace.clone(), e.name.clone(), e.identity.clone());
    let report = replicas::report(
        client.clone(),
        namespace.clone(),
        lease.clone(),
        identity.clone(),
        period,
        Arc::clone(&publisher),
    );
    let reporting = tokio::spawn(report);
    let (reports, others) = watch::channel(replicas::Reports::new());
    let following = tokio::spawn(replicas::follow(
        client.clone(),
        namespace.clone(),
        lease.clone(),
        identity.clone(),
        reports,
        is_leading.clone(),
    ));
    let (views, latest_view) = watch::channel(None);
    let writer = Writer::new(client.clone(), &status.election.identity);
    let writes = Arc::clone(&metrics);
    tokio::spawn(status_writer::run(writer, latest_view, is_leading, published_addresses, others, publisher, writes));

    serve(&client, config, sink, &views, &metrics, stop).await;
    reporting.abort();
    following.abort();
    let _ =
        tokio::time::timeout(Duration::from_secs(2), replicas::retire(client.clone(), &namespace, &lease, &identity))
            .await;
    stopping.send_replace(true);
    // Let the election release the Lease, so another replica takes over at once.
    let _ = tokio::time::timeout(Duration::from_secs(3), election).await;
}

async fn serve<S: Sink>(
    client: &Client,
    config: &WatchConfig,
    sink: S,
    views: &watch::Sender<Option<Arc<View>>>,
    metrics: &ControllerMetrics,
    stop: impl std::future::Future<Output = ()>,
) {
    let watched = Watched::start(client, config);
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
        let woke = Instant::now();
        tokio::time::sleep(HOLD_OFF).await;
        if !watched.synced() {
            continue;
        }
        let reconcile = Instant::now();
        let (inputs, invalid) = watched.inputs(client, &mut secrets).await;
        let load_errors: Vec<String> =
            invalid.iter().map(|i| format!("LuaRoute {}/{}: {} (Invalid)", i.namespace, i.name, i.error)).collect();
        let mut translation = translate(&inputs);
        let was_serving = publishing.serving();
        let before = publishing.version();
        publishing.offer(&mut translation, &BTreeMap::new(), &load_errors);
        metrics.reconciles.inc();
        metrics.reconcile_duration.observe(reconcile.elapsed().as_secs_f64());
        if publishing.version() != before {
            metrics.change_to_publish.observe(woke.elapsed().as_secs_f64());
        }
        for (kind, count) in watched.counts() {
            metrics
                .objects
                .get_or_create(&KindLabels { kind: kind.to_owned() })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        views.send_replace(Some(Arc::new(View {
            version: publishing.version(),
            content: publishing.content(),
            inputs,
            statuses: translation.statuses,
            invalid,
        })));
        if !was_serving && publishing.serving() {
            tracing::info!(
                after_ms = started.elapsed().as_millis(),
                objects = ?watched.counts(),
                "first configuration from the API server"
            );
        }
    }
}
