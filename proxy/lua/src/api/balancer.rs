//! `require "ngx.balancer"`: the `balancer` phase picks the peer of each try of the upstream,
//! as lua-resty-core's module does: `set_current_peer(host, port)`, `set_more_tries(n)`,
//! `get_last_failure()`, `set_timeouts(connect, send, read)` and `recreate_request()`.
//!
//! The peer is an IP address (as in OpenResty, the phase resolves no names: do that earlier,
//! with a cosocket or `resty.dns.resolver`, and keep the result in `ngx.ctx` or a shared
//! dictionary). An address in a `--lua-socket-deny` range is refused, as for cosockets.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mlua::{Lua, Table, Value};

use super::socket::Denied;
use super::{current, require_phase};
use crate::request::{BalancerState, Phase};

const BALANCING: &[Phase] = &[Phase::Balancer];

pub(super) fn module(lua: &Lua) -> mlua::Result<Table> {
    let balancer = lua.create_table()?;
    balancer.raw_set(
        "set_current_peer",
        lua.create_function(|lua, (host, port): (String, Option<Value>)| {
            let request = current("ngx.balancer.set_current_peer")?;
            require_phase(&request, "set_current_peer", BALANCING)?;
            // `host:port` in one argument, or the two apart.
            let (host, port) = match port {
                None | Some(Value::Nil) => match host.rsplit_once(':') {
                    Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                        (h.trim_matches(|c| c == '[' || c == ']').to_owned(), p.parse::<u16>().ok())
                    }
                    _ => (host, None),
                },
                Some(Value::Integer(n)) => (host, u16::try_from(n).ok()),
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                Some(Value::Number(n)) if n.fract() == 0.0 && (0.0..=65535.0).contains(&n) => (host, Some(n as u16)),
                Some(Value::String(s)) => (host, s.to_string_lossy().parse().ok()),
                Some(other) => {
                    return Err(mlua::Error::runtime(format!("bad port number: {}", other.type_name())));
                }
            };
            let Some(port) = port.filter(|p| *p != 0) else {
                return Ok((Value::Nil, Value::String(lua.create_string("no port specified")?)));
            };
            let Ok(ip) = host.parse::<IpAddr>() else {
                return Ok((
                    Value::Nil,
                    Value::String(lua.create_string(format!(
                        "host must be an IP address (names are not resolved in the balancer phase): {host}"
                    ))?),
                ));
            };
            let denied = lua.app_data_ref::<Denied>().is_some_and(|d| d.0.iter().any(|n| n.contains(ip)));
            if denied {
                tracing::warn!(
                    route = %request.state.head.route,
                    namespace = %request.state.head.namespace,
                    peer = %SocketAddr::new(ip, port),
                    "Lua balancer peer refused: the address is in a range --lua-socket-deny lists"
                );
                return Ok((Value::Nil, Value::String(lua.create_string("destination not allowed")?)));
            }
            with_state(&request.state, |state| state.peer = Some(SocketAddr::new(ip, port)));
            Ok((Value::Boolean(true), Value::Nil))
        })?,
    )?;
    balancer.raw_set(
        "set_more_tries",
        lua.create_function(|lua, count: i64| {
            let request = current("ngx.balancer.set_more_tries")?;
            require_phase(&request, "set_more_tries", BALANCING)?;
            let count = u32::try_from(count.max(0)).unwrap_or(u32::MAX);
            // As nginx: the tries of a request are bounded (`proxy_next_upstream_tries` when set,
            // else this), and asking for more says so.
            let warning = with_state(&request.state, |state| {
                let allowed = BalancerState::MAX_TRIES.saturating_sub(state.tries);
                state.more_tries = count.min(allowed);
                (count > allowed).then_some("reduced tries due to limit")
            });
            Ok((Value::Boolean(true), warning.map_or(Ok(Value::Nil), |w| lua.create_string(w).map(Value::String))?))
        })?,
    )?;
    balancer.raw_set(
        "get_last_failure",
        lua.create_function(|lua, ()| {
            let request = current("ngx.balancer.get_last_failure")?;
            require_phase(&request, "get_last_failure", BALANCING)?;
            let failure = with_state(&request.state, |state| state.last_failure);
            match failure {
                None => Ok((Value::Nil, Value::Nil)),
                Some((kind, status)) => Ok((
                    Value::String(lua.create_string(kind)?),
                    status.map_or(Value::Nil, |s| Value::Integer(s.into())),
                )),
            }
        })?,
    )?;
    balancer.raw_set(
        "set_timeouts",
        lua.create_function(|_, (connect, send, read): (Option<f64>, Option<f64>, Option<f64>)| {
            let request = current("ngx.balancer.set_timeouts")?;
            require_phase(&request, "set_timeouts", BALANCING)?;
            let seconds = |value: Option<f64>, name: &str| -> mlua::Result<Option<Duration>> {
                match value {
                    None => Ok(None),
                    Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
                    Some(s) => Err(mlua::Error::runtime(format!("bad {name} timeout: {s}"))),
                }
            };
            let timeouts = [seconds(connect, "connect")?, seconds(send, "send")?, seconds(read, "read")?];
            with_state(&request.state, |state| state.timeouts = timeouts);
            Ok(true)
        })?,
    )?;
    // The request goes out as it is made for each try already.
    balancer.raw_set("recreate_request", lua.create_function(|_, ()| Ok(true))?)?;
    Ok(balancer)
}

fn with_state<R>(state: &crate::request::RequestState, f: impl FnOnce(&mut BalancerState) -> R) -> R {
    let mut balancer = state.balancer.borrow_mut();
    f(balancer.get_or_insert_with(Box::default))
}
