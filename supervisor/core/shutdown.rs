//! Signals to the supervisor, shutdown and the last resort (SIGKILL to everything).

use super::*;

impl Core {
    pub(super) fn signal(&mut self, kind: SignalKind) {
        match kind {
            SignalKind::Hangup => {
                self.log.info("SIGHUP: reloading the configuration");
                self.reload(None);
            }
            SignalKind::Terminate => {
                self.log
                    .info("SIGTERM: stopping every daemon, dependents first");
                self.begin_shutdown(None);
            }
            SignalKind::Interrupt => {
                self.interrupts += 1;
                if self.interrupts == 1 {
                    self.log.info("SIGINT: stopping every daemon, dependents first (interrupt again to kill them all at once)");
                    self.begin_shutdown(None);
                } else {
                    self.log
                        .warn("second SIGINT: SIGKILL to every process group");
                    self.kill_everything();
                    self.finish_shutdown();
                }
            }
        }
    }

    pub(crate) fn kill_everything(&mut self) {
        for d in self.daemons.values() {
            if let Some(p) = &d.process {
                p.unit.kill();
            }
        }
        for j in self.jobs.values() {
            j.unit.kill();
        }
    }

    pub(super) fn begin_shutdown(&mut self, reply: Option<Reply>) {
        let replies = self.shutting_down.get_or_insert_with(Vec::new);
        if let Some(r) = reply {
            replies.push(r);
        }
        let names: Vec<String> = self.daemons.keys().cloned().collect();
        for name in names {
            self.want_down(&name);
        }
    }

    pub(super) fn finish_shutdown(&mut self) {
        self.announce();
        if self.events.dirty
            && let Err(e) = self.events.save()
        {
            self.log
                .warn(&format!("cannot save event subscribers: {e}"));
        }
        // The cgroup subtree goes before anyone hears "shut down" (killing whatever is left in it).
        if let Err(e) = self.containment.teardown() {
            self.log
                .warn(&format!("cannot remove the cgroup subtree: {e}"));
        }
        self.log.info("every daemon is stopped; supervisor exiting");
        // Gone from the file system before anyone hears "shut down": a `start` right after must boot
        // anew. Cleared first, so that the run/ keeper does not make it again.
        *self.socket_id.lock().expect("socket id lock") = None;
        let _ = std::fs::remove_file(&self.paths.socket);
        let _ = std::fs::remove_file(&self.paths.pid_file);
        for r in self.shutting_down.take().unwrap_or_default() {
            let _ = r.send(FromSupervisor::Done {
                ok: true,
                results: vec![OpResult::done("supervisor", "shut down")],
            });
        }
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(error(
                protocol::ErrorCode::ShuttingDown,
                "the supervisor shut down",
            ));
        }
        self.exit_now = true;
    }
}
