//! One Luau VM per worker thread, and how a request's handlers run in it.
//!
//! # The environment of a request
//! The VM's global table is the shared base: the allowlisted libraries, `ngx`, our modules. The
//! sandbox makes it and every library table read-only. Each request gets its own environment
//! table whose reads fall through to the base (`__index`), so a global one request writes is
//! never seen by another.
//!
//! A script is compiled as a chunk, which is the handler. The worker loads that bytecode once;
//! per request, the loaded chunk is cloned (a new closure of the same prototype) and the clone
//! is given the request's environment. A chunk that uses no global by name (most handlers,
//! which only call `ngx` and the libraries) would behave the same in any environment: it runs
//! as one closure per namespace, in the namespace's read-only globals (`bytecode`,
//! [`Vm::handler`]).
//!
//! # Phases and coroutines
//! Each handler runs as an entry coroutine of its request, as in OpenResty: all of a request's
//! handlers share its environment, `ngx.ctx` and state, and `ngx.exit` ends a handler by
//! suspending its coroutine for good, which `pcall` cannot intercept.
//!
//! # Limits
//! - CPU: the Lua time of a request (all phases) is capped; when over, the interrupt yields the
//!   coroutine (never resumed again) or, inside a C call that cannot yield, raises an error;
//!   either way the request fails with [`FailureKind::Timeout`].
//! - Memory: the whole VM is capped, and once it is half full each namespace's requests in
//!   flight to half of it ([`crate::memory`]); an allocation past either fails the request that
//!   made it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http::HeaderMap;
use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value, VmState};

use crate::api;
use crate::api::shared::NamespaceEnv;
use crate::api::thread::LightThread;
use crate::clock::WorkerClock;
use crate::compile::Script;
use crate::memory::{MemoryCharge, MemoryShares};
use crate::modules::{Modules, NamespaceCode};
use crate::request::{Phase, RequestHead, RequestState};
use crate::slice::{Slicer, Turn};

/// Limits and identity of one worker's VM.
#[derive(Debug, Clone)]
pub struct LuaConfig {
    /// Lua time allowed per request, across all its phases.
    pub cpu_budget: Duration,
    /// Memory allowed to the whole VM.
    pub memory_limit: usize,
    pub worker_id: usize,
    pub worker_count: usize,
    /// The proxy's `ngx.shared` dictionaries, shared by all workers.
    pub shared_dicts: Arc<crate::shdict::SharedDicts>,
    /// Timers a worker may have waiting at once (`lua_max_pending_timers`).
    pub max_pending_timers: usize,
    /// Certificate authorities cosockets trust in `sslhandshake` (system roots plus
    /// `lua_ssl_trusted_certificate`, as the proxy loads them at start).
    pub tls_roots: Arc<rustls::RootCertStore>,
    /// Addresses cosockets refuse to connect to (see [`crate::network`]).
    pub socket_deny: Arc<Vec<crate::network::Network>>,
    /// `ngx.log` and `print` lines begin as OpenResty's do: `[lua] <source>:<line>: `.
    pub openresty_log_lines: bool,
}

impl Default for LuaConfig {
    fn default() -> Self {
        LuaConfig {
            cpu_budget: Duration::from_millis(100),
            memory_limit: 128 << 20,
            worker_id: 0,
            worker_count: 1,
            shared_dicts: crate::shdict::SharedDicts::new(),
            max_pending_timers: 1024,
            tls_roots: Arc::new(rustls::RootCertStore::empty()),
            socket_deny: Arc::new(crate::network::Network::default_denied()),
            openresty_log_lines: false,
        }
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A Lua error (including errors raised by API functions).
    Error,
    /// The request's CPU budget ran out.
    Timeout,
    /// The VM's memory limit was reached.
    Memory,
}

impl FailureKind {
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
        }
    }
}

/// How running a phase's handlers ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every handler returned (or called `ngx.exit(ngx.OK)`): go on to the next phase.
    Continue,
    /// `ngx.exit(status)` ended the request (rewrite/access with status ≥ 200; any status in
    /// content).
    Exit(u16),
    /// `ngx.exec(uri)` (or `ngx.req.set_uri(uri, true)`) ended the request here: it goes on at
    /// the URI in [`crate::RequestState::exec`], from its routing, with a new `ngx.ctx`.
    Exec,
    /// A handler failed: the request gets 500 (or is cut if its headers went out).
    Failed { kind: FailureKind, message: String },
}

/// Reads the whole client body when Lua asks for it (`ngx.req.read_body`).
pub type BodyReader = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<bytes::Bytes, String>>>>>;

