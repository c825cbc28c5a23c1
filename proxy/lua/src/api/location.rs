//! Internal requests: `ngx.location.capture`, `ngx.location.capture_multi` (subrequests to the
//! namespace's routes on the same host, served by the proxy without a connection) and
//! `ngx.exec` (an internal redirect); `ngx.is_subrequest`.

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderValue};
use mlua::{Lua, MultiValue, Table, Value};

use super::codec::encode_args;
use super::output::headers_table;
use super::{current, require_phase};
use crate::internal::{Captured, Hook, Inherited, MAX_DEPTH, Subrequest};
use crate::request::Phase;
use crate::vm::LuaRequest;

const ISSUING: &[Phase] = &[Phase::Rewrite, Phase::Access, Phase::Content];

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let location = lua.create_table()?;
    location.raw_set(
        "capture",
        lua.create_async_function(|lua, (uri, options): (Value, Option<Table>)| {
            let started = start(&lua, "ngx.location.capture", uri, options.as_ref());
            async move {
                let captured = started?.await;
                Ok(Value::Table(result(&lua, &captured)?))
            }
        })?,
    )?;
    location.raw_set(
        "capture_multi",
        lua.create_async_function(|lua, requests: Table| {
            // All start before any is waited for: they run side by side.
            let started: mlua::Result<Vec<_>> = requests
                .sequence_values::<Table>()
                .map(|spec| {
                    let spec = spec.map_err(|_| mlua::Error::runtime("only tables are allowed in capture_multi"))?;
                    let uri: Value = spec.raw_get(1)?;
                    let options: Option<Table> = spec.raw_get(2)?;
                    start(&lua, "ngx.location.capture_multi", uri, options.as_ref())
                })
                .collect();
            async move {
                let started = started?;
                if started.is_empty() {
                    return Err(mlua::Error::runtime("at least one subrequest should be specified"));
                }
                let mut results = MultiValue::new();
                for waiting in started {
                    results.push_back(Value::Table(result(&lua, &waiting.await)?));
                }
                Ok(results)
            }
        })?,
    )?;
    ngx.raw_set("location", location)?;
    ngx.raw_set(
        "exec",
        lua.create_async_function(|_, (uri, args): (mlua::LuaString, Value)| {
            let prepared = exec(&uri.to_string_lossy(), &args);
            async move {
                prepared?;
                // Never resumed: the request goes on at the new URI.
                std::future::pending::<mlua::Result<()>>().await
            }
        })?,
    )?;
    ngx.raw_set(
        "is_subrequest",
        lua.create_function(|_, ()| Ok(current("ngx.is_subrequest")?.state.depth.get() > 0))?,
    )?;
    Ok(())
}

/// Starts one subrequest (the hook serves it from now on) and returns what waits for it.
fn start(
    lua: &Lua,
    api: &str,
    uri: Value,
    options: Option<&Table>,
) -> mlua::Result<std::pin::Pin<Box<dyn std::future::Future<Output = Captured>>>> {
    let request = current(api)?;
    require_phase(&request, api, ISSUING)?;
    let Value::String(uri) = uri else {
        return Err(mlua::Error::runtime(format!(
            "bad argument #1 to '{api}' (string expected, got {})",
            uri.type_name()
        )));
    };
    let uri = uri.to_string_lossy();
    if uri.is_empty() {
        return Err(mlua::Error::runtime("attempt to use zero-length uri"));
    }
    let depth = request.state.depth.get() + 1;
    if depth > MAX_DEPTH {
        return Err(mlua::Error::runtime(format!("subrequests cycle while processing \"{uri}\"")));
    }
    let sub = subrequest(&request, uri, depth, options)?;
    let hook = lua.app_data_ref::<Hook>().map(|h| std::rc::Rc::clone(&h.0));
    let Some(hook) = hook else {
        return Err(mlua::Error::runtime(format!("{api}: subrequests are not served here")));
    };
    Ok(hook(sub))
}

