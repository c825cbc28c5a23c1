//! Giving memory back once a burst is over.
//!
//! A burst of requests leaves two kinds of memory behind. Lua garbage is collected only as Lua
//! allocates, so a worker that goes quiet keeps its heap at the burst's size; and the allocator
//! keeps freed memory for a while, to serve the next burst without faulting pages in again.
//! Both would stay until the next burst, which makes an idle proxy look (and be, for the node)
//! as large as its busiest moment.
//!
//! Neither costs anything while the worker is busy: the checks run once a second. The Lua heap
//! is collected once the worker has started no request for a whole second; freed memory goes
//! back to the system once it has started none for [`TRIM_AFTER`], so that a burst that soon
//! follows another reuses its memory instead of faulting every page in again. The same tick
//! closes idle upstream connections that expired or that their upstream closed, adds what
//! each namespace's long Lua runs cost on the worker to the metrics, and takes a new runtime
//! when no request has (so that `init_worker` Lua runs on every worker).

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidegate_lua::NamespaceLuaUse;

use crate::metrics::NamespaceLabels;
use crate::worker::Worker;

const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Quiet time after which freed memory goes back to the system (the allocator keeps it longer on
/// its own, see [`crate::allocator::configure`]). Sooner, each burst of a bursty load would pay to
/// fault its pages in again (at 10,000 concurrent requests, a tenth of the burst's CPU).
const TRIM_AFTER: Duration = Duration::from_secs(10);

/// The Lua heap is collected when it has grown past twice what the last collection left, plus
/// this much.
const LUA_GROWTH: usize = 1 << 20;

/// Free memory is returned to the system when the open connections have fallen by this many
/// from their peak since the last time.
const CONNECTIONS_FALL: usize = 1000;

/// Runs on each worker for as long as it lives.
pub(crate) async fn run(worker: Rc<Worker>) {
    let mut after_collection = worker.vm.used_memory();
    let mut requests_seen = worker.started.get();
    let mut connections_peak = 0;
    let mut quiet_for = Duration::ZERO;
    let mut trim_due = false;
    let mut lua_use = foldhash::HashMap::default();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        // A worker no request reaches takes new namespaces' Lua too (their `init_worker`).
        let _ = worker.current_runtime();
        worker.pool.sweep();
        publish_lua_use(&worker, &mut lua_use);
        let open = worker.shared.open_connections.load(Ordering::Acquire);
        connections_peak = connections_peak.max(open);
        let requests = worker.started.get();
        if std::mem::replace(&mut requests_seen, requests) != requests {
            quiet_for = Duration::ZERO;
            continue;
        }
        quiet_for += CHECK_EVERY;
        let used = worker.vm.used_memory();
        if used > after_collection.saturating_mul(2).saturating_add(LUA_GROWTH) {
            worker.vm.collect_garbage().await;
            after_collection = worker.vm.used_memory();
            worker.note_lua_memory();
            tracing::debug!(worker = worker.id, before = used, after = after_collection, "Lua heap collected");
            trim_due = true;
        } else if worker.id == 0 && connections_peak.saturating_sub(open) >= CONNECTIONS_FALL {
            // Connections are process-wide: one worker watching them is enough.
            connections_peak = open;
            trim_due = true;
        }
        if trim_due && quiet_for >= TRIM_AFTER {
            trim_due = false;
            let began = std::time::Instant::now();
            crate::allocator::release_free_memory();
            tracing::debug!(worker = worker.id, took = ?began.elapsed(), "free memory returned");
        }
    }
}

/// Adds what each namespace's long Lua runs cost on this worker since the last tick to the
/// metrics (`published`: the totals already added).
fn publish_lua_use(worker: &Worker, published: &mut foldhash::HashMap<Arc<str>, NamespaceLuaUse>) {
    let metrics = &worker.shared.metrics;
    for (namespace, now) in worker.vm.namespace_use() {
        let before = published.get(&namespace).cloned().unwrap_or_default();
        if before == now {
            continue;
        }
        let labels = NamespaceLabels { namespace: namespace.to_string() };
        metrics
            .lua_long_run_seconds
            .get_or_create(&labels)
            .inc_by(now.long_runs.saturating_sub(before.long_runs).as_secs_f64());
        metrics.lua_preemptions.get_or_create(&labels).inc_by(now.preemptions - before.preemptions);
        metrics.lua_timers_cancelled.get_or_create(&labels).inc_by(now.timers_cancelled - before.timers_cancelled);
        published.insert(namespace, now);
    }
}
