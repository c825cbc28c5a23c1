//! Time slices: how a long Lua run shares its worker with everything else on it.
//!
//! A worker is one thread, so Lua that runs holds every other request of that worker, of every
//! namespace. A run (a handler, a timer callback, a light thread) that has run [`SLICE`] without
//! waiting is preempted: the interrupt yields its coroutine, the worker's other tasks and its
//! I/O go first, and the run resumes where it stopped. Its CPU budget is not renewed by that:
//! the slices of one run add up against it as before.
//!
//! Per namespace, the Lua time of preempted runs is accounted on each worker, decaying over
//! [`WINDOW`]. A namespace whose long runs took more than [`MAX_SHARE`] of the worker lately
//! waits [`PAUSE`] before each further slice, so one tenant's busy loop cannot take more than
//! about half of a worker from the others, and a request of another namespace waits at most one
//! slice behind it.
//!
//! # How the interrupt yields only the coroutine it should
//! The interrupt runs in whichever coroutine is current. When that is a coroutine the user's
//! code made (`coroutine.wrap`), its yield lands in our `coroutine.resume` wrapper, not in the
//! worker: the wrapper asks [`Slicer::take_preempted`] whether the interrupt yielded that
//! coroutine (a user's `coroutine.yield()` was not), and if so suspends its own coroutine in
//! turn and resumes the inner one afterwards, so user code never sees the preemption.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use mlua::Lua;

/// How long a run goes on before other work on its worker gets a turn.
pub(crate) const SLICE: Duration = Duration::from_micros(100);

/// Interrupts between two reads of the clock: a tight loop fires one every few nanoseconds,
/// and reading the clock at each would double the cost of the interrupt.
const CHECK_EVERY: u32 = 64;

/// Over how long a namespace's Lua time is weighed.
const WINDOW: Duration = Duration::from_secs(1);

/// The share of a worker a namespace's preempted runs may take before they pause.
const MAX_SHARE: f64 = 0.5;

/// What a run of a namespace over its share waits before each further slice.
pub(crate) const PAUSE: Duration = Duration::from_millis(2);

/// Where a slice ends early for memory ([`crate::memory`]).
pub(crate) struct MemoryMark {
    /// Heap size in bytes.
    pub(crate) at: usize,
    /// Whether to look at every interrupt (under memory pressure) or only with the clock.
    pub(crate) watch: bool,
}

/// One worker's slicing state, shared by the interrupt and the runner.
pub(crate) struct Slicer {
    /// Interrupts left before the clock is read.
    countdown: Cell<u32>,
    /// When the current slice ends.
    slice_end: Cell<Instant>,
    /// Heap size at which the current slice ends early, so that the memory shares can collect
    /// before the run goes on ([`crate::memory`]); `usize::MAX` when none applies.
    memory_mark: Cell<usize>,
    /// Whether the heap is checked at every interrupt rather than with the clock.
    watch_memory: Cell<bool>,
    /// Coroutines the interrupt yielded whose yield has not been claimed yet.
    preempted: RefCell<Vec<*const c_void>>,
    /// Whether the interrupt yielded anything since the runner last asked.
    yielded: Cell<bool>,
    /// Lua time of preempted runs, and timers cancelled, by namespace.
    shares: RefCell<foldhash::HashMap<Arc<str>, Share>>,
}

#[derive(Clone, Copy, Debug)]
struct Share {
    /// Seconds of Lua time, decayed over [`WINDOW`].
    recent: f64,
    at: Instant,
    /// Lua time of its preempted runs since the worker started.
    total: Duration,
    preemptions: u64,
    timers_cancelled: u64,
}

/// What a namespace's Lua has cost on a worker (for metrics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceLuaUse {
    /// Lua time of runs long enough to be preempted.
    pub long_runs: Duration,
    pub preemptions: u64,
    /// `ngx.timer.every` timers cancelled for exceeding their CPU budget run after run.
    pub timers_cancelled: u64,
}

impl Slicer {
    pub(crate) fn new() -> Slicer {
        Slicer {
            countdown: Cell::new(CHECK_EVERY),
            slice_end: Cell::new(Instant::now() + SLICE),
            memory_mark: Cell::new(usize::MAX),
            watch_memory: Cell::new(false),
            preempted: RefCell::new(Vec::new()),
            yielded: Cell::new(false),
            shares: RefCell::default(),
        }
    }

    /// A run is resumed at `now`: its slice starts, and ends at `mark` bytes of heap if it gets
    /// there first (checked at every interrupt when `watch`, else with the clock).
    pub(crate) fn start(&self, now: Instant, MemoryMark { at, watch }: MemoryMark) {
        self.slice_end.set(now + SLICE);
        self.memory_mark.set(at);
        self.watch_memory.set(watch);
        self.countdown.set(CHECK_EVERY);
    }

