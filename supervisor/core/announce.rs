//! Publishing what the supervisor sees: DAEMON_* events for state changes, and writing the
//! subscribers' positions.

use super::*;

impl Core {
    /// Writes the subscribers' positions now, or soon: at most a few times a second, whatever the ack rate.
    pub(super) fn flush_events(&mut self) {
        if !self.events.dirty {
            return;
        }
        let since = self.last_flush.elapsed();
        if since >= EVENT_FLUSH_EVERY {
            self.last_flush = Instant::now();
            if let Err(e) = self.events.save() {
                self.log
                    .warn(&format!("cannot save event subscribers: {e}"));
            }
        } else if !self.flush_pending {
            self.flush_pending = true;
            let tx = self.tx.clone();
            let wait = EVENT_FLUSH_EVERY - since;
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tx.send(Msg::FlushEvents);
            });
        }
    }

    /// DAEMON_STARTED / DAEMON_STOPPED / DAEMON_FAILED for every state change since the last look.
    pub(super) fn announce(&mut self) {
        let mut out = Vec::new();
        for d in self.daemons.values_mut() {
            let (was, now) = (d.announced, d.state);
            let respawned = d.generation != d.announced_generation;
            d.announced_generation = d.generation;
            if was == now && !respawned {
                continue;
            }
            d.announced = now;
            let name = d.cfg.name.clone();
            // A process that died and was replaced before this look (a restart without delay):
            // its end is announced all the same.
            if respawned
                && matches!(was, DaemonState::Running | DaemonState::Paused)
                && now == DaemonState::Initializing
            {
                out.push((
                    "DAEMON_STOPPED",
                    ringrift::events::payload([
                        ("daemon", name.clone().into()),
                        (
                            "last_exit",
                            d.last_exit
                                .clone()
                                .map(Into::into)
                                .unwrap_or(serde_json::Value::Null),
                        ),
                        (
                            "reason",
                            d.reason
                                .clone()
                                .map(Into::into)
                                .unwrap_or(serde_json::Value::Null),
                        ),
                    ]),
                ));
            }
            match now {
                DaemonState::Running if was != DaemonState::Paused => out.push((
                    "DAEMON_STARTED",
                    ringrift::events::payload([
                        ("daemon", name.into()),
                        ("pid", d.pid.unwrap_or(0).into()),
                    ]),
                )),
                DaemonState::Stopped | DaemonState::Backoff
                    if matches!(
                        was,
                        DaemonState::Running
                            | DaemonState::Paused
                            | DaemonState::ShuttingDown
                            | DaemonState::Initializing
                    ) =>
                {
                    out.push((
                        "DAEMON_STOPPED",
                        ringrift::events::payload([
                            ("daemon", name.into()),
                            (
                                "last_exit",
                                d.last_exit
                                    .clone()
                                    .map(Into::into)
                                    .unwrap_or(serde_json::Value::Null),
                            ),
                            (
                                "reason",
                                d.reason
                                    .clone()
                                    .map(Into::into)
                                    .unwrap_or(serde_json::Value::Null),
                            ),
                        ]),
                    ))
                }
                DaemonState::Failed => out.push((
                    "DAEMON_FAILED",
                    ringrift::events::payload([
                        ("daemon", name.into()),
                        ("reason", d.reason.clone().unwrap_or_default().into()),
                    ]),
                )),
                _ => {}
            }
        }
        for (t, p) in out {
            if let Err(e) = self.events.publish(t, p, "supervisor") {
                self.log.warn(&format!("cannot publish {t}: {e}"));
            }
        }
    }
}