/// The subrequest `options` describe: OpenResty's `method`, `args`, `body`, `ctx`, `vars`,
/// `copy_all_vars`, `share_all_vars` (copied too) and `always_forward_body`.
fn subrequest(request: &LuaRequest, mut uri: String, depth: u8, options: Option<&Table>) -> mlua::Result<Subrequest> {
    let state = &request.state;
    let mut method = Method::GET;
    let mut body = None;
    let mut inherited = Inherited::default();
    let mut forward_body = false;
    if let Some(options) = options {
        match options.raw_get::<Value>("method")? {
            Value::Nil => {}
            Value::Integer(n) => method = method_of(n)?,
            #[allow(clippy::cast_possible_truncation)]
            Value::Number(n) if n.fract() == 0.0 => method = method_of(n as i64)?,
            other => {
                return Err(mlua::Error::runtime(format!("Bad http request method: {}", other.type_name())));
            }
        }
        match options.raw_get::<Value>("args")? {
            Value::Nil => {}
            Value::String(s) => append_args(&mut uri, &s.to_string_lossy()),
            Value::Table(t) => append_args(&mut uri, &encode_args(&t)?),
            other => {
                return Err(mlua::Error::runtime(format!("Bad args option value: {}", other.type_name())));
            }
        }
        match options.raw_get::<Value>("body")? {
            Value::Nil => {}
            Value::String(s) => body = Some(Bytes::copy_from_slice(&s.as_bytes())),
            other => return Err(mlua::Error::runtime(format!("Bad body option value: {}", other.type_name()))),
        }
        match options.raw_get::<Value>("ctx")? {
            Value::Nil => {}
            Value::Table(t) => inherited.ctx = Some(t),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "Bad ctx option value type {}, expected a Lua table",
                    other.type_name()
                )));
            }
        }
        let truthy =
            |key: &str| -> mlua::Result<bool> { Ok(options.raw_get::<Value>(key)?.as_boolean() == Some(true)) };
        if truthy("copy_all_vars")? || truthy("share_all_vars")? {
            inherited.vars.extend(state.vars.borrow().iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        match options.raw_get::<Value>("vars")? {
            Value::Nil => {}
            Value::Table(vars) => {
                for pair in vars.pairs::<mlua::LuaString, Value>() {
                    let (name, value) = pair?;
                    let value = match value {
                        Value::String(s) => s.to_string_lossy(),
                        Value::Integer(n) => n.to_string(),
                        Value::Number(n) => super::format_number(n),
                        other => {
                            return Err(mlua::Error::runtime(format!(
                                "attempt to use bad variable value type {}",
                                other.type_name()
                            )));
                        }
                    };
                    inherited.vars.push((name.to_string_lossy(), value));
                }
            }
            _ => return Err(mlua::Error::runtime("Bad vars option value")),
        }
        forward_body = truthy("always_forward_body")?;
    }
    // As nginx: a subrequest sees its parent's request headers and, for PUT and POST (or with
    // `always_forward_body`), the body its parent read, unless it has a body of its own.
    let mut headers = state.headers.borrow().clone();
    if body.is_none() && (forward_body || method == Method::PUT || method == Method::POST) {
        body = state.body.borrow().clone();
    }
    headers.remove(header::TRANSFER_ENCODING);
    match &body {
        Some(body) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    Ok(Subrequest { parent: state.head.clone(), depth, method, uri, headers, body, inherited })
}

fn append_args(uri: &mut String, args: &str) {
    if args.is_empty() {
        return;
    }
    uri.push(if uri.contains('?') { '&' } else { '?' });
    uri.push_str(args);
}

fn method_of(number: i64) -> mlua::Result<Method> {
    super::req::METHODS
        .iter()
        .find(|(_, n)| *n == number)
        .and_then(|(name, _)| Method::from_bytes(name.trim_start_matches("HTTP_").as_bytes()).ok())
        .ok_or_else(|| mlua::Error::runtime(format!("unsupported HTTP method: {number}")))
}

/// `{status = ..., header = ..., body = ..., truncated = ...}`, made in one go.
fn result(lua: &Lua, captured: &Captured) -> mlua::Result<Table> {
    let header = headers_table(lua, &captured.headers, 0, false)?.0;
    lua.create_table_from([
        ("status", Value::Integer(captured.status.into())),
        ("header", Value::Table(header)),
        ("body", Value::String(lua.create_string(&captured.body)?)),
        ("truncated", Value::Boolean(captured.truncated)),
    ])
}

/// `ngx.exec(uri, args?)`: ends the handler; the request goes on at `uri`.
fn exec(uri: &str, args: &Value) -> mlua::Result<()> {
    let request = current("ngx.exec")?;
    require_phase(&request, "ngx.exec", ISSUING)?;
    if uri.is_empty() {
        return Err(mlua::Error::runtime("The uri argument is empty"));
    }
    if uri.starts_with('@') {
        return Err(mlua::Error::runtime(format!("ngx.exec: named locations are not supported: {uri}")));
    }
    if request.state.headers_sent.get() {
        return Err(mlua::Error::runtime("attempt to call ngx.exec after sending out response headers"));
    }
    let mut target = uri.to_owned();
    match args {
        Value::Nil => {}
        Value::String(s) => append_args(&mut target, &s.to_string_lossy()),
        Value::Table(t) => append_args(&mut target, &encode_args(t)?),
        Value::Integer(n) => append_args(&mut target, &n.to_string()),
        Value::Number(n) => append_args(&mut target, &super::format_number(*n)),
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #2 to 'exec' (string, number, or table expected, got {})",
                other.type_name()
            )));
        }
    }
    *request.state.exec.borrow_mut() = Some(target);
    request.state.exit.set(Some(0));
    Ok(())
}
