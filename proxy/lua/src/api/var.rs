//! `ngx.var`: nginx variables, computed from the request on read; variables Lua sets are kept
//! per request.

use std::sync::OnceLock;

use http::Version;
use mlua::{Lua, Table, Value};

use super::args::Ignored;
use super::{current, format_number};
use crate::vm::LuaRequest;

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let var = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.raw_set(
        "__index",
        lua.create_function(|lua, (_, name): (Ignored, String)| {
            let request = current("ngx.var")?;
            match lookup(&request, &name) {
                Some(value) => Ok(Value::String(lua.create_string(value)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    meta.raw_set(
        "__newindex",
        lua.create_function(|_, (_, name, value): (Ignored, String, Value)| {
            let request = current("ngx.var")?;
            let text = match &value {
                Value::Nil => None,
                Value::String(s) => Some(s.to_string_lossy()),
                Value::Integer(i) => Some(i.to_string()),
                Value::Number(n) => Some(format_number(*n)),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "ngx.var.{name}: a string, number or nil is expected, got {}",
                        other.type_name()
                    )));
                }
            };
            assign(&request, &name, text)
        })?,
    )?;
    super::seal(&meta)?;
    var.set_metatable(Some(meta))?;
    ngx.raw_set("var", var)
}

fn hostname() -> &'static str {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into())
    })
}

/// The value of `$name`, as nginx computes it.
pub(crate) fn lookup(request: &LuaRequest, name: &str) -> Option<String> {
    let state = &request.state;
    let head = &state.head;
    if let Some(value) = state.vars.borrow().get(name) {
        return Some(value.clone());
    }
    if let Some(header) = name.strip_prefix("http_") {
        let header = header.replace('_', "-");
        let headers = state.headers.borrow();
        let mut values = headers.get_all(header.as_str()).iter().filter_map(|v| v.to_str().ok());
        let first = values.next()?;
        let separator = if header == "cookie" { "; " } else { ", " };
        return Some(values.fold(first.to_owned(), |acc, v| format!("{acc}{separator}{v}")));
    }
    if let Some(arg) = name.strip_prefix("arg_") {
        let args = state.args.borrow();
        return args.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            key.eq_ignore_ascii_case(arg).then(|| value.to_owned())
        });
    }
    if let Some(cookie) = name.strip_prefix("cookie_") {
        let headers = state.headers.borrow();
        return headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                (key == cookie).then(|| value.to_owned())
            });
    }
    if let Some(header) = name.strip_prefix("sent_http_") {
        let header = header.replace('_', "-");
        let headers = state.response_headers.borrow();
        let values: Vec<&str> = headers.get_all(header.as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
        return (!values.is_empty()).then(|| values.join(", "));
    }
    let value = match name {
        "uri" | "document_uri" => state.uri.borrow().clone(),
        "request_uri" => head.request_uri.clone(),
        "args" | "query_string" => state.args.borrow().clone()?,
        "is_args" => {
            if state.args.borrow().as_deref().is_some_and(|a| !a.is_empty()) {
                "?".into()
            } else {
                String::new()
            }
        }
        "host" => {
            let headers = state.headers.borrow();
            let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
            host.map_or_else(|| head.host.clone(), |h| h.split(':').next().unwrap_or(h).to_ascii_lowercase())
        }
        "hostname" => hostname().to_owned(),
        "server_name" => head.host.clone(),
        "remote_addr" | "realip_remote_addr" => head.remote.ip().to_canonical().to_string(),
        "remote_port" | "realip_remote_port" => head.remote.port().to_string(),
        "server_port" => head.server_port.to_string(),
        "scheme" => if head.https { "https" } else { "http" }.into(),
        "https" => if head.https { "on" } else { "" }.into(),
        "request_method" => state.method.borrow().as_str().to_owned(),
        "server_protocol" => protocol(head.version).into(),
        "request_time" => format!("{:.3}", state.started.elapsed().as_secs_f64()),
        "msec" => format!(
            "{:.3}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default()
        ),
        "status" => match state.status.get() {
            0 => "000".into(),
            s => s.to_string(),
        },
        "content_type" => state.headers.borrow().get(http::header::CONTENT_TYPE)?.to_str().ok()?.to_owned(),
        "content_length" => state.headers.borrow().get(http::header::CONTENT_LENGTH)?.to_str().ok()?.to_owned(),
        "request_body" => String::from_utf8_lossy(state.body.borrow().as_ref()?).into_owned(),
        "upstream_addr" => state.upstream_addr.get()?.to_string(),
        "upstream_status" => state.upstream_status.get()?.to_string(),
        "upstream_response_time" => format!("{:.3}", state.upstream_response_time.get()?),
        "bytes_sent" | "body_bytes_sent" => state.bytes_sent.get().to_string(),
        "request_id" => head.request_id_text(),
        "pid" => std::process::id().to_string(),
        _ => return None,
    };
    Some(value)
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// `ngx.var.NAME = value`: `args` rewrites the query string; built-in read-only variables are
/// refused as nginx refuses them; anything else is a per-request variable.
fn assign(request: &LuaRequest, name: &str, value: Option<String>) -> mlua::Result<()> {
    match name {
        "args" | "query_string" => {
            *request.state.args.borrow_mut() = value;
            Ok(())
        }
        "uri" | "request_uri" | "host" | "remote_addr" | "remote_port" | "server_port" | "scheme" | "https"
        | "request_method" | "status" | "server_protocol" | "request_time" | "hostname" => {
            Err(mlua::Error::runtime(format!("variable \"{name}\" not changeable")))
        }
        _ if name.starts_with("http_") || name.starts_with("arg_") || name.starts_with("cookie_") => {
            Err(mlua::Error::runtime(format!("variable \"{name}\" not changeable")))
        }
        _ => {
            let mut vars = request.state.vars.borrow_mut();
            match value {
                Some(v) => vars.insert(name.to_owned(), v),
                None => vars.remove(name),
            };
            Ok(())
        }
    }
}
