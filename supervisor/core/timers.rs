//! Timers (backoff, grace, readiness, watchdog, drain checks) and readiness of plain programs.

use super::*;

impl Core {
    pub(super) fn timer(&mut self, name: &str, generation: u64, kind: TimerKind) {
        let Some(d) = self.daemons.get(name) else {
            return;
        };
        if d.generation != generation {
            return;
        }
        match kind {
            TimerKind::Backoff => {
                if d.state == DaemonState::Backoff {
                    let d = self.daemons.get_mut(name).expect("known");
                    d.restarts += 1;
                    self.spawn(name);
                }
            }
            TimerKind::Grace => {
                if d.state == DaemonState::ShuttingDown
                    && let Some(p) = &d.process
                    && p.unit.alive()
                {
                    let grace = d.cfg.grace_period;
                    self.log.warn(&format!(
                        "{name}: still running after the {grace:?} grace period: SIGKILL to process group {} and every process it started ({})",
                        p.pgid(),
                        p.unit.kind()
                    ));
                    p.unit.kill();
                    let d = self.daemons.get_mut(name).expect("known");
                    d.stop_how = Some(format!("killed after the {grace:?} grace period"));
                }
            }
            TimerKind::ReadyTimeout => {
                if d.state == DaemonState::Initializing && d.pid().is_some() {
                    let cause = format!("not ready after {:?}", d.cfg.ready_timeout);
                    self.kill_for(name, cause);
                }
            }
            TimerKind::ReadyAfter => {
                if d.state == DaemonState::Initializing && d.pid().is_some() {
                    self.became_ready(name, generation);
                }
            }
            TimerKind::Watchdog => self.watchdog(name),
            TimerKind::DrainCheck => {
                self.check_drained(name);
                let d = &self.daemons[name];
                if d.is_draining() {
                    self.schedule(
                        name,
                        generation,
                        TimerKind::DrainCheck,
                        Duration::from_millis(50),
                    );
                }
            }
        }
    }

    /// A plain program met its readiness condition: it is RUNNING, and its dependents may start.
    pub(super) fn became_ready(&mut self, name: &str, generation: u64) {
        let Some(d) = self.daemons.get_mut(name) else {
            return;
        };
        if d.generation != generation || d.state != DaemonState::Initializing {
            return;
        }
        let Some(p) = d.process.as_mut().filter(|p| p.leader_alive()) else {
            return;
        };
        p.abort_probe();
        if let Some(r) = &d.cfg.ready {
            self.log.info(&format!("{name}: ready ({})", r.describe()));
        }
        p.running_since = Some(Instant::now());
        d.reason = None;
        set_state(&self.log, name, d, DaemonState::Running);
    }

    pub(super) fn watchdog(&mut self, name: &str) {
        let d = &self.daemons[name];
        if !matches!(d.state, DaemonState::Running | DaemonState::Paused) {
            return;
        }
        let Some(p) = d.live() else { return };
        let now = Instant::now();
        // Time the supervisor itself did not run never counts against the daemon.
        let resumed = self.lag.lock().expect("lag lock").resumed_at(now);
        let last = p.last_heartbeat.or(p.running_since).unwrap_or(now);
        let windows = ringrift::watchdog::Windows {
            heartbeat_timeout: d.cfg.heartbeat_timeout,
            stall_timeout: d
                .cfg
                .stall_timeout
                .filter(|_| d.state == DaemonState::Running),
        };
        let next =
            match ringrift::watchdog::judge(now, last, p.last_progress_change, resumed, windows) {
                Verdict::Silent(silent) => {
                    let cause = format!("watchdog: no heartbeat for {:.1}s", silent.as_secs_f64());
                    self.kill_for(name, cause);
                    return;
                }
                Verdict::Stalled(flat) => {
                    let cause = format!("stalled: progress flat for {:.1}s", flat.as_secs_f64());
                    self.kill_for(name, cause);
                    return;
                }
                Verdict::Healthy { next_check } => next_check,
            };
        let generation = d.generation;
        self.schedule(
            name,
            generation,
            TimerKind::Watchdog,
            next + Duration::from_millis(5),
        );
    }
}
