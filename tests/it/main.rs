//! The integration tests: one binary (one link step), a module per area, shared helpers in
//! `common`. Every test starts the real binaries in a temporary root and stops what it started.

mod common;

mod bad_data;
mod cluster;
mod commands;
mod config;
mod containment;
mod control;
mod events;
mod fixtures;
mod http;
mod jobs;
mod parallel;
mod pipeline;
mod pipeline_jobs;
mod pipeline_view;
mod plugin;
mod queue;
mod resilience;
mod retention;
mod sync;
mod visible;
