//! Response side: `ngx.say`, `ngx.print`, `ngx.exit`, `ngx.redirect`, `ngx.flush`, `ngx.eof`,
//! `ngx.status`, `ngx.ctx`, `ngx.header`, `ngx.resp.get_headers`, `ngx.arg`.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use mlua::{Lua, Table, Value, Variadic};

use super::args::{HeaderInput, HeaderNameArg, Ignored};
use super::{current, current_with, format_number, require_phase};
use crate::request::Phase;

const RESPONDING: &[Phase] = &[Phase::Rewrite, Phase::Access, Phase::Content];

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    install_headers_meta(lua)?;
    ngx.raw_set("print", lua.create_function(|_, args: Variadic<Value>| emit("print", &args, false))?)?;
    ngx.raw_set("say", lua.create_function(|_, args: Variadic<Value>| emit("say", &args, true))?)?;
    ngx.raw_set(
        "flush",
        lua.create_function(|_, _: Variadic<Value>| {
            let request = current("ngx.flush")?;
            if header_only(&request.state) {
                return Ok((None, Some("header only")));
            }
            Ok((Some(1), None))
        })?,
    )?;
    ngx.raw_set(
        "eof",
        lua.create_function(|_, ()| {
            let request = current("ngx.eof")?;
            require_phase(&request, "ngx.eof", RESPONDING)?;
            if request.state.eof.replace(true) {
                return Ok((None, Some("seen eof")));
            }
            request.state.headers_sent.set(true);
            Ok((Some(1), None))
        })?,
    )?;
    ngx.raw_set(
        "send_headers",
        lua.create_function(|_, ()| {
            let request = current("ngx.send_headers")?;
            require_phase(&request, "ngx.send_headers", RESPONDING)?;
            if request.state.headers_sent.replace(true) {
                return Ok((None, Some("header already sent")));
            }
            Ok((Some(1), None))
        })?,
    )?;
    ngx.raw_set(
        "exit",
        lua.create_async_function(|_, status: i64| {
            let prepared = prepare_exit(status);
            async move {
                prepared?;
                // Never resumed: the runner sees the exit and drops this coroutine.
                std::future::pending::<mlua::Result<()>>().await
            }
        })?,
    )?;
    ngx.raw_set(
        "redirect",
        lua.create_async_function(|_, (uri, status): (String, Option<i64>)| {
            let prepared = prepare_redirect(&uri, status.unwrap_or(302));
            async move {
                prepared?;
                std::future::pending::<mlua::Result<()>>().await
            }
        })?,
    )?;

    let resp = lua.create_table()?;
    resp.raw_set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<usize>, Option<bool>)| {
            let request = current("ngx.resp.get_headers")?;
            let headers = request.state.response_headers.borrow();
            let max = max.unwrap_or(100);
            let builtin = builtin_headers(&request.state, &headers);
            // The built-in ones count first; `max` 0 is no limit.
            let room = max.saturating_sub(builtin.len());
            let listed = if max > 0 && room == 0 { &HeaderMap::new() } else { &*headers };
            let (table, truncated) = headers_table(lua, listed, room, raw.unwrap_or(false))?;
            let count = builtin.len() + headers.len();
            for (name, value) in builtin {
                table.raw_set(name, value)?;
            }
            if truncated.is_some() || (max > 0 && count > max) {
                super::log_line(8, &format!("lua exceeding response header limit {count} > {max}"));
                return Ok((table, Some("truncated".to_owned())));
            }
            Ok((table, None))
        })?,
    )?;
    // `require "ngx.resp"` (lua-resty-core) returns this table too.
    resp.raw_set(
        "set_status",
        lua.create_function(|_, (status, reason): (i64, Option<String>)| {
            let request = current("ngx.resp.set_status")?;
            let state = &request.state;
            if state.headers_sent.get() {
                return Err(mlua::Error::runtime("attempt to set status after sending out response headers"));
            }
            let status = u16::try_from(status)
                .ok()
                .filter(|s| (100..=999).contains(s))
                .ok_or_else(|| mlua::Error::runtime(format!("bad status {status}")))?;
            if reason.as_deref().is_some_and(|r| r.bytes().any(|b| b == b'\r' || b == b'\n')) {
                return Err(mlua::Error::runtime("bad reason: contains CR or LF"));
            }
            state.status.set(status);
            *state.reason.borrow_mut() = reason;
            Ok(())
        })?,
    )?;
    ngx.raw_set("resp", resp)?;

    // ngx.header: a proxy table over the response headers.
    let header = lua.create_table()?;
    let header_meta = lua.create_table()?;
    header_meta
        .raw_set("__index", lua.create_function(|lua, (_, name): (Ignored, HeaderNameArg)| get_header(lua, name))?)?;
    header_meta.raw_set(
        "__newindex",
        lua.create_function(|_, (_, name, value): (Ignored, HeaderNameArg, HeaderInput)| set_header(name, value))?,
    )?;
    super::seal(&header_meta)?;
    header.set_metatable(Some(header_meta))?;
    ngx.raw_set("header", header)?;

    // ngx.arg: the body filter's chunk and end-of-stream flag.
    let arg = lua.create_table()?;
    let arg_meta = lua.create_table()?;
    arg_meta.raw_set(
        "__index",
        lua.create_function(|lua, (_, index): (Ignored, i64)| {
            let request = current("ngx.arg")?;
            match index {
                1 => Ok(match request.state.arg_chunk.borrow().as_ref() {
                    Some(chunk) => Value::String(lua.create_string(chunk)?),
                    None => Value::String(lua.create_string("")?),
                }),
                2 => Ok(Value::Boolean(request.state.arg_eof.get())),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    arg_meta.raw_set(
        "__newindex",
        lua.create_function(|_, (_, index, value): (Ignored, i64, Value)| {
            let request = current("ngx.arg")?;
            require_phase(&request, "ngx.arg", &[Phase::BodyFilter])?;
            match index {
                1 => {
                    let mut chunk = BytesMut::new();
                    if !value.is_nil() {
                        flatten(&value, &mut chunk, 1, "ngx.arg")?;
                    }
                    *request.state.arg_chunk.borrow_mut() = Some(chunk.freeze());
                }
                2 => request.state.arg_eof.set(value.as_boolean().unwrap_or(false)),
                _ => return Err(mlua::Error::runtime("ngx.arg: only indexes 1 and 2 can be set")),
            }
            Ok(())
        })?,
    )?;
    super::seal(&arg_meta)?;
    arg.set_metatable(Some(arg_meta))?;
    ngx.raw_set("arg", arg)?;

    // ngx.status and ngx.ctx are per request: served by ngx's own metatable.
    let ngx_meta = lua.create_table()?;
    ngx_meta.raw_set(
        "__index",
        lua.create_function(|lua, (_, key): (Ignored, String)| {
            let Some(request) = crate::vm::with_current(|r| r.cloned()) else { return Ok(Value::Nil) };
            match key.as_str() {
                "status" => Ok(Value::Integer(match request.state.status.get() {
                    0 if request.state.headers_sent.get() => 200,
                    status => i64::from(status),
                })),
                "headers_sent" => Ok(Value::Boolean(request.state.headers_sent.get())),
                "ctx" => {
                    let mut ctx = request.ctx.borrow_mut();
                    if ctx.is_none() {
                        *ctx = Some(lua.create_table()?);
                    }
                    Ok(ctx.clone().map_or(Value::Nil, Value::Table))
                }
                _ => match request.ngx_fields.borrow().as_ref() {
                    Some(fields) => fields.raw_get(key),
                    None => Ok(Value::Nil),
                },
            }
        })?,
    )?;
    ngx_meta.raw_set(
        "__newindex",
        lua.create_function(|lua, (_, key, value): (Ignored, String, Value)| {
            let request = current_with(|| format!("ngx.{key}"))?;
            match key.as_str() {
                "status" => {
                    if request.state.headers_sent.get() {
                        tracing::error!(target: "lua", route = &*request.state.head.route, "attempt to set ngx.status after sending out response headers");
                        return Ok(());
                    }
                    let number = match value {
                        #[allow(clippy::cast_precision_loss)]
                        Value::Integer(i) => i as f64,
                        Value::Number(n) => n,
                        Value::String(s) => s.to_str()?.trim().parse::<f64>().map_err(|_| mlua::Error::runtime("ngx.status must be a number"))?,
                        _ => return Err(mlua::Error::runtime("ngx.status must be a number")),
                    };
                    #[allow(clippy::cast_possible_truncation)]
                    let status = number.trunc() as i64;
                    let status = u16::try_from(status).ok().filter(|s| (100..1000).contains(s)).ok_or_else(|| mlua::Error::runtime(format!("ngx.status: invalid status {status}")))?;
                    request.state.status.set(status);
                    Ok(())
                }
                "ctx" => match value {
                    Value::Table(t) => {
                        *request.ctx.borrow_mut() = Some(t);
                        Ok(())
                    }
                    _ => Err(mlua::Error::runtime("ngx.ctx must be a table")),
                },
                _ => {
                    // OpenResty lets code add fields to ngx; here they live as long as the request.
                    let mut fields = request.ngx_fields.borrow_mut();
                    if fields.is_none() {
                        *fields = Some(lua.create_table()?);
                    }
                    fields.as_ref().map_or(Ok(()), |f| f.raw_set(key, value))
                }
            }
        })?,
    )?;
    super::seal(&ngx_meta)?;
    ngx.set_metatable(Some(ngx_meta))?;
    Ok(())
}

fn emit(api: &str, args: &Variadic<Value>, newline: bool) -> mlua::Result<(Option<i64>, Option<String>)> {
    let request = current_with(|| format!("ngx.{api}"))?;
    require_phase(&request, api, RESPONDING)?;
    if request.state.eof.get() {
        return Ok((None, Some("seen eof".into())));
    }
    if header_only(&request.state) {
        return Ok((None, Some("header only".into())));
    }
    // Room for the usual short line and its newline at once: grown from empty, "ok\n" took two
    // allocations.
    let mut out = BytesMut::with_capacity(64);
    for (i, value) in args.iter().enumerate() {
        flatten(value, &mut out, i + 1, api)?;
    }
    if newline {
        out.extend_from_slice(b"\n");
    }
    request.state.headers_sent.set(true);
    request.state.output.borrow_mut().push(out.freeze());
    Ok((Some(1), None))
}

/// Appends a value as `ngx.print` writes it: strings, numbers, booleans, nil, ngx.null, and
/// array tables of those (nested).
fn flatten(value: &Value, out: &mut BytesMut, position: usize, api: &str) -> mlua::Result<()> {
    match value {
        Value::String(s) => out.extend_from_slice(&s.as_bytes()),
        // Luau numbers are doubles: print them as Lua does, whatever mlua calls them.
        #[allow(clippy::cast_precision_loss)]
        Value::Integer(i) => out.extend_from_slice(format_number(*i as f64).as_bytes()),
        Value::Number(n) => out.extend_from_slice(format_number(*n).as_bytes()),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Nil => out.extend_from_slice(b"nil"),
        Value::LightUserData(l) if l.0.is_null() => out.extend_from_slice(b"null"),
        Value::Table(t) => {
            let len = t.raw_len();
            let mut count = 0;
            for pair in t.pairs::<Value, Value>() {
                let (key, _) = pair?;
                let in_sequence =
                    matches!(key, Value::Integer(i) if i >= 1 && usize::try_from(i).is_ok_and(|i| i <= len));
                if !in_sequence {
                    return Err(mlua::Error::runtime(format!(
                        "bad argument #{position} to '{api}' (non-array table found)"
                    )));
                }
                count += 1;
            }
            let _ = count;
            for i in 1..=len {
                flatten(&t.raw_get::<Value>(i)?, out, position, api)?;
            }
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #{position} to '{api}' (string, number, boolean, nil, ngx.null, or array table expected, got {})",
                other.type_name()
            )));
        }
    }
    Ok(())
}

