//! The controller's Prometheus metrics, served as text on its admin port (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    /// Translations of the whole view.
    pub reconciles: Counter,
    pub reconcile_duration: Histogram,
    /// From the first change of a batch (as the watch delivered it) to the snapshot published.
    pub change_to_publish: Histogram,
    pub objects: Family<KindLabels, Gauge>,
    pub snapshot_version: Gauge,
    pub proxies_connected: Gauge,
    pub leader: Gauge,
    pub status_writes: Counter,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0].into_iter()
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tidegate_controller");
        let reconciles = Counter::default();
        registry.register("reconciles", "Translations of the whole view", reconciles.clone());
        let reconcile_duration = Histogram::new(seconds_buckets());
        registry.register(
            "reconcile_duration_seconds",
            "Time to read the caches and translate",
            reconcile_duration.clone(),
        );
        let change_to_publish = Histogram::new(seconds_buckets());
        registry.register(
            "change_to_publish_seconds",
            "Time from an object change reaching the controller to the snapshot holding it being published",
            change_to_publish.clone(),
        );
        let objects = Family::<KindLabels, Gauge>::default();
        registry.register("objects", "Objects cached, by kind", objects.clone());
        let snapshot_version = Gauge::default();
        registry.register("snapshot_version", "Version of the snapshot published", snapshot_version.clone());
        let proxies_connected = Gauge::default();
        registry.register("proxies_connected", "Proxies subscribed to this replica", proxies_connected.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the Lease and writes status", leader.clone());
        let status_writes = Counter::default();
        registry.register("status_writes", "Status subresource writes", status_writes.clone());
        ControllerMetrics {
            registry,
            reconciles,
            reconcile_duration,
            change_to_publish,
            objects,
            snapshot_version,
            proxies_connected,
            leader,
            status_writes,
        }
    }
}

impl ControllerMetrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
