//! Arguments of the hot callbacks, read straight off the Lua stack. mlua's own conversions keep
//! every table or string argument in a slot of its reference thread, filled and emptied again:
//! about 400 instructions each, more than some of these callbacks cost otherwise.

use std::ffi::c_int;

use http::{HeaderName, HeaderValue};
use mlua::state::RawLua;
use mlua::{FromLua, IntoLuaMulti, Lua, MultiValue, Value, ffi};

use super::format_number;
use super::output::{escape_header_bytes, normalize_header_name};

/// An argument the callback does not use, such as a metamethod's own table.
pub(crate) struct Ignored;

// Implementing `from_stack`, an `unsafe fn` of mlua's: nothing is read.
#[allow(unsafe_code)]
impl FromLua for Ignored {
    fn from_lua(_: Value, _: &Lua) -> mlua::Result<Self> {
        Ok(Ignored)
    }

    unsafe fn from_stack(_: c_int, _: &RawLua) -> mlua::Result<Self> {
        Ok(Ignored)
    }
}

/// The address of an argument that is a table, userdata or function, 0 for one of another type:
/// what a method compares with its object's, to check that it is called on it.
pub(crate) struct Address(pub(crate) usize);

// Reads the argument's address with `lua_topointer`, which converts nothing.
#[allow(unsafe_code)]
impl FromLua for Address {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        Ok(Address(value.to_pointer() as usize))
    }

    unsafe fn from_stack(idx: c_int, lua: &RawLua) -> mlua::Result<Self> {
        // SAFETY: `idx` is a valid index of the callback's arguments (mlua's contract for
        // `from_stack`); `lua_topointer` only reads the value there.
        Ok(Address(unsafe { ffi::lua_topointer(lua.state(), idx) } as usize))
    }
}

/// A header name as Lua gives it to `ngx.header.NAME`, `ngx.req.set_header(name, v)` and the
/// like, normalized (see [`normalize_header_name`]); `Err` when it cannot be one. A string is
/// read where it lies, not copied into a `String` first.
pub(crate) struct HeaderNameArg(pub(crate) mlua::Result<HeaderName>);

// Reads a string argument's bytes with Luau's C API; any other value (a number, or a type that
// is an error) goes through mlua's `String` conversion, as before.
#[allow(unsafe_code)]
impl FromLua for HeaderNameArg {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        let name = String::from_lua(value, lua)?;
        Ok(HeaderNameArg(normalize_header_name(&name)))
    }

    unsafe fn from_stack(idx: c_int, lua: &RawLua) -> mlua::Result<Self> {
        let state = lua.state();
        // SAFETY: as for `HeaderInput::from_stack`.
        unsafe {
            if ffi::lua_type(state, idx) == ffi::LUA_TSTRING {
                let mut len = 0;
                let data = ffi::lua_tolstring(state, idx, &raw mut len);
                if let Ok(name) = std::str::from_utf8(std::slice::from_raw_parts(data.cast::<u8>(), len)) {
                    return Ok(HeaderNameArg(normalize_header_name(name)));
                }
            }
            let name = String::from_stack(idx, lua)?;
            Ok(HeaderNameArg(normalize_header_name(&name)))
        }
    }
}

/// A header value as Lua gives it to `ngx.header.NAME = v` or `ngx.req.set_header(name, v)`.
pub(crate) enum HeaderInput {
    /// `nil`: the header goes.
    Nil,
    /// A string, number or boolean: one value, `None` when it cannot be one (control bytes).
    /// `number`: given as a Lua number.
    One { value: Option<HeaderValue>, number: bool },
    /// A table of values, or a value of another type (an error to report with the name).
    Other(Value),
}

impl HeaderInput {
    /// What a Lua value gives, read the way `from_stack` reads one.
    pub(crate) fn of(value: Value) -> HeaderInput {
        match value {
            Value::Nil => HeaderInput::Nil,
            Value::String(s) => HeaderInput::text(&s.as_bytes()),
            Value::Integer(i) => HeaderInput::integer(i),
            Value::Number(n) => HeaderInput::number(n),
            Value::Boolean(b) => HeaderInput::boolean(b),
            other => HeaderInput::Other(other),
        }
    }

    fn text(bytes: &[u8]) -> HeaderInput {
        HeaderInput::One { value: HeaderValue::from_bytes(&escape_header_bytes(bytes)).ok(), number: false }
    }

    /// Whether this may be a `Content-Length`: nil, a number, or a string of digits.
    pub(crate) fn is_length(&self) -> bool {
        match self {
            HeaderInput::Nil | HeaderInput::One { number: true, .. } => true,
            HeaderInput::One { value: Some(v), number: false } => {
                v.to_str().is_ok_and(|s| s.trim().parse::<u64>().is_ok())
            }
            HeaderInput::One { value: None, .. } | HeaderInput::Other(_) => false,
        }
    }

    fn integer(i: i64) -> HeaderInput {
        HeaderInput::One { value: Some(HeaderValue::from(i)), number: true }
    }

    fn number(n: f64) -> HeaderInput {
        HeaderInput::One { value: HeaderValue::from_str(&format_number(n)).ok(), number: true }
    }

