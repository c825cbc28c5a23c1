//! The `ngx` API and the modules handlers may `require`, installed once into a VM's base
//! environment. Functions that act on a request find it through [`crate::vm::with_current`];
//! outside a request they raise an error.

pub(crate) mod args;
mod balancer;
mod bit;
mod codec;
mod json;
mod location;
pub(crate) mod output;
mod re;
mod req;
mod resty;
mod semaphore;
pub(crate) mod shared;
pub(crate) mod socket;
mod ssl;
pub(crate) mod thread;
pub(crate) mod time;
mod timer;
mod udp;
mod var;

use std::rc::Rc;

use mlua::{LightUserData, Lua, Table, Value, Variadic};

use crate::request::Phase;
use crate::slice::Slicer;
use crate::vm::{LuaConfig, LuaRequest, display, with_current};

/// The request whose Lua is running, or an error naming the API used outside one.
pub(crate) fn current(api: &str) -> mlua::Result<Rc<LuaRequest>> {
    current_with(|| api.to_owned())
}

/// [`current`], with the API's name made only when it is needed (for the error).
pub(crate) fn current_with(api: impl FnOnce() -> String) -> mlua::Result<Rc<LuaRequest>> {
    with_current(|r| r.cloned()).ok_or_else(|| mlua::Error::runtime(format!("{}: no request found", api())))
}

/// Raises OpenResty's error for an API used in a phase that does not allow it.
pub(crate) fn require_phase(request: &LuaRequest, _api: &str, allowed: &[Phase]) -> mlua::Result<()> {
    let phase = request.state.phase.get();
    if allowed.contains(&phase) {
        Ok(())
    } else {
        Err(mlua::Error::runtime(format!("API disabled in the context of {}_by_lua*", phase.name())))
    }
}

/// Makes `table` and every table reachable from its fields read-only. The sandbox does that
/// only for the tables directly in the global table, which left `ngx.req`, `ngx.re` and the
/// like open: one request could have replaced `ngx.req.get_headers` for every later request on
/// its worker.
fn freeze(table: &Table) -> mlua::Result<()> {
    table.set_readonly(true);
    for pair in table.pairs::<Value, Value>() {
        if let (_, Value::Table(inner)) = pair?
            && !inner.is_readonly()
        {
            freeze(&inner)?;
        }
    }
    Ok(())
}

/// Makes the metatable of a table every request shares safe to hand to tenants: hidden from
/// `getmetatable` and read-only, so that no request can change what the API does for the next.
/// (The sandbox makes the tables themselves read-only, not their metatables.)
pub(crate) fn seal(meta: &Table) -> mlua::Result<()> {
    meta.raw_set("__metatable", false)?;
    meta.set_readonly(true);
    Ok(())
}

/// A value's type as Lua code sees it (Luau has one number type, whatever mlua calls it).
pub(crate) fn lua_type(value: &Value) -> &'static str {
    match value {
        Value::Integer(_) | Value::Number(_) => "number",
        Value::LightUserData(_) | Value::UserData(_) => "userdata",
        other => other.type_name(),
    }
}

