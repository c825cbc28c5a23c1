//! Prometheus metrics, served as text on the admin port.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the request counter. `host` is the virtual host pattern (never the raw request
/// host, which clients control) and `route` the route name, so cardinality stays bounded by
/// configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) host: String,
    pub(crate) route: String,
    pub(crate) status: &'static str,
}

/// Labels of the shared dictionary gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DictLabels {
    pub(crate) namespace: String,
    pub(crate) dict: String,
}

/// Labels of per-worker gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerLabels {
    pub(crate) worker: String,
}

/// Labels of counters by status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabels {
    pub(crate) status: String,
}

/// Labels of per-namespace counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NamespaceLabels {
    pub(crate) namespace: String,
}

/// Labels of the Lua failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LuaErrorLabels {
    pub(crate) route: String,
    pub(crate) phase: &'static str,
    pub(crate) kind: &'static str,
}

#[derive(Debug)]
pub(crate) struct Metrics {
    /// Requests no route matched (404).
    pub(crate) unmatched: crate::router::RouteCounters,
    pub(crate) lua_memory: Family<WorkerLabels, Gauge>,
    pub(crate) dict_used_bytes: Family<DictLabels, Gauge>,
    pub(crate) dict_capacity_bytes: Family<DictLabels, Gauge>,
    pub(crate) dict_evictions: Family<DictLabels, Gauge>,
    pub(crate) lua_errors: Family<LuaErrorLabels, Counter>,
    /// Lua time of runs long enough to be preempted, by namespace (all workers).
    pub(crate) lua_long_run_seconds: Family<NamespaceLabels, Counter<f64>>,
    pub(crate) lua_preemptions: Family<NamespaceLabels, Counter>,
    pub(crate) lua_timers_cancelled: Family<NamespaceLabels, Counter>,
    registry: Registry,
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) request_duration: WorkerHistogram,
    pub(crate) upstream_duration: WorkerHistogram,
    pub(crate) active_connections: Gauge,
    pub(crate) parked_connections: Gauge,
    pub(crate) refused_requests: Family<StatusLabels, Counter>,
    pub(crate) config_version: Gauge,
    pub(crate) config_apply_duration: Histogram,
    pub(crate) config_apply_failures: Counter,
    pub(crate) rejected_objects: Gauge,
    pub(crate) access_log_dropped: Counter,
    /// HTTP/2 connections closed for resetting most of their streams early (rapid reset).
    pub(crate) http2_reset_floods: Counter,
    /// Connections closed for want of a valid PROXY protocol header (`use-proxy-protocol`).
    pub(crate) proxy_protocol_refused: Counter,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0].into_iter()
}

