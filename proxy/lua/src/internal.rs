//! Internal requests: subrequests (`ngx.location.capture`, `capture_multi`). Lua asks for them;
//! the proxy, which knows the routes, serves them through its [`Subrequests`] hook, set once per
//! worker with [`crate::Vm::set_subrequests`]. (Internal redirects, `ngx.exec`, need no hook:
//! the handler ends with [`crate::Outcome::Exec`] and the proxy goes on at the new URI.)

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;
use http::{HeaderMap, Method};
use mlua::Table;

use crate::request::RequestHead;
use crate::vm::LuaRequest;

/// Subrequests nest at most this deep (nginx's limit is 50 as well).
pub const MAX_DEPTH: u8 = 50;

/// A subrequest as Lua asked for it.
pub struct Subrequest {
    /// The request that asked: the host and namespace it is served in, its client.
    pub parent: RequestHead,
    /// How deep the subrequest is (1 for a client request's own subrequests).
    pub depth: u8,
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// The parent's request headers as they are now, with a `Content-Length` for `body`.
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// What the subrequest's Lua starts with, for [`LuaRequest::inherit`].
    pub inherited: Inherited,
}

/// What a subrequest's Lua starts with from its parent: the `ctx` option's table as its
/// `ngx.ctx`, and variables (`vars`, `copy_all_vars`).
#[derive(Default)]
pub struct Inherited {
    pub(crate) ctx: Option<Table>,
    pub(crate) vars: Vec<(String, String)>,
}

/// A subrequest's response, as `ngx.location.capture` returns it.
#[derive(Debug, Default)]
pub struct Captured {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body was cut: it broke off, or exceeded what a capture holds.
    pub truncated: bool,
}

/// Serves a subrequest. The subrequest starts when the hook is called (the future only waits
/// for it), so that `capture_multi`'s run side by side.
pub type Subrequests = Rc<dyn Fn(Subrequest) -> Pin<Box<dyn Future<Output = Captured>>>>;

/// The worker's hook, kept in the Lua state's app data.
pub(crate) struct Hook(pub(crate) Subrequests);

impl LuaRequest {
    /// Gives a subrequest's Lua what its parent passed on: `ngx.ctx`, variables.
    pub fn inherit(&self, inherited: Inherited, depth: u8) {
        self.state.depth.set(depth);
        self.state.internal.set(true);
        if let Some(ctx) = inherited.ctx {
            *self.ctx.borrow_mut() = Some(ctx);
        }
        if !inherited.vars.is_empty() {
            self.state.vars.borrow_mut().extend(inherited.vars);
        }
    }
}