/// Formats a number as Lua's `tostring` does (`%.14g`).
pub(crate) fn format_number(n: f64) -> String {
    if n.is_nan() {
        return if n.is_sign_negative() { "-nan".into() } else { "nan".into() };
    }
    if n.is_infinite() {
        return if n > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if n == n.trunc() && n.abs() < 1e15 {
        // Integral: no decimals, and -0 stays -0 as in Lua.
        if n == 0.0 && n.is_sign_negative() {
            return "-0".into();
        }
        #[allow(clippy::cast_possible_truncation)]
        return format!("{}", n as i64);
    }
    let sci = format!("{n:.13e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..14).contains(&exponent) {
        let mantissa = trim_zeros(mantissa);
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let decimals = usize::try_from(13 - exponent).unwrap_or(0);
    trim_zeros(&format!("{n:.decimals$}")).to_owned()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { s }
}

/// `ngx.null` and `cjson.null`: the NULL light userdata.
pub(crate) fn null() -> Value {
    Value::LightUserData(LightUserData(std::ptr::null_mut()))
}

/// Installs `ngx`, the modules, and the sandbox's replacements for removed globals; returns
/// what makes the requests' environments.
pub(crate) fn install(lua: &Lua, base: &Table, config: &LuaConfig) -> mlua::Result<Rc<shared::DictObjects>> {
    // Removed: no environment tampering, no loading code at run time, no GC control.
    for name in [
        "getfenv",
        "setfenv",
        "loadstring",
        "load",
        "dofile",
        "loadfile",
        "require",
        "collectgarbage",
        "print",
        "debug",
        "module",
    ] {
        base.raw_set(name, Value::Nil)?;
    }
    // The collector belongs to the VM, not to a tenant: only "count" does something; the other
    // options (OpenResty code often calls collectgarbage()) are accepted and do nothing.
    base.raw_set(
        "collectgarbage",
        lua.create_function(|lua, option: Option<String>| match option.as_deref() {
            Some("count") =>
            {
                #[allow(clippy::cast_precision_loss)]
                Ok(lua.used_memory() as f64 / 1024.0)
            }
            _ => Ok(0.0),
        })?,
    )?;
    // Source only (Luau has no bytecode loading to expose), bound to the calling request's
    // environment so that globals it writes stay in that request.
    let loadstring = lua.create_function(|lua, (source, name): (mlua::LuaString, Option<String>)| {
        let request = current("loadstring")?;
        match crate::compile::compile_chunk(&source.to_string_lossy()) {
            Err(message) => Ok((Value::Nil, Value::String(lua.create_string(&message)?))),
            Ok(bytecode) => {
                let chunk = crate::vm::without_request(|| {
                    lua.load(&bytecode[..])
                        .set_mode(mlua::chunk::ChunkMode::Binary)
                        .set_name(format!("={}", name.as_deref().unwrap_or("loadstring")))
                        .set_environment(request.env(lua)?)
                        .into_function()
                })?;
                Ok((Value::Function(chunk), Value::Nil))
            }
        }
    })?;
    base.raw_set("loadstring", loadstring.clone())?;
    base.raw_set("load", loadstring)?;

    if config.openresty_log_lines {
        lua.set_app_data(OpenRestyLogLines);
    }
    wrap_pcall(lua, base)?;
    interruptible_sort(lua, base)?;
    wrap_coroutines(lua, base)?;

    let ngx = lua.create_table()?;
    constants(lua, &ngx)?;
    output::install(lua, &ngx)?;
    var::install(lua, &ngx)?;
    req::install(lua, &ngx)?;
    time::install(lua, &ngx)?;
    codec::install(lua, &ngx)?;
    re::install(lua, &ngx)?;
    timer::install(lua, &ngx)?;
    thread::install(lua, &ngx)?;
    socket::install(lua, &ngx)?;
    udp::install(lua, &ngx.raw_get::<Table>("socket")?)?;
    location::install(lua, &ngx)?;
    let dict_objects = shared::install(lua, &ngx, &config.shared_dicts)?;
    install_misc(lua, &ngx, config)?;

    let print = lua.create_function(|lua, args: Variadic<Value>| {
        // print is ngx.log(ngx.NOTICE, ...): arguments are concatenated.
        let mut text = caller_prefix(lua);
        text.extend(args.iter().map(display));
        log_line(6, &text);
        Ok(())
    })?;
    base.raw_set("print", print)?;

    let table_lib: Table = base.raw_get("table")?;
    resty::extend_table(lua, &table_lib)?;
    let modules = lua.create_table()?;
    modules.raw_set("cjson", json::module(lua, false)?)?;
    modules.raw_set("cjson.safe", json::module(lua, true)?)?;
    modules.raw_set("bit", bit::module(lua)?)?;
    modules.raw_set("ngx", ngx.clone())?;
    modules.raw_set("ngx.resp", ngx.raw_get::<Table>("resp")?)?;
    modules.raw_set("ngx.balancer", balancer::module(lua)?)?;
    modules.raw_set("ngx.ssl", ssl::module(lua)?)?;
    modules.raw_set("ngx.semaphore", semaphore::semaphore_module(lua)?)?;
    modules.raw_set("ngx.process", semaphore::process_module(lua)?)?;
    // Written in Lua over the cosockets; loaded in the base environment, whose reads it needs.
    base.raw_set("ngx", ngx.clone())?;
    let resty_http: Table =
        lua.load(include_str!("resty_http.lua")).set_name("=resty.http").set_environment(base.clone()).call(())?;
    modules.raw_set("resty.http", resty_http)?;
    let lrucache: Table = lua
        .load(include_str!("resty_lrucache.lua"))
        .set_name("=resty.lrucache")
        .set_environment(base.clone())
        .call(())?;
    modules.raw_set("resty.lrucache", lrucache.clone())?;
    modules.raw_set("resty.lrucache.pureffi", lrucache)?;
    let lock: Table =
        lua.load(include_str!("resty_lock.lua")).set_name("=resty.lock").set_environment(base.clone()).call(())?;
    modules.raw_set("resty.lock", lock)?;
    let limit_req: Table = lua
        .load(include_str!("resty_limit_req.lua"))
        .set_name("=resty.limit.req")
        .set_environment(base.clone())
        .call(())?;
    modules.raw_set("resty.limit.req", limit_req)?;
    // The standard libraries, as `require` finds them in OpenResty (`package.loaded`).
    for name in ["string", "table", "math", "coroutine", "utf8", "os", "bit32"] {
        if let Value::Table(library) = base.raw_get::<Value>(name)? {
            modules.raw_set(name, library)?;
        }
    }
    // LuaJIT's `jit` modules, for code that switches the JIT or its tracing on or off: there is
    // no JIT to switch here, so they do nothing.
    let jit: Table = lua
        .load(
            r#"local function none() end
            local jit = { version = "Luau", version_num = 20100, os = "Linux", arch = "x64",
                on = none, off = none, flush = none, status = function() return false end }
            local tracing = { on = none, off = none, start = none }
            return jit, tracing"#,
        )
        .set_name("=jit")
        .call::<(Table, Table)>(())
        .map(|(jit, tracing)| {
            let _ = modules.raw_set("jit.v", tracing.clone());
            let _ = modules.raw_set("jit.dump", tracing);
            jit
        })?;
    modules.raw_set("jit", jit)?;
    for (name, module) in resty::modules(lua, &table_lib)? {
        modules.raw_set(name, module)?;
    }
    for (_, module) in modules.pairs::<Value, Value>().flatten() {
        if let Value::Table(module) = module {
            freeze(&module)?;
        }
    }
    let builtin = move |name: &str| match modules.raw_get::<Value>(name)? {
        Value::Nil => Err(mlua::Error::runtime(format!(
            "module '{name}' not found: neither the namespace's modules nor the built-in ones have it; the built-in modules are cjson, cjson.safe, bit, ngx, ngx.resp, \
                 ngx.base64, ngx.balancer, ngx.ssl, ngx.semaphore, ngx.process, resty.http, resty.lrucache, resty.lock, resty.limit.req, resty.string, resty.md5, resty.sha1, \
                 resty.sha224, resty.sha256, resty.sha384, resty.sha512, resty.random, resty.core, table.new, table.clear, \
                 table.nkeys, table.isempty, jit, jit.v, jit.dump and the standard libraries"
        ))),
        module => Ok(module),
    };
    let require = lua.create_function(move |lua, name: String| {
        // The namespace's own modules, then the cluster-wide ones, then the built-ins.
        let users = lua.app_data_ref::<Rc<crate::modules::Modules>>().map(|m| Rc::clone(&m));
        let namespace = crate::vm::with_current(|r| r.map(|r| std::sync::Arc::clone(&r.state.head.namespace)));
        if let (Some(users), Some(namespace)) = (users.filter(|u| u.any()), namespace)
            && let Some(module) = users.require(lua, &namespace, &name)?
        {
            return Ok(module);
        }
        builtin(&name)
    })?;
    base.raw_set("require", require)?;
    base.raw_set("ngx", ngx)?;
    Ok(dict_objects)
}

/// Errors raised by API functions reach Lua as error objects; OpenResty code expects strings
/// (`local ok, err = pcall(cjson.decode, s)` then `"failed: " .. err`). `pcall` and `xpcall`
/// hand them over as their message.
fn wrap_pcall(lua: &Lua, base: &Table) -> mlua::Result<()> {
    const WRAP: &str = r#"
        local raw_pcall, raw_xpcall, errstr = ...
        local function fix(ok, ...)
            if ok then return true, ... end
            return false, errstr((...))
        end
        local function pcall(f, ...) return fix(raw_pcall(f, ...)) end
        local function xpcall(f, handler, ...)
            return raw_xpcall(f, function(e) return handler(errstr(e)) end, ...)
        end
        return pcall, xpcall
    "#;
    let errstr = lua.create_function(|lua, value: Value| {
        Ok(match value {
            Value::Error(e) => Value::String(lua.create_string(crate::vm::error_message(&e))?),
            other => other,
        })
    })?;
    let wrap = lua.load(WRAP).set_name("=pcall").into_function()?;
    let (pcall, xpcall): (mlua::Function, mlua::Function) =
        wrap.call((base.raw_get::<mlua::Function>("pcall")?, base.raw_get::<mlua::Function>("xpcall")?, errstr))?;
    base.raw_set("pcall", pcall)?;
    base.raw_set("xpcall", xpcall)
}

/// User coroutines may call APIs that wait (`ngx.sleep`, later sockets). Such a call suspends
/// the coroutine with mlua's "pending" marker; `coroutine.resume` and `coroutine.wrap` are
/// wrapped (as OpenResty wraps them) so that the marker never reaches Lua code: the wrapper
/// waits along with the coroutine, suspending the request, and resumes it when the wait is over.
/// A coroutine preempted at the end of its time slice ([`crate::slice`]) is handled the same way.
fn wrap_coroutines(lua: &Lua, base: &Table) -> mlua::Result<()> {
    const WRAP: &str = r##"
        local raw_create, raw_resume, raw_yield, raw_status, raw_isyieldable, pending, preempted = ...
        local select, error = select, error
        local function settle(co, ok, ...)
            if ok and raw_status(co) == "suspended" then
                local n = select("#", ...)
                if n == 1 and (...) == pending then
                    raw_yield(pending)
                    return settle(co, raw_resume(co))
                elseif n == 0 and preempted(co) then
                    -- The worker's other work had a turn; this coroutine's own caller never
                    -- sees it (where this one cannot yield, co just goes on).
                    if raw_isyieldable() then raw_yield(pending) end
                    return settle(co, raw_resume(co))
                end
            end
            return ok, ...
        end
        local function resume(co, ...)
            return settle(co, raw_resume(co, ...))
        end
        local function unwrap(ok, ...)
            if not ok then error((...), 2) end
            return ...
        end
        local function wrap(f)
            local co = raw_create(f)
            return function(...) return unwrap(resume(co, ...)) end
        end
        return resume, wrap
    "##;
    let coroutine: Table = base.raw_get("coroutine")?;
    let (resume, wrap): (mlua::Function, mlua::Function) =
        lua.load(WRAP).set_name("=coroutine").into_function()?.call((
            coroutine.raw_get::<mlua::Function>("create")?,
            coroutine.raw_get::<mlua::Function>("resume")?,
            coroutine.raw_get::<mlua::Function>("yield")?,
            coroutine.raw_get::<mlua::Function>("status")?,
            coroutine.raw_get::<mlua::Function>("isyieldable")?,
            Lua::poll_pending(),
            lua.create_function(|lua, co: mlua::Thread| {
                Ok(lua.app_data_ref::<Rc<Slicer>>().is_some_and(|slicer| slicer.take_preempted(co.to_pointer())))
            })?,
        ))?;
    coroutine.raw_set("resume", resume)?;
    coroutine.raw_set("wrap", wrap)
}

/// Luau's `table.sort` with its built-in comparison runs in C where the interrupt never fires
/// (3e6 numbers take ~0.4 s): a sort always gets a Lua comparator, whose every return lets the
/// interrupt enforce the CPU budget.
fn interruptible_sort(lua: &Lua, base: &Table) -> mlua::Result<()> {
    const SORT: &str = r#"
        local native_sort = ...
        local function less(a, b) return a < b end
        return function(t, comp) return native_sort(t, comp or less) end
    "#;
    let table: Table = base.raw_get("table")?;
    let native: mlua::Function = table.raw_get("sort")?;
    let sort: mlua::Function = lua.load(SORT).set_name("=table.sort").into_function()?.call(native)?;
    table.raw_set("sort", sort)
}

fn constants(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    for (name, value) in [("OK", 0), ("ERROR", -1), ("AGAIN", -2), ("DONE", -4), ("DECLINED", -5)] {
        ngx.raw_set(name, value)?;
    }
    let levels = [
        ("STDERR", 0),
        ("EMERG", 1),
        ("ALERT", 2),
        ("CRIT", 3),
        ("ERR", 4),
        ("WARN", 5),
        ("NOTICE", 6),
        ("INFO", 7),
        ("DEBUG", 8),
    ];
    for (name, value) in levels {
        ngx.raw_set(name, value)?;
    }
    for (name, value) in req::METHODS {
        ngx.raw_set(*name, *value)?;
    }
    let statuses: &[(&str, u16)] = &[
        ("HTTP_CONTINUE", 100),
        ("HTTP_SWITCHING_PROTOCOLS", 101),
        ("HTTP_OK", 200),
        ("HTTP_CREATED", 201),
        ("HTTP_ACCEPTED", 202),
        ("HTTP_NO_CONTENT", 204),
        ("HTTP_PARTIAL_CONTENT", 206),
        ("HTTP_SPECIAL_RESPONSE", 300),
        ("HTTP_MOVED_PERMANENTLY", 301),
        ("HTTP_MOVED_TEMPORARILY", 302),
        ("HTTP_SEE_OTHER", 303),
        ("HTTP_NOT_MODIFIED", 304),
        ("HTTP_TEMPORARY_REDIRECT", 307),
        ("HTTP_PERMANENT_REDIRECT", 308),
        ("HTTP_BAD_REQUEST", 400),
        ("HTTP_UNAUTHORIZED", 401),
        ("HTTP_PAYMENT_REQUIRED", 402),
        ("HTTP_FORBIDDEN", 403),
        ("HTTP_NOT_FOUND", 404),
        ("HTTP_NOT_ALLOWED", 405),
        ("HTTP_NOT_ACCEPTABLE", 406),
        ("HTTP_REQUEST_TIMEOUT", 408),
        ("HTTP_CONFLICT", 409),
        ("HTTP_GONE", 410),
        ("HTTP_UPGRADE_REQUIRED", 426),
        ("HTTP_TOO_MANY_REQUESTS", 429),
        ("HTTP_CLOSE", 444),
        ("HTTP_ILLEGAL", 451),
        ("HTTP_INTERNAL_SERVER_ERROR", 500),
        ("HTTP_METHOD_NOT_IMPLEMENTED", 501),
        ("HTTP_NOT_IMPLEMENTED", 501),
        ("HTTP_BAD_GATEWAY", 502),
        ("HTTP_SERVICE_UNAVAILABLE", 503),
        ("HTTP_GATEWAY_TIMEOUT", 504),
        ("HTTP_VERSION_NOT_SUPPORTED", 505),
        ("HTTP_INSUFFICIENT_STORAGE", 507),
    ];
    for (name, value) in statuses {
        ngx.raw_set(*name, *value)?;
    }
    ngx.raw_set("null", null())?;
    let _ = lua;
    Ok(())
}

fn install_misc(lua: &Lua, ngx: &Table, config: &LuaConfig) -> mlua::Result<()> {
    // ngx.sleep: the coroutine yields to the runner that resumed it, which keeps it suspended on
    // the worker's timer (see `vm::Sleeping`) while the worker serves others. It yields mlua's
    // "pending" marker, as a waiting API does, so that user coroutines pass it on.
    // Where the coroutine cannot yield (inside a callback from C), the yield raises Luau's
    // error before the sleep is armed: an armed sleep would delay the coroutine's next wait.
    const SLEEP: &str = r#"
        local sleep_after_yield, yield, isyieldable, pending = ...
        return function(seconds)
            if isyieldable() then
                sleep_after_yield(seconds)
            end
            yield(pending)
        end
    "#;
    let sleep_after_yield = lua.create_function(|_, seconds: Value| {
        let request = current("ngx.sleep")?;
        require_phase(&request, "ngx.sleep", crate::request::WAITING_PHASES)?;
        let seconds = match seconds {
            Value::Integer(i) => i as f64,
            Value::Number(n) => n,
            Value::String(s) => s.to_str().ok().and_then(|s| s.trim().parse().ok()).unwrap_or(f64::NAN),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #1 to 'sleep' (number expected, got {})",
                    lua_type(&other)
                )));
            }
        };
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(mlua::Error::runtime("bad argument #1 to 'sleep'"));
        }
        crate::vm::sleep_after_yield(std::time::Duration::from_secs_f64(seconds));
        Ok(())
    })?;
    let coroutine: Table = lua.globals().raw_get("coroutine")?;
    let sleep: mlua::Function = lua.load(SLEEP).set_name("=ngx.sleep").call((
        sleep_after_yield,
        coroutine.raw_get::<mlua::Function>("yield")?,
        coroutine.raw_get::<mlua::Function>("isyieldable")?,
        Lua::poll_pending(),
    ))?;
    ngx.raw_set("sleep", sleep)?;

    ngx.raw_set(
        "log",
        lua.create_function(|lua, (level, args): (i64, Variadic<Value>)| {
            let mut text = caller_prefix(lua);
            for (i, value) in args.iter().enumerate() {
                match value {
                    Value::Table(t)
                        if t.metatable().is_none_or(|m| m.raw_get::<Value>("__tostring").is_ok_and(|v| v.is_nil())) =>
                    {
                        return Err(mlua::Error::runtime(format!(
                            "bad argument #{} to 'log' (expected table to have __tostring metamethod)",
                            i + 2
                        )));
                    }
                    other => text.push_str(&display_with_tostring(lua, other)),
                }
            }
            log_line(level, &text);
            Ok(())
        })?,
    )?;
    ngx.raw_set(
        "get_phase",
        lua.create_function(|_, ()| Ok(with_current(|r| r.map_or("init_worker", |r| r.state.phase.get().name()))))?,
    )?;

    let worker = lua.create_table()?;
    let (id, count) = (config.worker_id, config.worker_count);
    worker.raw_set("id", lua.create_function(move |_, ()| Ok(id))?)?;
    worker.raw_set("count", lua.create_function(move |_, ()| Ok(count))?)?;
    worker.raw_set("pid", lua.create_function(|_, ()| Ok(std::process::id()))?)?;
    worker.raw_set("exiting", lua.create_function(|_, ()| Ok(false))?)?;
    ngx.raw_set("worker", worker)?;

    let cfg = lua.create_table()?;
    cfg.raw_set("subsystem", "http")?;
    cfg.raw_set("debug", false)?;
    cfg.raw_set("ngx_lua_version", 10026)?;
    cfg.raw_set("nginx_version", 1_025_003)?;
    cfg.raw_set("nginx_configure", lua.create_function(|_, ()| Ok(""))?)?;
    cfg.raw_set("prefix", lua.create_function(|_, ()| Ok("/"))?)?;
    ngx.raw_set("config", cfg)?;
    Ok(())
}

