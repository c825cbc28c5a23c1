//! The `tidegate` binary's wiring: subcommands assemble the controller and proxy crates.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod echo;
pub mod error;
pub mod standalone;
pub mod trust;
