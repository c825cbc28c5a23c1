//! UDP cosockets: `ngx.socket.udp()`, with OpenResty's `setpeername`, `send`, `receive`,
//! `settimeout` and `close`.
//!
//! As with TCP cosockets ([`super::socket`]), every wait suspends only the calling coroutine,
//! names are resolved off the worker, and a destination in a `--lua-socket-deny` range is
//! refused before any packet. A socket is connected to its peer, so datagrams from anyone else
//! are dropped by the kernel. `receive` returns one datagram (at most `size` bytes, 8192 by
//! default and 65536 at most, as OpenResty), or `nil, "timeout"` after the read timeout (60 s
//! by default, `settimeout`), which leaves the socket usable.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, UserDataRef, Value};
use tokio::net::UdpSocket as Socket;

use super::socket::{Denied, failure, flatten, io_error, milliseconds, success};
use super::{current, require_phase};
use crate::request::WAITING_PHASES;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_SIZE: usize = 8192;
const MAX_SIZE: usize = 65536;

struct UdpSocket {
    socket: RefCell<Option<Rc<Socket>>>,
    read_timeout: Cell<Duration>,
    busy: Cell<bool>,
}

/// A UDP failure that OpenResty logs (`lua_socket_log_errors` is on by default).
fn logged(what: &str) {
    super::log_line(3, &format!("lua udp socket {what}"));
}

async fn setpeername(socket: &UdpSocket, lua: &Lua, host: String, port: Option<u16>) -> mlua::Result<MultiValue> {
    let request = current("ngx.socket.udp setpeername")?;
    require_phase(&request, "setpeername", WAITING_PHASES)?;
    if socket.busy.get() {
        return failure(lua, "socket busy", None);
    }
    if host.starts_with("unix:") {
        return failure(lua, "unix domain sockets are not supported", None);
    }
    let Some(port) = port else {
        return Err(mlua::Error::runtime("bad argument #2 to 'setpeername' (port expected)"));
    };
    socket.socket.borrow_mut().take();
    let denied = lua.app_data_ref::<Denied>().map(|d| Arc::clone(&d.0)).unwrap_or_default();
    socket.busy.set(true);
    let resolved = tokio::time::timeout(DEFAULT_TIMEOUT, tokio::net::lookup_host((host.as_str(), port))).await;
    socket.busy.set(false);
    let resolved: Vec<SocketAddr> = match resolved {
        Err(_) => return failure(lua, "timeout", None),
        Ok(Err(e)) => return failure(lua, &format!("{host} could not be resolved ({e})"), None),
        Ok(Ok(addresses)) => addresses.collect(),
    };
    let Some(peer) = resolved.iter().copied().find(|a| !denied.iter().any(|n| n.contains(a.ip()))) else {
        tracing::warn!(
            route = %request.state.head.route,
            namespace = %request.state.head.namespace,
            destination = %format!("{host}:{port}"),
            "Lua cosocket refused: the destination is in a range --lua-socket-deny lists"
        );
        return failure(lua, "destination not allowed", None);
    };
    let local: SocketAddr = if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let bound = match Socket::bind(local).await {
        Ok(bound) => bound,
        Err(e) => return failure(lua, &io_error(&e), None),
    };
    if let Err(e) = bound.connect(peer).await {
        return failure(lua, &io_error(&e), None);
    }
    *socket.socket.borrow_mut() = Some(Rc::new(bound));
    Ok(success(Value::Integer(1)))
}

impl UserData for UdpSocket {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_async_method(
            "setpeername",
            |lua, this: UserDataRef<UdpSocket>, (host, port): (String, Option<u16>)| async move {
                setpeername(&this, &lua, host, port).await
            },
        );
        methods.add_method("settimeout", |_, this, ms: Option<f64>| {
            this.read_timeout.set(milliseconds(ms).unwrap_or(DEFAULT_TIMEOUT));
            Ok(())
        });
        methods.add_async_method("send", |lua, this: UserDataRef<UdpSocket>, data: Value| async move {
            let mut bytes = Vec::new();
            flatten(&data, &mut bytes, 0)?;
            let Some(socket) = this.socket.borrow().clone() else { return failure(&lua, "closed", None) };
            match socket.send(&bytes).await {
                Ok(_) => Ok(success(Value::Integer(1))),
                Err(e) => {
                    let error = io_error(&e);
                    logged(&format!("send() failed: {error}"));
                    failure(&lua, &error, None)
                }
            }
        });
        methods.add_async_method("receive", |lua, this: UserDataRef<UdpSocket>, size: Option<f64>| async move {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let size = match size {
                None => DEFAULT_SIZE,
                Some(n) if n.is_finite() && n >= 0.0 => (n as usize).clamp(1, MAX_SIZE),
                Some(_) => return Err(mlua::Error::runtime("bad argument #2 to 'receive' (bad size)")),
            };
            let Some(socket) = this.socket.borrow().clone() else { return failure(&lua, "closed", None) };
            if this.busy.replace(true) {
                return failure(&lua, "socket busy", None);
            }
            let mut buffer = vec![0u8; size];
            let received = tokio::time::timeout(this.read_timeout.get(), socket.recv(&mut buffer)).await;
            this.busy.set(false);
            match received {
                Ok(Ok(n)) => Ok(success(Value::String(lua.create_string(&buffer[..n])?))),
                Ok(Err(e)) => {
                    let error = io_error(&e);
                    logged(&format!("read failed: {error}"));
                    failure(&lua, &error, None)
                }
                Err(_) => {
                    logged("read timed out");
                    failure(&lua, "timeout", None)
                }
            }
        });
        methods.add_method("close", |lua, this, ()| {
            if this.busy.get() {
                return failure(lua, "socket busy", None);
            }
            match this.socket.borrow_mut().take() {
                Some(_) => Ok(success(Value::Integer(1))),
                None => failure(lua, "closed", None),
            }
        });
    }
}

pub(super) fn install(lua: &Lua, socket: &Table) -> mlua::Result<()> {
    socket.raw_set(
        "udp",
        lua.create_function(|_, ()| {
            Ok(UdpSocket {
                socket: RefCell::new(None),
                read_timeout: Cell::new(DEFAULT_TIMEOUT),
                busy: Cell::new(false),
            })
        })?,
    )
}