/// `tostring` semantics, including `__tostring` metamethods.
fn display_with_tostring(lua: &Lua, value: &Value) -> String {
    if let Value::Table(_) | Value::UserData(_) = value
        && let Ok(tostring) = lua.globals().get::<mlua::Function>("tostring")
        && let Ok(s) = tostring.call::<String>(value.clone())
    {
        return s;
    }
    display(value)
}

/// Whether `ngx.log` lines begin as OpenResty's (`LuaConfig::openresty_log_lines`).
pub(crate) struct OpenRestyLogLines;

/// `[lua] <source>:<line>: ` of the Lua that called, when lines take OpenResty's shape; empty
/// otherwise.
fn caller_prefix(lua: &Lua) -> String {
    if lua.app_data_ref::<OpenRestyLogLines>().is_none() {
        return String::new();
    }
    lua.inspect_stack(1, |debug| {
        let source = debug.source().short_src.map(|s| s.into_owned()).unwrap_or_default();
        format!("[lua] {source}:{}: ", debug.current_line().unwrap_or(0))
    })
    .unwrap_or_else(|| "[lua] ?: ".to_owned())
}

/// Writes an `ngx.log` line into our logs, with the request it belongs to.
pub(super) fn log_line(level: i64, text: &str) {
    with_current(|request| {
        let (route, request_id, phase) = request.map_or(("", String::new(), "init"), |r| {
            (&*r.state.head.route, r.state.head.request_id_text(), r.state.phase.get().name())
        });
        match level {
            ..=4 => tracing::error!(target: "lua", route, request_id, phase, "{text}"),
            5 => tracing::warn!(target: "lua", route, request_id, phase, "{text}"),
            6 | 7 => tracing::info!(target: "lua", route, request_id, phase, "{text}"),
            _ => tracing::debug!(target: "lua", route, request_id, phase, "{text}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::format_number;

    #[test]
    fn numbers_format_as_lua_tostring() {
        for (n, s) in [
            (1.0, "1"),
            (-3.0, "-3"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.33333333333333"),
            (1e15, "1e+15"),
            (1.5e-7, "1.5e-07"),
            (123.456, "123.456"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(format_number(n), s, "{n}");
        }
    }

    #[test]
    fn header_names_normalize_the_same_kept_or_not() {
        use super::output::normalize_header_name;
        let expect = |name: &str, header: &str| {
            assert_eq!(normalize_header_name(name).expect("a name").as_str(), header, "{name}");
        };
        // More names than are kept, twice over: the second pass finds some kept, some not.
        for _ in 0..2 {
            for i in 0..40 {
                expect(&format!("X_Name_{i}"), &format!("x-name-{i}"));
            }
            expect("Content_Type", "content-type");
            expect("X-Lua", "x-lua");
            expect("x y", "x%20y");
            expect(&"A".repeat(100), &"a".repeat(100));
        }
        assert!(normalize_header_name("").is_err());
    }
}
