//! Encodings and digests: base64, md5, sha1, hmac-sha1, crc32, URI escaping, query strings,
//! SQL quoting.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use hmac::Mac;
use md5::Digest;
use mlua::{Lua, Table, Value};

use super::format_number;
use super::req::decode_args;

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.raw_set(
        "encode_base64",
        lua.create_function(|lua, (s, no_padding): (Value, Value)| {
            let bytes = match &s {
                Value::Nil => Vec::new(),
                Value::String(_) | Value::Integer(_) | Value::Number(_) => to_text(&s)?,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "bad argument #1 to 'encode_base64' (string expected, got {})",
                        super::lua_type(other)
                    )));
                }
            };
            let no_padding = match no_padding {
                Value::Nil => false,
                Value::Boolean(b) => b,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "bad argument #2 to 'encode_base64' (boolean expected, got {})",
                        super::lua_type(&other)
                    )));
                }
            };
            let engine = if no_padding { &STANDARD_NO_PAD } else { &STANDARD };
            lua.create_string(engine.encode(bytes))
        })?,
    )?;
    ngx.raw_set(
        "decode_base64",
        lua.create_function(|lua, s: Value| {
            let Value::String(s) = s else {
                return Err(mlua::Error::runtime("string argument only"));
            };
            let bytes = s.as_bytes();
            // Padding is optional, as in nginx.
            let trimmed: &[u8] = {
                let b: &[u8] = &bytes;
                let end = b.iter().rposition(|c| *c != b'=').map_or(0, |i| i + 1);
                &b[..end]
            };
            match STANDARD_NO_PAD.decode(trimmed) {
                Ok(decoded) => Ok(Value::String(lua.create_string(decoded)?)),
                Err(_) => Ok(Value::Nil),
            }
        })?,
    )?;
    ngx.raw_set("md5", lua.create_function(|_, s: mlua::LuaString| Ok(hex(&md5::Md5::digest(&*s.as_bytes()))))?)?;
    ngx.raw_set(
        "md5_bin",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(md5::Md5::digest(&*s.as_bytes())))?,
    )?;
    ngx.raw_set(
        "sha1_bin",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(sha1::Sha1::digest(&*s.as_bytes())))?,
    )?;
    ngx.raw_set(
        "hmac_sha1",
        lua.create_function(|lua, (key, s): (mlua::LuaString, mlua::LuaString)| {
            let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&key.as_bytes())
                .map_err(|e| mlua::Error::runtime(e.to_string()))?;
            mac.update(&s.as_bytes());
            lua.create_string(mac.finalize().into_bytes())
        })?,
    )?;
    ngx.raw_set("crc32_short", lua.create_function(|_, s: mlua::LuaString| Ok(crc32fast::hash(&s.as_bytes())))?)?;
    ngx.raw_set("crc32_long", lua.create_function(|_, s: mlua::LuaString| Ok(crc32fast::hash(&s.as_bytes())))?)?;
    ngx.raw_set(
        "escape_uri",
        lua.create_function(|lua, (s, kind): (Value, Option<i64>)| {
            let text = to_text(&s)?;
            lua.create_string(escape(&text, kind.unwrap_or(2)))
        })?,
    )?;
    ngx.raw_set(
        "unescape_uri",
        lua.create_function(|lua, s: Value| {
            lua.create_string(unescape(&String::from_utf8_lossy(&to_text(&s)?), true))
        })?,
    )?;
    ngx.raw_set("encode_args", lua.create_function(|_, t: Table| encode_args(&t))?)?;
    ngx.raw_set(
        "decode_args",
        lua.create_function(|lua, (s, max): (String, Option<usize>)| {
            decode_args(lua, &s, max.unwrap_or(100)).map(|(t, _)| t)
        })?,
    )?;
    ngx.raw_set(
        "quote_sql_str",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(quote_sql(&s.as_bytes())))?,
    )?;
    Ok(())
}

fn to_text(value: &Value) -> mlua::Result<Vec<u8>> {
    match value {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(i) => Ok(i.to_string().into_bytes()),
        Value::Number(n) => Ok(format_number(*n).into_bytes()),
        Value::Nil => Ok(Vec::new()),
        other => Err(mlua::Error::runtime(format!("string expected, got {}", super::lua_type(other)))),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Percent-encodes as `ngx.escape_uri`: type 2 (the default) keeps only unreserved characters;
/// type 0 also keeps the characters allowed in a URI path.
pub(super) fn escape(bytes: &[u8], kind: i64) -> Vec<u8> {
    let keep = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (kind == 0
                && matches!(
                    b,
                    b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'/' | b':' | b';' | b'=' | b'@'
                ))
    };
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if keep(b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// Decodes `%XX` (and `+` as a space when `plus_as_space`); invalid escapes stay as they are.
pub(super) fn unescape(text: &str, plus_as_space: bool) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let decoded =
                    std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_as_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Encodes a table as a query string, keys in sorted order: `true` is a bare key, `false` is
/// left out, arrays repeat the key.
pub(super) fn encode_args(table: &Table) -> mlua::Result<String> {
    let mut pairs: Vec<(Vec<u8>, Value)> = Vec::new();
    for pair in table.pairs::<Value, Value>() {
        let (key, value) = pair?;
        let key = match key {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Integer(i) => i.to_string().into_bytes(),
            Value::Number(n) => format_number(n).into_bytes(),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "attempt to use {} as query arg key",
                    super::lua_type(&other)
                )));
            }
        };
        pairs.push((key, value));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parts: Vec<String> = Vec::new();
    let mut push = |key: &[u8], value: &Value| -> mlua::Result<()> {
        let key = String::from_utf8_lossy(&escape(key, 2)).into_owned();
        match value {
            Value::Boolean(true) => parts.push(key),
            Value::Boolean(false) => {}
            other => parts.push(format!("{key}={}", String::from_utf8_lossy(&escape(&to_text(other)?, 2)))),
        }
        Ok(())
    };
    for (key, value) in &pairs {
        match value {
            Value::Table(list) => {
                for v in list.sequence_values::<Value>() {
                    push(key, &v?)?;
                }
            }
            other => push(key, other)?,
        }
    }
    Ok(parts.join("&"))
}

fn quote_sql(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'\'');
    for &b in bytes {
        match b {
            0 => out.extend_from_slice(b"\\0"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\x1a' => out.extend_from_slice(b"\\Z"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\'' => out.extend_from_slice(b"\\'"),
            b'"' => out.extend_from_slice(b"\\\""),
            b => out.push(b),
        }
    }
    out.push(b'\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_escaping_round_trips() {
        assert_eq!(escape(b"a b/c?d=e", 2), b"a%20b%2Fc%3Fd%3De".to_vec());
        assert_eq!(escape(b"/a b", 0), b"/a%20b".to_vec());
        assert_eq!(unescape("b%20r56+7", true), b"b r56 7".to_vec());
        assert_eq!(unescape("100%", true), b"100%".to_vec());
        assert_eq!(unescape("%zz", true), b"%zz".to_vec());
    }

    #[test]
    fn sql_quoting() {
        assert_eq!(quote_sql(b"a'b\n"), b"'a\\'b\\n'".to_vec());
    }
}
