//! `ngx.thread.spawn`, `ngx.thread.wait`, `ngx.thread.kill`: light threads of a request.
//!
//! A light thread is a coroutine of the request that runs alongside the handler that spawned
//! it. `spawn` runs it at once until it first waits (or ends), then returns to the caller; from
//! then on the worker resumes it whenever what it waits on is ready. As in OpenResty:
//! - a handler is not over until every light thread of its request has ended or been killed;
//! - `ngx.exit` in any of them ends the request and kills the others;
//! - an error in a light thread is logged and reported to `ngx.thread.wait`; the handler goes on;
//! - they share the request's environment, `ngx.ctx` and CPU budget.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use mlua::{Function, Lua, MultiValue, UserData, UserDataRef, Value, Variadic};

use super::{current, require_phase};
use crate::request::Phase;
use crate::vm::{LuaRequest, Outcome, Runner, TimerContext, error_message};

type Task = Pin<Box<mlua::thread::AsyncThread<MultiValue>>>;

/// One light thread, as its request and its handle see it.
pub(crate) struct LightThread {
    state: RefCell<State>,
    /// The task resuming it, once it has waited for the first time.
    driver: RefCell<Option<tokio::task::JoinHandle<()>>>,
}

enum State {
    Running,
    /// Ended and not yet waited on: what it returned, or its error.
    Ended(Result<MultiValue, String>),
    /// Waited on or killed: nothing left to report.
    Collected,
}

impl LightThread {
    pub(crate) fn is_running(&self) -> bool {
        matches!(*self.state.borrow(), State::Running)
    }

    /// Stops it if it still runs (the coroutine is never resumed again).
    pub(crate) fn kill(&self) {
        if self.is_running() {
            *self.state.borrow_mut() = State::Collected;
        }
        if let Some(driver) = self.driver.borrow_mut().take() {
            driver.abort();
        }
    }

    fn end(&self, request: &LuaRequest, result: Result<MultiValue, String>) {
        if self.is_running() {
            *self.state.borrow_mut() = State::Ended(result);
        }
        self.driver.borrow_mut().take();
        request.thread_ended.notify_waiters();
    }
}

/// What Lua holds: `ngx.thread.spawn`'s return value.
struct Handle(Rc<LightThread>);

impl UserData for Handle {}

pub(super) fn install(lua: &Lua, ngx: &mlua::Table) -> mlua::Result<()> {
    let thread = lua.create_table()?;
    thread.raw_set(
        "spawn",
        lua.create_async_function(|lua, (f, args): (Function, MultiValue)| {
            let prepared = current("ngx.thread.spawn")
                .and_then(|request| {
                    require_phase(
                        &request,
                        "ngx.thread.spawn",
                        &[Phase::Rewrite, Phase::Access, Phase::Content, Phase::Timer],
                    )?;
                    Ok(request)
                })
                .and_then(|request| Ok((request, lua.create_thread(f)?.into_async::<MultiValue>(args)?)));
            async move {
                let (request, task) = prepared?;
                spawn(&lua, request, Box::pin(task)).await
            }
        })?,
    )?;
    thread.raw_set(
        "wait",
        lua.create_async_function(|lua, handles: Variadic<UserDataRef<Handle>>| {
            let threads: Vec<Rc<LightThread>> = handles.iter().map(|h| Rc::clone(&h.0)).collect();
            let request = current("ngx.thread.wait");
            async move {
                let request = request?;
                if threads.is_empty() {
                    return Err(mlua::Error::runtime("ngx.thread.wait: at least one thread should be specified"));
                }
                wait(&lua, &request, &threads).await
            }
        })?,
    )?;
    thread.raw_set(
        "kill",
        lua.create_function(|lua, handle: UserDataRef<Handle>| {
            let thread = &handle.0;
            let state = std::mem::replace(&mut *thread.state.borrow_mut(), State::Collected);
            let error = match state {
                State::Running => {
                    thread.kill();
                    return Ok(MultiValue::from_iter([Value::Integer(1)]));
                }
                State::Ended(_) => "already terminated",
                State::Collected => "already waited or killed",
            };
            Ok(MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(error)?)]))
        })?,
    )?;
    ngx.raw_set("thread", thread)
}

