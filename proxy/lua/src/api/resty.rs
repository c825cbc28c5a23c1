//! OpenResty's libraries that need LuaJIT's FFI upstream, built in natively under the same
//! names and with the same calls, so that code which requires them runs unchanged:
//! - `resty.string` (`to_hex`, `atoi`);
//! - `resty.md5`, `resty.sha1`, `resty.sha224`, `resty.sha256`, `resty.sha384`,
//!   `resty.sha512`: `obj = mod:new()`, `obj:update(s)`, `obj:final()` (the binary digest),
//!   `obj:reset()`;
//! - `resty.random` (`bytes(n, strong)`, from the system's CSPRNG either way);
//! - `ngx.base64` (`encode_base64url`, `decode_base64url`);
//! - the LuaJIT table extensions: `table.new`, `table.clear`, `table.nkeys`, `table.isempty`,
//!   also as `require "table.new"` and so on, which return the function;
//! - `resty.core`, which OpenResty code requires to switch its API to the FFI: an empty module
//!   (ours is native already).

use std::cell::RefCell;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mlua::{Lua, Table, UserData, UserDataMethods, Value};

/// The modules this file provides, by the name `require` takes.
pub(super) fn modules(lua: &Lua, table_lib: &Table) -> mlua::Result<Vec<(&'static str, Value)>> {
    let mut out: Vec<(&'static str, Value)> = vec![
        ("resty.string", Value::Table(string_module(lua)?)),
        ("resty.md5", Value::Table(hash_module(lua, Algorithm::Md5)?)),
        ("resty.sha1", Value::Table(hash_module(lua, Algorithm::Sha1)?)),
        ("resty.sha224", Value::Table(hash_module(lua, Algorithm::Sha224)?)),
        ("resty.sha256", Value::Table(hash_module(lua, Algorithm::Sha256)?)),
        ("resty.sha384", Value::Table(hash_module(lua, Algorithm::Sha384)?)),
        ("resty.sha512", Value::Table(hash_module(lua, Algorithm::Sha512)?)),
        ("resty.random", Value::Table(random_module(lua)?)),
        ("ngx.base64", Value::Table(base64_module(lua)?)),
        ("resty.core", Value::Table(lua.create_table()?)),
    ];
    for name in ["new", "clear", "nkeys", "isempty"] {
        out.push((table_module_name(name), table_lib.raw_get(name)?));
    }
    Ok(out)
}

fn table_module_name(name: &str) -> &'static str {
    match name {
        "new" => "table.new",
        "clear" => "table.clear",
        "nkeys" => "table.nkeys",
        _ => "table.isempty",
    }
}

/// Adds LuaJIT's table extensions to Luau's `table` (which has `clear` already).
pub(super) fn extend_table(lua: &Lua, table_lib: &Table) -> mlua::Result<()> {
    const EXTENSIONS: &str = r#"
        local create, next = ...
        local function new(narray, nhash)
            if type(narray) == "number" and narray > 0 then return create(narray) end
            return {}
        end
        local function nkeys(t)
            local n = 0
            for _ in next, t do n = n + 1 end
            return n
        end
        local function isempty(t) return next(t) == nil end
        return new, nkeys, isempty
    "#;
    let (new, nkeys, isempty): (Value, Value, Value) = lua
        .load(EXTENSIONS)
        .set_name("=table")
        .call((table_lib.raw_get::<Value>("create")?, lua.globals().raw_get::<Value>("next")?))?;
    table_lib.raw_set("new", new)?;
    table_lib.raw_set("nkeys", nkeys)?;
    table_lib.raw_set("isempty", isempty)
}

fn string_module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.raw_set(
        "to_hex",
        lua.create_function(|lua, s: mlua::LuaString| {
            let hex: String = s.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            lua.create_string(hex)
        })?,
    )?;
    module.raw_set(
        "atoi",
        lua.create_function(|_, s: mlua::LuaString| {
            let text = s.to_str().map(|t| t.trim().to_owned()).unwrap_or_default();
            Ok(text.parse::<i64>().ok())
        })?,
    )?;
    Ok(module)
}

