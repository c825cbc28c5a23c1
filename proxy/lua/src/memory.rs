//! Memory shares: how one tenant's allocations are kept from failing another tenant's requests.
//!
//! A worker's VM has one memory limit (`--lua-memory-limit-mb`), and every namespace on the
//! worker allocates from it. While the heap is under [`PRESSURE`] of the limit, Lua allocates
//! freely and Luau's collector keeps up. Past it, the requests in flight of one namespace may
//! together hold at most [`NAMESPACE_SHARE`] of the limit: while one of its runs goes, the VM's
//! limit is lowered to what is in use plus what the namespace may still take, so an allocation
//! past its share fails that run (a memory error, 500) and nothing else.
//!
//! What a request grew the heap by counts for its namespace until the request ends; its garbage
//! then belongs to no one. Garbage counts as growth until it is collected (Luau has no
//! collection on a failed allocation), so a run under pressure starts with a full collection
//! when the heap grew by [`COLLECT_EVERY`] of the limit since the last one; what that frees is
//! credited to the run. A slice also ends halfway to the run's limit, so that it stops for that
//! collection before it runs into the limit. The accounting is by heap size, not by owner: what
//! is freed during a run (others' garbage included) is credited to it, up to what its request
//! grew, so a namespace can go past its share by garbage of others collected meanwhile.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use mlua::Lua;

use crate::slice::MemoryMark;

/// The share of the VM's limit past which the namespaces' shares apply.
pub(crate) const PRESSURE: f64 = 0.5;

/// The share of the VM's limit the requests of one namespace in flight may grow it by, under
/// pressure.
pub(crate) const NAMESPACE_SHARE: f64 = 0.5;

/// The least growth a run under pressure goes on for before it stops for a collection.
const MIN_STEP: usize = 1 << 20;

/// The share of the limit allocated between two full collections made for room.
const COLLECT_EVERY: f64 = 0.125;

/// One worker's memory shares.
pub(crate) struct MemoryShares {
    limit: usize,
    /// Bytes the requests in flight of each namespace grew the heap by.
    namespaces: RefCell<foldhash::HashMap<Arc<str>, usize>>,
    /// The heap after the last full collection made for lack of room.
    after_collection: Cell<usize>,
    /// Whether the VM's limit is lowered for the run in progress.
    lowered: Cell<bool>,
}

/// What one request grew the heap by, held for its namespace until the request ends.
pub(crate) struct MemoryCharge {
    shares: Rc<MemoryShares>,
    namespace: Arc<str>,
    grown: Cell<usize>,
}

impl MemoryShares {
    pub(crate) fn new(limit: usize) -> Rc<MemoryShares> {
        Rc::new(MemoryShares {
            limit,
            namespaces: RefCell::default(),
            after_collection: Cell::new(0),
            lowered: Cell::new(false),
        })
    }

    /// A charge for a new request of `namespace`.
    pub(crate) fn charge(self: &Rc<Self>, namespace: &Arc<str>) -> MemoryCharge {
        MemoryCharge { shares: Rc::clone(self), namespace: Arc::clone(namespace), grown: Cell::new(0) }
    }

    fn share(&self, fraction: f64) -> usize {
        (self.limit as f64 * fraction) as usize
    }

    /// Sets the VM's limit for a run of `charge`'s request under pressure. Returns what was in
    /// use before (collections included), and under pressure the heap size halfway to the
    /// run's limit, where its slice should end so that its garbage can be collected before it
    /// goes on.
    pub(crate) fn before_run(&self, lua: &Lua, charge: &MemoryCharge) -> (usize, MemoryMark) {
        let mut used = lua.used_memory();
        if used < self.share(PRESSURE) {
            // Past half of that, watched at every interrupt, so that a fast allocator cannot
            // go far past the mark between two looks.
            return (used, MemoryMark { at: self.share(PRESSURE), watch: used > self.share(PRESSURE / 2.0) });
        }
        if used > self.after_collection.get() + self.share(COLLECT_EVERY) {
            let _ = lua.gc_collect();
            let collected = lua.used_memory();
            self.after_collection.set(collected);
            // What the collection freed is credited to this request, up to what it grew.
            self.account(charge, used, collected);
            used = collected;
        }
        let in_flight = self.namespaces.borrow().get(&charge.namespace).copied().unwrap_or(0);
        let left = self.share(NAMESPACE_SHARE).saturating_sub(in_flight);
        let limit = used.saturating_add(left).min(self.limit);
        // Only fails for a Lua state without memory control, which ours has.
        let _ = lua.set_memory_limit(limit.max(1));
        self.lowered.set(true);
        // Halfway to its limit the run stops for a collection; with little room left it just
        // runs into the limit.
        let halfway = limit.saturating_sub(used) / 2;
        if halfway < MIN_STEP {
            return (used, MemoryMark { at: usize::MAX, watch: false });
        }
        (used, MemoryMark { at: used + halfway, watch: true })
    }

    /// After the run: charges what it grew the heap by (`before`: in use when it started) and
    /// puts the VM's own limit back.
    pub(crate) fn after_run(&self, lua: &Lua, charge: &MemoryCharge, before: usize) {
        let used = lua.used_memory();
        if self.lowered.replace(false) {
            let _ = lua.set_memory_limit(self.limit);
        }
        self.account(charge, before, used);
    }

    /// Charges `charge` with the heap going from `before` to `after` bytes.
    fn account(&self, charge: &MemoryCharge, before: usize, after: usize) {
        if after == before {
            return;
        }
        let old = charge.grown.get();
        // What a run freed (a collection may free others' garbage too) gives back at most
        // what the request had taken.
        let new = if after > before { old + (after - before) } else { old.saturating_sub(before - after) };
        charge.grown.set(new);
        let mut namespaces = self.namespaces.borrow_mut();
        let in_flight = namespaces.entry(Arc::clone(&charge.namespace)).or_default();
        *in_flight = (*in_flight + new).saturating_sub(old);
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        let grown = self.grown.get();
        if grown == 0 {
            return;
        }
        let mut namespaces = self.shares.namespaces.borrow_mut();
        if let Some(in_flight) = namespaces.get_mut(&self.namespace) {
            *in_flight = in_flight.saturating_sub(grown);
            if *in_flight == 0 {
                namespaces.remove(&self.namespace);
            }
        }
    }
}