/// Runs the new thread until it first waits, then leaves it to a task of the worker.
async fn spawn(lua: &Lua, request: Rc<LuaRequest>, mut task: Task) -> mlua::Result<Value> {
    let runner = lua
        .app_data_ref::<Rc<TimerContext>>()
        .map(|c| Rc::clone(&c.runner))
        .ok_or_else(|| mlua::Error::runtime("light threads are not available in this VM"))?;
    let thread = Rc::new(LightThread { state: RefCell::new(State::Running), driver: RefCell::new(None) });
    request.threads.borrow_mut().push(Rc::clone(&thread));
    // Inside the caller's resume: the caller's request is current and its CPU clock runs.
    let first = std::future::poll_fn(|cx| Poll::Ready(task.as_mut().poll(cx))).await;
    let asleep = crate::vm::take_sleep();
    if runner.clock.expired() || request.state.exit.get().is_some() {
        // Out of CPU budget, or the thread called ngx.exit: the runner ends the request as soon
        // as the caller yields here.
        thread.kill();
        return std::future::pending().await;
    }
    match first {
        Poll::Ready(result) => thread.end(&request, result.map_err(|e| report(&request, &e))),
        Poll::Pending => {
            let driver = tokio::task::spawn_local(drive(
                lua.clone(),
                runner,
                Rc::clone(&request),
                Rc::clone(&thread),
                task,
                asleep,
            ));
            *thread.driver.borrow_mut() = Some(driver);
        }
    }
    Ok(Value::UserData(lua.create_userdata(Handle(thread))?))
}

async fn drive(
    lua: Lua,
    runner: Rc<Runner>,
    request: Rc<LuaRequest>,
    thread: Rc<LightThread>,
    task: Task,
    asleep: Option<Duration>,
) {
    let (outcome, values) = runner.drive_values(&lua, &request, task, asleep).await;
    let result = match outcome {
        Outcome::Continue => Ok(values.unwrap_or_default()),
        // The request's runner sees the exit and ends the request.
        Outcome::Exit(status) => Err(format!("exited with {status}")),
        Outcome::Exec => Err("ended by ngx.exec".to_owned()),
        Outcome::Failed { kind, message } => {
            tracing::error!(target: "lua", route = &*request.state.head.route, kind = kind.name(), "Lua light thread failed: {message}");
            Err(message)
        }
    };
    thread.end(&request, result);
}

fn report(request: &LuaRequest, error: &mlua::Error) -> String {
    let message = error_message(error);
    tracing::error!(target: "lua", route = &*request.state.head.route, kind = "error", "Lua light thread failed: {message}");
    message
}

/// Waits until one of `threads` ends: `true, values...` or `false, error`.
async fn wait(lua: &Lua, request: &LuaRequest, threads: &[Rc<LightThread>]) -> mlua::Result<MultiValue> {
    loop {
        let ended = request.thread_ended.notified();
        if let Some(thread) = threads.iter().find(|t| !t.is_running()) {
            // Waited on now: nothing is left to report after this.
            return match std::mem::replace(&mut *thread.state.borrow_mut(), State::Collected) {
                State::Running => unreachable!("filtered out above"),
                State::Ended(Ok(values)) => Ok(std::iter::once(Value::Boolean(true)).chain(values).collect()),
                State::Ended(Err(message)) => {
                    Ok(MultiValue::from_iter([Value::Boolean(false), Value::String(lua.create_string(&message)?)]))
                }
                State::Collected => Err(mlua::Error::runtime("ngx.thread.wait: thread already waited or killed")),
            };
        }
        ended.await;
    }
}
