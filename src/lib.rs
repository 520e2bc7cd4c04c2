//! The shared vocabulary of ringrift-supervisor: no processes, no sockets.
//!
//! Protocol frames, the daemon catalog, configuration loading and validation, the dependency graph,
//! the lifecycle state machine and the restart policy all live here as plain data and functions, so
//! that the rules can be tested without starting a process. The one exception is [`os`]: the
//! readers of /proc and cgroupfs that the supervisor, the worker and the tests share.

#![warn(missing_docs)]

pub mod backoff;
pub mod catalog;
pub mod config;
pub mod config_key;
pub mod deps;
pub mod events;
pub mod lifecycle;
pub mod limits;
pub mod os;
pub mod pipeline_view;
pub mod plan;
pub mod protocol;
pub mod ratings;
pub mod readiness;
pub mod reaper;
pub mod reload;
pub mod restart;
pub mod retention;
pub mod settings;
pub mod sprt;
pub mod sqlite;
pub mod template;
pub mod timefmt;
pub mod watchdog;
pub mod work_queue;

// Short paths for the OS readers, used throughout the binaries and tests.
pub use os::{cgroupfs, procfs};
