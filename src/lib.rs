//! The `tidegate` binary's wiring: subcommands assemble the controller and proxy crates.
#![forbid(unsafe_code)]

pub mod echo;
pub mod standalone;
