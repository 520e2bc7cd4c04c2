//! A daemon's process ended: draining what it left, removing its cgroup, and what comes next
//! (`ringrift::restart::decide_after_exit`).

use super::*;

impl Core {
    pub(super) fn child_exited(
        &mut self,
        name: &str,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        let Some(d) = self.daemons.get_mut(name) else {
            return;
        };
        if d.generation != generation {
            return;
        }
        let (kind, desc) = match &status {
            Ok(s) if s.success() => (ExitKind::Success, unix::describe_exit(s)),
            Ok(s) if s.code().is_some() => (ExitKind::Failure, unix::describe_exit(s)),
            Ok(s) => (ExitKind::Signaled, unix::describe_exit(s)),
            Err(e) => (ExitKind::Failure, format!("wait failed: {e}")),
        };
        // Only the running leader's exit is news (there is one per spawn).
        let Some(p) = d.process.as_mut().filter(|p| p.leader_alive()) else {
            return;
        };
        let pgid = p.pgid();
        p.conn = None;
        p.abort_probe();
        let info = match p.kill_cause.take() {
            Some(cause) => ExitInfo {
                kind: ExitKind::Signaled,
                desc: format!("{cause} ({desc})"),
            },
            None => ExitInfo {
                kind,
                desc: desc.clone(),
            },
        };
        self.events.disconnect(name);
        d.last_exit = Some(desc);
        self.log
            .info(&format!("{name}: process {pgid} ended: {}", info.desc));
        let stopping = d.state == DaemonState::ShuttingDown;
        if p.unit.alive() {
            if !stopping {
                // The leader died on its own: whatever it left behind is a stray.
                self.log.warn(&format!(
                    "{name}: killing what is left of its processes (group {pgid}, {})",
                    p.unit.kind()
                ));
                p.unit.kill();
            }
            p.draining = Some(info);
            let generation = d.generation;
            self.schedule(
                name,
                generation,
                TimerKind::DrainCheck,
                Duration::from_millis(50),
            );
            return;
        }
        self.after_exit(name, info);
    }

    /// Finishes an exit once the drained unit has no process left.
    pub(super) fn check_drained(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("known");
        let Some(p) = d.process.as_mut() else { return };
        if p.leader_alive() || p.unit.alive() {
            return;
        }
        if let Some(info) = p.draining.take() {
            self.after_exit(name, info);
        }
    }

    /// The daemon's process group is gone (or its spawn failed): forget the process, decide what
    /// comes next.
    pub(super) fn after_exit(&mut self, name: &str, info: ExitInfo) {
        let now = self.started.elapsed();
        let jitter = self.jitter.next_f64();
        let d = self.daemons.get_mut(name).expect("known");
        // The process and everything it started are gone (or it never started): forget it, and
        // remove its cgroup.
        if let Some(p) = d.process.take() {
            if let Err(e) = p.unit.remove() {
                self.log.warn(&format!("{name}: {e}"));
            }
            // A daemon that ran long enough before dying starts its backoff from the beginning.
            if let Some(since) = p.running_since {
                d.history
                    .note_stable(since - self.started, now, &d.cfg.restart);
            }
        }
        self.records_dirty = true;
        if d.state == DaemonState::ShuttingDown || d.intent != Intent::None {
            let intent = std::mem::replace(&mut d.intent, Intent::None);
            set_state(&self.log, name, d, DaemonState::Stopped);
            if intent == Intent::Restart && self.shutting_down.is_none() {
                self.want_up(name);
            } else {
                // A stopped daemon's jobs stop with it; a restarting one keeps them and hears how they end.
                let jobs: Vec<String> = self
                    .jobs
                    .values()
                    .filter(|j| j.daemon == name)
                    .map(|j| j.id.clone())
                    .collect();
                for id in jobs {
                    self.stop_job(&id);
                }
            }
            return;
        }
        if self.shutting_down.is_some() {
            set_state(&self.log, name, d, DaemonState::Stopped);
            return;
        }
        match restart::decide_after_exit(
            &mut d.history,
            &d.cfg.restart,
            info.kind,
            &info.desc,
            now,
            jitter,
        ) {
            ExitDecision::Restart { delay, attempt } => {
                d.reason = Some(info.desc.clone());
                d.failures += 1;
                d.next_attempt = Some(Instant::now() + delay);
                self.log.warn(&format!(
                    "{name}: {}; restart #{attempt} in {} ms",
                    info.desc,
                    delay.as_millis()
                ));
                set_state(&self.log, name, d, DaemonState::Backoff);
                if delay.is_zero() {
                    // No delay configured: respawn now, before any bookkeeping of this exit.
                    d.restarts += 1;
                    self.spawn(name);
                } else {
                    let generation = d.generation;
                    self.schedule(name, generation, TimerKind::Backoff, delay);
                }
            }
            ExitDecision::Stop => {
                d.failures += 1;
                d.reason = Some(format!(
                    "{} (restart policy {})",
                    info.desc, d.cfg.restart.policy
                ));
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            ExitDecision::Fail { reason } => {
                self.log.error(&format!("{name}: FAILED: {reason}"));
                d.reason = Some(reason);
                set_state(&self.log, name, d, DaemonState::Failed);
            }
        }
    }
}
