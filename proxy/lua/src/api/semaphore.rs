//! `require "ngx.semaphore"` (lua-resty-core's, built in natively) and `require "ngx.process"`.
//!
//! A semaphore belongs to its worker, as in OpenResty: requests and timers of one worker share
//! it (through a module-level table, `ngx.ctx` of a parent, an upvalue), and `wait` suspends only
//! the calling coroutine, bounded by its timeout. `count()` is the resources left, or minus the
//! number of waiters when there are any.

use std::cell::Cell;
use std::time::Duration;

use mlua::{Lua, Table, UserData, UserDataMethods, UserDataRef, Value};

use super::{current, require_phase};
use crate::request::WAITING_PHASES;

struct Semaphore {
    permits: tokio::sync::Semaphore,
    waiting: Cell<i64>,
}

impl UserData for Semaphore {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("post", |_, this, n: Option<i64>| {
            let n = n.unwrap_or(1);
            if n < 1 {
                return Err(mlua::Error::runtime(format!("bad 'n' argument: {n}")));
            }
            let room = tokio::sync::Semaphore::MAX_PERMITS - this.permits.available_permits();
            this.permits.add_permits(usize::try_from(n).unwrap_or(usize::MAX).min(room));
            Ok(true)
        });
        methods.add_method("count", |_, this, ()| {
            let waiting = this.waiting.get();
            Ok(if waiting > 0 { -waiting } else { i64::try_from(this.permits.available_permits()).unwrap_or(i64::MAX) })
        });
        methods.add_async_method("wait", |lua, this: UserDataRef<Semaphore>, timeout: Option<f64>| async move {
            let request = current("ngx.semaphore wait")?;
            require_phase(&request, "semaphore wait", WAITING_PHASES)?;
            let timeout = timeout.unwrap_or(0.0);
            if !timeout.is_finite() || timeout < 0.0 {
                return Err(mlua::Error::runtime(format!("bad 'timeout' argument: {timeout}")));
            }
            if let Ok(permit) = this.permits.try_acquire() {
                permit.forget();
                return Ok((Value::Boolean(true), Value::Nil));
            }
            if timeout == 0.0 {
                return Ok((Value::Nil, Value::String(lua.create_string("timeout")?)));
            }
            this.waiting.set(this.waiting.get() + 1);
            let acquired = tokio::time::timeout(Duration::from_secs_f64(timeout), this.permits.acquire()).await;
            this.waiting.set(this.waiting.get() - 1);
            match acquired {
                Ok(Ok(permit)) => {
                    permit.forget();
                    Ok((Value::Boolean(true), Value::Nil))
                }
                _ => Ok((Value::Nil, Value::String(lua.create_string("timeout")?))),
            }
        });
    }
}

pub(super) fn semaphore_module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.raw_set(
        "new",
        lua.create_function(|lua, n: Option<i64>| {
            let n = n.unwrap_or(0);
            if n < 0 {
                return Ok((Value::Nil, Value::String(lua.create_string("no memory")?)));
            }
            let permits = usize::try_from(n).unwrap_or(0).min(tokio::sync::Semaphore::MAX_PERMITS);
            let semaphore = Semaphore { permits: tokio::sync::Semaphore::new(permits), waiting: Cell::new(0) };
            Ok((Value::UserData(lua.create_userdata(semaphore)?), Value::Nil))
        })?,
    )?;
    Ok(module)
}

/// `ngx.process`: every Lua runs in a worker; there is no privileged agent.
pub(super) fn process_module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.raw_set("type", lua.create_function(|_, ()| Ok("worker"))?)?;
    module.raw_set("get_master_pid", lua.create_function(|_, ()| Ok(i64::from(std::process::id())))?)?;
    module.raw_set(
        "enable_privileged_agent",
        lua.create_function(|lua, _: Option<i64>| {
            Ok((Value::Nil, Value::String(lua.create_string("privileged agent is not supported")?)))
        })?,
    )?;
    module.raw_set(
        "signal_graceful_exit",
        lua.create_function(|_, ()| -> mlua::Result<()> {
            Err(mlua::Error::runtime("signal_graceful_exit: the proxy's workers stop with the proxy"))
        })?,
    )?;
    Ok(module)
}
