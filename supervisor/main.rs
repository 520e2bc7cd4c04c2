//! `ringrift-supervisor`: runs the RingRift pipeline daemons, one OS process each, and is the CLI
//! that controls them.

mod cli;
mod cluster;
mod core;
mod events;
mod http;
mod ipc;
mod leftovers;
mod logwriter;
mod os;
mod paths;
mod readiness;
mod server;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringrift::config::{self, Config};
use ringrift::protocol::{
    Emit, FromSupervisor, KillRequest, Request, StartRequest, StatusRequest, StopRequest, Targets,
};

use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use crate::paths::Paths;
// The OS modules by their short names (`crate::unix`, `crate::cgroup`, `crate::containment`).
use os::{cgroup, containment, unix};

#[derive(Parser)]
#[command(
    name = "ringrift-supervisor",
    version,
    about = "Runs the RingRift self-improvement pipeline's daemons, one OS process each, under one supervisor.",
    long_about = "Runs the RingRift self-improvement pipeline's daemons (sync, export, training, evaluation, \
promotion, health, scheduling, reaping), one OS process each, under one supervisor per root directory.\n\n\
The first command that needs a supervisor starts one in the background; every command talks to it over \
run/supervisor.sock. Logs: logs/master_loop.log (the supervisor), logs/<daemon>.log (each daemon).\n\n\
Exit codes: 0 done, 1 an operation failed, 2 bad input (unknown name, invalid configuration), \
3 no supervisor running."
)]
struct Cli {
    /// Root directory holding config/, logs/, run/ and data/ [default: current directory]
    #[arg(long, global = true, env = "RINGRIFT_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    /// Configuration file [default: <root>/config/unified_loop.yaml, else the embedded default]
    #[arg(long, global = true, env = "RINGRIFT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// `queue` subcommands.
#[derive(Subcommand)]
enum QueueCommand {
    /// Items, newest first, and the count per status. In a cluster: pending and running items of
    /// the shared queue (running ones with the node that runs them) and the dead-lettered ones
    List {
        /// Only items with this status: pending, claimed, running, completed, failed, timeout (in
        /// a cluster: pending, running, failed; a completed item leaves the shared queue)
        #[arg(long)]
        status: Option<String>,
        /// At most this many items (in a cluster: of each status)
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: u64,
        /// Machine-readable output (a JSON list of items)
        #[arg(long)]
        json: bool,
    },
    /// One item: what it asks for, who claimed it, when, and why it failed
    Show {
        /// The item's id (the ID column of `queue list`)
        id: i64,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Makes a failed or timed-out item pending again, with its attempts reset (in a cluster: a
    /// dead-lettered item is queued again as a new item, whose id is printed)
    Retry {
        /// The item's id
        id: i64,
    },
    /// Cancels an item no job runs yet (pending or claimed): it becomes failed, "cancelled by
    /// the operator"; a running item's job ends by itself within its maximum runtime. In a
    /// cluster: a pending or running item is removed from the shared queue, and the node running
    /// it stops its job (within a third of cluster.work_ack_wait)
    Cancel {
        /// The item's id
        id: i64,
    },
}

/// `pipeline` subcommands.
#[derive(Subcommand)]
enum PipelineCommand {
    /// Clears a config key's failure backoff: training_trigger's failed runs, auto_export's
    /// retry schedule and evaluation's failed attempts of the key's candidates. Works with or
    /// without a running supervisor (the daemons apply it at their next look at the key)
    ResetBackoff {
        /// The config key, one of pipeline.config_keys (e.g. hex8_2p)
        key: String,
    },
}

/// `cluster` subcommands.
#[derive(Subcommand)]
enum ClusterCommand {
    /// Every node of the cluster with its roles, daemons, jobs and how long ago it was last seen
    Status {
        /// Machine-readable output (the same JSON as GET /cluster/status)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Start daemons (booting the supervisor if needed); waits until they are RUNNING
    Start {
        /// Daemon names (any case: AUTO_SYNC or auto_sync); their dependencies start first
        names: Vec<String>,
        /// Every daemon enabled in the configuration
        #[arg(long)]
        all: bool,
        /// The daemons of a profile: coordinator, training_node, ephemeral, selfplay, full, minimal
        #[arg(long, value_name = "PROFILE")]
        profile: Option<String>,
        /// Run the supervisor in this terminal (for systemd units and containers); Ctrl-C stops everything
        #[arg(long)]
        foreground: bool,
        /// Return once the request is accepted instead of waiting for RUNNING
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the daemons to come up
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Stop daemons; daemons that depend on them stop first
    Stop {
        names: Vec<String>,
        /// Every daemon
        #[arg(long)]
        all: bool,
        /// Skip the grace period: SIGKILL to each daemon's process group at once
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the daemons to stop
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Stop daemons with a signal sent at once (SIGKILL unless --signal says otherwise)
    Kill {
        /// Daemon names; daemons that depend on them stop first, by the same signal
        #[arg(required = true)]
        names: Vec<String>,
        /// The signal: a name (TERM, SIGINT, ...) or a number; SIGKILL follows after the grace
        /// period if the process group is still alive [default: KILL]
        #[arg(long, short = 's', value_name = "SIG")]
        signal: Option<String>,
        /// Seconds to wait for the daemons to stop
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Restart daemons (a new process each); clears FAILED
    Restart {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Pause daemons: they stay alive but run no cycles (plain programs are frozen: cgroup.freeze, else SIGSTOP)
    Pause {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Resume paused daemons
    Resume {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show every daemon's state, pid, uptime, restarts and health
    Status {
        /// Show only this daemon
        name: Option<String>,
        /// Machine-readable output (the format is documented in the README)
        #[arg(long)]
        json: bool,
    },
    /// The cluster this node belongs to (`cluster.enabled`): `cluster status`
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// The work queue: list, show, retry or cancel items. On a single node it is
    /// data/work_queue.db, read with or without a running supervisor; on a node in a cluster
    /// (cluster.enabled) it is the cluster's shared queue, which this node's supervisor reads
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// The self-improvement loop: `pipeline reset-backoff KEY`
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Show a daemon's log (logs/<daemon>.log), or the supervisor's with `master_loop`
    Logs {
        name: String,
        /// Number of lines
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Keep printing new lines as they are written
        #[arg(short, long)]
        follow: bool,
    },
    /// One JOB_REAPER pass now: stop overdue and stuck jobs, orphans of earlier runs, poke zombies' parents
    Reap {
        /// Print what would be stopped, stop nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the event stream: the retained history, then (with -f) new events as they come
    Events {
        /// Keep printing new events
        #[arg(short, long)]
        follow: bool,
        /// Only this event type (repeatable), e.g. --type NEW_GAMES_AVAILABLE
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Only events after this sequence number (fetched page by page up to the newest)
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Only the newest N events of the history (at most what is retained: 100,000)
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<usize>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
        /// Only the types that cross the cluster (this node's and other nodes'; an event from
        /// another node shows its source as NODE/SOURCE)
        #[arg(long)]
        cluster: bool,
    },
    /// Live view of daemons (state, pid, uptime, restarts, CPU, RSS, health) and the latest events; q quits
    Watch {
        /// Print one frame and exit
        #[arg(long)]
        once: bool,
    },
    /// Publish one event, validated against its type's payload schema
    Emit {
        /// Event type, e.g. NEW_GAMES_AVAILABLE
        event_type: String,
        /// JSON payload, e.g. '{"config_key": "hex8_2p", "new_games": 100}'
        payload: String,
    },
    /// Re-read the configuration and apply only what changed (same as SIGHUP)
    Reload,
    /// Stop every daemon, dependents first, then the supervisor
    Shutdown {
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Configuration commands
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Run the supervisor in this process without starting any daemon (what `start` boots)
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        foreground: bool,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate the configuration (with environment overrides) without starting anything
    Check,
}

fn main() {
    if let Some(code) = status_fast_path() {
        std::process::exit(code);
    }
    let cli = Cli::parse();
    let root = cli.root.clone().unwrap_or_else(|| PathBuf::from("."));
    let paths = Paths::new(&root);
    std::process::exit(run(cli, paths));
}

/// `status [NAME] [--json] [--root DIR]` without building clap's command tree first: `status` is what
/// scripts and monitoring call in loops, and most of its cost is process start-up. Anything else
/// (help, other flags, other commands) goes through clap as usual.
fn status_fast_path() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != "status" {
        return None;
    }
    let (mut name, mut json, mut root) = (
        None,
        false,
        std::env::var_os("RINGRIFT_ROOT").map(PathBuf::from),
    );
    while let Some(a) = args.next() {
        let text = a.to_str()?;
        match text {
            "--json" => json = true,
            "--root" => root = Some(PathBuf::from(args.next()?)),
            _ if text.starts_with('-') => return None,
            _ if name.is_none() => name = Some(text.to_string()),
            _ => return None,
        }
    }
    let paths = Paths::new(&root.unwrap_or_else(|| PathBuf::from(".")));
    Some(status(&paths, name, json))
}

fn status(paths: &Paths, name: Option<String>, json: bool) -> i32 {
    let mut client = match cli::connect_or_explain(paths) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.call(
        &Request::Status(StatusRequest { name }),
        Duration::from_secs(10),
    ) {
        Ok(FromSupervisor::Status(report)) => {
            if json {
                let mut text = serde_json::to_string_pretty(&report).expect("status serializes");
                text.push('\n');
                use std::io::Write as _;
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
            } else {
                cli::print_status(&report);
            }
            0
        }
        Ok(other) => cli::report(&other),
        Err(msg) => {
            eprintln!("error: {msg}");
            EXIT_FAILED
        }
    }
}

fn load_config(paths: &Paths, explicit: Option<&std::path::Path>) -> Result<Config, i32> {
    config::load(&paths.root, explicit).map_err(|e| {
        eprint!("error: {e}");
        EXIT_USAGE
    })
}

fn run(cli: Cli, paths: Paths) -> i32 {
    let config_path = cli
        .config
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    match cli.command {
        Command::Config {
            action: ConfigAction::Check,
        } => match config::load_checked(&paths.root, config_path.as_deref()) {
            Err(e) => {
                eprint!("error: {e}");
                EXIT_USAGE
            }
            // Programs that cannot be run are only warned about by `start`; the check refuses
            // those `start --all` needs, and notes those of disabled daemons.
            Ok((_, missing)) if !missing.needed.is_empty() => {
                eprint!(
                    "error: {}",
                    config::ConfigError {
                        problems: missing.needed
                    }
                );
                EXIT_USAGE
            }
            Ok((c, missing)) => {
                for p in missing.disabled {
                    eprintln!("note: {p}");
                }
                let enabled = c.enabled();
                println!(
                    "{}: ok ({} daemons, {} enabled: {})",
                    c.source,
                    c.daemons.len(),
                    enabled.len(),
                    enabled.into_iter().collect::<Vec<_>>().join(", ")
                );
                0
            }
        },
        Command::Serve { foreground } => {
            let config = match load_config(&paths, config_path.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            server::serve(server::ServeOptions {
                paths,
                config,
                config_path,
                foreground,
                initial: None,
            })
        }
        Command::Start {
            names,
            all,
            profile,
            foreground,
            no_wait,
            timeout,
        } => {
            // A bad configuration is refused before anything starts; a program that cannot be
            // run now is a warning (its daemon's spawn fails and `status` says why).
            let config = match config::load_checked(&paths.root, config_path.as_deref()) {
                Ok((c, missing)) => {
                    for p in missing.needed {
                        eprintln!("warning: {p}");
                    }
                    c
                }
                Err(e) => {
                    eprint!("error: {e}");
                    return EXIT_USAGE;
                }
            };
            let mut start = StartRequest {
                names,
                all,
                profile,
                no_wait,
            };
            if foreground {
                // The supervisor is this process: its initial start cannot wait for an answer.
                start.no_wait = true;
                let request = Request::Start(start);
                if cli::Client::connect(&paths).is_ok() {
                    eprintln!(
                        "error: a supervisor is already running on {}; use `start` without --foreground to talk to it",
                        paths.root.display()
                    );
                    return EXIT_FAILED;
                }
                return server::serve(server::ServeOptions {
                    paths,
                    config,
                    config_path,
                    foreground: true,
                    initial: Some(request),
                });
            }
            let mut client = match cli::Client::connect(&paths) {
                Ok(c) => c,
                Err(cli::ConnectError::NotRunning) => {
                    match cli::boot_background(&paths, config_path.as_deref()) {
                        Ok(c) => c,
                        Err(msg) => {
                            eprintln!("error: {msg}");
                            return EXIT_FAILED;
                        }
                    }
                }
                Err(cli::ConnectError::Other(msg)) => {
                    eprintln!("error: {msg}");
                    return EXIT_FAILED;
                }
            };
            let code = call_and_report(&mut client, &Request::Start(start), timeout);
            warn_if_http_is_off(&paths);
            code
        }
        Command::Stop {
            names,
            all,
            force,
            timeout,
        } => with_client(
            &paths,
            &Request::Stop(StopRequest { names, all, force }),
            timeout,
        ),
        Command::Kill {
            names,
            signal,
            timeout,
        } => with_client(
            &paths,
            &Request::Kill(KillRequest { names, signal }),
            timeout,
        ),
        Command::Restart { names, timeout } => {
            with_client(&paths, &Request::Restart(Targets { names }), timeout)
        }
        Command::Pause { names } => with_client(&paths, &Request::Pause(Targets { names }), 30),
        Command::Resume { names } => with_client(&paths, &Request::Resume(Targets { names }), 30),
        Command::Reload => with_client(&paths, &Request::Reload, 30),
        Command::Emit {
            event_type,
            payload,
        } => {
            let payload: serde_json::Value = match serde_json::from_str(&payload) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: the payload is not valid JSON: {e}");
                    return EXIT_USAGE;
                }
            };
            // Checked here too, so a mistake is explained even when no supervisor runs.
            if let Err(e) = ringrift::events::validate(&event_type, &payload) {
                eprintln!("error: {e}");
                return EXIT_USAGE;
            }
            let mut client = match cli::connect_or_explain(&paths) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match client.call(
                &Request::Emit(Emit {
                    event_type,
                    payload,
                    source: None,
                }),
                Duration::from_secs(10),
            ) {
                Ok(FromSupervisor::Emitted {
                    seq,
                    id,
                    event_type,
                }) => {
                    println!("{event_type} accepted: seq {seq}, id {id}");
                    0
                }
                Ok(other) => cli::report(&other),
                Err(msg) => {
                    eprintln!("error: {msg}");
                    EXIT_FAILED
                }
            }
        }
        Command::Watch { once } => match cli::connect_or_explain(&paths) {
            Ok(mut client) => watch::run(&mut client, once),
            Err(code) => code,
        },
        Command::Events {
            follow,
            types,
            since,
            lines,
            json,
            cluster,
        } => {
            let mut types = types;
            if cluster && types.is_empty() {
                types = ringrift::events::CLUSTER_WIDE
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
            }
            let mut client = match cli::connect_or_explain(&paths) {
                Ok(c) => c,
                Err(code) => return code,
            };
            cli::print_events(
                &mut client,
                &cli::EventsQuery {
                    since,
                    types,
                    follow,
                    newest: lines,
                    json,
                },
            )
        }
        Command::Reap { dry_run } => {
            let config = match load_config(&paths, config_path.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let empty = serde_json::Map::new();
            let settings = config
                .daemons
                .get("job_reaper")
                .and_then(|d| d.settings.as_object())
                .unwrap_or(&empty);
            // The same typed settings the job_reaper daemon uses (checked when the config loaded).
            let reaper = match ringrift::settings::ReaperSettings::from_map(settings) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: job_reaper: {e}");
                    return EXIT_USAGE;
                }
            };
            let mut cmd = std::process::Command::new(server::worker_binary());
            cmd.arg("reap").arg("--root").arg(&paths.root);
            cmd.arg("--stuck-after")
                .arg(reaper.stuck_after.as_secs_f64().to_string());
            cmd.arg("--grace")
                .arg(reaper.reap_grace.as_secs_f64().to_string());
            if dry_run {
                cmd.arg("--dry-run");
            }
            match cmd.status() {
                Ok(s) => s.code().unwrap_or(EXIT_FAILED),
                Err(e) => {
                    eprintln!(
                        "error: cannot run {}: {e}",
                        server::worker_binary().display()
                    );
                    EXIT_FAILED
                }
            }
        }
        Command::Pipeline {
            command: PipelineCommand::ResetBackoff { key },
        } => match load_config(&paths, config_path.as_deref()) {
            Ok(config) => cli::reset_backoff(&paths, &config, &key),
            Err(code) => code,
        },
        Command::Shutdown { timeout } => with_client(&paths, &Request::Shutdown, timeout),
        Command::Status { name, json } => status(&paths, name, json),
        Command::Cluster {
            command: ClusterCommand::Status { json },
        } => match cli::connect_or_explain(&paths) {
            Ok(mut client) => cli::cluster_status(&mut client, json),
            Err(code) => code,
        },
        Command::Queue { command } => {
            let in_cluster =
                config::load(&paths.root, config_path.as_deref()).is_ok_and(|c| c.cluster.enabled);
            let (action, json) = match command {
                QueueCommand::List {
                    status,
                    limit,
                    json,
                } => (
                    cli::QueueAction::List {
                        // Statuses in either case, as daemon names.
                        status: status.map(|s| s.to_ascii_lowercase()),
                        limit,
                    },
                    json,
                ),
                QueueCommand::Show { id, json } => (cli::QueueAction::Show { id }, json),
                QueueCommand::Retry { id } => (cli::QueueAction::Retry { id }, false),
                QueueCommand::Cancel { id } => (cli::QueueAction::Cancel { id }, false),
            };
            // Which queue is the running supervisor's to say (a changed cluster section takes
            // effect only when it next starts); without one, the configuration's.
            match cli::Client::connect(&paths) {
                Ok(mut client) => {
                    match client.call(&Request::ClusterStatus, Duration::from_secs(10)) {
                        Ok(FromSupervisor::Cluster(_)) => {
                            cli::shared_queue(&mut client, action, json)
                        }
                        _ => cli::queue(&paths.root, action, json),
                    }
                }
                Err(_) if in_cluster => {
                    eprintln!(
                        "error: no supervisor is running on {}: on a node in a cluster the shared \
                         work queue is read through it; start it (`ringrift-supervisor start ...`)",
                        paths.root.display()
                    );
                    cli::EXIT_NOT_RUNNING
                }
                Err(_) => cli::queue(&paths.root, action, json),
            }
        }
        Command::Logs {
            name,
            lines,
            follow,
        } => {
            let file = if ringrift::catalog::normalize(&name) == "master_loop" {
                paths.master_log.clone()
            } else {
                let config = match load_config(&paths, config_path.as_deref()) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                match config.resolve(&name) {
                    Ok(n) => paths.daemon_log(&n),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return EXIT_USAGE;
                    }
                }
            };
            cli::show_logs(&file, lines, follow)
        }
    }
}

fn with_client(paths: &Paths, request: &Request, timeout: u64) -> i32 {
    match cli::connect_or_explain(paths) {
        Ok(mut client) => call_and_report(&mut client, request, timeout),
        Err(code) => code,
    }
}

/// `start`'s warning when the supervisor could not bind its HTTP address: monitoring that the
/// configuration asks for is off, and only master_loop.log would say so otherwise.
fn warn_if_http_is_off(paths: &Paths) {
    let Ok(mut client) = cli::Client::connect(paths) else {
        return;
    };
    if let Ok(FromSupervisor::Status(report)) = client.call(
        &Request::Status(StatusRequest::default()),
        Duration::from_secs(10),
    ) && let Some(why) = report.supervisor.http_error
    {
        eprintln!("warning: HTTP monitoring is off: {why} (set http.addr to another address)");
    }
}

fn call_and_report(client: &mut cli::Client, request: &Request, timeout: u64) -> i32 {
    match client.call(request, Duration::from_secs(timeout)) {
        Ok(answer) => cli::report(&answer),
        Err(msg) => {
            eprintln!("error: {msg}");
            EXIT_FAILED
        }
    }
}
