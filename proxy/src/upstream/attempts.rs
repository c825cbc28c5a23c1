//! The endpoints one request tries, as nginx's `proxy_next_upstream` allows: the first a
//! balancer chose, then others while the route's [`Retry`] says the failure is worth another
//! and tries and time remain. Nothing is tried again once any of the response went to the
//! client (the response head ends the attempts), and a request that may already have reached
//! an endpoint goes to another only when its method is idempotent (or `non_idempotent` is
//! set) and it has no body to send again.
//!
//! With Lua `balancer` handlers, Lua picks each endpoint instead ([`PickPeer`]), within the
//! same rules and the tries it allows (`set_more_tries`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tidegate_snapshot::{Balance, Retry};

use super::UpstreamError;
use super::balance::{Endpoints, Pick};

/// Why an attempt failed, in `proxy_next_upstream`'s terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// No connection, or one that broke before an answer (`error`).
    Error,
    /// No connection or no answer in time (`timeout`).
    Timeout,
    /// An answer that could not be read (`invalid_header`).
    InvalidHeader,
    /// An answer with this status (`http_NNN`).
    Status(u16),
}

impl Cause {
    pub(crate) fn of(error: &UpstreamError) -> Option<Cause> {
        match error {
            UpstreamError::Connect(..) | UpstreamError::Io(..) | UpstreamError::Tls(..) | UpstreamError::Http2(..) => {
                Some(Cause::Error)
            }
            UpstreamError::ConnectTimeout(_) | UpstreamError::ReadTimeout(_) | UpstreamError::SendTimeout(_) => {
                Some(Cause::Timeout)
            }
            UpstreamError::Malformed(..) => Some(Cause::InvalidHeader),
            // The client's own body failed: no endpoint would do better.
            UpstreamError::ClientBody(..) => None,
        }
    }
}

/// Picks the endpoint of each further try from outside the route's balancer (Lua).
pub(crate) trait PickPeer {
    /// The endpoint after the current one failed for `cause`; `None` ends the tries.
    fn next(&self, cause: Cause) -> Pin<Box<dyn Future<Output = Option<SocketAddr>> + '_>>;
}

/// The endpoints of one request.
pub(crate) struct Attempts<'a> {
    /// Where others come from, when the request came through a balancer.
    source: Option<(&'a Endpoints, &'a Balance, &'a Retry)>,
    /// Who picks the others, when not the route's balancer.
    picker: Option<(Box<dyn PickPeer + 'a>, &'a Retry)>,
    key: Option<String>,
    current: Option<Pick>,
    address: SocketAddr,
    tried: Vec<SocketAddr>,
    /// When the first attempt began, when the route limits the time for others.
    started: Option<Instant>,
    idempotent: bool,
}