/// A request as the VM knows it: its state, its environment, its `ngx.ctx`.
pub struct LuaRequest {
    pub state: RequestState,
    /// Its environment, made when first needed: handlers that need none of their own (see
    /// [`Vm::handler`]) run without one.
    pub(crate) env: RefCell<Option<Table>>,
    /// What the environments of the request's namespace are made of; `None` for a timer, which
    /// has its environment from the start.
    namespace: Option<Rc<NamespaceEnv>>,
    pub(crate) ctx: RefCell<Option<Table>>,
    /// Fields a request adds to `ngx` (OpenResty lets code do that); kept per request.
    pub(crate) ngx_fields: RefCell<Option<Table>>,
    lua_time: Cell<Duration>,
    /// The request's CPU budget when its route sets one.
    cpu_budget: Cell<Option<Duration>>,
    /// Set by the proxy; taken by the first `ngx.req.read_body`.
    pub body_reader: RefCell<Option<BodyReader>>,
    /// Id of the script running now (timers it creates belong to it).
    pub(crate) script: Cell<u64>,
    /// What the request grew the VM's heap by, held for its namespace ([`crate::memory`]).
    pub(crate) memory: MemoryCharge,
    /// Light threads spawned by the running handler (`ngx.thread.spawn`).
    pub(crate) threads: RefCell<Vec<Rc<LightThread>>>,
    /// Notified whenever one of them ends.
    pub(crate) thread_ended: tokio::sync::Notify,
}

impl std::fmt::Debug for LuaRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuaRequest")
            .field("state", &self.state)
            .field("lua_time", &self.lua_time)
            .finish_non_exhaustive()
    }
}

impl LuaRequest {
    /// A request with its environment already made (a timer's).
    pub(crate) fn with_env(head: RequestHead, headers: HeaderMap, env: Table, memory: MemoryCharge) -> Rc<LuaRequest> {
        LuaRequest::new(head, headers, Some(env), None, memory)
    }

    fn new(
        head: RequestHead,
        headers: HeaderMap,
        env: Option<Table>,
        namespace: Option<Rc<NamespaceEnv>>,
        memory: MemoryCharge,
    ) -> Rc<LuaRequest> {
        Rc::new(LuaRequest {
            memory,
            state: RequestState::new(head, headers),
            env: RefCell::new(env),
            namespace,
            ctx: RefCell::new(None),
            ngx_fields: RefCell::new(None),
            lua_time: Cell::new(Duration::ZERO),
            cpu_budget: Cell::new(None),
            body_reader: RefCell::new(None),
            script: Cell::new(0),
            threads: RefCell::new(Vec::new()),
            thread_ended: tokio::sync::Notify::new(),
        })
    }

    /// The request's own environment (what its handlers see as globals), made on first use:
    /// an empty table that reads the namespace's globals. `safeenv`, as Luau's own sandbox
    /// makes each script's environment: the handlers' imports come from their load-time
    /// resolution (`without_request`), and built-ins such as `type` or `string.sub` take the
    /// interpreter's fast path. A global the request writes stays in its environment; one that
    /// shadows a built-in is seen by the chunk that wrote it, not by the request's other
    /// handlers.
    pub(crate) fn env(&self, lua: &Lua) -> mlua::Result<Table> {
        if let Some(env) = &*self.env.borrow() {
            return Ok(env.clone());
        }
        let env = lua.create_table()?;
        if let Some(namespace) = &self.namespace {
            env.set_metatable(Some(namespace.meta.clone()))?;
        }
        env.set_safeenv(true);
        *self.env.borrow_mut() = Some(env.clone());
        Ok(env)
    }

    /// Lua time this request has used so far.
    pub fn lua_time(&self) -> Duration {
        self.lua_time.get()
    }

    /// Overrides the VM's CPU budget for this request (a LuaRoute's `cpuBudget`).
    pub fn set_cpu_budget(&self, budget: Duration) {
        self.cpu_budget.set(Some(budget));
    }

    fn remaining_budget(&self, default: Duration) -> Option<Duration> {
        self.cpu_budget.get().unwrap_or(default).checked_sub(self.lua_time.get())
    }
}

