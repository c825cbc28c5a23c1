//! A response body read from its upstream connection as the client side polls it. When the
//! last byte is read the connection goes back to its pool there and then; a body dropped
//! before its end closes the connection, whose framing is lost.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::wire::ResponseFraming;
use super::{Pool, UpstreamConn};
use crate::framing::chunked::{Decoded, Decoder};
use crate::framing::spare;
use crate::http1::Detached;

/// Bytes read at most at once for body data.
const BODY_READ: usize = 64 * 1024;

enum State {
    Length(u64),
    Chunked(Decoder),
    UntilClose,
    /// The body is over (the connection went back to the pool or was closed), or the
    /// connection was switched to another protocol and waits to be taken.
    Done,
}

pub(crate) struct Http1Body {
    conn: Option<UpstreamConn>,
    state: State,
    /// Return the connection to `pool` at the end.
    reusable: bool,
    pool: Rc<Pool>,
}

impl Http1Body {
    pub(super) fn new(conn: UpstreamConn, framing: ResponseFraming, reusable: bool, pool: &Rc<Pool>) -> Self {
        let state = match framing {
            ResponseFraming::Length(n) => State::Length(n),
            ResponseFraming::Chunked => State::Chunked(Decoder::new()),
            ResponseFraming::UntilClose => State::UntilClose,
        };
        let mut body = Http1Body { conn: Some(conn), state, reusable, pool: Rc::clone(pool) };
        if matches!(body.state, State::Length(0)) {
            body.finish();
        }
        body
    }

    /// The body of a `101`: none; the connection waits for [`Self::take_switched`].
    pub(super) fn switched(conn: UpstreamConn, pool: &Rc<Pool>) -> Self {
        Http1Body { conn: Some(conn), state: State::Done, reusable: false, pool: Rc::clone(pool) }
    }

    /// The connection of a `101` answer, with what the upstream sent after its head.
    pub(crate) fn take_switched(&mut self) -> Option<Detached> {
        let conn = self.conn.take()?;
        Some(Detached::with_read(Box::new(conn.io), conn.buf.freeze()))
    }

    /// The end of the body: the connection goes back to the pool if it can carry another
    /// exchange (nothing unasked-for was read past the body).
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.pool.checkin(conn);
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl std::fmt::Debug for Http1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Body")
            .field("endpoint", &self.conn.as_ref().map(|c| c.endpoint))
            .field("end_stream", &self.is_end_stream())
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            let want = match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = conn.buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= n as u64;
                        let data = conn.buf.split_to(n).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    usize::try_from(*left).unwrap_or(usize::MAX).min(BODY_READ)
                }
                State::Chunked(decoder) => match decoder.decode(&mut conn.buf, BODY_READ) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => 8192,
                    Err(why) => return this.fail(io::Error::new(io::ErrorKind::InvalidData, why)),
                },
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(conn.buf.split().freeze()))));
                    }
                    BODY_READ
                }
            };
            spare::make_room(&mut conn.buf, want);
            match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the upstream closed before the end of the body");
                    return this.fail(e);
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) => SizeHint::with_exact(left),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
