//! Stopping a daemon's process: the shutdown frame, SIGTERM, the grace period, forced signals,
//! and kills the supervisor decides on (watchdog, stall, ready timeout).

use super::*;

impl Core {
    /// Asks a daemon's process to go: shutdown frame, SIGTERM to the group, SIGKILL after the grace
    /// period. A forced stop (the process's `stop_signal`) sends its signal instead, at once, even
    /// to a daemon already shutting down. A daemon that reported SHUTTING_DOWN by itself gets its
    /// SIGTERM now; its grace period began with the report.
    pub(super) fn begin_stop(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("known");
        if !d.state.has_process() {
            if d.state.is_wanted() {
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            return;
        }
        let already = d.state == DaemonState::ShuttingDown;
        let Some(p) = &d.process else {
            if !already {
                set_state(&self.log, name, d, DaemonState::ShuttingDown);
            }
            return;
        };
        let (pgid, forced, terminated) = (p.pgid(), p.stop_signal, p.terminated);
        if let Some(sig) = forced {
            set_state(&self.log, name, d, DaemonState::ShuttingDown);
            if let Some(p) = d.process.as_mut() {
                if sig == Signal::SIGKILL {
                    p.unit.kill();
                } else {
                    p.unit.freeze(false);
                    p.unit.signal(sig);
                }
                p.terminated = true;
            }
            if sig == Signal::SIGKILL {
                d.stop_how = Some("killed at once, no grace period".into());
                self.log.info(&format!(
                    "{name}: forced stop: SIGKILL to process group {pgid}"
                ));
            } else {
                self.log.info(&format!(
                    "{name}: {} to process group {pgid}, SIGKILL in {:?}",
                    sig.as_str(),
                    d.cfg.grace_period
                ));
                if !already {
                    let (generation, grace) = (d.generation, d.cfg.grace_period);
                    self.schedule(name, generation, TimerKind::Grace, grace);
                }
            }
            return;
        }
        if already && terminated {
            return;
        }
        set_state(&self.log, name, d, DaemonState::ShuttingDown);
        if let Some(p) = d.process.as_mut() {
            p.terminated = true;
            if let Some((_, tx)) = &p.conn {
                let _ = tx.send(FromSupervisor::Shutdown);
            }
            if !d.cfg.protocol {
                // A frozen (paused) process cannot act on SIGTERM.
                p.unit.freeze(false);
            }
            // Every process of the daemon, including those that left its process group.
            p.unit.signal(Signal::SIGTERM);
            self.log.info(&format!(
                "{name}: SIGTERM to process group {pgid} and every process it started ({}), SIGKILL in {:?}",
                p.unit.kind(),
                d.cfg.grace_period
            ));
        }
        if !already {
            let (generation, grace) = (d.generation, d.cfg.grace_period);
            self.schedule(name, generation, TimerKind::Grace, grace);
        }
    }

    /// Kills a process the supervisor gave up on (watchdog, stall, ready timeout); the exit then restarts it.
    pub(super) fn kill_for(&mut self, name: &str, cause: String) {
        let Some(p) = self.daemons.get_mut(name).and_then(Daemon::live_mut) else {
            return;
        };
        self.log.warn(&format!(
            "{name}: {cause}: SIGKILL to process group {} and everything it started",
            p.pgid()
        ));
        p.kill_cause = Some(cause);
        p.unit.kill();
    }
}
