//! `ngx.re`: `match`, `find`, `gmatch`, `sub`, `gsub` and `split` with OpenResty's signatures
//! and PCRE2's semantics ([`crate::pcre`]): lookaround, backreferences, atomic groups,
//! possessive quantifiers, named and duplicate named captures, compiled with PCRE2's JIT.
//!
//! Every match is bounded by a match limit (1,000,000 backtracking steps, OpenResty's
//! `lua_regex_match_limit`), a depth and a heap limit: a pattern that would backtrack for
//! longer fails with `nil, "pcre2_match() failed: -47 (match limit exceeded)"` (or the
//! limit it reached) instead of stalling the worker, and what Lua runs around it stays under
//! the request's CPU budget. Compiled regexes are cached per worker (up to 1024, whatever the
//! `o` option says).
//!
//! Options: `i` caseless, `m` multi-line, `s` dot matches newline, `x` extended, `u` UTF-8,
//! `U` UTF-8 too (OpenResty's `U` skips the UTF-8 check, but PCRE2 on invalid UTF-8 that it was
//! told not to check is undefined behaviour: the check stays), `a` anchored at the start position, `D` duplicate
//! named groups (their captures come as an array), `J` JavaScript compatibility; `j` (the JIT
//! is always used) and `o` (always cached) are accepted, and `d` (DFA mode) matches as the
//! default mode does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value};

use crate::pcre::{Flags, Offsets, Regex};

const CACHE_ENTRIES: usize = 1024;

/// Compiled regexes of this worker, by (pattern, options).
type Cache = HashMap<(Vec<u8>, String), Rc<Regex>>;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(HashMap::new());
}

fn compile(pattern: &[u8], options: &str) -> Result<Rc<Regex>, String> {
    let key = (pattern.to_vec(), options.to_owned());
    if let Some(hit) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(hit);
    }
    let mut flags = Flags::default();
    for flag in options.chars() {
        match flag {
            'i' => flags.caseless = true,
            'm' => flags.multiline = true,
            's' => flags.dotall = true,
            'x' => flags.extended = true,
            'u' | 'U' => flags.utf = true,
            'a' => flags.anchored = true,
            'D' => flags.dupnames = true,
            'J' => flags.javascript = true,
            'j' | 'o' | 'd' => {}
            other => return Err(format!("unknown flag \"{other}\" (flags \"{options}\")")),
        }
    }
    let regex = Regex::new(pattern, flags)
        .map_err(|e| format!("failed to compile regex \"{}\": {e}", String::from_utf8_lossy(pattern)))?;
    let compiled = Rc::new(regex);
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, Rc::clone(&compiled));
    });
    Ok(compiled)
}

/// Where to look after an empty match at `at`: the next byte, or under UTF-8 the next
/// character.
fn after_empty(compiled: &Regex, subject: &[u8], at: usize) -> usize {
    let mut next = at + 1;
    if compiled.flags.utf {
        while next < subject.len() && subject[next] & 0xC0 == 0x80 {
            next += 1;
        }
    }
    next
}

fn whole(offsets: &Offsets) -> (usize, usize) {
    offsets.first().copied().flatten().unwrap_or((0, 0))
}

fn group_value(lua: &Lua, subject: &[u8], group: Option<&Option<(usize, usize)>>) -> mlua::Result<Value> {
    match group.copied().flatten() {
        Some((start, end)) => Ok(Value::String(lua.create_string(&subject[start..end])?)),
        None => Ok(Value::Boolean(false)),
    }
}

