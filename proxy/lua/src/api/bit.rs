//! `require "bit"`: LuaJIT's bit operations (signed 32-bit results) for code written for
//! OpenResty.

use mlua::{Lua, Table, Variadic};

/// Lua numbers to the 32-bit integer LuaJIT's `bit.tobit` gives.
fn tobit(n: f64) -> i32 {
    #[allow(clippy::cast_possible_truncation)]
    let wide = n.round_ties_even() as i64;
    #[allow(clippy::cast_possible_truncation)]
    let narrow = wide as i32;
    narrow
}

pub(super) fn module(lua: &Lua) -> mlua::Result<Table> {
    let bit = lua.create_table()?;
    bit.raw_set("tobit", lua.create_function(|_, n: f64| Ok(tobit(n)))?)?;
    bit.raw_set("bnot", lua.create_function(|_, n: f64| Ok(!tobit(n)))?)?;
    bit.raw_set(
        "band",
        lua.create_function(|_, ns: Variadic<f64>| Ok(ns.iter().fold(-1i32, |acc, n| acc & tobit(*n))))?,
    )?;
    bit.raw_set(
        "bor",
        lua.create_function(|_, ns: Variadic<f64>| Ok(ns.iter().fold(0i32, |acc, n| acc | tobit(*n))))?,
    )?;
    bit.raw_set(
        "bxor",
        lua.create_function(|_, ns: Variadic<f64>| Ok(ns.iter().fold(0i32, |acc, n| acc ^ tobit(*n))))?,
    )?;
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_wrap)]
    {
        bit.raw_set(
            "lshift",
            lua.create_function(|_, (n, s): (f64, f64)| Ok(((tobit(n) as u32) << (tobit(s) & 31)) as i32))?,
        )?;
        bit.raw_set(
            "rshift",
            lua.create_function(|_, (n, s): (f64, f64)| Ok(((tobit(n) as u32) >> (tobit(s) & 31)) as i32))?,
        )?;
        bit.raw_set("arshift", lua.create_function(|_, (n, s): (f64, f64)| Ok(tobit(n) >> (tobit(s) & 31)))?)?;
        bit.raw_set(
            "rol",
            lua.create_function(|_, (n, s): (f64, f64)| {
                Ok((tobit(n) as u32).rotate_left((tobit(s) & 31) as u32) as i32)
            })?,
        )?;
        bit.raw_set(
            "ror",
            lua.create_function(|_, (n, s): (f64, f64)| {
                Ok((tobit(n) as u32).rotate_right((tobit(s) & 31) as u32) as i32)
            })?,
        )?;
        bit.raw_set("bswap", lua.create_function(|_, n: f64| Ok((tobit(n) as u32).swap_bytes() as i32))?)?;
        bit.raw_set(
            "tohex",
            lua.create_function(|_, (n, digits): (f64, Option<i64>)| {
                let digits = digits.unwrap_or(8);
                let upper = digits < 0;
                let width = usize::try_from(digits.unsigned_abs().clamp(1, 8)).unwrap_or(8);
                let value = tobit(n) as u32;
                let masked = if width >= 8 { value } else { value & ((1u32 << (width * 4)) - 1) };
                Ok(if upper { format!("{masked:0width$X}") } else { format!("{masked:0width$x}") })
            })?,
        )?;
    }
    Ok(bit)
}
