//! Reloading the configuration (SIGHUP, `reload`): what changed and what it does to each daemon.

use ringrift::reload;

use super::*;

impl Core {
    pub(super) fn reload(&mut self, reply: Option<Reply>) {
        let new =
            match ringrift::config::load_checked(&self.paths.root, self.config_path.as_deref()) {
                Ok((c, missing)) => {
                    for p in missing.needed {
                        self.log.warn(&format!("reload: {p}"));
                    }
                    c
                }
                Err(e) => {
                    self.log.error(&format!(
                        "reload refused, keeping the running configuration: {e}"
                    ));
                    if let Some(r) = reply {
                        let _ = r.send(error(protocol::ErrorCode::Config, e));
                    }
                    return;
                }
            };
        // The daemons' queue follows the running supervisor's cluster, which reload does not change.
        let mut new = new;
        new.set_shared_work_queue(self.config.cluster.enabled);
        let current: BTreeMap<String, reload::Running> = self
            .daemons
            .iter()
            .map(|(n, d)| {
                let r = reload::Running {
                    config: &d.cfg,
                    state: d.state,
                };
                (n.clone(), r)
            })
            .collect();
        let changes = reload::plan(&current, &new.daemons);
        let mut results = Vec::new();
        let mut gone = Vec::new();
        for (name, change) in changes {
            if let Some(message) = change.message() {
                results.push(OpResult::done(&name, message));
            }
            if let Some(cfg) = new.daemons.get(&name) {
                match self.daemons.get_mut(&name) {
                    Some(d) => d.cfg = cfg.clone(),
                    None => {
                        self.daemons.insert(name.clone(), Daemon::new(cfg.clone()));
                    }
                }
            }
            match change {
                reload::Change::Removed => {
                    self.want_down(&name);
                    gone.push(name);
                }
                reload::Change::Disabled => self.want_down(&name),
                reload::Change::Added { start: true } | reload::Change::Enabled => {
                    self.want_up(&name)
                }
                reload::Change::Restart(_) => {
                    self.daemons.get_mut(&name).expect("known").intent = Intent::Restart;
                    self.begin_stop(&name);
                }
                // Policy only: the next decision (restart, grace, watchdog) uses the new values.
                reload::Change::Added { start: false }
                | reload::Change::InPlace { .. }
                | reload::Change::JobTemplates
                | reload::Change::Changed => {}
            }
        }
        // The bus connection, the HTTP listener and the containment mode are set up once, at
        // start: say so rather than let a changed section look applied.
        for (section, changed) in [
            ("cluster", new.cluster != self.config.cluster),
            ("http", new.http != self.config.http),
            ("containment", new.containment != self.config.containment),
        ] {
            if changed {
                results.push(OpResult::done(
                    section,
                    "changed: not applied by reload; it takes effect when the supervisor next starts \
                     (shutdown, then start)",
                ));
            }
        }
        new.cluster = self.config.cluster.clone();
        new.http = self.config.http.clone();
        new.containment = self.config.containment;
        self.config = new;
        // Removed daemons are dropped once they are at rest.
        for name in gone {
            if self.daemons[&name].state.is_at_rest() {
                self.daemons.remove(&name);
            }
        }
        self.log.info(&format!(
            "configuration reloaded: {}",
            if results.is_empty() {
                "no change".to_string()
            } else {
                results
                    .iter()
                    .map(|r| format!("{} {}", r.name, r.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        ));
        if let Some(r) = reply {
            let _ = r.send(FromSupervisor::Done { ok: true, results });
        }
    }
}