/// Statuses for which nginx sends nothing and closes the connection: request timeout, "no
/// response" and client closed request.
const CLOSING: [u16; 3] = [408, 444, 499];

fn prepare_exit(status: i64) -> mlua::Result<()> {
    let request = current("ngx.exit")?;
    // In a timer it ends the timer, light threads included, as in OpenResty.
    require_phase(
        &request,
        "ngx.exit",
        &[Phase::Rewrite, Phase::Access, Phase::Content, Phase::HeaderFilter, Phase::Timer, Phase::SslCertificate],
    )?;
    if status == -2 || status == -4 {
        return Err(mlua::Error::runtime("bad argument to 'ngx.exit': does not accept NGX_AGAIN or NGX_DONE"));
    }
    // ngx.ERROR ends the request like 444 (and is recorded as such).
    let abort = status == -1;
    let status = if abort { 444 } else { status };
    let status =
        u16::try_from(status.max(0)).map_err(|_| mlua::Error::runtime(format!("ngx.exit: bad status {status}")))?;
    let state = &request.state;
    // In header_filter the status line is already on its way: 444 and the like go out as a
    // status there (as in nginx), and only ngx.ERROR closes the connection.
    let filtering = state.phase.get() == Phase::HeaderFilter;
    state.abort.set(abort || (CLOSING.contains(&status) && !filtering));
    // As nginx: a special response status once headers are out is an error, except the ones
    // that only close the connection.
    if state.headers_sent.get()
        && status >= 300
        && !CLOSING.contains(&status)
        && state.phase.get() != Phase::HeaderFilter
    {
        let sent = match state.status.get() {
            0 => 200,
            s => s,
        };
        if status != sent {
            tracing::error!(target: "lua", route = &*state.head.route, "attempt to set status {status} via ngx.exit after sending out the response status {sent}");
        }
    }
    state.exit.set(Some(status));
    Ok(())
}