impl Metrics {
    /// Metrics of a proxy with `workers` workers.
    pub(crate) fn new(workers: usize) -> Self {
        let mut registry = Registry::with_prefix("tidegate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests answered, by virtual host, route and status class", requests.clone());
        let request_duration = WorkerHistogram::new(workers, seconds_buckets());
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let upstream_duration = WorkerHistogram::new(workers, seconds_buckets());
        registry.register(
            "upstream_duration_seconds",
            "Time from sending upstream to its response headers",
            upstream_duration.clone(),
        );
        let active_connections = Gauge::default();
        registry.register("active_connections", "Client connections open now", active_connections.clone());
        let parked_connections = Gauge::default();
        registry.register(
            "parked_connections",
            "Idle HTTP/1 client connections waiting in their worker without a task (part of active_connections)",
            parked_connections.clone(),
        );
        let refused_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "refused_requests",
            "HTTP/1 request heads refused before routing, by status (400 malformed or ambiguous framing, 431 too large)",
            refused_requests.clone(),
        );
        let config_version = Gauge::default();
        registry.register("config_version", "Version of the snapshot being served", config_version.clone());
        let config_apply_duration = Histogram::new(seconds_buckets());
        registry.register(
            "config_apply_duration_seconds",
            "Time to build and swap in a snapshot",
            config_apply_duration.clone(),
        );
        let config_apply_failures = Counter::default();
        registry.register(
            "config_apply_failures",
            "Snapshots refused because they did not build",
            config_apply_failures.clone(),
        );
        let rejected_objects = Gauge::default();
        registry.register(
            "rejected_objects",
            "Objects with errors in the current configuration",
            rejected_objects.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let proxy_protocol_refused = Counter::default();
        registry.register(
            "proxy_protocol_refused",
            "Connections closed for want of a valid PROXY protocol header",
            proxy_protocol_refused.clone(),
        );
        let http2_reset_floods = Counter::default();
        registry.register(
            "http2_reset_floods",
            "HTTP/2 connections closed because the client reset most of their streams before the answer",
            http2_reset_floods.clone(),
        );
        let lua_errors = Family::<LuaErrorLabels, Counter>::default();
        registry.register(
            "lua_errors",
            "Lua handler failures, by route, phase and kind (error, timeout, memory)",
            lua_errors.clone(),
        );
        let lua_long_run_seconds = Family::<NamespaceLabels, Counter<f64>>::default();
        registry.register(
            "lua_long_run_seconds",
            "Lua time of runs that went on past a time slice and were preempted, by namespace",
            lua_long_run_seconds.clone(),
        );
        let lua_preemptions = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "lua_preemptions",
            "Times a Lua run was preempted at the end of its time slice, by namespace",
            lua_preemptions.clone(),
        );
        let lua_timers_cancelled = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "lua_timers_cancelled",
            "ngx.timer.every timers cancelled for exceeding their CPU budget run after run, by namespace",
            lua_timers_cancelled.clone(),
        );
        let dict_used_bytes = Family::<DictLabels, Gauge>::default();
        registry.register(
            "shared_dict_used_bytes",
            "Bytes held by each ngx.shared dictionary",
            dict_used_bytes.clone(),
        );
        let dict_capacity_bytes = Family::<DictLabels, Gauge>::default();
        registry.register(
            "shared_dict_capacity_bytes",
            "Size of each ngx.shared dictionary",
            dict_capacity_bytes.clone(),
        );
        let dict_evictions = Family::<DictLabels, Gauge>::default();
        registry.register(
            "shared_dict_evictions",
            "Live entries each ngx.shared dictionary evicted to make room, since it was declared",
            dict_evictions.clone(),
        );
        let lua_memory = Family::<WorkerLabels, Gauge>::default();
        registry.register("lua_memory_bytes", "Bytes held by each worker's Lua VM", lua_memory.clone());
        let unmatched_class = |status: &'static str| {
            requests.get_or_create(&RequestLabels { host: String::new(), route: String::new(), status }).clone()
        };
        let unmatched = crate::router::RouteCounters([
            unmatched_class("1xx"),
            unmatched_class("2xx"),
            unmatched_class("3xx"),
            unmatched_class("4xx"),
            unmatched_class("5xx"),
        ]);
        Metrics {
            http2_reset_floods,
            proxy_protocol_refused,
            unmatched,
            lua_memory,
            dict_used_bytes,
            dict_capacity_bytes,
            dict_evictions,
            lua_errors,
            lua_long_run_seconds,
            lua_preemptions,
            lua_timers_cancelled,
            registry,
            requests,
            request_duration,
            upstream_duration,
            active_connections,
            parked_connections,
            refused_requests,
            config_version,
            config_apply_duration,
            config_apply_failures,
            rejected_objects,
            access_log_dropped,
        }
    }

    /// Reads the dictionaries' figures into their gauges (at scrape time: the dictionaries keep
    /// their own counters, so the request path pays nothing for these metrics).
    pub(crate) fn observe_dicts(&self, stats: &[tidegate_lua::DictStats]) {
        self.dict_used_bytes.clear();
        self.dict_capacity_bytes.clear();
        self.dict_evictions.clear();
        for s in stats {
            let labels = DictLabels { namespace: s.namespace.clone(), dict: s.name.clone() };
            self.dict_used_bytes.get_or_create(&labels).set(i64::try_from(s.used_bytes).unwrap_or(i64::MAX));
            self.dict_capacity_bytes.get_or_create(&labels).set(i64::try_from(s.capacity_bytes).unwrap_or(i64::MAX));
            self.dict_evictions.get_or_create(&labels).set(i64::try_from(s.evictions).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn observe_lua_memory(&self, per_worker: &[std::sync::atomic::AtomicU64]) {
        for (worker, bytes) in per_worker.iter().enumerate() {
            let labels = WorkerLabels { worker: worker.to_string() };
            let bytes = bytes.load(std::sync::atomic::Ordering::Relaxed);
            self.lua_memory.get_or_create(&labels).set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// The counters of one route (created once per runtime build, shared by the workers).
    pub(crate) fn route_counters(&self, host: &str, route: &str) -> crate::router::RouteCounters {
        let make = |status: &'static str| {
            self.requests
                .get_or_create(&RequestLabels { host: host.to_owned(), route: route.to_owned(), status })
                .clone()
        };
        crate::router::RouteCounters([make("1xx"), make("2xx"), make("3xx"), make("4xx"), make("5xx")])
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A histogram every worker observes into its own shard: no lock and no cache line shared with
/// another worker on the request path (prometheus-client's `Histogram` takes a mutex per
/// observation, which two workers contend on; when the holder is preempted, the other waits a
/// scheduler slice). A scrape adds the shards up into one histogram.
#[derive(Clone, Debug)]
pub(crate) struct WorkerHistogram(Arc<Shards>);

#[derive(Debug)]
struct Shards {
    /// Upper bounds, finite and ascending; an overflow bucket follows them.
    bounds: Box<[f64]>,
    shards: Box<[Shard]>,
}

/// Buckets a [`WorkerHistogram`] can have, the overflow bucket included.
const MAX_BUCKETS: usize = 24;

/// One worker's observations, inline on cache lines of its own (separately allocated buckets
/// could share a line with the next worker's).
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    count: AtomicU64,
    /// The sum, as `f64` bits: only the shard's worker writes it.
    sum: AtomicU64,
    /// Per bucket (not cumulative): one per bound, then the overflow bucket.
    buckets: [AtomicU64; MAX_BUCKETS],
}

impl WorkerHistogram {
    /// A histogram with these upper bounds (finite ones, at most `MAX_BUCKETS - 1`) for
    /// `workers` workers.
    pub(crate) fn new(workers: usize, bounds: impl Iterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.filter(|b| b.is_finite()).take(MAX_BUCKETS - 1).collect();
        let shards = (0..workers.max(1))
            .map(|_| Shard {
                count: AtomicU64::new(0),
                sum: AtomicU64::new(0f64.to_bits()),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            })
            .collect();
        WorkerHistogram(Arc::new(Shards { bounds, shards }))
    }

    /// Records `value` in `worker`'s shard. Each shard has one writer, its worker.
    pub(crate) fn observe(&self, worker: usize, value: f64) {
        let Shards { bounds, shards } = &*self.0;
        let shard = &shards[worker % shards.len()];
        let bucket = bounds.partition_point(|bound| *bound < value);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let sum = f64::from_bits(shard.sum.load(Ordering::Relaxed)) + value;
        shard.sum.store(sum.to_bits(), Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl EncodeMetric for WorkerHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let Shards { bounds, shards } = &*self.0;
        let mut buckets: Vec<(f64, u64)> = bounds.iter().chain([&f64::INFINITY]).map(|b| (*b, 0)).collect();
        let (mut sum, mut count) = (0.0, 0);
        for shard in shards {
            for (total, bucket) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += bucket.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            count += shard.count.load(Ordering::Relaxed);
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metric: impl prometheus_client::registry::Metric) -> String {
        let mut registry = Registry::default();
        registry.register("d", "durations", metric);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        out
    }

    /// Shards add up into the text prometheus-client writes for one histogram fed the same values.
    #[test]
    fn worker_shards_encode_as_one_histogram() {
        let bounds = || [0.001, 0.01, 0.1].into_iter();
        let sharded = WorkerHistogram::new(3, bounds());
        let single = Histogram::new(bounds());
        for (worker, value) in [(0, 0.0005), (1, 0.001), (2, 0.05), (0, 0.5), (1, 0.01), (2, 7.0)] {
            sharded.observe(worker, value);
            single.observe(value);
        }
        let expected = text(single);
        assert!(expected.contains("d_bucket{le=\"+Inf\"} 6"), "{expected}");
        assert_eq!(text(sharded), expected);
    }
}
