//! Stopping a daemon's process: the shutdown frame, SIGTERM, the grace period, forced signals,
//! and kills the supervisor decides on (watchdog, stall, ready timeout).

use super::*;

impl Core {
    /// Asks a daemon's process to go: shutdown frame, SIGTERM to the group, SIGKILL after the grace
    /// period. A forced stop (`stop_signal`) sends its signal instead, at once, even to a daemon
    /// already shutting down. A daemon that reported SHUTTING_DOWN by itself gets its SIGTERM now;
    /// its grace period began with the report.
    pub(super) fn begin_stop(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("known");
        if !d.state.has_process() {
            if d.state.is_wanted() {
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            return;
        }
        let already = d.state == DaemonState::ShuttingDown;
        let Some(pgid) = Self::group_of(d) else {
            if !already {
                set_state(&self.log, name, d, DaemonState::ShuttingDown);
            }
            return;
        };
        if let Some(sig) = d.stop_signal {
            set_state(&self.log, name, d, DaemonState::ShuttingDown);
            match &d.unit {
                Some(unit) if sig == Signal::SIGKILL => unit.kill(),
                Some(unit) => {
                    unit.freeze(false);
                    unit.signal(sig);
                }
                None => {
                    unix::signal_group(pgid, Signal::SIGCONT);
                    unix::signal_group(pgid, sig);
                }
            }
            d.terminated = true;
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
        if already && d.terminated {
            return;
        }
        set_state(&self.log, name, d, DaemonState::ShuttingDown);
        d.terminated = true;
        if let Some((_, tx)) = &d.conn {
            let _ = tx.send(FromSupervisor::Shutdown);
        }
        if let Some(unit) = &d.unit {
            if !d.cfg.protocol {
                // A frozen (paused) process cannot act on SIGTERM.
                unit.freeze(false);
            }
            // Every process of the daemon, including those that left its process group.
            unit.signal(Signal::SIGTERM);
            self.log.info(&format!(
                "{name}: SIGTERM to process group {pgid} and every process it started ({}), SIGKILL in {:?}",
                unit.kind(),
                d.cfg.grace_period
            ));
        } else {
            if !d.cfg.protocol {
                unix::signal_group(pgid, Signal::SIGCONT);
            }
            unix::signal_group(pgid, Signal::SIGTERM);
            self.log.info(&format!(
                "{name}: SIGTERM to process group {pgid}, SIGKILL in {:?}",
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
        let d = self.daemons.get_mut(name).expect("known");
        let Some(pid) = d.pid else { return };
        self.log.warn(&format!(
            "{name}: {cause}: SIGKILL to process group {pid} and everything it started"
        ));
        d.kill_cause = Some(cause);
        if let Some(unit) = &d.unit {
            unit.kill();
        }
    }
}