fn prepare_redirect(uri: &str, status: i64) -> mlua::Result<()> {
    let request = current("ngx.redirect")?;
    require_phase(&request, "ngx.redirect", RESPONDING)?;
    let status = match status {
        301 | 302 | 303 | 307 | 308 => u16::try_from(status).unwrap_or(302),
        other => {
            return Err(mlua::Error::runtime(format!(
                "only ngx.HTTP_MOVED_TEMPORARILY, ngx.HTTP_MOVED_PERMANENTLY, ngx.HTTP_PERMANENT_REDIRECT, ngx.HTTP_SEE_OTHER, and ngx.HTTP_TEMPORARY_REDIRECT are allowed, got {other}"
            )));
        }
    };
    if let Some(byte) = uri.bytes().find(|b| *b == b'\r' || *b == b'\n') {
        return Err(mlua::Error::runtime(format!(
            "unsafe byte \"0x{byte:02x}\" in redirect uri \"{}\"",
            escape_for_log(uri.as_bytes())
        )));
    }
    let location = HeaderValue::from_str(uri).map_err(|_| mlua::Error::runtime("ngx.redirect: invalid URI"))?;
    request.state.response_headers.borrow_mut().insert(http::header::LOCATION, location);
    request.state.location_as_set.set(false);
    request.state.status.set(status);
    request.state.exit.set(Some(status));
    Ok(())
}

