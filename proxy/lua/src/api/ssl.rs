//! `require "ngx.ssl"`: the `ssl_certificate` phase (OpenResty's `ssl_certificate_by_lua`)
//! chooses the certificate of a TLS handshake, as lua-resty-core's module does:
//! `server_name`, `clear_certs`, `set_der_cert`, `set_der_priv_key`, `cert_pem_to_der`,
//! `priv_key_pem_to_der`, `parse_pem_cert`, `parse_pem_priv_key`, `set_cert` and
//! `set_priv_key`. What Lua sets is read by the proxy when the handler ends
//! ([`crate::request::SslState`]).

use mlua::{AnyUserData, Lua, Table, UserData, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{current, require_phase};
use crate::request::{Phase, SslState};

const HANDSHAKE: &[Phase] = &[Phase::SslCertificate];

/// A parsed certificate chain (`parse_pem_cert`), end entity first.
struct Chain(Vec<Vec<u8>>);
impl UserData for Chain {}

/// A parsed private key (`parse_pem_priv_key`), as PKCS#8, PKCS#1 or SEC1 DER.
struct Key(Vec<u8>);
impl UserData for Key {}

pub(super) fn module(lua: &Lua) -> mlua::Result<Table> {
    let ssl = lua.create_table()?;
    ssl.raw_set(
        "server_name",
        lua.create_function(|lua, ()| {
            let request = current("ngx.ssl.server_name")?;
            let name = request.state.ssl.borrow().as_ref().and_then(|s| s.server_name.clone());
            match name {
                Some(name) => Ok(Value::String(lua.create_string(&name)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    ssl.raw_set(
        "clear_certs",
        lua.create_function(|_, ()| {
            with_state("clear_certs", |state| {
                state.cleared = true;
                state.chain = None;
                state.key = None;
            })?;
            Ok(true)
        })?,
    )?;
    ssl.raw_set(
        "cert_pem_to_der",
        lua.create_function(|lua, pem: mlua::LuaString| match pem_chain(&pem.as_bytes()) {
            Ok(chain) => Ok((Value::String(lua.create_string(chain.concat())?), Value::Nil)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    ssl.raw_set(
        "priv_key_pem_to_der",
        lua.create_function(|lua, pem: mlua::LuaString| match pem_key(&pem.as_bytes()) {
            Ok(key) => Ok((Value::String(lua.create_string(key)?), Value::Nil)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    ssl.raw_set(
        "parse_pem_cert",
        lua.create_function(|lua, pem: mlua::LuaString| match pem_chain(&pem.as_bytes()) {
            Ok(chain) => Ok((Value::UserData(lua.create_userdata(Chain(chain))?), Value::Nil)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    ssl.raw_set(
        "parse_pem_priv_key",
        lua.create_function(|lua, pem: mlua::LuaString| match pem_key(&pem.as_bytes()) {
            Ok(key) => Ok((Value::UserData(lua.create_userdata(Key(key))?), Value::Nil)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    ssl.raw_set(
        "set_der_cert",
        lua.create_function(|lua, der: mlua::LuaString| match der_chain(&der.as_bytes()) {
            Ok(chain) => set("set_der_cert", lua, |state| state.chain = Some(chain)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    ssl.raw_set(
        "set_der_priv_key",
        lua.create_function(|lua, der: mlua::LuaString| {
            let der = der.as_bytes().to_vec();
            set("set_der_priv_key", lua, |state| state.key = Some(der))
        })?,
    )?;
    ssl.raw_set(
        "set_cert",
        lua.create_function(|lua, chain: AnyUserData| {
            let chain =
                chain.borrow::<Chain>().map_err(|_| mlua::Error::runtime("bad cert arg: cdata expected"))?.0.clone();
            set("set_cert", lua, |state| state.chain = Some(chain))
        })?,
    )?;
    ssl.raw_set(
        "set_priv_key",
        lua.create_function(|lua, key: AnyUserData| {
            let key =
                key.borrow::<Key>().map_err(|_| mlua::Error::runtime("bad priv key arg: cdata expected"))?.0.clone();
            set("set_priv_key", lua, |state| state.key = Some(key))
        })?,
    )?;
    Ok(ssl)
}

fn with_state<R>(api: &str, f: impl FnOnce(&mut SslState) -> R) -> mlua::Result<R> {
    let request = current(&format!("ngx.ssl.{api}"))?;
    require_phase(&request, api, HANDSHAKE)?;
    let mut ssl = request.state.ssl.borrow_mut();
    Ok(f(ssl.get_or_insert_with(Box::default)))
}

fn set(api: &str, _lua: &Lua, f: impl FnOnce(&mut SslState)) -> mlua::Result<(Value, Value)> {
    with_state(api, f)?;
    Ok((Value::Boolean(true), Value::Nil))
}

/// The certificates of PEM text, end entity first, as DER.
fn pem_chain(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("PEM_read_bio_X509_AUX() failed: {e}"))?;
    if chain.is_empty() {
        return Err("PEM_read_bio_X509_AUX() failed: no certificate".into());
    }
    Ok(chain)
}

/// The first private key of PEM text, as DER.
fn pem_key(pem: &[u8]) -> Result<Vec<u8>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|key| key.secret_der().to_vec())
        .map_err(|e| format!("PEM_read_bio_PrivateKey() failed: {e}"))
}

/// Certificates given as DER, one after another (as `cert_pem_to_der` joins a chain).
fn der_chain(der: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut chain = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        let length = der_length(rest).ok_or("d2i_X509() failed: not DER")?;
        let (one, after) = rest.split_at(length);
        chain.push(one.to_vec());
        rest = after;
    }
    if chain.is_empty() {
        return Err("d2i_X509() failed: empty".into());
    }
    Ok(chain)
}

/// The whole length of the DER SEQUENCE at the start of `der`.
fn der_length(der: &[u8]) -> Option<usize> {
    if der.first() != Some(&0x30) {
        return None;
    }
    let first = *der.get(1)?;
    let (content, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let bytes = usize::from(first & 0x7f);
        if bytes == 0 || bytes > 4 {
            return None;
        }
        let mut length = 0usize;
        for b in der.get(2..2 + bytes)? {
            length = (length << 8) | usize::from(*b);
        }
        (length, 2 + bytes)
    };
    let total = header.checked_add(content)?;
    (total <= der.len()).then_some(total)
}
