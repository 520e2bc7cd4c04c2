//! The shared vocabulary of ringrift-supervisor: no processes, no sockets.
//!
//! Protocol frames, the daemon catalog, configuration loading and validation, the dependency graph,
//! the lifecycle state machine and the restart policy all live here as plain data and functions, so
//! that the rules can be tested without starting a process.

pub mod catalog;
pub mod cgroupfs;
pub mod config;
pub mod config_key;
pub mod deps;
pub mod events;
pub mod lifecycle;
pub mod limits;
pub mod procfs;
pub mod protocol;
pub mod readiness;
pub mod reaper;
pub mod reload;
pub mod restart;
pub mod settings;
pub mod template;
pub mod timefmt;
pub mod watchdog;
