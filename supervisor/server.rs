//! Boots the supervisor process: lock the root, open the logs, bind the socket, wire signals and
//! the orphan reaper to the core loop, then run until shutdown.

use std::path::PathBuf;
use std::sync::Arc;

use ringrift::config::Config;
use tokio::signal::unix::{SignalKind as TokioSignal, signal};
use tokio::sync::mpsc;

use crate::core::{Core, Msg, SignalKind};
use crate::logwriter::SupervisorLog;
use crate::paths::{self, Paths};
use crate::unix::{self, OwnedPids};

pub(crate) struct ServeOptions {
    pub paths: Paths,
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub foreground: bool,
    /// Daemons to start as soon as the supervisor is up (used by `start --foreground`).
    pub initial: Option<ringrift::protocol::Request>,
}

/// Runs the supervisor in this process. Returns the process exit code.
pub(crate) fn serve(opts: ServeOptions) -> i32 {
    // First of all: nothing the caller left open (a pipe to `| cat`, an ssh channel, a CI step's
    // output) may stay open in the supervisor, or the caller would wait for it forever.
    unix::close_inherited();
    let paths = opts.paths.clone();
    if let Err(e) = paths.prepare_dirs() {
        eprintln!(
            "error: cannot create {} or {}: {e}",
            paths.run_dir.display(),
            paths.logs_dir.display()
        );
        return 1;
    }
    let lock = match lock_when_free(&paths) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let log = match SupervisorLog::open(
        &paths.master_log,
        opts.config.logs.max_bytes,
        opts.config.logs.max_files,
    ) {
        Ok(l) => Arc::new(l.mirror_stderr(opts.foreground)),
        Err(e) => {
            eprintln!("error: cannot open {}: {e}", paths.master_log.display());
            return 1;
        }
    };
    if let Err(e) = paths::write_pid_file(&paths) {
        fatal(
            &log,
            opts.foreground,
            &format!("cannot write {}: {e}", paths.pid_file.display()),
        );
        return 1;
    }
    crate::leftovers::clean(&paths, &log);
    if let Err(e) = unix::become_subreaper() {
        log.warn(&format!(
            "cannot become a child subreaper ({e}): orphaned grandchildren will go to init"
        ));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            fatal(
                &log,
                opts.foreground,
                &format!("cannot start the runtime: {e}"),
            );
            return 1;
        }
    };
    let socket_id = std::sync::Arc::new(std::sync::Mutex::new(None));
    let code = runtime.block_on(run(opts, log.clone(), socket_id.clone()));
    // Remove only what is ours: never a socket or pid file some other process put in their place.
    let ours = *socket_id.lock().expect("socket id lock");
    if ours.is_some() && paths::file_id(&paths.socket) == ours {
        let _ = std::fs::remove_file(&paths.socket);
    }
    if std::fs::read_to_string(&paths.pid_file)
        .is_ok_and(|p| p.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(&paths.pid_file);
    }
    drop(lock);
    code
}

/// The (device, inode) of the socket this supervisor bound last.
/// None before it is bound and after the supervisor removed it on purpose (shutdown).
pub(crate) type SocketId = std::sync::Arc<std::sync::Mutex<Option<(u64, u64)>>>;

/// How often the supervisor checks that run/ and its socket are still there.
const RUN_DIR_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the control socket for the supervisor's whole life. If run/ or the socket vanish
/// (`rm -rf run/`), they are made again within [`RUN_DIR_CHECK`]: a CLI then finds this supervisor
/// instead of booting a second one (which the lock on the root directory would refuse anyway).
async fn keep_serving(
    paths: Paths,
    listener: tokio::net::UnixListener,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    open: crate::ipc::OpenConnections,
    socket_id: SocketId,
) {
    let mut serving = tokio::spawn(crate::ipc::serve(
        listener,
        core.clone(),
        log.clone(),
        open.clone(),
    ));
    let mut check = tokio::time::interval(RUN_DIR_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        check.tick().await;
        ticks += 1;
        // Bursts (a flood of HTTP bodies, a cut-off client) leave freed memory in the allocator;
        // hand it back now and then so that RSS reflects what is in use (glibc only; cheap).
        if ticks.is_multiple_of(30) {
            crate::ipc::release_free_memory();
        }
        let ours = *socket_id.lock().expect("socket id lock");
        if ours.is_none() || paths::file_id(&paths.socket) == ours {
            continue;
        }
        log.warn(&format!(
            "{} is gone (run/ deleted?); making it again",
            paths.socket.display()
        ));
        let listener = match paths
            .prepare_dirs()
            .and_then(|()| crate::ipc::bind(&paths.socket))
        {
            Ok(l) => l,
            Err(e) => {
                log.error(&format!(
                    "cannot make {} again: {e}; retrying in {} s",
                    paths.socket.display(),
                    RUN_DIR_CHECK.as_secs()
                ));
                continue;
            }
        };
        *socket_id.lock().expect("socket id lock") = paths::file_id(&paths.socket);
        if let Err(e) = paths::write_pid_file(&paths) {
            log.warn(&format!("cannot write {}: {e}", paths.pid_file.display()));
        }
        serving.abort();
        serving = tokio::spawn(crate::ipc::serve(
            listener,
            core.clone(),
            log.clone(),
            open.clone(),
        ));
        let _ = core.send(Msg::RunDirRecreated);
    }
}