/// OpenResty's captures table: `[0]` the whole match, `[n]` each group (`false` when it did not
/// take part), and named groups by name (with `D`, a name used by several groups gives the
/// array of those that took part).
fn captures_table(lua: &Lua, compiled: &Regex, subject: &[u8], caps: &Offsets) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(caps.len(), compiled.names.len())?;
    for (i, _) in caps.iter().enumerate() {
        table.raw_set(i, group_value(lua, subject, caps.get(i))?)?;
    }
    for (name, number) in &compiled.names {
        let value = group_value(lua, subject, caps.get(*number))?;
        if compiled.flags.dupnames && compiled.names.iter().filter(|(n, _)| n == name).count() > 1 {
            let list = match table.raw_get::<Value>(name.as_str())? {
                Value::Table(list) => list,
                _ => {
                    let list = lua.create_table()?;
                    table.raw_set(name.as_str(), list.clone())?;
                    list
                }
            };
            if !matches!(value, Value::Boolean(false)) {
                list.raw_push(value)?;
            }
        } else if !matches!(value, Value::Boolean(false)) || table.raw_get::<Value>(name.as_str())?.is_nil() {
            table.raw_set(name.as_str(), value)?;
        }
    }
    Ok(table)
}

/// `ctx.pos` (1-based) as a byte offset.
fn start_of(ctx: Option<&Table>) -> mlua::Result<usize> {
    let pos: Option<i64> = match ctx {
        Some(t) => t.raw_get("pos")?,
        None => None,
    };
    Ok(usize::try_from(pos.unwrap_or(1).max(1) - 1).unwrap_or(0))
}

fn error_pair(lua: &Lua, message: &str) -> mlua::Result<(Value, Value)> {
    Ok((Value::Nil, Value::String(lua.create_string(message)?)))
}