#[derive(Clone, Copy)]
enum Algorithm {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// A digest in progress.
enum State {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl State {
    fn new(algorithm: Algorithm) -> State {
        use md5::Digest as _;
        use sha2::Digest as _;
        match algorithm {
            Algorithm::Md5 => State::Md5(md5::Md5::new()),
            Algorithm::Sha1 => State::Sha1(sha1::Sha1::new()),
            Algorithm::Sha224 => State::Sha224(sha2::Sha224::new()),
            Algorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
            Algorithm::Sha384 => State::Sha384(sha2::Sha384::new()),
            Algorithm::Sha512 => State::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        use md5::Digest as _;
        use sha2::Digest as _;
        match self {
            State::Md5(h) => h.update(bytes),
            State::Sha1(h) => h.update(bytes),
            State::Sha224(h) => h.update(bytes),
            State::Sha256(h) => h.update(bytes),
            State::Sha384(h) => h.update(bytes),
            State::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest so far; the state starts over (as `final` leaves OpenSSL's context).
    fn finish(&mut self, algorithm: Algorithm) -> Vec<u8> {
        use md5::Digest as _;
        use sha2::Digest as _;
        match std::mem::replace(self, State::new(algorithm)) {
            State::Md5(h) => h.finalize().to_vec(),
            State::Sha1(h) => h.finalize().to_vec(),
            State::Sha224(h) => h.finalize().to_vec(),
            State::Sha256(h) => h.finalize().to_vec(),
            State::Sha384(h) => h.finalize().to_vec(),
            State::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// A `resty.sha256` (etc.) object.
struct Hasher {
    algorithm: Algorithm,
    state: RefCell<State>,
}

impl UserData for Hasher {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("update", |_, this, s: mlua::LuaString| {
            this.state.borrow_mut().update(&s.as_bytes());
            Ok(true)
        });
        methods.add_method("final", |lua, this, ()| {
            let digest = this.state.borrow_mut().finish(this.algorithm);
            lua.create_string(digest)
        });
        methods.add_method("reset", |_, this, ()| {
            *this.state.borrow_mut() = State::new(this.algorithm);
            Ok(true)
        });
    }
}

fn hash_module(lua: &Lua, algorithm: Algorithm) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    // `mod:new()`: the module comes first.
    module.raw_set(
        "new",
        lua.create_function(move |_, _module: Value| {
            Ok(Hasher { algorithm, state: RefCell::new(State::new(algorithm)) })
        })?,
    )?;
    Ok(module)
}

fn random_module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.raw_set(
        "bytes",
        lua.create_function(|lua, (len, _strong): (usize, Value)| {
            if len > 1 << 20 {
                return Err(mlua::Error::runtime("bad argument #1 to 'bytes' (at most 1 MiB)"));
            }
            let mut bytes = vec![0u8; len];
            match getrandom::fill(&mut bytes) {
                Ok(()) => Ok(Value::String(lua.create_string(&bytes)?)),
                Err(_) => Ok(Value::Nil),
            }
        })?,
    )?;
    Ok(module)
}

fn base64_module(lua: &Lua) -> mlua::Result<Table> {
    let module = lua.create_table()?;
    module.raw_set(
        "encode_base64url",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(URL_SAFE_NO_PAD.encode(s.as_bytes())))?,
    )?;
    module.raw_set(
        "decode_base64url",
        lua.create_function(|lua, s: mlua::LuaString| {
            // Padding, when present, is accepted as lua-resty-core's decoder accepts it.
            let bytes = s.as_bytes();
            let trimmed = bytes.strip_suffix(b"==").or_else(|| bytes.strip_suffix(b"=")).unwrap_or(&bytes);
            match URL_SAFE_NO_PAD.decode(trimmed) {
                Ok(decoded) => Ok((Value::String(lua.create_string(decoded)?), Value::Nil)),
                Err(_) => Ok((Value::Nil, Value::String(lua.create_string("invalid input")?))),
            }
        })?,
    )?;
    Ok(module)
}
