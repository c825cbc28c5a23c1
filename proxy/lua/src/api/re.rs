//! `ngx.re`: `match`, `find`, `gmatch`, `sub`, `gsub` and `split` with OpenResty's signatures.
//!
//! Patterns are compiled by Rust's `regex` crate, whose matching time is linear in the subject:
//! no pattern can stall a worker (there is no catastrophic backtracking). The syntax users write
//! for PCRE works (classes, anchors, lazy quantifiers, named groups `(?<name>...)`); lookaround
//! and backreferences do not, and fail with a compile error. Compiled regexes are cached per
//! worker (up to 1024, whatever the `o` option says).
//!
//! Options: `i` case-insensitive, `m` multi-line, `s` dot matches newline, `x` extended, `u`
//! UTF-8 (without it, matching is on bytes), `a` anchored at the start position; `j`, `o`, `d`,
//! `D`, `J` are accepted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value};
use regex::bytes::{Captures, Regex, RegexBuilder};

const CACHE_ENTRIES: usize = 1024;
/// Compiled programs may use this much memory at most.
const SIZE_LIMIT: usize = 4 << 20;

/// Compiled regexes of this worker, by (pattern, options).
type Cache = HashMap<(Vec<u8>, String), Rc<Compiled>>;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(HashMap::new());
}

struct Compiled {
    regex: Regex,
    anchored: bool,
}

fn compile(pattern: &[u8], options: &str) -> Result<Rc<Compiled>, String> {
    let key = (pattern.to_vec(), options.to_owned());
    if let Some(hit) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(hit);
    }
    let mut builder = RegexBuilder::new(std::str::from_utf8(pattern).map_err(|_| "pattern is not UTF-8".to_owned())?);
    builder.unicode(options.contains('u')).size_limit(SIZE_LIMIT);
    for flag in options.chars() {
        match flag {
            'i' => {
                builder.case_insensitive(true);
            }
            'm' => {
                builder.multi_line(true);
            }
            's' => {
                builder.dot_matches_new_line(true);
            }
            'x' => {
                builder.ignore_whitespace(true);
            }
            'u' | 'a' | 'j' | 'o' | 'd' | 'D' | 'J' | 'U' => {}
            other => return Err(format!("unknown flag \"{other}\" (flags \"{options}\")")),
        }
    }
    let regex = builder
        .build()
        .map_err(|e| format!("failed to compile regex \"{}\": {e}", String::from_utf8_lossy(pattern)))?;
    let compiled = Rc::new(Compiled { regex, anchored: options.contains('a') });
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, Rc::clone(&compiled));
    });
    Ok(compiled)
}

/// The next match at or after byte `from` (anchored: exactly at `from`).
fn captures_at<'s>(compiled: &Compiled, subject: &'s [u8], from: usize) -> Option<Captures<'s>> {
    let caps = compiled.regex.captures_at(subject, from)?;
    let start = caps.get(0).map_or(usize::MAX, |m| m.start());
    (!compiled.anchored || start == from).then_some(caps)
}

/// OpenResty's captures table: `[0]` the whole match, `[n]` each group (`false` when it did not
/// take part), and named groups by name.
fn captures_table(lua: &Lua, compiled: &Compiled, caps: &Captures<'_>) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    for i in 0..caps.len() {
        let value = match caps.get(i) {
            Some(m) => Value::String(lua.create_string(m.as_bytes())?),
            None => Value::Boolean(false),
        };
        table.raw_set(i, value)?;
    }
    for name in compiled.regex.capture_names().flatten() {
        let value = match caps.name(name) {
            Some(m) => Value::String(lua.create_string(m.as_bytes())?),
            None => Value::Boolean(false),
        };
        table.raw_set(name, value)?;
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
            match captures_at(&compiled, &subject, from) {
                None => Ok(MultiValue::from_iter([Value::Nil])),
                Some(caps) => {
                    if let (Some(ctx), Some(m)) = (&ctx, caps.get(0)) {
                        ctx.raw_set("pos", m.end() + 1)?;
                    }
                    Ok(MultiValue::from_iter([Value::Table(captures_table(lua, &compiled, &caps)?)]))
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
                let Some(caps) = captures_at(&compiled, &subject, from) else {
                    return Ok(MultiValue::from_iter([Value::Nil]));
                };
                if let (Some(ctx), Some(m)) = (&ctx, caps.get(0)) {
                    ctx.raw_set("pos", m.end() + 1)?;
                }
                match caps.get(nth.unwrap_or(0)) {
                    #[allow(clippy::cast_precision_loss)]
                    Some(m) => Ok(MultiValue::from_iter([
                        Value::Number((m.start() + 1) as f64),
                        Value::Number(m.end() as f64),
                    ])),
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
                match captures_at(&compiled, &subject, from) {
                    None => {
                        *position.borrow_mut() = None;
                        Ok(Value::Nil)
                    }
                    Some(caps) => {
                        let whole = caps.get(0).map_or(from..from, |m| m.range());
                        // An empty match moves on by one byte, so iteration always ends.
                        *position.borrow_mut() = Some(if whole.is_empty() { whole.end + 1 } else { whole.end });
                        Ok(Value::Table(captures_table(lua, &compiled, &caps)?))
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
                for m in compiled.regex.find_iter(&subject) {
                    if limit.is_some_and(|l| parts.raw_len() + 1 >= l) {
                        break;
                    }
                    if m.is_empty() && m.start() == last {
                        continue;
                    }
                    parts.raw_push(lua.create_string(&subject[last..m.start()])?)?;
                    last = m.end();
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
        let Some(caps) = captures_at(&compiled, &subject, from) else { break };
        let Some(whole) = caps.get(0) else { break };
        out.extend_from_slice(&subject[last..whole.start()]);
        match &replace {
            Value::Function(f) => out.extend_from_slice(&call_replacement(lua, f, &compiled, &caps)?),
            Value::String(template) => match expand(&template.as_bytes(), &compiled, &caps) {
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
        last = whole.end();
        if !global {
            break;
        }
        if whole.is_empty() {
            // Copy the byte an empty match stopped at, then look past it.
            if let Some(&b) = subject.get(whole.end()) {
                out.push(b);
            }
            last = whole.end() + 1;
            from = whole.end() + 1;
        } else {
            from = whole.end();
        }
    }
    if last < subject.len() {
        out.extend_from_slice(&subject[last..]);
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(MultiValue::from_iter([Value::String(lua.create_string(&out)?), Value::Number(count as f64)]))
}

fn call_replacement(lua: &Lua, f: &Function, compiled: &Compiled, caps: &Captures<'_>) -> mlua::Result<Vec<u8>> {
    let result: Value = f.call(captures_table(lua, compiled, caps)?)?;
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
fn expand(template: &[u8], compiled: &Compiled, caps: &Captures<'_>) -> Result<Vec<u8>, String> {
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
            Ok(n) => caps.get(n),
            Err(_) if compiled.regex.capture_names().flatten().any(|n| n == name) => caps.name(&name),
            Err(_) => return Err(format!("unknown capturing variable {name:?}")),
        };
        if let Some(m) = group {
            out.extend_from_slice(m.as_bytes());
        }
        i += 1 + used;
    }
    Ok(out)
}