pub(super) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let re = lua.create_table()?;
    re.raw_set(
        "match",
        lua.create_function(|lua, (subject, pattern, options, ctx): (mlua::LuaString, mlua::LuaString, Option<String>, Option<Table>)| {
            let compiled = match compile(&pattern.as_bytes(), options.as_deref().unwrap_or("")) {
                Ok(c) => c,
                Err(e) => return Ok(MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(&e)?)])),
            };
            let subject = subject.as_bytes();
            let from = start_of(ctx.as_ref())?;
            if from > subject.len() {
                return Ok(MultiValue::from_iter([Value::Nil]));
            }
            match compiled.captures_at(&subject, from) {
                Err(e) => Ok(MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(&e)?)])),
                Ok(None) => Ok(MultiValue::from_iter([Value::Nil])),
                Ok(Some(caps)) => {
                    if let Some(ctx) = &ctx {
                        ctx.raw_set("pos", whole(&caps).1 + 1)?;
                    }
                    Ok(MultiValue::from_iter([Value::Table(captures_table(lua, &compiled, &subject, &caps)?)]))
                }
            }
        })?,
    )?;
    re.raw_set(
        "find",
        lua.create_function(
            |lua,
             (subject, pattern, options, ctx, nth): (
                mlua::LuaString,
                mlua::LuaString,
                Option<String>,
                Option<Table>,
                Option<usize>,
            )| {
                let compiled = match compile(&pattern.as_bytes(), options.as_deref().unwrap_or("")) {
                    Ok(c) => c,
                    Err(e) => {
                        return Ok(MultiValue::from_iter([
                            Value::Nil,
                            Value::Nil,
                            Value::String(lua.create_string(&e)?),
                        ]));
                    }
                };
                let subject = subject.as_bytes();
                let from = start_of(ctx.as_ref())?;
                if from > subject.len() {
                    return Ok(MultiValue::from_iter([Value::Nil]));
                }
                let caps = match compiled.captures_at(&subject, from) {
                    Err(e) => {
                        return Ok(MultiValue::from_iter([
                            Value::Nil,
                            Value::Nil,
                            Value::String(lua.create_string(&e)?),
                        ]));
                    }
                    Ok(None) => return Ok(MultiValue::from_iter([Value::Nil])),
                    Ok(Some(caps)) => caps,
                };
                if let Some(ctx) = &ctx {
                    ctx.raw_set("pos", whole(&caps).1 + 1)?;
                }
                match caps.get(nth.unwrap_or(0)).copied().flatten() {
                    #[allow(clippy::cast_precision_loss)]
                    Some((start, end)) => {
                        Ok(MultiValue::from_iter([Value::Number((start + 1) as f64), Value::Number(end as f64)]))
                    }
                    None => Ok(MultiValue::from_iter([Value::Nil])),
                }
            },
        )?,
    )?;
    re.raw_set(
        "gmatch",
        lua.create_function(|lua, (subject, pattern, options): (mlua::LuaString, mlua::LuaString, Option<String>)| {
            let compiled = match compile(&pattern.as_bytes(), options.as_deref().unwrap_or("")) {
                Ok(c) => c,
                Err(e) => return Ok((Value::Nil, Value::String(lua.create_string(&e)?))),
            };
            let subject = subject.as_bytes().to_vec();
            let position = RefCell::new(Some(0usize));
            let iterator = lua.create_function(move |lua, ()| {
                let Some(from) = *position.borrow() else { return Ok(Value::Nil) };
                if from > subject.len() {
                    *position.borrow_mut() = None;
                    return Ok(Value::Nil);
                }
                match compiled.captures_at(&subject, from) {
                    Err(e) => {
                        *position.borrow_mut() = None;
                        Err(mlua::Error::runtime(e))
                    }
                    Ok(None) => {
                        *position.borrow_mut() = None;
                        Ok(Value::Nil)
                    }
                    Ok(Some(caps)) => {
                        let (start, end) = whole(&caps);
                        // An empty match moves on by one character, so iteration always ends.
                        *position.borrow_mut() =
                            Some(if start == end { after_empty(&compiled, &subject, end) } else { end });
                        Ok(Value::Table(captures_table(lua, &compiled, &subject, &caps)?))
                    }
                }
            })?;
            Ok((Value::Function(iterator), Value::Nil))
        })?,
    )?;
    re.raw_set(
        "sub",
        lua.create_function(|lua, args: (mlua::LuaString, mlua::LuaString, Value, Option<String>)| {
            substitute(lua, args, false)
        })?,
    )?;
    re.raw_set(
        "gsub",
        lua.create_function(|lua, args: (mlua::LuaString, mlua::LuaString, Value, Option<String>)| {
            substitute(lua, args, true)
        })?,
    )?;
    re.raw_set(
        "split",
        lua.create_function(
            |lua,
             (subject, pattern, options, _ctx, max): (
                mlua::LuaString,
                mlua::LuaString,
                Option<String>,
                Value,
                Option<i64>,
            )| {
                let compiled = match compile(&pattern.as_bytes(), options.as_deref().unwrap_or("")) {
                    Ok(c) => c,
                    Err(e) => return error_pair(lua, &e),
                };
                let subject = subject.as_bytes();
                let parts = lua.create_table()?;
                let limit = max.filter(|m| *m > 0).and_then(|m| usize::try_from(m).ok());
                let mut last = 0;
                let mut from = 0;
                while from <= subject.len() {
                    if limit.is_some_and(|l| parts.raw_len() + 1 >= l) {
                        break;
                    }
                    let (start, end) = match compiled.captures_at(&subject, from) {
                        Err(e) => return error_pair(lua, &e),
                        Ok(None) => break,
                        Ok(Some(caps)) => whole(&caps),
                    };
                    from = if start == end { after_empty(&compiled, &subject, end) } else { end };
                    if start == end && start == last {
                        continue;
                    }
                    parts.raw_push(lua.create_string(&subject[last..start])?)?;
                    last = end;
                }
                parts.raw_push(lua.create_string(&subject[last..])?)?;
                Ok((Value::Table(parts), Value::Nil))
            },
        )?,
    )?;
    ngx.raw_set("re", re)
}

