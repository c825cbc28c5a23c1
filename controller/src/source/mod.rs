//! Where objects come from, one source per mode, and where their translations go:
//!
//! - [`folder`]: a folder of manifests, watched (standalone mode, and a controller without a
//!   cluster);
//! - [`cluster`]: the Kubernetes API server, watched, with the leader election and the status
//!   writer (a controller in a cluster).
//!
//! Both translate what they hold with the same pure [`crate::translate()`] and offer it to
//! [`Publishing`], which feeds a [`Sink`]: the proxy in the same process, or the proxies that
//! subscribe to the controller. [`signals`] stops them.

pub mod cluster;
pub mod folder;
pub mod signals;
mod sink;

pub use sink::{Publishing, Sink, Stamp};
