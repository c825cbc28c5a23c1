//! `ngx.req`: the request as it will go upstream, readable and changeable.

use std::str::FromStr;

use bytes::Bytes;
use http::Method;
use mlua::{Lua, Table, Value};

use super::args::{HeaderInput, HeaderNameArg};
use super::codec::{encode_args, unescape};
use super::output::{headers_table, set_header_input};
use super::{current, require_phase};
use crate::request::Phase;

/// `ngx.HTTP_GET` and friends: the numbers OpenResty uses for methods.
pub(super) const METHODS: &[(&str, i64)] = &[
    ("HTTP_GET", 2),
    ("HTTP_HEAD", 4),
    ("HTTP_POST", 8),
    ("HTTP_PUT", 16),
    ("HTTP_DELETE", 32),
    ("HTTP_MKCOL", 64),
    ("HTTP_COPY", 128),
    ("HTTP_MOVE", 256),
    ("HTTP_OPTIONS", 512),
    ("HTTP_PROPFIND", 1024),
    ("HTTP_PROPPATCH", 2048),
    ("HTTP_LOCK", 4096),
    ("HTTP_UNLOCK", 8192),
    ("HTTP_PATCH", 16384),
    ("HTTP_TRACE", 32768),
];

const BEFORE_CONTENT: &[Phase] = &[Phase::Rewrite, Phase::Access, Phase::Content];

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let req = lua.create_table()?;
    req.raw_set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<usize>, Option<bool>)| {
            let request = current("ngx.req.get_headers")?;
            let headers = request.state.headers.borrow();
            headers_table(lua, &headers, max.unwrap_or(100), raw.unwrap_or(false))
        })?,
    )?;
    req.raw_set(
        "set_header",
        lua.create_function(|_, (name, value): (HeaderNameArg, HeaderInput)| {
            let request = current("ngx.req.set_header")?;
            let header = name.0?;
            set_header_input(&mut request.state.headers.borrow_mut(), &header, value)
        })?,
    )?;
    req.raw_set(
        "clear_header",
        lua.create_function(|_, name: HeaderNameArg| {
            let request = current("ngx.req.clear_header")?;
            request.state.headers.borrow_mut().remove(name.0?);
            Ok(())
        })?,
    )?;
    req.raw_set(
        "get_method",
        lua.create_function(|_, ()| Ok(current("ngx.req.get_method")?.state.method.borrow().as_str().to_owned()))?,
    )?;
    req.raw_set(
        "set_method",
        lua.create_function(|_, number: i64| {
            let request = current("ngx.req.set_method")?;
            let name = METHODS
                .iter()
                .find(|(_, n)| *n == number)
                .map(|(name, _)| &name[5..])
                .ok_or_else(|| mlua::Error::runtime(format!("unsupported HTTP method: {number}")))?;
            *request.state.method.borrow_mut() =
                Method::from_str(name).map_err(|e| mlua::Error::runtime(e.to_string()))?;
            Ok(())
        })?,
    )?;
    req.raw_set(
        "get_uri_args",
        lua.create_function(|lua, max: Option<usize>| {
            let request = current("ngx.req.get_uri_args")?;
            let args = request.state.args.borrow().clone().unwrap_or_default();
            decode_args(lua, &args, max.unwrap_or(100))
        })?,
    )?;
    req.raw_set(
        "set_uri_args",
        lua.create_function(|_, args: Value| {
            let request = current("ngx.req.set_uri_args")?;
            let encoded = match args {
                Value::String(s) => s.to_string_lossy(),
                Value::Table(t) => encode_args(&t)?,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "bad argument #1 to 'set_uri_args' (string or table expected, got {})",
                        other.type_name()
                    )));
                }
            };
            *request.state.args.borrow_mut() = Some(encoded);
            Ok(())
        })?,
    )?;
    req.raw_set(
        "set_uri",
        lua.create_async_function(|_, (uri, jump): (String, Option<bool>)| {
            let jumped = set_uri(uri, jump == Some(true));
            async move {
                if jumped? {
                    // Never resumed: the request goes on at the new URI.
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        })?,
    )?;
    req.raw_set(
        "http_version",
        lua.create_function(|_, ()| {
            Ok(match current("ngx.req.http_version")?.state.head.version {
                http::Version::HTTP_10 => 1.0,
                http::Version::HTTP_2 => 2.0,
                http::Version::HTTP_3 => 3.0,
                _ => 1.1,
            })
        })?,
    )?;
    req.raw_set(
        "start_time",
        lua.create_function(|_, ()| {
            let request = current("ngx.req.start_time")?;
            Ok(request
                .state
                .started_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| (d.as_secs_f64() * 1000.0).floor() / 1000.0)
                .unwrap_or_default())
        })?,
    )?;
    req.raw_set("is_internal", lua.create_function(|_, ()| Ok(current("ngx.req.is_internal")?.state.internal.get()))?)?;
    req.raw_set(
        "read_body",
        lua.create_async_function(|_, ()| {
            let prepared = current("ngx.req.read_body").and_then(|r| {
                require_phase(&r, "ngx.req.read_body", BEFORE_CONTENT)?;
                Ok(r)
            });
            async move {
                let request = prepared?;
                let reader = request.body_reader.borrow_mut().take();
                if let Some(reader) = reader {
                    let body = reader().await.map_err(mlua::Error::runtime)?;
                    *request.state.body.borrow_mut() = Some(body);
                }
                Ok(())
            }
        })?,
    )?;
    req.raw_set(
        "discard_body",
        lua.create_function(|_, ()| {
            let request = current("ngx.req.discard_body")?;
            request.body_reader.borrow_mut().take();
            *request.state.body.borrow_mut() = Some(Bytes::new());
            Ok(())
        })?,
    )?;
    req.raw_set(
        "get_body_data",
        lua.create_function(|lua, ()| {
            let request = current("ngx.req.get_body_data")?;
            match request.state.body.borrow().as_ref() {
                Some(body) if !body.is_empty() => Ok(Value::String(lua.create_string(body)?)),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    req.raw_set("get_body_file", lua.create_function(|_, ()| Ok(Value::Nil))?)?;
    req.raw_set(
        "set_body_data",
        lua.create_function(|_, data: mlua::LuaString| {
            let request = current("ngx.req.set_body_data")?;
            request.body_reader.borrow_mut().take();
            *request.state.body.borrow_mut() = Some(Bytes::copy_from_slice(&data.as_bytes()));
            Ok(())
        })?,
    )?;
    req.raw_set(
        "get_post_args",
        lua.create_function(|lua, max: Option<usize>| {
            let request = current("ngx.req.get_post_args")?;
            let body = request.state.body.borrow().clone();
            match body {
                Some(body) => {
                    let (table, truncated) = decode_args(lua, &String::from_utf8_lossy(&body), max.unwrap_or(100))?;
                    let second = match truncated {
                        Some(t) => Value::String(lua.create_string(t)?),
                        None => Value::Nil,
                    };
                    Ok((Value::Table(table), second))
                }
                None => Ok((
                    Value::Nil,
                    Value::String(lua.create_string("no request body found; call ngx.req.read_body() first")?),
                )),
            }
        })?,
    )?;
    ngx.raw_set("req", req)
}

/// Parses `a=1&b&a=2` into `{a = {"1", "2"}, b = true}`, unescaping keys and values.
pub(super) fn decode_args(lua: &Lua, args: &str, max: usize) -> mlua::Result<(Table, Option<String>)> {
    let table = lua.create_table()?;
    for (count, pair) in args.split('&').filter(|p| !p.is_empty()).enumerate() {
        if max > 0 && count >= max {
            return Ok((table, Some("truncated".into())));
        }
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (unescape(k, true), Value::String(lua.create_string(unescape(v, true))?)),
            None => (unescape(pair, true), Value::Boolean(true)),
        };
        if key.is_empty() {
            continue;
        }
        let key = lua.create_string(key)?;
        match table.raw_get::<Value>(&key)? {
            Value::Nil => table.raw_set(key, value)?,
            Value::Table(list) => list.raw_push(value)?,
            previous => {
                let list = lua.create_table()?;
                list.raw_push(previous)?;
                list.raw_push(value)?;
                table.raw_set(key, list)?;
            }
        }
    }
    Ok((table, None))
}

/// `ngx.req.set_uri`: with `jump`, an internal redirect to the new URI with the request's
/// query, as nginx's `rewrite ... last` (rewrite phase only); returns whether it jumped.
fn set_uri(uri: String, jump: bool) -> mlua::Result<bool> {
    let request = current("ngx.req.set_uri")?;
    if uri.is_empty() {
        return Err(mlua::Error::runtime("attempt to use zero-length uri"));
    }
    if !jump {
        *request.state.uri.borrow_mut() = uri;
        return Ok(false);
    }
    let phase = request.state.phase.get();
    if phase != Phase::Rewrite {
        return Err(mlua::Error::runtime(format!("API disabled in the context of {}_by_lua* (jump)", phase.name())));
    }
    let target = match request.state.args.borrow().as_deref() {
        Some(args) if !args.is_empty() => format!("{uri}?{args}"),
        _ => uri.clone(),
    };
    *request.state.uri.borrow_mut() = uri;
    *request.state.exec.borrow_mut() = Some(target);
    request.state.exit.set(Some(0));
    Ok(true)
}