async fn run(opts: ServeOptions, log: Arc<SupervisorLog>, socket_id: SocketId) -> i32 {
    let paths = opts.paths;
    // The event log first: a supervisor that cannot open it exits before any client can connect
    // (and then see its connection reset instead of the reason in run/supervisor.stderr).
    let events_dir = paths.root.join("data/events");
    let events = match crate::events::Router::open(&events_dir, crate::events::Limits::default()) {
        Ok((r, warnings)) => {
            for w in warnings {
                log.warn(&format!("events: {w}"));
            }
            r
        }
        Err(e) => {
            fatal(
                &log,
                opts.foreground,
                &format!("cannot open the event log: {e}"),
            );
            return 1;
        }
    };
    let listener = match crate::ipc::bind(&paths.socket) {
        Ok(l) => l,
        Err(e) => {
            fatal(
                &log,
                opts.foreground,
                &format!("cannot listen on {}: {e}", paths.socket.display()),
            );
            return 1;
        }
    };
    *socket_id.lock().expect("socket id lock") = paths::file_id(&paths.socket);
    log.info(&format!(
        "supervisor {} started: pid {}, root {}, config {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        paths.root.display(),
        opts.config.source
    ));
    let (tx, rx) = mpsc::unbounded_channel();
    let owned = OwnedPids::default();

    // Signals. SIGCHLD drives the orphan reaper; the others go to the core.
    for (kind, sig) in [
        (SignalKind::Terminate, TokioSignal::terminate()),
        (SignalKind::Interrupt, TokioSignal::interrupt()),
        (SignalKind::Hangup, TokioSignal::hangup()),
    ] {
        match signal(sig) {
            Ok(mut stream) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if tx.send(Msg::Signal(kind)).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => log.error(&format!("cannot handle {kind:?}: {e}")),
        }
    }
    match signal(TokioSignal::child()) {
        Ok(mut stream) => {
            let tx = tx.clone();
            let owned = owned.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if !unix::reap_orphans(&owned).is_empty() && tx.send(Msg::Reaped).is_err() {
                        break;
                    }
                }
            });
        }
        Err(e) => log.error(&format!("cannot handle SIGCHLD: {e}")),
    }

    let open = crate::ipc::OpenConnections::default();
    let keeper = tokio::spawn(keep_serving(
        paths.clone(),
        listener,
        tx.clone(),
        log.clone(),
        open.clone(),
        socket_id.clone(),
    ));

    if let Some(initial) = opts.initial {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Msg::Request {
            frame: initial,
            reply: reply_tx,
            stream: None,
            from: crate::core::Requester::Supervisor,
        });
        let log = log.clone();
        tokio::spawn(async move {
            if let Ok(answer) = reply_rx.await {
                log.info(&format!(
                    "initial start: {}",
                    crate::cli::summarize(&answer)
                ));
            }
        });
    }

    let opts_http = opts.config.http.clone();
    let http_tx = tx.clone();
    let run_dir = paths.run_dir.clone();
    let disabled = (opts.config.containment == ringrift::config::ContainmentMode::ProcessGroup)
        .then_some("disabled by the configuration (containment: process-group)");
    let (containment, notes) =
        crate::containment::Containment::new(&paths.root, &paths.run_dir, disabled);
    for note in notes {
        log.warn(&note);
    }
    match (containment.subtree_dir(), &containment.why_not) {
        (Some(dir), _) => log.info(&format!(
            "containment: a cgroup per daemon and job under {}",
            dir.display()
        )),
        (None, why) => log.warn(&format!(
            "containment: no cgroups ({}); process groups plus a sweep by environment markers",
            why.as_deref().unwrap_or("unknown reason")
        )),
    }
    let cluster_cfg = opts.config.cluster.clone();
    // The leases of the cluster-scoped daemons this node may run (`catalog::leases`).
    let cluster_leases: Vec<crate::cluster::Wanted> = opts
        .config
        .daemons
        .values()
        .filter(|d| d.enabled)
        .flat_map(|d| {
            ringrift::catalog::leases(&d.name, &opts.config.pipeline.config_keys)
                .into_iter()
                .map(|(name, config_key)| crate::cluster::Wanted {
                    name,
                    daemon: d.name.clone(),
                    config_key,
                })
        })
        .collect();
    let cluster_root = paths.root.clone();
    let cluster_tx = tx.clone();
    let core = Core::new(crate::core::CoreParts {
        paths,
        config: opts.config,
        config_path: opts.config_path,
        tx,
        log: log.clone(),
        owned,
        worker_bin: worker_binary(),
        events,
        containment,
    });
    let mut core = core;
    core.socket_id = socket_id.clone();
    if opts_http.enabled {
        match crate::http::start(&opts_http, &run_dir, http_tx, log.clone()) {
            Ok(bound) => {
                log.info(&format!("http: listening on http://{bound}"));
                core.http_addr = Some(bound.to_string());
            }
            Err(e) => {
                let why = format!("cannot listen on {}: {e}", opts_http.addr);
                log.error(&format!(
                    "http: {why}; monitoring over HTTP is off (set http.addr to change the address)"
                ));
                core.http_error = Some(why);
            }
        }
    }
    // The view of a previous run, if any, is not this run's: the membership task writes it anew
    // (and a node no longer in a cluster must not resolve `role:` targets from an old one).
    let _ = std::fs::remove_file(run_dir.join("cluster.json"));
    let cluster = if cluster_cfg.enabled {
        log.info(&format!(
            "cluster: node {} (roles {}), bus {}",
            cluster_cfg.node_id,
            cluster_cfg.roles.join(", "),
            cluster_cfg.servers_shown()
        ));
        core.mark_cluster_scoped(&cluster_leases);
        Some(crate::cluster::start(
            cluster_cfg,
            cluster_leases,
            cluster_root,
            core.http_addr.clone(),
            cluster_tx,
            log.clone(),
        ))
    } else {
        None
    };
    core.cluster = cluster.as_ref().map(|c| c.view.clone());
    core.work = cluster.as_ref().map(|c| c.work.clone());
    core.run(rx).await;
    // Every daemon has stopped: hand this node's leases over now rather than after their TTL.
    // Its shared work items too: another node takes them at once.
    if let Some(c) = &cluster {
        c.release_leases(std::time::Duration::from_secs(2)).await;
        c.release_work(std::time::Duration::from_secs(2)).await;
    }
    // The socket is gone on purpose now: it must not be made again while the last answers drain,
    // or a `start` right after the shutdown would reach this exiting supervisor.
    keeper.abort();
    // Let the last answers (the reply to `shutdown`) reach their clients, within a bound.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while open.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    0
}

/// A start-up failure goes to the supervisor's log and to stderr: a background supervisor's stderr
/// is run/supervisor.stderr, which `start` prints as the reason it could not boot. (In the
/// foreground the log already mirrors to stderr.)
fn fatal(log: &SupervisorLog, foreground: bool, msg: &str) {
    log.error(msg);
    if !foreground {
        eprintln!("error: {msg}");
    }
}

/// Takes the root's lock. A supervisor that has just shut down may still hold it for a moment
/// (its socket is already gone): wait for it, bounded. One that still answers is a real second
/// supervisor and is refused at once.
fn lock_when_free(paths: &Paths) -> Result<paths::RootLock, paths::LockError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match paths::lock_root(paths) {
            Ok(l) => return Ok(l),
            Err(e) => {
                let answering = std::os::unix::net::UnixStream::connect(&paths.socket).is_ok();
                if answering || std::time::Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// `ringrift-worker` beside this executable, unless RINGRIFT_WORKER_BIN says otherwise.
pub(crate) fn worker_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGRIFT_WORKER_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("ringrift-worker")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ringrift-worker"))
}