thread_local! {
    /// The request whose Lua is running on this thread right now.
    static CURRENT: RefCell<Option<Rc<LuaRequest>>> = const { RefCell::new(None) };
    /// How long the coroutine being resumed asked to sleep, set by `ngx.sleep` just before it
    /// yields; taken by whoever resumed it.
    static SLEEP: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// `ngx.sleep`: the running coroutine, which yields next, is to stay suspended this long.
pub(crate) fn sleep_after_yield(duration: Duration) {
    SLEEP.set(Some(duration));
}

/// What the coroutine just resumed asked for with [`sleep_after_yield`], if it did.
pub(crate) fn take_sleep() -> Option<Duration> {
    SLEEP.take()
}

/// A coroutine's `ngx.sleep`, kept by the runner that resumes it, as OpenResty's coroutine
/// yields to nginx: until it is over, the coroutine is not resumed. Going through an mlua async
/// function instead (a boxed future in a userdata, polled through two more callbacks) cost
/// about 4,000 instructions per sleep.
#[derive(Default)]
struct Sleeping(Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl Sleeping {
    /// Starts a sleep; 0 only lets the worker serve what else is ready first.
    fn start(&mut self, duration: Duration, cx: &mut std::task::Context<'_>) {
        if !duration.is_zero() {
            let deadline = tokio::time::Instant::now() + duration;
            let sleep = match &mut self.0 {
                Some(sleep) => {
                    sleep.as_mut().reset(deadline);
                    sleep
                }
                None => self.0.insert(Box::pin(tokio::time::sleep_until(deadline))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return;
            }
        }
        cx.waker().wake_by_ref();
    }

    /// Ready once the last sleep is over (at once when there was none).
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

/// Runs `f` with the request whose Lua is running; `None` outside any request.
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&Rc<LuaRequest>>) -> R) -> R {
    CURRENT.with(|c| f(c.borrow().as_ref()))
}

/// Runs `load` with no request current. Luau's loader resolves a chunk's imports
/// (`ngx.req.get_method`, `string.format`) as it loads it, in the base environment, and the
/// chunk then uses that resolution in every request (request environments are `safeenv`, see
/// [`Vm::begin`]). An import such as `ngx.var.uri`, `ngx.status` or `ngx.ctx` must therefore
/// find no request then, and stay unresolved, to be looked up again each time it runs.
pub(crate) fn without_request<R>(load: impl FnOnce() -> R) -> R {
    let outer = CURRENT.with(|c| c.borrow_mut().take());
    let loaded = load();
    CURRENT.with(|c| *c.borrow_mut() = outer);
    loaded
}

/// Makes a request current for the duration of one resume.
struct Scope;

impl Scope {
    fn enter(request: &Rc<LuaRequest>) -> Scope {
        CURRENT.with(|c| *c.borrow_mut() = Some(Rc::clone(request)));
        Scope
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}

/// Runs a coroutine to its end within its request's CPU budget, with the request current
/// during every resume. Shared by request handlers and timers.
pub(crate) struct Runner {
    pub(crate) clock: Arc<WorkerClock>,
    /// Preempts long runs so that the worker's other work gets turns ([`crate::slice`]).
    pub(crate) slicer: Rc<Slicer>,
    /// Keeps each request and namespace to its share of the VM's memory ([`crate::memory`]).
    pub(crate) memory: Rc<MemoryShares>,
    pub(crate) cpu_budget: Duration,
}

impl Runner {
    /// Runs a handler (or timer callback) and then its light threads to their end: the handler
    /// is over when all of them are, or as soon as one ends the request (`ngx.exit`, CPU
    /// budget). Those still running then are killed.
    pub(crate) async fn drive_with_threads(
        &self,
        lua: &Lua,
        request: &Rc<LuaRequest>,
        task: impl Future<Output = mlua::Result<()>>,
    ) -> Outcome {
        let _threads = KillThreadsOnDrop(request);
        let mut handler = std::pin::pin!(self.drive(lua, request, task));
        // Followed only once the handler has spawned a thread: most never do.
        let mut threads = None;
        let outcome = std::future::poll_fn(|cx| {
            if let Poll::Ready(outcome) = handler.as_mut().poll(cx) {
                return Poll::Ready(outcome);
            }
            if threads.is_none() && request.threads.borrow().is_empty() {
                return Poll::Pending;
            }
            threads.get_or_insert_with(|| Box::pin(self.watch_threads(request, false))).as_mut().poll(cx)
        })
        .await;
        if outcome != Outcome::Continue {
            return outcome;
        }
        self.watch_threads(request, true).await
    }

    /// Follows the request's light threads: returns when one of them ends the request
    /// (`ngx.exit`, CPU budget) or, with `until_all_ended`, once none runs.
    async fn watch_threads(&self, request: &LuaRequest, until_all_ended: bool) -> Outcome {
        loop {
            let ended = request.thread_ended.notified();
            if let Some(status) = request.state.exit.get() {
                return exit_or_exec(&request.state, status);
            }
            if request.remaining_budget(self.cpu_budget).is_none() {
                return timeout();
            }
            if until_all_ended && !request.threads.borrow().iter().any(|t| t.is_running()) {
                return Outcome::Continue;
            }
            ended.await;
        }
    }

    pub(crate) async fn drive(
        &self,
        lua: &Lua,
        request: &Rc<LuaRequest>,
        task: impl Future<Output = mlua::Result<()>>,
    ) -> Outcome {
        self.drive_values(lua, request, task, None).await.0
    }

    /// Like [`Runner::drive`], keeping what the coroutine returned (light threads need it).
    /// `asleep`: the coroutine has already been resumed once, and went to sleep this long.
    pub(crate) async fn drive_values<R>(
        &self,
        lua: &Lua,
        request: &Rc<LuaRequest>,
        task: impl Future<Output = mlua::Result<R>>,
        mut asleep: Option<Duration>,
    ) -> (Outcome, Option<R>) {
        let mut task = std::pin::pin!(task);
        let mut values = None;
        let mut sleeping = Sleeping::default();
        let mut turn = Turn::default();
        let mut preempted = false;
        let outcome = std::future::poll_fn(|cx| {
            if let Some(duration) = asleep.take() {
                sleeping.start(duration, cx);
                return Poll::Pending;
            }
            if sleeping.poll(cx).is_pending() || turn.poll().is_pending() {
                return Poll::Pending;
            }
            let Some(budget) = request.remaining_budget(self.cpu_budget) else {
                return Poll::Ready(timeout());
            };
            let polled = {
                SLEEP.set(None);
                let _scope = Scope::enter(request);
                // A run after a wait sees the time anew, as nginx's after its event loop; one
                // resumed after a preemption (which nginx does not have) keeps it.
                if !std::mem::take(&mut preempted) {
                    crate::api::time::new_turn();
                }
                let began = Instant::now();
                self.clock.start(began, budget);
                let (in_use, memory_mark) = self.memory.before_run(lua, &request.memory);
                self.slicer.start(began, memory_mark);
                let polled = task.as_mut().poll(cx);
                let expired = self.clock.expired();
                self.clock.stop();
                self.memory.after_run(lua, &request.memory, in_use);
                let elapsed = began.elapsed();
                request.lua_time.set(request.lua_time.get() + elapsed);
                if expired {
                    return Poll::Ready(timeout());
                }
                if let Some(pause) = self.slicer.after_resume(&request.state.head.namespace, elapsed)
                    && polled.is_pending()
                {
                    // Preempted: after the worker's other ready tasks, or after a pause when
                    // its namespace has had more than its share.
                    match pause {
                        Some(pause) => sleeping.start(pause, cx),
                        None => turn.ask(cx),
                    }
                    preempted = true;
                    return Poll::Pending;
                }
                polled
            };
            if let Some(status) = request.state.exit.get() {
                return Poll::Ready(exit_or_exec(&request.state, status));
            }
            match polled {
                Poll::Ready(Ok(v)) => {
                    values = Some(v);
                    Poll::Ready(Outcome::Continue)
                }
                Poll::Ready(Err(e)) => Poll::Ready(failure(&e)),
                Poll::Pending => {
                    if let Some(duration) = take_sleep() {
                        sleeping.start(duration, cx);
                    }
                    Poll::Pending
                }
            }
        })
        .await;
        (outcome, values)
    }
}

/// What timers need from their worker's VM (kept in the Lua state's app data).
pub(crate) struct TimerContext {
    pub(crate) runner: Rc<Runner>,
    pub(crate) env_meta: Table,
    pub(crate) loaded: Rc<RefCell<foldhash::HashMap<u64, Function>>>,
    pub(crate) pending: Cell<usize>,
    pub(crate) running: Cell<usize>,
    pub(crate) max_pending: usize,
    /// Set when the worker stops: waiting timers run at once with `premature = true`.
    pub(crate) stopping: Cell<bool>,
    pub(crate) stop: tokio::sync::Notify,
}

/// Finished coroutines a VM keeps for the next handlers: creating one per phase per request
/// was a tenth of a Lua request's CPU. Bounded, since each idle one keeps its stack.
const THREAD_POOL: usize = 256;

/// One worker's VM.
pub struct Vm {
    lua: Lua,
    runner: Rc<Runner>,
    config: LuaConfig,
    /// The shared base environment: the global table as `api::install` filled it.
    base: Table,
    /// Makes what requests' environments fall back to, per namespace (see [`api::shared`]).
    dict_objects: Rc<api::shared::DictObjects>,
    /// Loaded chunks by script id.
    loaded: Rc<RefCell<foldhash::HashMap<u64, Function>>>,
    /// By script id, the closure of a script that needs no environment of the request's own,
    /// for the namespace it last ran in; `None` for a script that needs one.
    pub(crate) shared: RefCell<foldhash::HashMap<u64, Option<SharedHandler>>>,
    /// The namespaces' modules and module-level code ([`crate::modules`]).
    modules: Rc<Modules>,
}

/// A namespace's `init_worker` scripts, for [`Vm::init_worker`].
#[derive(Debug)]
pub struct InitWorker {
    pub namespace: Arc<str>,
    scripts: Vec<Arc<Script>>,
}

/// A script's closure in the globals of a namespace (see [`Vm::shared_handler`]).
pub(crate) struct SharedHandler {
    /// The namespace environment its closure runs in.
    namespace: Rc<NamespaceEnv>,
    closure: Function,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("loaded", &self.loaded.borrow().len())
            .finish_non_exhaustive()
    }
}

/// The standard libraries a handler may use. `os` in Luau only tells time; there is no `io`,
/// and `debug` is left out.
fn allowed_libraries() -> StdLib {
    StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::BIT
        | StdLib::MATH
        | StdLib::BUFFER
        | StdLib::OS
}

impl Vm {
    /// Creates the VM with the sandboxed base environment.
    ///
    /// # Errors
    /// When the Lua state cannot be set up (out of memory).
    pub fn new(config: LuaConfig) -> mlua::Result<Vm> {
        let lua = Lua::new_with(allowed_libraries(), LuaOptions::new().thread_pool_size(THREAD_POOL))?;
        let slicer = Rc::new(Slicer::new());
        lua.set_app_data(Rc::clone(&slicer));
        let base = lua.globals();
        let dict_objects = api::install(&lua, &base, &config)?;
        lua.sandbox(true)?;

        let env_meta = lua.create_table()?;
        env_meta.raw_set("__index", &base)?;
        env_meta.raw_set("__metatable", false)?;
        env_meta.set_readonly(true);

        let clock = WorkerClock::new();
        let interrupt_clock = Arc::clone(&clock);
        let raise_next = Cell::new(false);
        let interrupt_slicer = Rc::clone(&slicer);
        lua.set_interrupt(move |lua| {
            if !interrupt_clock.expired() {
                return Ok(if interrupt_slicer.due(lua) { VmState::Yield } else { VmState::Continue });
            }
            // Yield where the coroutine can yield (pcall cannot catch that); where it cannot
            // (inside a C call such as pattern matching), the yield is ignored and the next
            // interrupt raises an error to get out of the C call.
            let raise = raise_next.replace(!raise_next.get());
            if raise { Err(mlua::Error::runtime("CPU budget exceeded")) } else { Ok(VmState::Yield) }
        });
        lua.set_memory_limit(config.memory_limit)?;
        let memory = MemoryShares::new(config.memory_limit);
        let runner = Rc::new(Runner { clock, slicer, memory, cpu_budget: config.cpu_budget });
        let loaded = Rc::new(RefCell::new(foldhash::HashMap::default()));
        lua.set_app_data(Rc::new(api::socket::TlsClients::new(&config.tls_roots)?));
        lua.set_app_data(api::socket::Denied(Arc::clone(&config.socket_deny)));
        lua.set_app_data(Rc::new(TimerContext {
            runner: Rc::clone(&runner),
            env_meta,
            loaded: Rc::clone(&loaded),
            pending: Cell::new(0),
            running: Cell::new(0),
            max_pending: config.max_pending_timers,
            stopping: Cell::new(false),
            stop: tokio::sync::Notify::new(),
        }));
        let modules = Rc::new(Modules::default());
        lua.set_app_data(Rc::clone(&modules));
        Ok(Vm { lua, runner, config, base, dict_objects, loaded, shared: RefCell::default(), modules })
    }

    pub fn config(&self) -> &LuaConfig {
        &self.config
    }

    /// Bytes the VM uses now.
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }

    /// Starts a request with its head and headers: its state and, when first needed, its
    /// environment and `ngx.ctx`.
    ///
    /// # Errors
    /// Only when the VM is out of memory.
    pub fn begin(&self, head: RequestHead, headers: HeaderMap) -> mlua::Result<Rc<LuaRequest>> {
        let namespace = match self.dict_objects.kept_env(&head.namespace) {
            Some(namespace) => namespace,
            None => {
                // The namespace's first request since its code or dictionaries changed: its
                // module-level code runs first (once per version), under a limit.
                let init = self
                    .modules
                    .init(&self.lua, &head.namespace, |chunk, globals| self.run_init(&head.namespace, chunk, globals))
                    .map_err(|e| mlua::Error::runtime(format!("init: {e}")))?;
                let _setup = self.unlimited();
                self.dict_objects.env_meta(&self.lua, &self.base, &head.namespace, init.as_ref())?
            }
        };
        let _setup = self.unlimited();
        let memory = self.runner.memory.charge(&head.namespace);
        Ok(LuaRequest::new(head, headers, None, Some(namespace), memory))
    }

    /// Lifts the memory limit until the guard drops, for the VM's own bookkeeping between
    /// handlers (a request's environment, a handler's closure and coroutine).
    ///
    /// While a limit is set, mlua wraps every call that allocates in a protected call, since an
    /// allocation may fail: that was a fifth of the cost of starting a handler. The bookkeeping
    /// is small and bounded, so it runs without the limit; Lua code, and the API it calls,
    /// always runs under it, and a VM over its limit fails the next allocation Lua makes.
    fn unlimited(&self) -> Unlimited<'_> {
        // Only fails for a Lua state without memory control, which ours has.
        let _ = self.lua.set_memory_limit(0);
        Unlimited(&self.lua, self.config.memory_limit)
    }

    /// Takes the namespaces' modules and module-level code (by namespace; the cluster-wide
    /// modules under [`crate::modules::CLUSTER_WIDE`]). A namespace whose code changed starts
    /// anew: its modules run again on their next `require`, its `init` before its next handler.
    ///
    /// Returns what each worker runs for the new version: the `init_worker` scripts of the
    /// namespaces that changed, to be run by [`Vm::init_worker`].
    #[must_use]
    pub fn set_namespaces(&self, code: HashMap<String, Arc<NamespaceCode>>) -> Vec<InitWorker> {
        let changed = self.modules.set(code);
        match &changed {
            None => self.dict_objects.forget(None),
            Some(changed) if !changed.is_empty() => self.dict_objects.forget(Some(changed)),
            Some(_) => return Vec::new(),
        }
        self.modules
            .init_workers(changed.as_deref())
            .into_iter()
            .map(|(namespace, scripts)| InitWorker { namespace: namespace.into(), scripts })
            .collect()
    }

    /// Runs a namespace's `init_worker` scripts, in order, each as a run of its own with the
    /// request CPU budget, in the namespace's globals (after its `init`). They may start timers,
    /// which go on after them.
    pub async fn init_worker(&self, job: InitWorker) -> Outcome {
        for script in &job.scripts {
            let route = format!("{}/init_worker", job.namespace).into();
            let head = RequestHead::outside_request(Arc::clone(&job.namespace), route);
            let request = match self.begin(head, HeaderMap::new()) {
                Ok(request) => request,
                Err(e) => return Outcome::Failed { kind: FailureKind::Error, message: e.to_string() },
            };
            request.state.phase.set(Phase::InitWorker);
            request.script.set(script.id);
            let handler = match self.handler(&request, script) {
                Ok(handler) => handler,
                Err(e) => return Outcome::Failed { kind: FailureKind::Error, message: e.to_string() },
            };
            let outcome = self.runner.drive_with_threads(&self.lua, &request, handler.call_async::<()>(())).await;
            if outcome != Outcome::Continue {
                return outcome;
            }
        }
        Outcome::Continue
    }

    /// Runs an `ssl_certificate` handler for a handshake asking for `server_name` (with the
    /// request CPU budget, or `budget`), in its namespace's globals; returns what it chose
    /// (`None`: it chose nothing, the usual certificate serves). `Err` fails the handshake: the
    /// handler failed, or ended it with `ngx.exit(ngx.ERROR)`.
    pub async fn ssl_certificate(
        &self,
        namespace: Arc<str>,
        route: Arc<str>,
        script: &Arc<Script>,
        server_name: &str,
        remote: std::net::SocketAddr,
        budget: Option<Duration>,
    ) -> Result<Option<Box<crate::request::SslState>>, String> {
        let head = RequestHead {
            remote,
            https: true,
            host: server_name.to_owned(),
            ..RequestHead::outside_request(namespace, route)
        };
        let request = self.begin(head, HeaderMap::new()).map_err(|e| e.to_string())?;
        if let Some(budget) = budget {
            request.set_cpu_budget(budget);
        }
        *request.state.ssl.borrow_mut() = Some(Box::new(crate::request::SslState {
            server_name: Some(server_name.to_owned()),
            ..Default::default()
        }));
        match self.run(&request, Phase::SslCertificate, std::slice::from_ref(script)).await {
            Outcome::Failed { message, .. } => Err(message),
            _ if request.state.abort.get() => Err("the handshake was ended by ngx.exit".into()),
            _ => {
                Ok(request.state.ssl.borrow_mut().take().filter(|s| s.cleared || s.chain.is_some() || s.key.is_some()))
            }
        }
    }

    /// Runs one chunk of a namespace's module-level code to its end, in `globals`, as its own
    /// run: with the CPU budget of a request, and the VM's memory limit.
    fn run_init(&self, namespace: &Arc<str>, chunk: &Function, globals: &Table) -> Result<(), String> {
        let head = RequestHead::outside_request(Arc::clone(namespace), format!("{namespace}/init").into());
        let memory = self.runner.memory.charge(namespace);
        let request = LuaRequest::with_env(head, HeaderMap::new(), globals.clone(), memory);
        request.state.phase.set(Phase::Init);
        chunk.set_environment(globals.clone()).map_err(|e| e.to_string())?;
        let runner = &self.runner;
        let began = Instant::now();
        runner.clock.start(began, runner.cpu_budget);
        let (in_use, memory_mark) = runner.memory.before_run(&self.lua, &request.memory);
        runner.slicer.start(began, memory_mark);
        let result = {
            let _scope = Scope::enter(&request);
            crate::api::time::new_turn();
            chunk.call::<()>(())
        };
        let expired = runner.clock.expired();
        runner.clock.stop();
        runner.memory.after_run(&self.lua, &request.memory, in_use);
        // A yield asked for meanwhile was ignored (nothing here can yield); forget it.
        let _ = runner.slicer.after_resume(namespace, began.elapsed());
        if expired {
            return Err(format!("CPU budget of {:?} exceeded", runner.cpu_budget));
        }
        result.map_err(|e| e.to_string())
    }

    /// Forgets loaded scripts that `keep` says are gone.
    pub fn retain_scripts(&self, keep: impl Fn(u64) -> bool) {
        self.loaded.borrow_mut().retain(|id, _| keep(*id));
        self.shared.borrow_mut().retain(|id, _| keep(*id));
    }

    fn chunk(&self, script: &Script) -> mlua::Result<Function> {
        if let Some(f) = self.loaded.borrow().get(&script.id) {
            return Ok(f.clone());
        }
        let chunk = without_request(|| {
            self.lua
                .load(&script.bytecode[..])
                .set_name(format!("={}", script.name))
                .set_mode(ChunkMode::Binary)
                .into_function()
        })?;
        self.loaded.borrow_mut().insert(script.id, chunk.clone());
        Ok(chunk)
    }

    /// The handler closure of `script` for `request`: the chunk in the request's environment,
    /// or, for a chunk that needs none of its own, one closure of it per namespace.
    fn handler(&self, request: &LuaRequest, script: &Script) -> mlua::Result<Function> {
        if let Some(shared) = self.shared_handler(request, script)? {
            return Ok(shared);
        }
        let handler = self.chunk(script)?.deep_clone()?;
        handler.set_environment(request.env(&self.lua)?)?;
        Ok(handler)
    }

    /// The closure that runs `script` for every request of `request`'s namespace, when the
    /// script uses no global by name and its imports start at built-ins (`bytecode`): a global
    /// it reads is the same in the namespace's globals as in any request's environment, and it
    /// writes none, so the closure and environment made for each request (a fifth of a small
    /// handler's cost) buy nothing. Its environment is the namespace's read-only globals.
    fn shared_handler(&self, request: &LuaRequest, script: &Script) -> mlua::Result<Option<Function>> {
        let (Some(roots), Some(namespace)) = (&script.import_roots, &request.namespace) else {
            return Ok(None);
        };
        match self.shared.borrow().get(&script.id) {
            Some(None) => return Ok(None),
            Some(Some(shared)) if Rc::ptr_eq(&shared.namespace, namespace) => return Ok(Some(shared.closure.clone())),
            _ => {}
        }
        let built_in = |root: &String| self.base.raw_get::<Value>(root.as_str()).is_ok_and(|v| !v.is_nil());
        let shared = if roots.iter().all(built_in) {
            let closure = self.chunk(script)?.deep_clone()?;
            closure.set_environment(namespace.globals.clone())?;
            Some(SharedHandler { namespace: Rc::clone(namespace), closure })
        } else {
            None
        };
        let closure = shared.as_ref().map(|s| s.closure.clone());
        self.shared.borrow_mut().insert(script.id, shared);
        Ok(closure)
    }

    /// Runs a phase's handlers in order, each in its own entry coroutine. Handlers may wait on
    /// asynchronous API calls; the worker serves other requests meanwhile.
    pub async fn run(&self, request: &Rc<LuaRequest>, phase: Phase, scripts: &[Arc<Script>]) -> Outcome {
        request.state.phase.set(phase);
        for script in scripts {
            let outcome = self.run_one(request, script).await;
            if outcome != Outcome::Continue {
                return outcome;
            }
        }
        Outcome::Continue
    }

    async fn run_one(&self, request: &Rc<LuaRequest>, script: &Script) -> Outcome {
        request.state.exit.set(None);
        request.script.set(script.id);
        let started = {
            let _scope = Scope::enter(request);
            let _setup = self.unlimited();
            // `call_async` runs the handler on a coroutine from the VM's pool (a new one only when
            // the pool is empty) and returns it there afterwards.
            self.handler(request, script).map(|f| f.call_async::<()>(()))
        };
        match started {
            Ok(task) => self.runner.drive_with_threads(&self.lua, request, task).await,
            Err(e) => failure(&e),
        }
    }

    /// What each namespace's long runs have cost on this worker (see [`crate::slice`]).
    pub fn namespace_use(&self) -> Vec<(Arc<str>, crate::NamespaceLuaUse)> {
        self.runner.slicer.uses()
    }

    /// How this worker serves subrequests (`ngx.location.capture`): the proxy's hook.
    pub fn set_subrequests(&self, hook: crate::internal::Subrequests) {
        self.lua.set_app_data(crate::internal::Hook(hook));
    }

    /// The worker is stopping: every waiting timer runs now with `premature = true` (once, also
    /// `every` timers), and new timers are refused with `"process exiting"`.
    pub fn stop_timers(&self) {
        if let Some(timers) = self.lua.app_data_ref::<Rc<TimerContext>>() {
            timers.stopping.set(true);
            timers.stop.notify_waiters();
        }
    }

    /// Collects all garbage, in slices of about a millisecond that let the worker serve between
    /// them: finishes the cycle in progress (whose marks predate the garbage), then runs a whole
    /// one.
    pub async fn collect_garbage(&self) {
        const SLICE: Duration = Duration::from_millis(1);
        let mut cycles_ended = 0;
        loop {
            let began = Instant::now();
            while began.elapsed() < SLICE {
                // `true` when a step ends a cycle (also on an error, which only a finalizer could
                // raise, and sandboxed Lua has none).
                if self.lua.gc_step().unwrap_or(true) {
                    cycles_ended += 1;
                    if cycles_ended == 2 {
                        return;
                    }
                }
            }
            tokio::task::yield_now().await;
        }
    }

    /// Runs garbage collection steps between requests when the VM is near its memory limit.
    pub fn collect_if_needed(&self) {
        if self.lua.used_memory() > self.config.memory_limit / 2 {
            let _ = self.lua.gc_collect();
        }
    }
}

