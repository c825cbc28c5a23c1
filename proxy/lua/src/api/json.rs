//! `require "cjson"` and `require "cjson.safe"`: lua-cjson's API and output format (numbers as
//! `%.14g`, `/` escaped, empty tables as `{}` unless marked as arrays). The safe variant returns
//! `nil, err` instead of raising. Settings that would change encoding for every tenant sharing a
//! worker (`encode_empty_table_as_object` and friends) are accepted and have no effect.

use std::fmt::Write;

use mlua::{LightUserData, Lua, MultiValue, Table, Value};

use super::{format_number, null};

const MAX_DEPTH: usize = 1000;

/// `cjson.empty_array`: encodes as `[]`.
fn empty_array() -> Value {
    Value::LightUserData(LightUserData(std::ptr::without_provenance_mut(1)))
}

pub(super) fn module(lua: &Lua, safe: bool) -> mlua::Result<Table> {
    let cjson = lua.create_table()?;
    let array_mt = lua.create_table()?;
    array_mt.set_readonly(true);
    cjson.raw_set("null", null())?;
    cjson.raw_set("empty_array", empty_array())?;
    cjson.raw_set("array_mt", array_mt.clone())?;
    cjson.raw_set("empty_array_mt", array_mt.clone())?;
    cjson.raw_set("_NAME", if safe { "cjson.safe" } else { "cjson" })?;
    cjson.raw_set("_VERSION", "2.1.0.14")?;

    let encode = lua.create_function(move |lua, value: Value| {
        let mut out = String::new();
        match encode_value(&value, &array_mt, &mut out, 0) {
            Ok(()) => Ok(MultiValue::from_iter([Value::String(lua.create_string(&out)?)])),
            Err(message) if safe => {
                Ok(MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(&message)?)]))
            }
            Err(message) => Err(mlua::Error::runtime(message)),
        }
    })?;
    cjson.raw_set("encode", encode)?;
    let decode = lua.create_function(move |lua, text: mlua::LuaString| {
        match serde_json::from_slice::<serde_json::Value>(&text.as_bytes()) {
            Ok(parsed) => Ok(MultiValue::from_iter([to_lua(lua, &parsed)?])),
            Err(e) => {
                let message =
                    format!("Expected value but found invalid token at line {} column {}: {e}", e.line(), e.column());
                if safe {
                    Ok(MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(&message)?)]))
                } else {
                    Err(mlua::Error::runtime(message))
                }
            }
        }
    })?;
    cjson.raw_set("decode", decode)?;
    for setting in [
        "encode_empty_table_as_object",
        "decode_array_with_array_mt",
        "encode_sparse_array",
        "encode_max_depth",
        "decode_max_depth",
        "encode_number_precision",
        "encode_keep_buffer",
        "encode_invalid_numbers",
        "decode_invalid_numbers",
        "encode_escape_forward_slash",
    ] {
        cjson.raw_set(setting, lua.create_function(|_, _: mlua::MultiValue| Ok(true))?)?;
    }
    let new = cjson.clone();
    cjson.raw_set("new", lua.create_function(move |_, ()| Ok(new.clone()))?)?;
    Ok(cjson)
}

fn encode_value(value: &Value, array_mt: &Table, out: &mut String, depth: usize) -> Result<(), String> {
    match value {
        Value::Nil => out.push_str("null"),
        Value::LightUserData(l) if l.0.is_null() => out.push_str("null"),
        Value::LightUserData(l) if l.0.addr() == 1 => out.push_str("[]"),
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Number(n) => {
            if !n.is_finite() {
                return Err("Cannot serialise number: must not be NaN or Infinity".into());
            }
            out.push_str(&format_number(*n));
        }
        Value::String(s) => encode_string(&s.as_bytes(), out),
        Value::Table(t) => {
            if depth >= MAX_DEPTH {
                return Err(format!("Cannot serialise, excessive nesting ({})", depth + 1));
            }
            encode_table(t, array_mt, out, depth + 1)?;
        }
        other => return Err(format!("Cannot serialise {}: type not supported", other.type_name())),
    }
    Ok(())
}

fn encode_table(table: &Table, array_mt: &Table, out: &mut String, depth: usize) -> Result<(), String> {
    let marked_array = table.metatable().is_some_and(|m| m == *array_mt);
    let mut max_index = 0usize;
    let mut count = 0usize;
    let mut is_array = true;
    for pair in table.pairs::<Value, Value>() {
        let (key, _) = pair.map_err(|e| e.to_string())?;
        count += 1;
        match key {
            Value::Integer(i) if i >= 1 => max_index = max_index.max(usize::try_from(i).unwrap_or(usize::MAX)),
            Value::Number(n) if n >= 1.0 && n.fract() == 0.0 => {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let i = n as usize;
                max_index = max_index.max(i);
            }
            _ => is_array = false,
        }
    }
    if is_array && (count > 0 || marked_array) {
        // lua-cjson refuses arrays that are mostly holes.
        if max_index > 10 && max_index > count * 2 {
            return Err("Cannot serialise table: excessively sparse array".into());
        }
        out.push('[');
        for i in 1..=max_index {
            if i > 1 {
                out.push(',');
            }
            let value: Value = table.raw_get(i).map_err(|e| e.to_string())?;
            encode_value(&value, array_mt, out, depth)?;
        }
        out.push(']');
        return Ok(());
    }
    out.push('{');
    let mut first = true;
    for pair in table.pairs::<Value, Value>() {
        let (key, value) = pair.map_err(|e| e.to_string())?;
        let key = match &key {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Integer(i) => i.to_string().into_bytes(),
            Value::Number(n) => format_number(*n).into_bytes(),
            other => {
                return Err(format!("Cannot serialise {}: table key must be a number or string", other.type_name()));
            }
        };
        if !first {
            out.push(',');
        }
        first = false;
        encode_string(&key, out);
        out.push(':');
        encode_value(&value, array_mt, out, depth)?;
    }
    out.push('}');
    Ok(())
}

fn encode_string(bytes: &[u8], out: &mut String) {
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' => out.push_str("\\/"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
        // Invalid UTF-8 bytes pass through as lua-cjson does (it does not validate).
        for b in chunk.invalid() {
            out.push(char::from(*b));
        }
    }
    out.push('"');
}

fn to_lua(lua: &Lua, value: &serde_json::Value) -> mlua::Result<Value> {
    Ok(match value {
        serde_json::Value::Null => null(),
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) if i.unsigned_abs() < (1 << 53) => Value::Integer(i),
            _ => Value::Number(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Value::String(lua.create_string(s)?),
        serde_json::Value::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for item in items {
                table.raw_push(to_lua(lua, item)?)?;
            }
            Value::Table(table)
        }
        serde_json::Value::Object(map) => {
            let table = lua.create_table_with_capacity(0, map.len())?;
            for (k, v) in map {
                table.raw_set(k.as_str(), to_lua(lua, v)?)?;
            }
            Value::Table(table)
        }
    })
}