    /// Asked by the interrupt: whether the running coroutine should yield now. It does only
    /// where it can (mlua ignores a yield inside a C call), and then it is recorded.
    #[allow(unsafe_code)]
    pub(crate) fn due(&self, lua: &Lua) -> bool {
        let left = self.countdown.get();
        if left > 0 {
            self.countdown.set(left - 1);
            // Under memory pressure the heap is watched at every interrupt: one allocation
            // per interrupt can be large.
            if !self.watch_memory.get() || lua.used_memory() < self.memory_mark.get() {
                return false;
            }
        } else {
            self.countdown.set(CHECK_EVERY);
            if Instant::now() < self.slice_end.get() && lua.used_memory() < self.memory_mark.get() {
                return false;
            }
        }
        let running = lua.current_thread().to_pointer();
        // SAFETY: `running` is the state of the coroutine running this interrupt, alive for
        // the duration of the call; `lua_isyieldable` only reads it. mlua makes the same check
        // before it yields, so a yield is recorded exactly when it happens.
        if unsafe { mlua::ffi::lua_isyieldable(running.cast_mut().cast()) } == 0 {
            return false;
        }
        self.preempted.borrow_mut().push(running);
        self.yielded.set(true);
        true
    }

    /// Whether the interrupt's yield is what suspended `thread` (the `coroutine.resume`
    /// wrapper asks when a coroutine yielded nothing).
    pub(crate) fn take_preempted(&self, thread: *const c_void) -> bool {
        let mut preempted = self.preempted.borrow_mut();
        let found = preempted.iter().position(|t| *t == thread);
        found.map(|i| preempted.swap_remove(i)).is_some()
    }

    /// After a resume of a run of `namespace` that took `elapsed`: whether it was preempted,
    /// and if so what it waits before its next slice (`None`: it goes after the worker's
    /// other ready tasks only).
    pub(crate) fn after_resume(&self, namespace: &Arc<str>, elapsed: Duration) -> Option<Option<Duration>> {
        if !self.yielded.replace(false) {
            return None;
        }
        // The run's own coroutine was the one yielded (or claimed by the wrappers above it).
        self.preempted.borrow_mut().clear();
        let now = Instant::now();
        let mut shares = self.shares.borrow_mut();
        let share = shares.entry(Arc::clone(namespace)).or_insert_with(|| Share::new(now));
        share.decay(now);
        share.recent += elapsed.as_secs_f64();
        share.total += elapsed;
        share.preemptions += 1;
        Some((share.recent / WINDOW.as_secs_f64() > MAX_SHARE).then_some(PAUSE))
    }

    /// A timer of `namespace` was cancelled for exhausting its budget run after run.
    pub(crate) fn timer_cancelled(&self, namespace: &Arc<str>) {
        let now = Instant::now();
        let mut shares = self.shares.borrow_mut();
        let share = shares.entry(Arc::clone(namespace)).or_insert_with(|| Share::new(now));
        share.timers_cancelled += 1;
    }

    pub(crate) fn uses(&self) -> Vec<(Arc<str>, NamespaceLuaUse)> {
        self.shares
            .borrow()
            .iter()
            .map(|(namespace, share)| {
                let usage = NamespaceLuaUse {
                    long_runs: share.total,
                    preemptions: share.preemptions,
                    timers_cancelled: share.timers_cancelled,
                };
                (Arc::clone(namespace), usage)
            })
            .collect()
    }
}

impl Share {
    fn new(now: Instant) -> Share {
        Share { recent: 0.0, at: now, total: Duration::ZERO, preemptions: 0, timers_cancelled: 0 }
    }

    fn decay(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.recent *= (-age / WINDOW.as_secs_f64()).exp();
        self.at = now;
    }
}

/// A preempted run waiting for its next turn: woken only once the runtime has polled its I/O
/// and timers (tokio defers the wake-up of `yield_now` until then), so that requests whose
/// data arrived meanwhile go first. Wakes from elsewhere (mlua wakes a coroutine it yielded at
/// once) do not end the wait.
#[derive(Default)]
pub(crate) struct Turn(Option<Arc<TurnFlag>>);

struct TurnFlag {
    given: AtomicBool,
    task: Waker,
}

impl Wake for TurnFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.given.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl Turn {
    /// Asks for the next turn of the task polled with `cx`.
    pub(crate) fn ask(&mut self, cx: &Context<'_>) {
        let flag = Arc::new(TurnFlag { given: AtomicBool::new(false), task: cx.waker().clone() });
        let waker = Waker::from(Arc::clone(&flag));
        let mut deferred = std::pin::pin!(tokio::task::yield_now());
        // The first poll hands our waker to the scheduler's deferred list and is pending.
        let _ = deferred.as_mut().poll(&mut Context::from_waker(&waker));
        self.0 = Some(flag);
    }

    /// Ready once the turn asked for came (or none was asked for).
    pub(crate) fn poll(&mut self) -> Poll<()> {
        match &self.0 {
            Some(flag) if !flag.given.load(Ordering::Acquire) => Poll::Pending,
            _ => {
                self.0 = None;
                Poll::Ready(())
            }
        }
    }
}
