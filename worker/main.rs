//! `ringrift-worker`: the process that runs one daemon for ringrift-supervisor.
//!
//! The supervisor spawns `ringrift-worker <daemon>` with the socket path in `RINGRIFT_SUPERVISOR_SOCKET`;
//! the worker says hello, takes its configuration from the welcome and runs the daemon's cycles until it
//! is told to stop. `ringrift-worker fault` is a deliberately misbehaving worker for integration tests.

mod daemons;
mod fault;
mod job_reaper;
mod jobs;
mod pipeline;
mod runtime;
mod unified_idle_shutdown;
mod unified_node_health;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::runtime::Quirks;

const AFTER_HELP: &str = "\
Daemons: auto_sync, ephemeral_sync, cluster_data_sync, model_distribution, training_trigger,
auto_export, evaluation, auto_promotion, unified_node_health, quality_monitor, idle_resource,
unified_idle_shutdown, queue_populator, selfplay_scheduler, job_reaper (either case).

Workers are started by the supervisor, which hands each its own connection (RINGRIFT_SUPERVISOR_FD);
to run a daemon, use `ringrift-supervisor start <daemon>`.";

#[derive(Debug, Parser)]
#[command(
    name = "ringrift-worker",
    version,
    about = "Runs one RingRift daemon under ringrift-supervisor",
    long_about = "Runs one RingRift daemon under ringrift-supervisor.\n\n\
        `ringrift-worker <DAEMON>` speaks to the supervisor on the connection it was handed at spawn \
        (RINGRIFT_SUPERVISOR_FD), reports its state, heartbeats, and runs the daemon's cycles until it is told to stop or \
        receives SIGTERM.\n\
        `ringrift-worker fault [OPTIONS]` is a worker that misbehaves on request (crashes, hangs, \
        floods its log, ...), for the supervisor's integration tests.",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The daemon to run
    #[arg(value_name = "DAEMON", required = true)]
    daemon: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the fault-injection worker (integration tests only)
    Fault(fault::FaultArgs),
    /// One JOB_REAPER pass over a root's process tree now (what `ringrift-supervisor reap` runs)
    Reap(job_reaper::ReapArgs),
    /// Run one reference pipeline job (selfplay, export, train, gauntlet) and exit
    Job(jobs::JobArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match (cli.command, cli.daemon) {
        (Some(Command::Fault(args)), _) => fault::main(args),
        (Some(Command::Reap(args)), _) => job_reaper::main(args),
        (Some(Command::Job(args)), _) => jobs::main(args),
        (None, Some(daemon)) => run_daemon(&daemon),
        // clap requires one of the two.
        (None, None) => {
            eprintln!("ringrift-worker: name a daemon to run (see --help)");
            ExitCode::from(2)
        }
    }
}

fn run_daemon(name: &str) -> ExitCode {
    let Some(daemon) = daemons::lookup(name) else {
        let valid: Vec<&str> = daemons::names().collect();
        eprintln!(
            "ringrift-worker: unknown daemon {name:?}; valid names: {}",
            valid.join(", ")
        );
        return ExitCode::from(2);
    };
    let connection = match ringrift::protocol::inherited_connection() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringrift-worker: {e}");
            return ExitCode::from(2);
        }
    };
    match tokio_runtime("ringrift-worker") {
        Ok(rt) => rt.block_on(runtime::run(connection, daemon, Quirks::default())),
        Err(code) => code,
    }
}

/// The worker's single-threaded tokio runtime (daemon futures are not `Send`), or, when it cannot
/// start, exit code 1 after saying so on stderr as `<who>: failed to start the tokio runtime: ...`.
pub(crate) fn tokio_runtime(who: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{who}: failed to start the tokio runtime: {e}");
            ExitCode::FAILURE
        })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ringrift-worker").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_daemon_name_runs_that_daemon() {
        let cli = parse(&["auto_sync"]).unwrap();
        assert_eq!(cli.daemon.as_deref(), Some("auto_sync"));
        assert!(cli.command.is_none());
    }

    #[test]
    fn nothing_at_all_is_a_usage_error() {
        let err = parse(&[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn fault_options_combine() {
        let cli = parse(&[
            "fault",
            "--crash-after-ms",
            "250",
            "--grandchild",
            "--flood",
            "1000",
            "--print-every-ms",
            "10",
            "--no-protocol",
            "--ignore-sigterm",
        ])
        .unwrap();
        let Some(Command::Fault(args)) = cli.command else {
            panic!("expected the fault subcommand");
        };
        assert_eq!(
            args,
            fault::FaultArgs {
                crash_after_ms: Some(250),
                grandchild: true,
                flood: Some(1000),
                print_every_ms: Some(10),
                no_protocol: true,
                ignore_sigterm: true,
                ..fault::FaultArgs::default()
            }
        );
    }

    #[test]
    fn fault_with_no_options_is_a_plain_protocol_worker() {
        let Some(Command::Fault(args)) = parse(&["fault"]).unwrap().command else {
            panic!("expected the fault subcommand");
        };
        assert_eq!(args, fault::FaultArgs::default());
    }

    #[test]
    fn fault_refuses_bad_numbers_and_unknown_options() {
        assert!(parse(&["fault", "--print-every-ms", "0"]).is_err());
        assert!(parse(&["fault", "--flood", "-3"]).is_err());
        assert!(parse(&["fault", "--explode"]).is_err());
    }

    #[test]
    fn a_daemon_name_and_the_fault_subcommand_do_not_mix() {
        assert!(parse(&["auto_sync", "fault"]).is_err());
    }

    #[test]
    fn help_lists_every_daemon() {
        for name in daemons::names() {
            assert!(AFTER_HELP.contains(name), "{name} missing from --help");
        }
    }

    #[test]
    fn version_is_reported() {
        let err = parse(&["--version"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayVersion);
    }
}
