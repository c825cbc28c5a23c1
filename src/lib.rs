//! The `tidegate` binary's wiring: subcommands assemble the controller and proxy crates.
#![forbid(unsafe_code)]

pub mod api_source;
pub mod cluster;
pub mod echo;
pub mod manifest_source;
pub mod standalone;
pub mod trust;
