//! CPU budgets: a watchdog thread marks a worker's Lua run as over budget; the Luau interrupt
//! only reads that mark.
//!
//! The interrupt fires at every function call and loop back-edge (and inside pattern matching),
//! so it must be cheap: it compares two atomics. The watchdog sleeps until the earliest deadline
//! of the runs in progress, and runs are short: under load it looks every [`HORIZON`] or so,
//! not on a fixed tick (a 1 ms tick woke it a thousand times a second, each time taking a core
//! from a worker on a busy machine). A run whose deadline comes before the watchdog's next look
//! wakes it; when no Lua runs it sleeps until a run starts.
//!
//! # Guarantees
//! A mark set for one run never affects a later run: each run has a generation number, and the
//! watchdog marks the generation it saw, not "whatever runs now".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// When runs come and go but none is in progress, the watchdog looks again this much later.
/// A run with less budget than this left wakes it at start.
const HORIZON: Duration = Duration::from_millis(10);

/// How long the idle watchdog sleeps at most: a safety net, runs wake it when they start.
const IDLE_SLEEP: Duration = Duration::from_secs(1);

/// Nanoseconds since the process's first clock: the time base every clock and the watchdog share.
fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// [`now_ns`] at `instant`.
fn ns_at(instant: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| instant);
    u64::try_from(instant.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One worker's Lua clock.
#[derive(Debug)]
pub struct WorkerClock {
    /// Generation of the run in progress (odd while running, even when idle).
    generation: AtomicU64,
    /// When (see [`now_ns`]) the current run is over budget.
    deadline: AtomicU64,
    /// The generation the watchdog found over budget.
    expired: AtomicU64,
}

impl WorkerClock {
    /// A clock registered with the process-wide watchdog.
    pub fn new() -> Arc<WorkerClock> {
        let clock = Arc::new(WorkerClock {
            generation: AtomicU64::new(0),
            deadline: AtomicU64::new(0),
            expired: AtomicU64::new(u64::MAX),
        });
        watchdog().register(&clock);
        clock
    }

    /// Starts a run, at `now` (the time just read), allowed to take `budget`.
    pub fn start(&self, now: Instant, budget: Duration) {
        let deadline = ns_at(now).saturating_add(nanos(budget));
        self.deadline.store(deadline, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::SeqCst);
        watchdog().wake_before(deadline);
    }

    /// Ends the run.
    pub fn stop(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the run in progress is over its budget (what the interrupt asks).
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed) == self.generation.load(Ordering::Relaxed)
    }

    /// Marks the run in progress if it is over budget at `now`; the deadline of a run in
    /// progress that is not, if any.
    fn check(&self, now: u64) -> Option<u64> {
        let generation = self.generation.load(Ordering::SeqCst);
        if generation.is_multiple_of(2) {
            return None;
        }
        let deadline = self.deadline.load(Ordering::Relaxed);
        if now >= deadline {
            self.expired.store(generation, Ordering::Relaxed);
            return None;
        }
        Some(deadline)
    }
}

struct Watchdog {
    clocks: Mutex<Vec<Weak<WorkerClock>>>,
    thread: OnceLock<std::thread::Thread>,
    /// When the watchdog looks next (`u64::MAX`: when a run starts).
    next_look: AtomicU64,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("lua-watchdog".into()).spawn(|| {
            let watchdog = watchdog();
            let mut last_runs = 0;
            loop {
                let now = now_ns();
                let (earliest, runs) = watchdog.check_all(now);
                let next = match earliest {
                    Some(deadline) => deadline,
                    // Nothing started since the last look: sleep until something does.
                    None if runs == last_runs => u64::MAX,
                    None => now.saturating_add(nanos(HORIZON)),
                };
                last_runs = runs;
                // Announce the next look, then check again: a run that started in between
                // either sees it (and wakes us if its deadline is earlier) or is seen here.
                watchdog.next_look.store(next, Ordering::SeqCst);
                if watchdog.check_all(now_ns()).0.is_some_and(|deadline| deadline < next) {
                    continue;
                }
                let sleep =
                    if next == u64::MAX { IDLE_SLEEP } else { Duration::from_nanos(next.saturating_sub(now_ns())) };
                std::thread::park_timeout(sleep);
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
            Watchdog { clocks: Mutex::new(Vec::new()), thread: OnceLock::new(), next_look: AtomicU64::new(0) };
        if let Some(thread) = thread {
            let _ = watchdog.thread.set(thread);
        }
        watchdog
    })
}

impl Watchdog {
    /// Checks every clock at `now`: the earliest deadline of the runs in progress, and a number
    /// that changes whenever a run starts or ends.
    fn check_all(&self, now: u64) -> (Option<u64>, u64) {
        let clocks = self.clocks.lock().map(|c| c.clone()).unwrap_or_default();
        let (mut earliest, mut runs) = (None::<u64>, 0u64);
        for clock in clocks.iter().filter_map(Weak::upgrade) {
            if let Some(deadline) = clock.check(now) {
                earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
            }
            runs = runs.wrapping_add(clock.generation.load(Ordering::SeqCst));
        }
        (earliest, runs)
    }

    /// A run with this deadline started: the watchdog looks earlier if it would look later.
    fn wake_before(&self, deadline: u64) {
        if deadline < self.next_look.load(Ordering::SeqCst)
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
        std::thread::sleep(HORIZON * 3 + Duration::from_millis(50));
        a_5_ms_run_is_caught_in_time(&clock);
        clock.stop();
    }

    /// Starts a 5 ms run on `clock` and waits for the watchdog to mark it.
    fn a_5_ms_run_is_caught_in_time(clock: &WorkerClock) {
        clock.start(Instant::now(), Duration::from_millis(5));
        let started = Instant::now();
        while !clock.expired() {
            assert!(started.elapsed() < Duration::from_secs(2), "not caught");
            std::thread::yield_now();
        }
        assert!(started.elapsed() < Duration::from_millis(100), "caught late: {:?}", started.elapsed());
    }

    /// While the watchdog sleeps until a long run's deadline, a run with a shorter budget that
    /// starts on another worker wakes it and is caught at its own deadline.
    #[test]
    fn a_shorter_run_is_caught_while_the_watchdog_waits_for_a_longer_one() {
        let (long, short) = (WorkerClock::new(), WorkerClock::new());
        long.start(Instant::now(), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
        a_5_ms_run_is_caught_in_time(&short);
        assert!(!long.expired(), "the longer run is within its budget");
        short.stop();
        long.stop();
    }

    #[test]
    fn a_run_past_its_budget_is_marked_and_the_next_run_is_not() {
        let clock = WorkerClock::new();
        clock.start(Instant::now(), Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(30));
        assert!(clock.expired());
        clock.stop();
        assert!(!clock.expired(), "an idle clock is never expired");
        clock.start(Instant::now(), Duration::from_secs(10));
        assert!(!clock.expired(), "a new run starts fresh");
        clock.stop();
    }
}
