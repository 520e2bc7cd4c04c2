//! Starting a daemon's process: program, environment, its connection, containment, output pumps,
//! readiness; and the timers that come back to the loop.

use super::*;

impl Core {
    pub(super) fn spawn(&mut self, name: &str) {
        let tx = self.tx.clone();
        let owned = self.owned.clone();
        let log_cfg = (self.config.logs.max_bytes, self.config.logs.max_files);
        let daemon_log_path = self.paths.daemon_log(name);
        let worker_bin = self.worker_bin.clone();
        let root = self.paths.root.clone();
        let socket = self.paths.socket.display().to_string();
        let d = self.daemons.get_mut(name).expect("known");
        if d.log.is_none() {
            match RotatingFile::open(&daemon_log_path, log_cfg.0, log_cfg.1) {
                Ok(f) => d.log = Some(Arc::new(Mutex::new(f))),
                Err(e) => self.log.error(&format!(
                    "{name}: cannot open {}: {e}",
                    daemon_log_path.display()
                )),
            }
        }
        let (program, args): (PathBuf, Vec<String>) = match &d.cfg.command {
            Some(cmd) => (PathBuf::from(&cmd[0]), cmd[1..].to_vec()),
            None => (worker_bin, vec![name.to_string()]),
        };
        let mut env = tree_env(&root, &socket);
        env.push((protocol::DAEMON_ENV.to_string(), name.to_string()));
        env.extend(d.cfg.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // A daemon that speaks the protocol gets its own connection: one end of a socket pair,
        // inherited at spawn. Holding it is its identity (DESIGN.md, trust model).
        let pair = if d.cfg.protocol {
            match std::os::unix::net::UnixStream::pair() {
                Ok((ours, theirs)) => {
                    env.push((protocol::FD_ENV.to_string(), theirs.as_raw_fd().to_string()));
                    Some((ours, theirs))
                }
                Err(e) => {
                    self.log
                        .error(&format!("{name}: cannot make its connection: {e}"));
                    None
                }
            }
        } else {
            None
        };
        d.generation += 1;
        let generation = d.generation;
        if d.state == DaemonState::Waiting {
            d.reason = None;
        }
        // What the last process left for `status` and its stop's answer goes now; the process
        // itself (connection, probe, timers' marks) went with it in `after_exit`.
        debug_assert!(d.process.is_none(), "{name}: spawned over a live process");
        d.stop_how = None;
        d.next_attempt = None;
        d.health = Health::default();
        d.progress.clear();
        let prepared = self
            .containment
            .prepare(&Member::Daemon(name.to_string()), &d.cfg.limits);
        let spec = SpawnSpec {
            program: &program,
            args: &args,
            cwd: &root,
            env,
            pass_fd: pair.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
            cgroup_procs: prepared.procs.as_ref().map(|f| f.as_raw_fd()),
        };
        let spawned = unix::spawn(&spec);
        // Our copy of the child's end must go, or the worker would never see us hang up.
        let ours = pair.map(|(ours, _theirs)| ours);
        match spawned {
            Ok(mut child) => {
                if let Some(ours) = ours
                    && let Err(e) = crate::ipc::adopt_worker(
                        ours,
                        name.to_string(),
                        generation,
                        self.tx.clone(),
                        self.log.clone(),
                    )
                {
                    self.log
                        .error(&format!("{name}: cannot serve its connection: {e}"));
                }
                let pid = child.id().expect("a just-spawned child has a pid");
                owned.insert(pid);
                self.records_dirty = true;
                let unit = self
                    .containment
                    .unit(Member::Daemon(name.to_string()), pid, prepared);
                if let Some(why) = &unit.why_not {
                    self.log
                        .warn(&format!("{name}: not contained by a cgroup: {why}"));
                }
                for p in &unit.limit_problems {
                    self.log.warn(&format!("{name}: {p}"));
                }
                d.process = Some(Process::new(unit));
                d.spawn_failed = false;
                // A `ready: {log: ...}` condition watches the output on its way to the log.
                let watch = match &d.cfg.ready {
                    Some(Ready::Log(pattern)) => {
                        let tx = self.tx.clone();
                        let daemon = name.to_string();
                        Some(crate::readiness::LineWatch::new(
                            pattern.clone(),
                            Box::new(move || {
                                let _ = tx.send(Msg::Ready { daemon, generation });
                            }),
                        ))
                    }
                    _ => None,
                };
                if let Some(log) = &d.log {
                    if let Some(out) = child.stdout.take() {
                        spawn_pump(out, logwriter::Stream::Out, log, watch.as_ref());
                    }
                    if let Some(err) = child.stderr.take() {
                        spawn_pump(err, logwriter::Stream::Err, log, watch.as_ref());
                    }
                }
                let daemon = name.to_string();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    owned.remove(pid);
                    let _ = tx.send(Msg::ChildExited {
                        daemon,
                        generation,
                        status,
                    });
                });
                self.log.info(&format!(
                    "{name}: spawned pid {pid} ({} {})",
                    program.display(),
                    args.join(" ")
                ));
                set_state(&self.log, name, d, DaemonState::Initializing);
                let ready_timeout = d.cfg.ready_timeout;
                // A worker reports its readiness; a plain program meets its `ready:` condition
                // (src/readiness.rs). Either way it must by `ready_timeout`.
                if let Some(r) = &d.cfg.ready {
                    d.reason = Some(format!("waiting until ready: {}", r.describe()));
                }
                match d.cfg.ready.clone() {
                    None if !d.cfg.protocol => {
                        if let Some(p) = d.process.as_mut() {
                            p.running_since = Some(Instant::now());
                        }
                        set_state(&self.log, name, d, DaemonState::Running);
                    }
                    None | Some(Ready::Log(_)) => {}
                    Some(Ready::After(after)) => {
                        self.schedule(name, generation, TimerKind::ReadyAfter, after)
                    }
                    Some(probe) => {
                        let probe = crate::readiness::spawn_probe(
                            &probe,
                            name.to_string(),
                            generation,
                            root.clone(),
                            tree_env(&root, &socket),
                            self.tx.clone(),
                        );
                        if let Some(p) = d.process.as_mut() {
                            p.probe = probe;
                        }
                    }
                }
                if self.daemons[name].state == DaemonState::Initializing {
                    self.schedule(name, generation, TimerKind::ReadyTimeout, ready_timeout);
                }
            }
            Err(e) => {
                if let Some(dir) = &prepared.cgroup {
                    let _ = crate::cgroup::remove(dir);
                }
                let desc = format!("cannot spawn {}: {e}", program.display());
                self.log.error(&format!("{name}: {desc}"));
                d.last_exit = Some(desc.clone());
                d.spawn_failed = true;
                set_state(&self.log, name, d, DaemonState::Initializing);
                self.after_exit(
                    name,
                    ExitInfo {
                        kind: ExitKind::Failure,
                        desc,
                    },
                );
            }
        }
    }

    /// The environment every process of this root's tree carries (daemons, jobs).
    pub(super) fn tree_env(&self) -> Vec<(String, String)> {
        tree_env(&self.paths.root, &self.paths.socket.display().to_string())
    }

    pub(super) fn record_processes_later(&mut self) {
        self.records_dirty = true;
    }

    pub(super) fn schedule(&self, name: &str, generation: u64, kind: TimerKind, after: Duration) {
        let tx = self.tx.clone();
        let daemon = name.to_string();
        if after.is_zero() {
            // No timer for "now": the loop takes it right after the current message.
            let _ = tx.send(Msg::Timer {
                daemon,
                generation,
                kind,
            });
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Msg::Timer {
                daemon,
                generation,
                kind,
            });
        });
    }
}

/// Copies a child's output into its log, through the `ready: {log: ...}` watch when there is one.
pub(super) fn spawn_pump<R>(
    reader: R,
    stream: logwriter::Stream,
    log: &SharedLog,
    watch: Option<&crate::readiness::SharedWatch>,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    match watch {
        Some(w) => tokio::spawn(logwriter::pump(
            crate::readiness::WatchOutput::new(reader, w.clone()),
            stream,
            log.clone(),
        )),
        None => tokio::spawn(logwriter::pump(reader, stream, log.clone())),
    };
}

pub(super) fn tree_env(root: &std::path::Path, socket: &str) -> Vec<(String, String)> {
    vec![
        (protocol::SOCKET_ENV.to_string(), socket.to_string()),
        (protocol::ROOT_ENV.to_string(), root.display().to_string()),
        (
            protocol::SUPERVISOR_PID_ENV.to_string(),
            std::process::id().to_string(),
        ),
    ]
}