impl<'a> Attempts<'a> {
    /// Only `address` (a call to another service, as external auth's).
    pub(crate) fn one(address: SocketAddr) -> Attempts<'static> {
        Attempts {
            source: None,
            picker: None,
            key: None,
            current: None,
            address,
            tried: Vec::new(),
            started: None,
            idempotent: false,
        }
    }

    /// The first endpoint: `session`'s when it has one, else the one `balance` picks of
    /// `endpoints` (with the request's hash `key`); `None` when there is none.
    pub(crate) fn balanced(
        endpoints: &'a Endpoints,
        balance: &'a Balance,
        retry: &'a Retry,
        key: Option<String>,
        idempotent: bool,
        session: Option<SocketAddr>,
    ) -> Option<Attempts<'a>> {
        let pick = match session.and_then(|address| endpoints.find(address, balance)) {
            Some(pick) => pick,
            None => endpoints.pick(balance, key.as_deref(), &[])?,
        };
        Some(Attempts {
            source: Some((endpoints, balance, retry)),
            picker: None,
            key,
            current: Some(pick),
            address: pick.address,
            tried: Vec::new(),
            started: (retry.timeout_ms != 0).then(Instant::now),
            idempotent,
        })
    }

    /// The endpoint of the current attempt.
    pub(crate) fn endpoint(&self) -> SocketAddr {
        self.address
    }

    /// `first`, then what `picker` picks, under the route's `retry` rules.
    pub(crate) fn picked(
        first: SocketAddr,
        picker: Box<dyn PickPeer + 'a>,
        retry: &'a Retry,
        idempotent: bool,
    ) -> Attempts<'a> {
        Attempts {
            source: None,
            picker: Some((picker, retry)),
            key: None,
            current: None,
            address: first,
            tried: Vec::new(),
            started: (retry.timeout_ms != 0).then(Instant::now),
            idempotent,
        }
    }

    /// [`Attempts::next_after`] a failure, when it is one another endpoint may not have.
    pub(crate) async fn next_after_error(
        &mut self,
        error: &UpstreamError,
        sent: bool,
        replayable: bool,
    ) -> Option<SocketAddr> {
        match Cause::of(error) {
            Some(cause) => self.next_after(cause, sent, replayable).await,
            None => None,
        }
    }

    /// Another endpoint after the current one failed for `cause`, when the route allows it.
    /// `sent`: the request may have reached the endpoint (it went out, in part or whole);
    /// `replayable`: it can be sent again (it has no body).
    pub(crate) async fn next_after(&mut self, cause: Cause, sent: bool, replayable: bool) -> Option<SocketAddr> {
        if let Some((picker, retry)) = &self.picker {
            self.tried.push(self.address);
            if !self.may_retry(retry, cause, sent, replayable) {
                return None;
            }
            let next = picker.next(cause).await?;
            self.address = next;
            return Some(next);
        }
        self.next_balanced(cause, sent, replayable)
    }

    /// Whether `retry` lets a request that failed for `cause` go on to another endpoint.
    fn may_retry(&self, retry: &Retry, cause: Cause, sent: bool, replayable: bool) -> bool {
        let allowed = match cause {
            Cause::Error => retry.on_error,
            Cause::Timeout => retry.on_timeout,
            Cause::InvalidHeader => retry.on_invalid_header,
            Cause::Status(status) => retry.on_statuses.contains(&status),
        };
        let tries = if retry.tries == 0 { usize::MAX } else { usize::try_from(retry.tries).unwrap_or(usize::MAX) };
        let in_time = self.started.is_none_or(|at| at.elapsed() < Duration::from_millis(retry.timeout_ms));
        let resend = !sent || (replayable && (self.idempotent || retry.non_idempotent));
        allowed && resend && self.tried.len() < tries && in_time
    }

    fn next_balanced(&mut self, cause: Cause, sent: bool, replayable: bool) -> Option<SocketAddr> {
        let (endpoints, balance, retry) = self.source?;
        if let Some(pick) = self.current.take() {
            // A failure, for the balancer, whatever the cause.
            endpoints.finished(pick, None);
        }
        self.tried.push(self.address);
        if !self.may_retry(retry, cause, sent, replayable) {
            return None;
        }
        let pick = endpoints.pick(balance, self.key.as_deref(), &self.tried)?;
        self.current = Some(pick);
        self.address = pick.address;
        Some(pick.address)
    }

    /// Whether an answer with `status` may go on to another endpoint.
    pub(crate) fn retries_status(&self, status: u16) -> bool {
        let retry = self.source.map(|(_, _, retry)| retry).or(self.picker.as_ref().map(|(_, retry)| *retry));
        retry.is_some_and(|retry| retry.on_statuses.contains(&status))
    }

    /// The current attempt answered after `took` with `status` (or failed, `None`): what the
    /// balancer learns.
    pub(crate) fn finished(&mut self, answered: Option<(Duration, u16)>) {
        if let (Some((endpoints, ..)), Some(pick)) = (self.source, self.current.take()) {
            endpoints.finished(pick, answered);
        }
    }
}

impl Drop for Attempts<'_> {
    /// An attempt nobody reported: the client went away while it waited. The endpoint's
    /// request in progress ends, and counts neither for nor against its health.
    fn drop(&mut self) {
        if let (Some((endpoints, ..)), Some(pick)) = (self.source, self.current.take()) {
            endpoints.abandoned(pick);
        }
    }
}
