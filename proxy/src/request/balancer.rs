//! The upstream step of a route whose Lua picks the peers (`balancer` handlers, OpenResty's
//! `balancer_by_lua`): the handlers run before the first try and again before each further
//! one, and `ngx.balancer.set_current_peer` names its peer.
//!
//! - Further tries follow the route's retry rules (`proxy-next-upstream`: on error and timeout
//!   by default, the statuses it lists, idempotent or bodiless requests only once sent, its
//!   tries and time) and as many as Lua allows with `set_more_tries` (none by default);
//!   `get_last_failure` tells the handler why the last try failed (`"failed"` with 502 or 504,
//!   or `"next"` with the status that is retried).
//! - A handler that picks no peer leaves the request to the route's backend, when it has one,
//!   and answers 502 otherwise; a failing handler answers 500.
//! - Connections to the peers are pooled like any other (per address and protocol), and the
//!   response goes on as the backend's would.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tidegate_lua::{LuaRequest, Outcome as LuaOutcome, Phase};

use super::context::Outcome;
use super::upstream::{exchange, finish};
use crate::body::LocalBody;
use crate::connection::Connection;
use crate::http1::OnUpgrade;
use crate::respond::text;
use crate::router::{LuaChain, Target};
use crate::runtime::Runtime;
use crate::upstream::{Attempts, Cause, PickPeer, RequestBody};
use crate::worker::Worker;

#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    target: &Target,
    chain: &LuaChain,
    lua: &Rc<LuaRequest>,
    request: Request<RequestBody>,
    client_upgrade: Option<OnUpgrade>,
    outcome: &mut Outcome,
) -> Response<LocalBody> {
    let first = match pick(worker, target, chain, lua, None).await {
        Ok(Some(peer)) => peer,
        Ok(None) if target.action.backend.is_some() => {
            return super::upstream::forward(worker, runtime, conn, target, request, client_upgrade, outcome).await;
        }
        Ok(None) => {
            tracing::error!(route = &*target.name, "the Lua balancer set no peer (ngx.balancer.set_current_peer)");
            return text(StatusCode::BAD_GATEWAY, "502 Bad Gateway\n");
        }
        Err(answer) => return answer,
    };
    let mut timeouts = target.action.timeouts;
    if let Some(state) = lua.state.balancer.borrow().as_deref() {
        let ms =
            |d: Option<Duration>, default: u64| d.map_or(default, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        timeouts.connect_ms = ms(state.timeouts[0], timeouts.connect_ms);
        timeouts.send_ms = ms(state.timeouts[1], timeouts.send_ms);
        timeouts.read_ms = ms(state.timeouts[2], timeouts.read_ms);
    }
    let idempotent = request.method().is_idempotent();
    let picker = LuaPeers { worker, target, chain, lua };
    let mut attempts = Attempts::picked(first, Box::new(picker), &target.action.upstream.retry, idempotent);
    let label = || format!("Lua balancer of {}", target.name);
    match exchange(worker, conn, target, &mut attempts, request, timeouts, outcome, label).await {
        Ok(response) => finish(response, client_upgrade, timeouts),
        Err(answer) => answer,
    }
}

/// Runs the balancer handlers for one try (after `failure`, for a further one) and takes the
/// peer they set; `Err` is the answer when they fail.
async fn pick(
    worker: &Worker,
    target: &Target,
    chain: &LuaChain,
    lua: &Rc<LuaRequest>,
    failure: Option<Cause>,
) -> Result<Option<SocketAddr>, Response<LocalBody>> {
    {
        let mut state = lua.state.balancer.borrow_mut();
        let state = state.get_or_insert_with(Box::default);
        state.tries += 1;
        state.peer = None;
        state.last_failure = failure.map(|cause| match cause {
            Cause::Status(status) => ("next", Some(status)),
            Cause::Timeout => ("failed", Some(504)),
            Cause::Error | Cause::InvalidHeader => ("failed", Some(502)),
        });
    }
    match worker.vm.run(lua, Phase::Balancer, chain.phase(Phase::Balancer)).await {
        LuaOutcome::Failed { kind, message } => {
            Err(super::lua::failed(worker, &target.name, Phase::Balancer, kind, &message, Some(lua)))
        }
        // ngx.exit and ngx.exec are refused in this phase.
        LuaOutcome::Continue | LuaOutcome::Exit(_) | LuaOutcome::Exec => {
            Ok(lua.state.balancer.borrow_mut().as_mut().and_then(|state| state.peer.take()))
        }
    }
}

/// The further tries of a request, as its balancer handlers pick them.
struct LuaPeers<'a> {
    worker: &'a Rc<Worker>,
    target: &'a Target,
    chain: &'a LuaChain,
    lua: &'a Rc<LuaRequest>,
}

impl PickPeer for LuaPeers<'_> {
    fn next(&self, cause: Cause) -> Pin<Box<dyn Future<Output = Option<SocketAddr>> + '_>> {
        Box::pin(async move {
            {
                let mut state = self.lua.state.balancer.borrow_mut();
                let state = state.as_mut()?;
                if state.more_tries == 0 {
                    return None;
                }
                state.more_tries -= 1;
            }
            pick(self.worker, self.target, self.chain, self.lua, Some(cause)).await.ok().flatten()
        })
    }
}
