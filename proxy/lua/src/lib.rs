//! tidegate's Lua: one sandboxed Luau VM per worker thread, handlers compiled once, the
//! OpenResty `ngx` API.
//!
//! - [`compile()`] turns handler source into a [`Script`] (bytecode), or a [`CompileError`] with
//!   the Lua line; [`check`] only validates (what the controller and `tidegate validate` use).
//! - [`Vm`] is a worker's VM: [`Vm::begin`] starts a request, [`Vm::run`] runs a phase's
//!   handlers, which may wait on asynchronous calls in every phase.
//!
//! See `vm.rs` for how environments, coroutines and limits work.
#![deny(unsafe_code)]

mod api;
mod bytecode;
pub mod clock;
mod compile;
pub mod internal;
mod memory;
pub mod modules;
pub mod network;
mod pcre;
mod request;
mod shdict;
mod slice;
mod vm;

pub use api::output::join_output;
pub use compile::{CompileError, Script, check, compile};
pub use modules::NamespaceCode;
pub use request::{BalancerState, Phase, RequestHead, RequestId, RequestState, SslState};
pub use shdict::{DictStats, SharedDicts};
pub use slice::NamespaceLuaUse;
pub use vm::{BodyReader, FailureKind, InitWorker, LuaConfig, LuaRequest, Outcome, Vm};

#[cfg(test)]
mod tests;
