//! A worker thread's state, shared by its connections and requests: the runtime it serves
//! with, its upstream pool, its Lua VM and its reactor of client sockets. Never crosses threads.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use tidegate_lua::{RequestId, Vm};

use crate::Shared;
use crate::connection::ConnectionGuard;
use crate::reactor::Reactor;
use crate::runtime::Runtime;
use crate::upstream::Pool;

/// State of one worker thread, shared by its connections; never crosses threads.
pub(crate) struct Worker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Rc<Pool>,
    /// The worker's client sockets, and its HTTP/1 connections waiting without a task.
    pub(crate) reactor: Reactor<ConnectionGuard>,
    pub(crate) vm: Rc<Vm>,
    pub(crate) id: usize,
    /// Runtime version whose scripts the VM's cache was last trimmed to.
    pub(crate) scripts_version: Cell<u64>,
    /// Lua requests started (the sequence of their ids).
    pub(crate) requests: Cell<u64>,
    /// Requests started, of every kind (what tells the worker's upkeep it is quiet).
    pub(crate) started: Cell<u64>,
    /// The runtime this worker serves with, refreshed when the shared one is swapped: requests
    /// clone this `Rc` rather than the shared `Arc`, whose counter every worker would contend on.
    #[allow(clippy::redundant_allocation)]
    pub(crate) runtime: RefCell<Rc<Arc<Runtime>>>,
}

impl Worker {
    /// A request id unique in this process.
    pub(crate) fn next_request_id(&self) -> RequestId {
        static PROCESS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let sequence = self.requests.get().wrapping_add(1);
        self.requests.set(sequence);
        RequestId {
            process: *PROCESS.get_or_init(std::process::id),
            worker: u32::try_from(self.id).unwrap_or(u32::MAX),
            sequence,
        }
    }

    /// Publishes how much memory this worker's Lua VM holds (read by `/metrics`).
    pub(crate) fn note_lua_memory(&self) {
        if let Some(slot) = self.shared.lua_memory.get(self.id) {
            slot.store(u64::try_from(self.vm.used_memory()).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[allow(clippy::redundant_allocation)]
    pub(crate) fn current_runtime(&self) -> Rc<Arc<Runtime>> {
        let latest = self.shared.runtime.load();
        let mut cached = self.runtime.borrow_mut();
        if !Arc::ptr_eq(&latest, &**cached) {
            self.pool.configure(latest.routing.pool_limits);
            if !Arc::ptr_eq(&latest.routing, &cached.routing) {
                self.adopt_lua(&latest.routing);
            }
            *cached = Rc::new(Arc::clone(&latest));
        }
        Rc::clone(&cached)
    }

    /// Gives the VM the namespaces' modules and module-level code of `routing`, and starts the
    /// `init_worker` Lua of the namespaces whose code changed (a task each: they may wait).
    pub(crate) fn adopt_lua(&self, routing: &crate::runtime::RoutingState) {
        for job in self.vm.set_namespaces(routing.lua_namespaces.clone()) {
            let vm = Rc::clone(&self.vm);
            tokio::task::spawn_local(async move {
                let namespace = Arc::clone(&job.namespace);
                if let tidegate_lua::Outcome::Failed { kind, message } = vm.init_worker(job).await {
                    tracing::error!(
                        target: "lua",
                        namespace = &*namespace,
                        kind = kind.name(),
                        phase = "init_worker",
                        "Lua init_worker failed: {message}"
                    );
                }
            });
        }
    }

    /// Drops loaded scripts that the current runtime no longer uses.
    pub(crate) fn trim_scripts(&self, runtime: &Runtime) {
        if self.scripts_version.replace(runtime.version) != runtime.version {
            let keep = &runtime.routing.script_ids;
            self.vm.retain_scripts(|id| keep.contains(&id));
        }
    }
}