/// Puts the VM's memory limit back when dropped (see [`Vm::unlimited`]).
struct Unlimited<'a>(&'a Lua, usize);

impl Drop for Unlimited<'_> {
    fn drop(&mut self) {
        let _ = self.0.set_memory_limit(self.1);
    }
}

/// A handler's light threads do not outlive it: when it ends (or its request goes away),
/// those still running are killed.
struct KillThreadsOnDrop<'a>(&'a LuaRequest);

impl Drop for KillThreadsOnDrop<'_> {
    fn drop(&mut self) {
        for thread in self.0.threads.take() {
            thread.kill();
        }
    }
}

fn timeout() -> Outcome {
    Outcome::Failed { kind: FailureKind::Timeout, message: "CPU budget exceeded".into() }
}

/// What `ngx.exit(status)` means in a phase: in rewrite and access, a status below 200 (ngx.OK)
/// only ends the handler; in content, any status ends the response.
/// How a handler that called `ngx.exit(status)` (or `ngx.exec`) ends its request.
fn exit_or_exec(state: &crate::request::RequestState, status: u16) -> Outcome {
    if state.exec.borrow().is_some() {
        return Outcome::Exec;
    }
    exit_outcome(state.phase.get(), status)
}

fn exit_outcome(phase: Phase, status: u16) -> Outcome {
    match phase {
        Phase::Rewrite | Phase::Access | Phase::HeaderFilter if status < 200 => Outcome::Continue,
        Phase::Rewrite | Phase::Access | Phase::Content | Phase::HeaderFilter => Outcome::Exit(status),
        _ => Outcome::Continue,
    }
}

fn failure(error: &mlua::Error) -> Outcome {
    let kind = if is_memory_error(error) { FailureKind::Memory } else { FailureKind::Error };
    Outcome::Failed { kind, message: error_message(error) }
}

fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// The first line of a Lua error: `chunk:line: message`, without traceback.
pub(crate) fn error_message(error: &mlua::Error) -> String {
    let text = match error {
        mlua::Error::CallbackError { cause, .. } => return error_message(cause),
        mlua::Error::RuntimeError(m) | mlua::Error::MemoryError(m) => m.clone(),
        other => other.to_string(),
    };
    text.lines().next().unwrap_or("").to_owned()
}

/// Turns any Lua value into the string `tostring` would give (for logging).
pub(crate) fn display(value: &Value) -> String {
    match value {
        Value::Nil => "nil".into(),
        Value::Boolean(b) => b.to_string(),
        Value::String(s) => s.to_string_lossy(),
        #[allow(clippy::cast_precision_loss)]
        Value::Integer(i) => crate::api::format_number(*i as f64),
        Value::Number(n) => crate::api::format_number(*n),
        Value::LightUserData(l) if l.0.is_null() => "null".into(),
        other => other.to_string().unwrap_or_else(|_| other.type_name().to_string()),
    }
}
