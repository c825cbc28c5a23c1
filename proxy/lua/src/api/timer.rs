//! `ngx.timer.at`, `ngx.timer.every`, `ngx.timer.pending_count`, `ngx.timer.running_count`.
//!
//! A timer runs on the worker that created it, in a coroutine of its own, with the same CPU
//! budget as a request (per run) and in the same VM (so under its memory limit). It outlives the
//! request that created it and reaches the `ngx.shared` dictionaries of that request's
//! namespace.
//!
//! # Guarantees
//! - At most `max_pending_timers` (default 1024) timers wait per worker; past that, creating one
//!   returns `nil, "too many pending timers"` instead of consuming memory.
//! - When the worker stops, waiting timers run at once with `premature = true` and are not
//!   scheduled again; new ones get `nil, "process exiting"`.
//! - An `every` timer whose script was replaced (it is no longer loaded in this worker) finishes
//!   its current run and is not scheduled again; so does one that `init_worker` started, once
//!   a new version of its namespace's Lua (which runs `init_worker` again) is in.
//! - A timer run that exhausts its CPU budget is stopped like a request; an `every` timer whose
//!   runs keep doing so is backed off (its next run waits at least 0.2 s, then 0.4 s, 0.8 s,
//!   1.6 s) and cancelled after [`EXHAUSTED_RUNS`] such runs in a row, with an error log and the
//!   `tidegate_lua_timers_cancelled_total` metric of its namespace. Its runs are also preempted
//!   like any long run ([`crate::slice`]), so meanwhile the worker's other requests go on.

use std::rc::Rc;
use std::time::Duration;

use http::HeaderMap;
use mlua::{Function, Lua, MultiValue, Table, Value, Variadic};

use super::current;
use crate::FailureKind;
use crate::request::{Phase, RequestHead};
use crate::vm::{LuaRequest, Outcome, TimerContext};

/// The first wait of a timer backed off for exhausting its CPU budget (then doubled each time).
const BACKOFF: Duration = Duration::from_millis(100);

/// Runs in a row that exhaust their CPU budget after which an `every` timer is cancelled.
pub(crate) const EXHAUSTED_RUNS: u32 = 5;

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let timer = lua.create_table()?;
    timer.raw_set(
        "at",
        lua.create_function(|lua, (delay, callback, args): (f64, Function, Variadic<Value>)| {
            schedule(lua, delay, callback, args, false)
        })?,
    )?;
    timer.raw_set(
        "every",
        lua.create_function(|lua, (delay, callback, args): (f64, Function, Variadic<Value>)| {
            schedule(lua, delay, callback, args, true)
        })?,
    )?;
    timer.raw_set("pending_count", lua.create_function(|lua, ()| Ok(context(lua)?.pending.get()))?)?;
    timer.raw_set("running_count", lua.create_function(|lua, ()| Ok(context(lua)?.running.get()))?)?;
    ngx.raw_set("timer", timer)
}

fn context(lua: &Lua) -> mlua::Result<Rc<TimerContext>> {
    lua.app_data_ref::<Rc<TimerContext>>()
        .map(|c| Rc::clone(&c))
        .ok_or_else(|| mlua::Error::runtime("timers are not available in this VM"))
}

