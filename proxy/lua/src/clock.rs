//! CPU budgets: a watchdog thread marks a worker's Lua run as over budget; the Luau interrupt
//! only reads that mark.
//!
//! The interrupt fires at every function call and loop back-edge (and inside pattern matching),
//! so it must be cheap: it compares two atomics. The watchdog ticks every millisecond while a
//! run is in progress, which is the precision of the budget; when no Lua runs it sleeps until a
//! run starts (an idle proxy does not wake a thousand times a second).
//!
//! # Guarantees
//! A mark set for one run never affects a later run: each run has a generation number, and the
//! watchdog marks the generation it saw, not "whatever runs now".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(1);

/// Ticks without any run before the watchdog sleeps: a busy worker never has to wake it.
const QUIET_TICKS: u32 = 100;

/// How long the idle watchdog sleeps at most: a safety net, runs wake it when they start.
const IDLE_SLEEP: Duration = Duration::from_secs(1);

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
        self.generation.fetch_add(1, Ordering::SeqCst);
        watchdog().wake();
    }

    /// Ends the run.
    pub fn stop(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the run in progress is over its budget (what the interrupt asks).
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed) == self.generation.load(Ordering::Relaxed)
    }

    /// Marks the run in progress if it is over budget; true while a run is in progress.
    fn check(&self) -> bool {
        let generation = self.generation.load(Ordering::SeqCst);
        if generation % 2 == 1 && self.now_ns() >= self.deadline.load(Ordering::Relaxed) {
            self.expired.store(generation, Ordering::Relaxed);
        }
        generation % 2 == 1
    }
}

struct Watchdog {
    clocks: Mutex<Vec<Weak<WorkerClock>>>,
    thread: OnceLock<std::thread::Thread>,
    /// The watchdog sleeps until a run starts.
    parked: AtomicBool,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("lua-watchdog".into()).spawn(|| {
            let watchdog = watchdog();
            let (mut quiet, mut last) = (0, 0);
            loop {
                let (running, runs) = watchdog.check_all();
                quiet = if running || runs != last { 0 } else { quiet + 1 };
                last = runs;
                if quiet < QUIET_TICKS {
                    std::thread::sleep(TICK);
                    continue;
                }
                // Announce the sleep, then look again: a run that started in between either
                // sees `parked` (and wakes us) or is seen here.
                watchdog.parked.store(true, Ordering::SeqCst);
                if watchdog.check_all() == (false, last) {
                    std::thread::park_timeout(IDLE_SLEEP);
                }
                // Still quiet after the timeout: the next look parks again at once.
                watchdog.parked.store(false, Ordering::SeqCst);
            }
        });
        let thread = match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the Lua watchdog: CPU budgets are not enforced");
                None
            }
        };
        let watchdog =
            Watchdog { clocks: Mutex::new(Vec::new()), thread: OnceLock::new(), parked: AtomicBool::new(false) };
        if let Some(thread) = thread {
            let _ = watchdog.thread.set(thread);
        }
        watchdog
    })
}

impl Watchdog {
    /// Checks every clock: whether some run is in progress, and a number that changes whenever
    /// a run starts or ends.
    fn check_all(&self) -> (bool, u64) {
        let clocks = self.clocks.lock().map(|c| c.clone()).unwrap_or_default();
        let (mut running, mut runs) = (false, 0u64);
        for clock in clocks.iter().filter_map(Weak::upgrade) {
            running |= clock.check();
            runs = runs.wrapping_add(clock.generation.load(Ordering::SeqCst));
        }
        (running, runs)
    }

    /// A run started: the watchdog ticks again if it was asleep.
    fn wake(&self) {
        if self.parked.load(Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }

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

    /// After a quiet spell the watchdog sleeps; a run that starts then wakes it, and is still
    /// stopped at its budget.
    #[test]
    fn a_run_after_a_quiet_spell_is_still_caught() {
        let clock = WorkerClock::new();
        std::thread::sleep(TICK * (QUIET_TICKS + 50));
        clock.start(Duration::from_millis(5));
        let started = Instant::now();
        while !clock.expired() {
            assert!(started.elapsed() < Duration::from_millis(200), "not caught");
            std::thread::yield_now();
        }
        assert!(started.elapsed() < Duration::from_millis(100), "caught late: {:?}", started.elapsed());
        clock.stop();
    }

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
