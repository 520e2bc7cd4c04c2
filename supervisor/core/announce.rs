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

    /// DAEMON_STARTED / DAEMON_STOPPED / DAEMON_FAILED for every state change since the last look
    /// (which ones: `ringrift::plan::announcements`).
    pub(super) fn announce(&mut self) {
        let mut out = Vec::new();
        for d in self.daemons.values_mut() {
            let (was, now) = (d.announced, d.state);
            let respawned = d.generation != d.announced_generation;
            d.announced = now;
            d.announced_generation = d.generation;
            for a in plan::announcements(was, now, respawned) {
                let name = d.cfg.name.clone();
                let text =
                    |v: &Option<String>| v.clone().map_or(serde_json::Value::Null, Into::into);
                let payload = match a {
                    plan::Announcement::Started => ringrift::events::payload([
                        ("daemon", name.into()),
                        ("pid", d.pid().unwrap_or(0).into()),
                    ]),
                    plan::Announcement::Stopped => ringrift::events::payload([
                        ("daemon", name.into()),
                        ("last_exit", text(&d.last_exit)),
                        ("reason", text(&d.reason)),
                    ]),
                    plan::Announcement::Failed => ringrift::events::payload([
                        ("daemon", name.into()),
                        ("reason", d.reason.clone().unwrap_or_default().into()),
                    ]),
                };
                out.push((a.event_type(), payload));
            }
        }
        for (t, p) in out {
            if let Err(e) = self.events.publish(t, p, "supervisor") {
                self.log.warn(&format!("cannot publish {t}: {e}"));
            }
        }
    }

    /// An event from another node: the same provenance rule as a local one (its source must be
    /// allowed to emit the type: a remote node announces facts, never what this node does), then
    /// into the log and to the subscribers.
    pub(super) fn take_remote(&mut self, node: &str, event: ringrift::events::Event) {
        let t = ringrift::events::normalize(&event.event_type);
        let refused = match ringrift::events::find(&t) {
            None => Some(format!("unknown event type '{}'", event.event_type)),
            Some(_) if !ringrift::events::is_cluster_wide(&t) => {
                Some(format!("{t} does not cross the cluster"))
            }
            Some(spec) => ringrift::events::may_emit(spec, Origin::from_source(&event.source))
                .err()
                .map(|e| e.0),
        };
        if let Some(why) = refused {
            self.log.warn(&format!(
                "cluster: refused event {} from node {node}: {why}",
                event.id
            ));
            return;
        }
        match self.events.publish_remote(node, event) {
            Ok(_) => {}
            Err(e) => self
                .log
                .warn(&format!("cluster: refused an event from node {node}: {e}")),
        }
    }
}