    fn boolean(b: bool) -> HeaderInput {
        HeaderInput::One { value: Some(HeaderValue::from_static(if b { "true" } else { "false" })), number: false }
    }
}

// Reads the argument at `idx` with Luau's C API: its type, and a string's bytes or a number or
// boolean where they lie on the stack.
#[allow(unsafe_code)]
impl FromLua for HeaderInput {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        Ok(HeaderInput::of(value))
    }

    unsafe fn from_stack(idx: c_int, lua: &RawLua) -> mlua::Result<Self> {
        let state = lua.state();
        // SAFETY: `idx` is a valid index of the callback's arguments (mlua's contract for
        // `from_stack`); a string is read where it lies, and nothing is pushed or converted.
        unsafe {
            match ffi::lua_type(state, idx) {
                ffi::LUA_TNIL | ffi::LUA_TNONE => Ok(HeaderInput::Nil),
                ffi::LUA_TSTRING => {
                    let mut len = 0;
                    let data = ffi::lua_tolstring(state, idx, &raw mut len);
                    Ok(HeaderInput::text(std::slice::from_raw_parts(data.cast::<u8>(), len)))
                }
                // As mlua reads a number: an integer when it is one exactly.
                ffi::LUA_TNUMBER if ffi::lua_isinteger(state, idx) != 0 => {
                    Ok(HeaderInput::integer(ffi::lua_tointeger(state, idx)))
                }
                ffi::LUA_TNUMBER => Ok(HeaderInput::number(ffi::lua_tonumber(state, idx))),
                ffi::LUA_TBOOLEAN => Ok(HeaderInput::boolean(ffi::lua_toboolean(state, idx) != 0)),
                _ => Ok(HeaderInput::Other(Value::from_stack(idx, lua)?)),
            }
        }
    }
}

/// A string, number, boolean or nil argument, read off the stack (a string's bytes copied out);
/// of any other type, only that it is one.
pub(crate) enum Scalar {
    Nil,
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(Vec<u8>),
    Other,
}

// Reads the argument at `idx` with Luau's C API, as `HeaderInput` does.
#[allow(unsafe_code)]
impl FromLua for Scalar {
    fn from_lua(value: Value, _: &Lua) -> mlua::Result<Self> {
        Ok(match value {
            Value::Nil => Scalar::Nil,
            Value::Boolean(b) => Scalar::Bool(b),
            Value::Integer(i) => Scalar::Int(i),
            Value::Number(n) => Scalar::Num(n),
            Value::String(s) => Scalar::Str(s.as_bytes().to_vec()),
            _ => Scalar::Other,
        })
    }

    unsafe fn from_stack(idx: c_int, lua: &RawLua) -> mlua::Result<Self> {
        let state = lua.state();
        // SAFETY: as for `HeaderInput::from_stack`.
        unsafe {
            match ffi::lua_type(state, idx) {
                ffi::LUA_TNIL | ffi::LUA_TNONE => Ok(Scalar::Nil),
                ffi::LUA_TBOOLEAN => Ok(Scalar::Bool(ffi::lua_toboolean(state, idx) != 0)),
                ffi::LUA_TNUMBER if ffi::lua_isinteger(state, idx) != 0 => {
                    Ok(Scalar::Int(ffi::lua_tointeger(state, idx)))
                }
                ffi::LUA_TNUMBER => Ok(Scalar::Num(ffi::lua_tonumber(state, idx))),
                ffi::LUA_TSTRING => {
                    let mut len = 0;
                    let data = ffi::lua_tolstring(state, idx, &raw mut len);
                    Ok(Scalar::Str(std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec()))
                }
                _ => Ok(Scalar::Other),
            }
        }
    }
}

/// Up to three values for Lua, pushed straight onto its stack: a `MultiValue` is a `VecDeque`
/// allocated for each call.
pub(crate) struct Returns([Value; 3], usize);

impl Returns {
    pub(crate) fn of<const N: usize>(values: [Value; N]) -> Returns {
        const { assert!(N <= 3, "at most three values") };
        let mut all = [Value::Nil, Value::Nil, Value::Nil];
        for (slot, value) in all.iter_mut().zip(values) {
            *slot = value;
        }
        Returns(all, N)
    }
}

// Pushes the values with mlua's own tuple pushes.
#[allow(unsafe_code)]
impl IntoLuaMulti for Returns {
    fn into_lua_multi(self, _: &Lua) -> mlua::Result<MultiValue> {
        let Returns(values, len) = self;
        Ok(values.into_iter().take(len).collect())
    }

    unsafe fn push_into_stack_multi(self, lua: &RawLua) -> mlua::Result<c_int> {
        let Returns([a, b, c], len) = self;
        // SAFETY: mlua's contract for `push_into_stack_multi`, passed on as it is.
        unsafe {
            match len {
                0 => Ok(0),
                1 => (a,).push_into_stack_multi(lua),
                2 => (a, b).push_into_stack_multi(lua),
                _ => (a, b, c).push_into_stack_multi(lua),
            }
        }
    }
}
