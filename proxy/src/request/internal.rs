//! Internal requests, served without a connection of their own: subrequests
//! (`ngx.location.capture`) and internal redirects (`ngx.exec`, `ngx.req.set_uri(uri, true)`).
//!
//! Both go through the pipeline from its route step, on the asking request's host, and reach
//! only routes of the asking Lua's namespace: any other route is a 404 to them, as a location
//! nginx does not find. A subrequest runs as a task of its own (its Lua with its own CPU
//! budget and `ngx.ctx`, or the `ctx` its parent passed), and its response is read whole (at
//! most [`MAX_CAPTURE`]); it writes no access log line and runs no `log` Lua, as nginx does not
//! log subrequests. An internal redirect starts the pipeline again at the new URI with the
//! request's method, headers and body as Lua left them, and a new `ngx.ctx`; after
//! [`MAX_REDIRECTS`] of them the request fails with 500, as nginx's "internal redirection
//! cycle".

use std::rc::{Rc, Weak};

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tidegate_lua::LuaRequest;
use tidegate_lua::internal::{Captured, Inherited, Subrequest, Subrequests};

use super::context::Outcome;
use crate::body::{ClientBody, LocalBody};
use crate::connection::Connection;
use crate::respond::error_response;
use crate::router::{Match, RequestFacts, Target};
use crate::runtime::Runtime;
use crate::worker::Worker;

/// A captured response body is cut (and `truncated`) beyond this.
const MAX_CAPTURE: usize = 16 << 20;

/// Internal redirects one request may take (nginx's limit too).
const MAX_REDIRECTS: u8 = 10;

/// How far a request has gone inside the proxy.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Hops {
    /// How deep in subrequests it is (0: the client's request, redirected or not).
    pub(super) depth: u8,
    /// Internal redirects taken so far.
    pub(super) redirects: u8,
}

/// What an internal request carries into the Lua it reaches.
pub(super) struct Internal {
    pub(super) hops: Hops,
    pub(super) inherited: Inherited,
}

/// The hook the worker's VM serves `ngx.location.capture` with.
pub(crate) fn subrequests(worker: &Rc<Worker>) -> Subrequests {
    // Weak: the VM that keeps the hook belongs to the worker.
    let worker: Weak<Worker> = Rc::downgrade(worker);
    Rc::new(move |sub: Subrequest| {
        let worker = worker.upgrade();
        // Started now, so that capture_multi's subrequests run side by side.
        let task = tokio::task::spawn_local(async move {
            match worker {
                Some(worker) => capture(worker, sub).await,
                None => Captured { status: 500, ..Captured::default() },
            }
        });
        Box::pin(async move { task.await.unwrap_or(Captured { status: 500, ..Captured::default() }) })
    })
}

async fn capture(worker: Rc<Worker>, sub: Subrequest) -> Captured {
    let runtime = worker.current_runtime();
    let parent = &sub.parent;
    let conn = Connection::new(parent.remote, parent.server_port, parent.https, None);
    let mut request = Request::new(ClientBody::Internal(sub.body));
    *request.method_mut() = sub.method;
    *request.headers_mut() = sub.headers;
    *request.version_mut() = parent.version;
    match sub.uri.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return Captured { status: 404, ..Captured::default() },
    }
    let internal = Internal { hops: Hops { depth: sub.depth, redirects: 0 }, inherited: sub.inherited };
    let mut outcome = Outcome::default();
    let response =
        dispatch(&worker, &runtime, &conn, &parent.host, &parent.namespace, request, &mut outcome, internal).await;
    let (parts, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if read.len() + data.len() > MAX_CAPTURE {
                        read.extend_from_slice(&data[..MAX_CAPTURE - read.len()]);
                        truncated = true;
                        break;
                    }
                    read.extend_from_slice(&data);
                }
            }
            Err(_) => {
                truncated = true;
                break;
            }
        }
    }
    Captured { status: parts.status.as_u16(), headers: parts.headers, body: read.freeze(), truncated }
}

/// `ngx.exec`: the request goes on at the URI Lua named, from the route step, with the method,
/// headers and body as Lua left them and a new `ngx.ctx` (boxed: it may come back here).
#[allow(clippy::too_many_arguments)]
pub(super) async fn redirect(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    host: &str,
    lua: &LuaRequest,
    version: http::Version,
    unread: Option<ClientBody>,
    outcome: &mut Outcome,
    hops: Hops,
) -> Response<LocalBody> {
    let uri = lua.state.exec.borrow_mut().take().unwrap_or_default();
    if hops.redirects >= MAX_REDIRECTS {
        tracing::error!(
            route = outcome.route.as_deref().unwrap_or_default(),
            "rewrite or internal redirection cycle while internally redirecting to \"{uri}\""
        );
        return error_response(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let Ok(uri) = uri.parse::<http::Uri>() else {
        tracing::error!(route = &*lua.state.head.route, "ngx.exec: bad URI \"{uri}\"");
        return error_response(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let body = match lua.state.body.borrow().clone() {
        Some(bytes) => ClientBody::Internal(Some(bytes)),
        None => unread.unwrap_or(ClientBody::Internal(None)),
    };
    let mut request = Request::new(body);
    *request.uri_mut() = uri;
    *request.method_mut() = lua.state.method.borrow().clone();
    *request.headers_mut() = lua.state.headers.borrow().clone();
    *request.version_mut() = version;
    let internal = Internal { hops: Hops { redirects: hops.redirects + 1, ..hops }, inherited: Inherited::default() };
    let namespace = lua.state.head.namespace.clone();
    Box::pin(dispatch(worker, runtime, conn, host, &namespace, request, outcome, internal)).await
}

/// Routes an internal request among the namespace's routes of `host`, and serves it.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    worker: &Rc<Worker>,
    runtime: &Runtime,
    conn: &Connection,
    host: &str,
    namespace: &str,
    request: Request<ClientBody>,
    outcome: &mut Outcome,
    internal: Internal,
) -> Response<LocalBody> {
    let facts = RequestFacts { method: request.method().as_str(), headers: request.headers() };
    let target: &Target = match runtime.routing.router.find(host, request.uri().path(), facts) {
        Match::Route(target) | Match::DefaultBackend(target) if namespace_of(target) == namespace => target,
        _ => return error_response(StatusCode::NOT_FOUND),
    };
    outcome.route = Some(std::sync::Arc::clone(&target.name));
    if let Some(refusal) = &target.action.refusal {
        return error_response(StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    }
    let response = match &target.lua {
        Some(chain) => {
            Box::pin(super::lua::serve(worker, runtime, conn, target, chain, host, request, outcome, Some(internal)))
                .await
        }
        None => Box::pin(super::filtered_upstream(worker, runtime, conn, target, host, request, outcome)).await,
    };
    let mut response = target.filters.body_filter(response);
    for (name, value) in target.filters.response_headers() {
        response.headers_mut().insert(name, value.clone());
    }
    response
}

/// The namespace a route comes from: the first part of its name (`namespace/name/...`).
fn namespace_of(target: &Target) -> &str {
    match &target.lua {
        Some(chain) => &chain.namespace,
        None => target.name.split('/').next().unwrap_or_default(),
    }
}