/// Control bytes, `"` and `\\` as `\xHH`, the way nginx writes untrusted bytes into its log.
fn escape_for_log(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f {
            out.push_str(&format!("\\x{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// Response and request headers that hold one value: setting several keeps the last.
const SINGLE_VALUED: &[&str] = &["content-type", "content-length", "location", "last-modified", "etag", "expires"];

/// CR and LF would split a header; OpenResty percent-escapes them instead of failing. A value
/// without them (the usual case) is used as it is.
pub(super) fn escape_header_bytes(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + 4);
    for &b in bytes {
        match b {
            b'\r' => out.extend_from_slice(b"%0D"),
            b'\n' => out.extend_from_slice(b"%0A"),
            b => out.push(b),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Names a worker keeps normalized: handlers name the same few headers request after request.
const KEPT_NAMES: usize = 32;
/// Longer names are normalized each time.
const KEPT_NAME_LEN: usize = 64;

/// `content_type` and `Content-Type` name the same header. Bytes a header name cannot hold are
/// percent-escaped, as OpenResty does. The last [`KEPT_NAMES`] names a worker normalized are
/// kept as they were written: for `X-Custom`, normalizing is an allocation and a copy, where a
/// kept name is a reference count.
pub(super) fn normalize_header_name(name: &str) -> mlua::Result<HeaderName> {
    thread_local! {
        static NAMES: std::cell::RefCell<Vec<(Box<str>, HeaderName)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let kept = NAMES.with_borrow(|names| names.iter().find(|(n, _)| **n == *name).map(|(_, h)| h.clone()));
    if let Some(header) = kept {
        return Ok(header);
    }
    let header = normalize_uncached(name)?;
    if name.len() <= KEPT_NAME_LEN {
        NAMES.with_borrow_mut(|names| {
            if names.len() == KEPT_NAMES {
                names.remove(0);
            }
            names.push((name.into(), header.clone()));
        });
    }
    Ok(header)
}

fn normalize_uncached(name: &str) -> mlua::Result<HeaderName> {
    // Token bytes with no `_`: `http` lowercases them itself, with no copy of ours.
    if !name.is_empty()
        && name.bytes().all(|b| b != b'_' && (b.is_ascii_alphanumeric() || b"!#$&'*+-.^`|~".contains(&b)))
    {
        return HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| mlua::Error::runtime(format!("invalid header name {name:?}")));
    }
    let name = name.replace('_', "-").to_ascii_lowercase();
    let mut escaped = Vec::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b) {
            escaped.push(b);
        } else {
            escaped.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    let name = escaped;
    HeaderName::from_bytes(&name)
        .map_err(|_| mlua::Error::runtime(format!("invalid header name {:?}", String::from_utf8_lossy(&name))))
}

fn get_header(lua: &Lua, name: HeaderNameArg) -> mlua::Result<Value> {
    let request = current("ngx.header")?;
    let name = name.0?;
    let headers = request.state.response_headers.borrow();
    header_value(lua, &headers, &name)
}

/// One value as a string; several as a table.
pub(super) fn header_value(lua: &Lua, headers: &HeaderMap, name: &HeaderName) -> mlua::Result<Value> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return Ok(Value::Nil) };
    let rest: Vec<&HeaderValue> = values.collect();
    if rest.is_empty() {
        return Ok(Value::String(lua.create_string(first.as_bytes())?));
    }
    let table = lua.create_table()?;
    table.raw_push(lua.create_string(first.as_bytes())?)?;
    for v in rest {
        table.raw_push(lua.create_string(v.as_bytes())?)?;
    }
    Ok(Value::Table(table))
}

fn set_header(name: HeaderNameArg, value: HeaderInput) -> mlua::Result<()> {
    let request = current("ngx.header")?;
    let header = name.0?;
    if request.state.headers_sent.get() {
        tracing::error!(target: "lua", route = &*request.state.head.route, header = header.as_str(), "attempt to set ngx.header.HEADER after sending out response headers");
        return Ok(());
    }
    if header == http::header::CONTENT_TYPE {
        request.state.content_type_touched.set(true);
    }
    if header == http::header::LOCATION {
        request.state.location_as_set.set(true);
    }
    if header == http::header::CONTENT_LENGTH && !value.is_length() {
        return Err(mlua::Error::runtime("attempt to set invalid Content-Length"));
    }
    let mut headers = request.state.response_headers.borrow_mut();
    set_header_input(&mut headers, &header, value)
}

/// Replaces a header with what Lua gave: nil (or an empty table) clears it, a table sets several
/// values (the last one for a single-valued header), anything else one. A value refused leaves
/// the header as it was.
pub(super) fn set_header_input(headers: &mut HeaderMap, name: &HeaderName, value: HeaderInput) -> mlua::Result<()> {
    let one = |input: HeaderInput| match input {
        HeaderInput::One { value: Some(value), .. } => Ok(value),
        HeaderInput::One { value: None, .. } => Err(mlua::Error::runtime(format!("invalid value for header {name}"))),
        HeaderInput::Nil => Err(mlua::Error::runtime(format!("bad header value for {name}: nil"))),
        HeaderInput::Other(other) => {
            Err(mlua::Error::runtime(format!("bad header value for {name}: {}", other.type_name())))
        }
    };
    match value {
        HeaderInput::Nil => {
            headers.remove(name);
        }
        HeaderInput::Other(Value::Table(t)) => {
            let items = t.sequence_values::<Value>().map(|v| v.map(HeaderInput::of));
            let values: Vec<HeaderValue> = if SINGLE_VALUED.contains(&name.as_str()) {
                items.last().transpose()?.map(one).transpose()?.into_iter().collect()
            } else {
                items.map(|item| one(item?)).collect::<mlua::Result<_>>()?
            };
            headers.remove(name);
            for value in values {
                headers.append(name.clone(), value);
            }
        }
        // The usual case: one value, set with no list made.
        single => {
            headers.insert(name.clone(), one(single)?);
        }
    }
    Ok(())
}

/// A HEAD request whose headers went out: output has nowhere to go (`nil, "header only"`).
fn header_only(state: &crate::request::RequestState) -> bool {
    state.headers_sent.get() && state.head.method == http::Method::HEAD
}

/// The headers nginx keeps apart from the list that `ngx.resp.get_headers` reports too:
/// `connection` always, and once the response head is being sent (header and body filters)
/// `transfer-encoding: chunked` for a body of unannounced length on HTTP/1.1.
fn builtin_headers(state: &crate::request::RequestState, headers: &HeaderMap) -> Vec<(&'static str, &'static str)> {
    let mut builtin = Vec::with_capacity(2);
    let asks_close = state
        .headers
        .borrow()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let keep_alive = match state.head.version {
        http::Version::HTTP_10 => state
            .headers
            .borrow()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"keep-alive")),
        http::Version::HTTP_11 => !asks_close,
        _ => true,
    };
    builtin.push(("connection", if keep_alive { "keep-alive" } else { "close" }));
    let filtering = matches!(state.phase.get(), Phase::HeaderFilter | Phase::BodyFilter);
    if filtering
        && state.head.version == http::Version::HTTP_11
        && state.head.method != http::Method::HEAD
        && !matches!(state.status.get(), 204 | 304)
        && !headers.contains_key(http::header::CONTENT_LENGTH)
    {
        builtin.push(("transfer-encoding", "chunked"));
    }
    builtin
}

/// A header table as `ngx.req.get_headers` and `ngx.resp.get_headers` return it: lower-case
/// names (unless raw), repeated headers as arrays, and lookups by any case through `__index`.
pub(super) fn headers_table(
    lua: &Lua,
    headers: &HeaderMap,
    max: usize,
    raw: bool,
) -> mlua::Result<(Table, Option<String>)> {
    // Made in one go (each `raw_set` is a protected call of its own): a name's values as one
    // string, or an array when it repeats.
    let mut fields: Vec<(&str, Value)> = Vec::with_capacity(headers.keys_len());
    let mut count = 0;
    let mut truncated = false;
    'names: for name in headers.keys() {
        let mut values = headers.get_all(name).iter();
        let Some(first) = values.next() else { continue };
        if max > 0 && count >= max {
            truncated = true;
            break;
        }
        count += 1;
        let first = Value::String(lua.create_string(first.as_bytes())?);
        let mut rest = values.peekable();
        if rest.peek().is_none() {
            fields.push((name.as_str(), first));
            continue;
        }
        let mut list = vec![first];
        for value in rest {
            if max > 0 && count >= max {
                truncated = true;
                fields.push((name.as_str(), Value::Table(lua.create_sequence_from(list)?)));
                break 'names;
            }
            count += 1;
            list.push(Value::String(lua.create_string(value.as_bytes())?));
        }
        fields.push((name.as_str(), Value::Table(lua.create_sequence_from(list)?)));
    }
    let table = lua.create_table_from(fields)?;
    if !raw {
        table.set_metatable(Some(headers_meta(lua)?))?;
    }
    Ok((table, truncated.then(|| "truncated".to_owned())))
}

/// The metatable of header tables: lookups by any case, `_` for `-`. One per VM, made at
/// install, sealed (`getmetatable` does not hand it out), so that no request can change it for
/// another.
struct HeadersMeta(Table);

fn install_headers_meta(lua: &Lua) -> mlua::Result<()> {
    let meta = lua.create_table()?;
    meta.raw_set(
        "__index",
        lua.create_function(|_, (t, key): (Table, String)| {
            let normalized = key.replace('_', "-").to_ascii_lowercase();
            if normalized == key { Ok(Value::Nil) } else { t.raw_get::<Value>(normalized) }
        })?,
    )?;
    super::seal(&meta)?;
    lua.set_app_data(HeadersMeta(meta));
    Ok(())
}

fn headers_meta(lua: &Lua) -> mlua::Result<Table> {
    lua.app_data_ref::<HeadersMeta>()
        .map(|meta| meta.0.clone())
        .ok_or_else(|| mlua::Error::runtime("header tables: no metatable installed"))
}

/// Output as one body.
pub fn join_output(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }
}