/// `sub` and `gsub`: `newstr, n, err`. The replacement is a template (`$0`, `$1`, `${name}`,
/// `$$`) or a function of the captures table.
fn substitute(
    lua: &Lua,
    (subject, pattern, replace, options): (mlua::LuaString, mlua::LuaString, Value, Option<String>),
    global: bool,
) -> mlua::Result<MultiValue> {
    let fail = |message: &str| -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_iter([Value::Nil, Value::Nil, Value::String(lua.create_string(message)?)]))
    };
    let compiled = match compile(&pattern.as_bytes(), options.as_deref().unwrap_or("")) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let subject = subject.as_bytes();
    let mut out = Vec::with_capacity(subject.len());
    let mut last = 0;
    let mut count = 0usize;
    let mut from = 0;
    while from <= subject.len() {
        let caps = match compiled.captures_at(&subject, from) {
            Err(e) => return fail(&e),
            Ok(None) => break,
            Ok(Some(caps)) => caps,
        };
        let (start, end) = whole(&caps);
        out.extend_from_slice(&subject[last..start]);
        match &replace {
            Value::Function(f) => out.extend_from_slice(&call_replacement(lua, f, &compiled, &subject, &caps)?),
            Value::String(template) => match expand(&template.as_bytes(), &compiled, &subject, &caps) {
                Ok(text) => out.extend_from_slice(&text),
                Err(e) => return fail(&e),
            },
            #[allow(clippy::cast_precision_loss)]
            Value::Integer(i) => out.extend_from_slice(super::format_number(*i as f64).as_bytes()),
            Value::Number(n) => out.extend_from_slice(super::format_number(*n).as_bytes()),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #3 to 'sub' (string or function expected, got {})",
                    super::lua_type(other)
                )));
            }
        }
        count += 1;
        last = end;
        if !global {
            break;
        }
        if start == end {
            // Copy the character an empty match stopped at, then look past it.
            let next = after_empty(&compiled, &subject, end);
            out.extend_from_slice(&subject[end.min(subject.len())..next.min(subject.len())]);
            last = next;
            from = next;
        } else {
            from = end;
        }
    }
    if last < subject.len() {
        out.extend_from_slice(&subject[last..]);
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(MultiValue::from_iter([Value::String(lua.create_string(&out)?), Value::Number(count as f64)]))
}

fn call_replacement(
    lua: &Lua,
    f: &Function,
    compiled: &Regex,
    subject: &[u8],
    caps: &Offsets,
) -> mlua::Result<Vec<u8>> {
    let result: Value = f.call(captures_table(lua, compiled, subject, caps)?)?;
    Ok(match result {
        Value::String(s) => s.as_bytes().to_vec(),
        #[allow(clippy::cast_precision_loss)]
        Value::Integer(i) => super::format_number(i as f64).into_bytes(),
        Value::Number(n) => super::format_number(n).into_bytes(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "the replacement function must return a string, not {}",
                super::lua_type(&other)
            )));
        }
    })
}

/// Expands `$0`, `$12`, `${name}` and `$$` in a replacement template.
fn expand(template: &[u8], compiled: &Regex, subject: &[u8], caps: &Offsets) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(template.len());
    let mut i = 0;
    while i < template.len() {
        if template[i] != b'$' {
            out.push(template[i]);
            i += 1;
            continue;
        }
        let rest = &template[i + 1..];
        let (name, used): (String, usize) = match rest.first() {
            Some(b'$') => {
                out.push(b'$');
                i += 2;
                continue;
            }
            Some(b'{') => {
                let end = rest.iter().position(|b| *b == b'}').ok_or("invalid capturing variable name")?;
                (String::from_utf8_lossy(&rest[1..end]).into_owned(), end + 1)
            }
            Some(b) if b.is_ascii_digit() => {
                let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                (String::from_utf8_lossy(&rest[..digits]).into_owned(), digits)
            }
            _ => return Err("invalid capturing variable name".into()),
        };
        let group = match name.parse::<usize>() {
            Ok(n) => caps.get(n).copied().flatten(),
            Err(_) if compiled.names.iter().any(|(n, _)| *n == name) => compiled
                .names
                .iter()
                .filter(|(n, _)| *n == name)
                .find_map(|(_, number)| caps.get(*number).copied().flatten()),
            Err(_) => return Err(format!("unknown capturing variable {name:?}")),
        };
        if let Some((start, end)) = group {
            out.extend_from_slice(&subject[start..end]);
        }
        i += 1 + used;
    }
    Ok(out)
}
