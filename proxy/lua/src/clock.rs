//! CPU budgets: a watchdog thread marks a worker's Lua run as over budget; the Luau interrupt
//! only reads that mark.
//!
//! The interrupt fires at every function call and loop back-edge (and inside pattern matching),
//! so it must be cheap: it compares two atomics. The watchdog ticks every millisecond, which is
//! the precision of the budget.
//!
//! # Guarantees
//! A mark set for one run never affects a later run: each run has a generation number, and the
//! watchdog marks the generation it saw, not "whatever runs now".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(1);

/// One worker's Lua clock.
#[derive(Debug)]
pub struct WorkerClock {
    epoch: Instant,
    /// Generation of the run in progress (odd while running, even when idle).
    generation: AtomicU64,
    /// Nanoseconds since `epoch` at which the current run is over budget.
    deadline: AtomicU64,
    /// The generation the watchdog found over budget.
    expired: AtomicU64,
}

impl WorkerClock {
    /// A clock registered with the process-wide watchdog.
    pub fn new() -> Arc<WorkerClock> {
        let clock = Arc::new(WorkerClock {
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            deadline: AtomicU64::new(0),
            expired: AtomicU64::new(u64::MAX),
        });
        watchdog().register(&clock);
        clock
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Starts a run allowed to take `budget`.
    pub fn start(&self, budget: Duration) {
        let deadline = self.now_ns().saturating_add(u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX));
        self.deadline.store(deadline, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends the run.
    pub fn stop(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the run in progress is over its budget (what the interrupt asks).
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed) == self.generation.load(Ordering::Relaxed)
    }

    fn check(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if generation % 2 == 1 && self.now_ns() >= self.deadline.load(Ordering::Relaxed) {
            self.expired.store(generation, Ordering::Relaxed);
        }
    }
}

struct Watchdog {
    clocks: Mutex<Vec<Weak<WorkerClock>>>,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("lua-watchdog".into()).spawn(|| {
            loop {
                std::thread::sleep(TICK);
                let clocks = watchdog().clocks.lock().map(|c| c.clone()).unwrap_or_default();
                for clock in clocks.iter().filter_map(Weak::upgrade) {
                    clock.check();
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the Lua watchdog: CPU budgets are not enforced");
        }
        Watchdog { clocks: Mutex::new(Vec::new()) }
    })
}

impl Watchdog {
    fn register(&self, clock: &Arc<WorkerClock>) {
        if let Ok(mut clocks) = self.clocks.lock() {
            clocks.retain(|c| c.strong_count() > 0);
            clocks.push(Arc::downgrade(clock));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_past_its_budget_is_marked_and_the_next_run_is_not() {
        let clock = WorkerClock::new();
        clock.start(Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(30));
        assert!(clock.expired());
        clock.stop();
        assert!(!clock.expired(), "an idle clock is never expired");
        clock.start(Duration::from_secs(10));
        assert!(!clock.expired(), "a new run starts fresh");
        clock.stop();
    }
}