fn schedule(
    lua: &Lua,
    delay: f64,
    callback: Function,
    args: Variadic<Value>,
    repeat: bool,
) -> mlua::Result<(Value, Value)> {
    if !delay.is_finite() || delay < 0.0 {
        return Err(mlua::Error::runtime("bad argument #1 to 'at' (delay must be a non-negative number)"));
    }
    if repeat && delay == 0.0 {
        return Err(mlua::Error::runtime("bad argument #1 to 'every' (delay cannot be zero)"));
    }
    let ctx = context(lua)?;
    if ctx.stopping.get() {
        return Ok((Value::Nil, Value::String(lua.create_string("process exiting")?)));
    }
    if ctx.pending.get() >= ctx.max_pending {
        return Ok((Value::Nil, Value::String(lua.create_string("too many pending timers")?)));
    }
    let creator = current("ngx.timer.at")?;
    let namespace = creator.state.head.namespace.clone();
    let script = creator.script.get();
    // One `init_worker` starts lives as long as its namespace's code version.
    let modules = lua.app_data_ref::<Rc<crate::modules::Modules>>().map(|m| Rc::clone(&m));
    let version = modules
        .filter(|_| creator.state.phase.get() == Phase::InitWorker)
        .map(|modules| (modules.version(&namespace), modules));
    let args: Vec<Value> = args.into_iter().collect();
    let lua = lua.clone();
    ctx.pending.set(ctx.pending.get() + 1);
    tokio::task::spawn_local(async move {
        let delay = Duration::from_secs_f64(delay);
        // Runs in a row that ran out of CPU budget.
        let mut exhausted = 0u32;
        loop {
            let wait = if exhausted == 0 { delay } else { delay.max(BACKOFF * 2u32.pow(exhausted)) };
            let premature = tokio::select! {
                () = tokio::time::sleep(wait) => false,
                () = stopped(&ctx) => true,
            };
            ctx.pending.set(ctx.pending.get().saturating_sub(1));
            if repeat && !ctx.loaded.borrow().contains_key(&script) {
                tracing::debug!(namespace = &*namespace, "ngx.timer.every stopped: its script was replaced");
                break;
            }
            if repeat && version.as_ref().is_some_and(|(version, modules)| modules.version(&namespace) != *version) {
                tracing::debug!(
                    namespace = &*namespace,
                    "ngx.timer.every stopped: a new version of the namespace's Lua runs"
                );
                break;
            }
            ctx.running.set(ctx.running.get() + 1);
            let outcome = run_callback(&lua, &ctx, &namespace, script, &callback, &args, premature).await;
            ctx.running.set(ctx.running.get() - 1);
            if let Outcome::Failed { kind, message } = &outcome {
                tracing::error!(target: "lua", namespace = &*namespace, kind = kind.name(), phase = "timer", "Lua timer failed: {message}");
            }
            if !repeat || premature {
                break;
            }
            match outcome {
                Outcome::Failed { kind: FailureKind::Timeout, .. } => exhausted += 1,
                _ => exhausted = 0,
            }
            if exhausted >= EXHAUSTED_RUNS {
                tracing::error!(
                    target: "lua",
                    namespace = &*namespace,
                    "ngx.timer.every cancelled: {EXHAUSTED_RUNS} runs in a row exceeded the CPU budget"
                );
                ctx.runner.slicer.timer_cancelled(&namespace);
                break;
            }
            ctx.pending.set(ctx.pending.get() + 1);
        }
    });
    Ok((Value::Boolean(true), Value::Nil))
}

/// Returns once the worker stops.
async fn stopped(ctx: &TimerContext) {
    loop {
        let notified = ctx.stop.notified();
        if ctx.stopping.get() {
            return;
        }
        notified.await;
    }
}

/// One run of a timer callback: `callback(premature, ...)` in a fresh coroutine and environment.
async fn run_callback(
    lua: &Lua,
    ctx: &TimerContext,
    namespace: &str,
    script: u64,
    callback: &Function,
    args: &[Value],
    premature: bool,
) -> Outcome {
    let head = RequestHead::outside_request(namespace.into(), "timer".into());
    let started = (|| {
        let env = lua.create_table()?;
        env.set_metatable(Some(ctx.env_meta.clone()))?;
        let memory = ctx.runner.memory.charge(&head.namespace);
        let request = LuaRequest::with_env(head, HeaderMap::new(), env, memory);
        request.state.phase.set(Phase::Timer);
        request.script.set(script);
        let arguments: MultiValue = std::iter::once(Value::Boolean(premature)).chain(args.iter().cloned()).collect();
        let task = callback.call_async::<()>(arguments);
        Ok::<_, mlua::Error>((request, task))
    })();
    match started {
        // Its light threads are joined as a handler's are: the timer runs until they end.
        Ok((request, task)) => ctx.runner.drive_with_threads(lua, &request, task).await,
        Err(e) => Outcome::Failed { kind: crate::FailureKind::Error, message: e.to_string() },
    }
}
