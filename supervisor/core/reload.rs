//! Reloading the configuration (SIGHUP, `reload`): what changed and what it does to each daemon.

use super::*;

impl Core {
    pub(super) fn reload(&mut self, reply: Option<Reply>) {
        let new =
            match ringrift::config::load_checked(&self.paths.root, self.config_path.as_deref()) {
                Ok((c, missing)) => {
                    for p in missing {
                        self.log.warn(&format!("reload: {p}"));
                    }
                    c
                }
                Err(e) => {
                    self.log.error(&format!(
                        "reload refused, keeping the running configuration: {e}"
                    ));
                    if let Some(r) = reply {
                        let _ = r.send(error(protocol::ErrorCode::Config, &e.to_string()));
                    }
                    return;
                }
            };
        let mut results = Vec::new();
        let old_names: BTreeSet<String> = self.daemons.keys().cloned().collect();
        let new_names: BTreeSet<String> = new.daemons.keys().cloned().collect();
        for name in old_names.difference(&new_names) {
            self.want_down(name);
            results.push(OpResult {
                name: name.clone(),
                ok: true,
                message: "removed: stopping".into(),
            });
        }
        for name in new_names.difference(&old_names) {
            let cfg = new.daemons[name].clone();
            let enabled = cfg.enabled;
            self.daemons.insert(name.clone(), Daemon::new(cfg));
            if enabled {
                self.want_up(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "added: starting".into(),
                });
            }
        }
        for name in old_names.intersection(&new_names) {
            let new_cfg = new.daemons[name].clone();
            let d = self.daemons.get_mut(name).expect("known");
            if d.cfg == new_cfg {
                continue;
            }
            let action = ringrift::reload::classify(&d.cfg, &new_cfg);
            let was_enabled = d.cfg.enabled;
            d.cfg = new_cfg;
            let (state, enabled) = (d.state, d.cfg.enabled);
            if was_enabled && !enabled {
                self.want_down(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "disabled: stopping".into(),
                });
            } else if !was_enabled && enabled && state.is_at_rest() {
                self.want_up(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "enabled: starting".into(),
                });
            } else if let ReloadAction::InPlace(keys) = &action {
                // Policy only: the next decision (restart, grace, watchdog) uses the new values.
                // Readiness is judged once per process: a process already being checked (or
                // already ready) keeps the condition it started with.
                let (next_start, now): (Vec<&String>, Vec<&String>) = keys
                    .iter()
                    .partition(|k| matches!(k.as_str(), "ready" | "ready_timeout"));
                let mut parts = Vec::new();
                if !now.is_empty() {
                    let now: Vec<&str> = now.iter().map(|k| k.as_str()).collect();
                    parts.push(format!("changed {}: applied in place", now.join(", ")));
                }
                if !next_start.is_empty() {
                    let later: Vec<&str> = next_start.iter().map(|k| k.as_str()).collect();
                    parts.push(format!(
                        "changed {}: used from its next start",
                        later.join(", ")
                    ));
                }
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: parts.join("; "),
                });
            } else if action == ReloadAction::JobTemplates {
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "job templates changed: used from its next start (no restart)".into(),
                });
            } else if let ReloadAction::Restart(keys) = &action
                && state.has_process()
                && state != DaemonState::ShuttingDown
            {
                let message = format!("changed {}: restarting", keys.join(", "));
                let d = self.daemons.get_mut(name).expect("known");
                d.intent = Intent::Restart;
                self.begin_stop(name);
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message,
                });
            } else {
                results.push(OpResult {
                    name: name.clone(),
                    ok: true,
                    message: "changed".into(),
                });
            }
        }
        self.config = new;
        // Removed daemons are dropped once they are at rest.
        let gone: Vec<String> = old_names.difference(&new_names).cloned().collect();
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
