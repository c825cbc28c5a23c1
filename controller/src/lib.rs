//! tidegate's control plane.
//!
//! Objects come from a folder of manifests ([`manifests`]) or, in a cluster, from the API
//! server; [`translate()`] turns them into a [`tidegate_snapshot::Snapshot`] plus a status per
//! object. Translation is pure; everything that touches files, clocks or networks lives at the
//! edges.
#![forbid(unsafe_code)]

pub mod election;
pub mod luaroute;
pub mod manifests;
pub mod metrics;
pub mod objects;
pub mod publish;
pub mod replicas;
pub mod report;
pub mod source;
pub mod status;
pub mod status_writer;
pub mod translate;
mod validate;
pub mod watch;

pub use objects::{Inputs, ObjectRef, Options};
pub use status::{ObjectStatus, Problem, Reason, Severity};
pub use translate::{Translation, translate};
