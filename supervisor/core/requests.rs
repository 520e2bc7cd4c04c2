//! CLI requests: start, stop, kill, restart, pause and resume, status, emit, events.
//!
//! Each marks what it wants (`want_up`, `want_down`) and leaves the moving to `settle`; the answer
//! comes from a waiter (waiters.rs) once the daemons reach the goal.

use ringrift::config::UnknownDaemon;
use ringrift::protocol::{
    Emit, EventsRequest, KillRequest, Request, StartRequest, StatusRequest, StopRequest, Targets,
};

use super::*;

impl Core {
    pub(super) fn request(
        &mut self,
        frame: Request,
        reply: Reply,
        stream: Option<ConnTx>,
        from: Requester,
    ) {
        if self.shutting_down.is_some() && !matches!(frame, Request::Status(_) | Request::Shutdown)
        {
            let _ = reply.send(error(
                protocol::ErrorCode::ShuttingDown,
                "the supervisor is shutting down",
            ));
            return;
        }
        match frame {
            Request::Status(StatusRequest { name }) => {
                let report = self.status_report();
                let report = match name {
                    None => report,
                    Some(n) => match self.resolve_name(&n) {
                        Ok(n) => StatusReport {
                            daemons: report.daemons.into_iter().filter(|d| d.name == n).collect(),
                            pipeline: Default::default(),
                            ..report
                        },
                        Err(e) => {
                            let _ = reply.send(error(protocol::ErrorCode::UnknownDaemon, &e));
                            return;
                        }
                    },
                };
                let _ = reply.send(FromSupervisor::Status(report));
            }
            Request::Start(StartRequest {
                names,
                all,
                profile,
                no_wait,
            }) => self.start_request(names, all, profile, no_wait, reply),
            Request::Stop(StopRequest { names, all, force }) => {
                self.stop_request(names, all, force.then_some(Signal::SIGKILL), reply)
            }
            Request::Kill(KillRequest { names, signal }) => {
                let sig = match signal.as_deref().map(parse_signal).transpose() {
                    Ok(sig) => sig.unwrap_or(Signal::SIGKILL),
                    Err(e) => {
                        let _ = reply.send(error(protocol::ErrorCode::BadRequest, &e));
                        return;
                    }
                };
                self.stop_request(names, false, Some(sig), reply)
            }
            Request::Restart(Targets { names }) => self.restart_request(names, reply),
            Request::Pause(Targets { names }) => self.pause_request(names, true, reply),
            Request::Resume(Targets { names }) => self.pause_request(names, false, reply),
            Request::Reload => self.reload(Some(reply)),
            Request::Emit(Emit {
                event_type,
                payload,
                ..
            }) => {
                let origin = match from {
                    Requester::Cli => Origin::Cli,
                    Requester::Http => Origin::Http,
                    Requester::Supervisor => Origin::Supervisor,
                };
                let answer = match self.publish_from(origin, &event_type, payload) {
                    Ok(ev) => FromSupervisor::Emitted {
                        seq: ev.seq,
                        id: ev.id.clone(),
                        event_type: ev.event_type.clone(),
                    },
                    Err((code, e)) => error(code, &e),
                };
                let _ = reply.send(answer);
            }
            Request::Events(EventsRequest {
                since,
                types,
                follow,
                limit,
            }) => {
                let mut set = BTreeSet::new();
                for t in &types {
                    let n = ringrift::events::normalize(t);
                    if ringrift::events::find(&n).is_none() {
                        let _ = reply.send(error(
                            protocol::ErrorCode::BadRequest,
                            format!("unknown event type '{t}'"),
                        ));
                        return;
                    }
                    set.insert(n);
                }
                let Some(stream) = stream else {
                    let _ = reply.send(error(
                        protocol::ErrorCode::BadRequest,
                        "events need a streaming connection",
                    ));
                    return;
                };
                // One page: a client that wants more asks again from `next_since`.
                let page = self.events.query(since.unwrap_or(0), &set, limit);
                for ev in page.events {
                    let _ = stream.send(FromSupervisor::Event {
                        event: (*ev).clone(),
                    });
                }
                let end = FromSupervisor::EndOfEvents {
                    last_seq: self.events.info().last_seq,
                    next_since: page.next_since,
                };
                // Following starts once the history is exhausted; until then it is paged like a listing.
                if follow && page.next_since.is_none() {
                    let _ = stream.send(end);
                    self.events.watch(&set, stream);
                    // No final reply: the stream stays open until the client leaves.
                    drop(reply);
                } else {
                    let _ = reply.send(end);
                }
            }
            Request::Shutdown => self.begin_shutdown(Some(reply)),
            Request::ClusterStatus => {
                let answer = match &self.cluster {
                    Some(view) => {
                        FromSupervisor::Cluster(view.lock().expect("cluster view lock").clone())
                    }
                    None => error(
                        ErrorCode::BadRequest,
                        "this supervisor is not in a cluster (cluster.enabled was false when it started; a changed cluster section takes effect when it next starts)",
                    ),
                };
                let _ = reply.send(answer);
            }
            Request::Queue(req) => {
                if self.work.is_none() {
                    let _ = reply.send(error(
                        ErrorCode::BadRequest,
                        "this supervisor is not in a cluster (cluster.enabled was false when it \
                         started; a changed cluster section takes effect when it next starts): \
                         its work queue is data/work_queue.db",
                    ));
                } else if let Err(e) = self.try_work(req, reply) {
                    let _ = e.send(error(
                        ErrorCode::Failed,
                        "the shared work queue is not reachable yet: this node is not on the bus",
                    ));
                }
            }
        }
    }

    /// Hands a `queue` request to the work task; gives the reply back when there is none.
    fn try_work(
        &self,
        req: protocol::QueueRequest,
        reply: super::Reply,
    ) -> Result<(), super::Reply> {
        let tx = self
            .work
            .as_ref()
            .and_then(|slot| slot.lock().expect("work slot lock").clone());
        let Some(tx) = tx else { return Err(reply) };
        match tx.send(crate::cluster::work::Cmd::Queue { req, reply }) {
            Err(tokio::sync::mpsc::error::SendError(crate::cluster::work::Cmd::Queue {
                reply,
                ..
            })) => Err(reply),
            _ => Ok(()),
        }
    }

    /// Resolves user-typed names; unknown ones become failed results.
    /// A user-typed name: one of the configuration, or one that a reload removed and that is still
    /// shutting down (listed by `status`, so it can be stopped with `--force` or killed).
    pub(super) fn resolve_name(&self, name: &str) -> Result<String, UnknownDaemon> {
        self.config.resolve(name).or_else(|e| {
            let n = ringrift::catalog::normalize(name);
            if self.daemons.contains_key(&n) {
                Ok(n)
            } else {
                Err(e)
            }
        })
    }

    pub(super) fn resolve(&self, names: &[String]) -> (Vec<String>, Vec<OpResult>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for n in names {
            match self.resolve_name(n) {
                Ok(n) => {
                    if !ok.contains(&n) {
                        ok.push(n)
                    }
                }
                Err(e) => bad.push(OpResult::failed(n, ErrorCode::UnknownDaemon, e.to_string())),
            }
        }
        (ok, bad)
    }

    pub(super) fn start_request(
        &mut self,
        names: Vec<String>,
        all: bool,
        profile: Option<String>,
        no_wait: bool,
        reply: Reply,
    ) {
        let (mut selected, bad) = self.resolve(&names);
        if !bad.is_empty() {
            let _ = reply.send(FromSupervisor::Done {
                ok: false,
                results: bad,
            });
            return;
        }
        if all {
            selected.extend(self.config.enabled());
        }
        if let Some(p) = profile {
            match self.config.profiles.get(&p.to_ascii_lowercase()) {
                Some(members) => selected.extend(members.iter().cloned()),
                None => {
                    let hint = ringrift::catalog::suggestion(
                        &p,
                        self.config.profiles.keys().map(String::as_str),
                    );
                    let _ = reply.send(error(
                        protocol::ErrorCode::BadRequest,
                        format!("unknown profile '{p}': {hint}"),
                    ));
                    return;
                }
            }
        }
        if selected.is_empty() {
            let _ = reply.send(error(
                protocol::ErrorCode::BadRequest,
                "nothing to start: name daemons, or use --all or --profile",
            ));
            return;
        }
        let graph = self.config.graph();
        let requested: BTreeSet<String> = selected.into_iter().collect();
        let set = deps::with_dependencies(&graph, &requested);
        let order = deps::start_order(&graph, &set);
        for name in &order {
            if !requested.contains(name) && self.daemons[name].state.is_at_rest() {
                self.log.info(&format!(
                    "{name}: started as a dependency of {}",
                    dependents_in(&graph, name, &requested)
                ));
            }
            self.want_up(name);
        }
        self.add_waiter(order, Goal::Up, Vec::new(), reply, no_wait);
    }

    /// Marks a daemon as wanted: at rest → WAITING (the pump spawns it once its dependencies are up).
    pub(super) fn want_up(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("resolved name");
        if d.stop_queued || d.intent == Intent::Stop {
            // A stop still under way: it will not end in STOPPED, and its request hears so.
            d.stop_overrides += 1;
            self.log.info(&format!("{name}: stop overridden by start"));
        }
        d.stop_queued = false;
        if let Some(p) = d.process.as_mut() {
            p.stop_signal = None;
        }
        if d.intent == Intent::Stop {
            d.intent = Intent::Restart;
        }
        if plan::on_start(d.state) {
            d.history.clear();
            d.reason = None;
            set_state(&self.log, name, d, DaemonState::Waiting);
        }
    }

    /// Stops daemons, dependents first; `force` is the signal of a forced stop (no grace period for
    /// SIGKILL), also given to the dependents that stop with them.
    pub(super) fn stop_request(
        &mut self,
        names: Vec<String>,
        all: bool,
        force: Option<Signal>,
        reply: Reply,
    ) {
        let (selected, bad) = self.resolve(&names);
        if !bad.is_empty() {
            let _ = reply.send(FromSupervisor::Done {
                ok: false,
                results: bad,
            });
            return;
        }
        let requested: BTreeSet<String> = if all {
            self.daemons.keys().cloned().collect()
        } else {
            selected.into_iter().collect()
        };
        if requested.is_empty() {
            let _ = reply.send(error(
                protocol::ErrorCode::BadRequest,
                "nothing to stop: name daemons, or use --all",
            ));
            return;
        }
        let graph = self.config.graph();
        let set = deps::with_dependents(&graph, &requested);
        let order = deps::stop_order(&graph, &set);
        let live: Vec<String> = order
            .into_iter()
            .filter(|n| requested.contains(n) || !self.daemons[n].state.is_at_rest())
            .collect();
        for name in &live {
            if !requested.contains(name) {
                self.log.info(&format!(
                    "{name}: stopping because it depends on a daemon being stopped"
                ));
            }
            self.want_down(name);
            if let Some(sig) = force {
                self.force_stop(name, sig);
            }
        }
        self.add_waiter(live, Goal::Down, Vec::new(), reply, false);
    }

    pub(super) fn want_down(&mut self, name: &str) {
        let d = self.daemons.get_mut(name).expect("resolved name");
        match plan::on_stop(d.state) {
            plan::OnStop::StopNow => {
                d.intent = Intent::None;
                d.stop_queued = false;
                set_state(&self.log, name, d, DaemonState::Stopped);
            }
            plan::OnStop::AtRest => {}
            plan::OnStop::Queue => {
                d.stop_queued = true;
                if d.intent == Intent::Restart {
                    d.intent = Intent::Stop;
                }
            }
        }
    }

    /// A forced stop of a daemon already going down, or about to: its signal goes out now (or when
    /// its dependents are gone, for a queued stop).
    pub(super) fn force_stop(&mut self, name: &str, sig: Signal) {
        let d = self.daemons.get_mut(name).expect("resolved name");
        if d.state.is_at_rest() {
            return;
        }
        // After `want_down`, only a daemon with a process is not at rest: the signal is for it.
        if let Some(p) = d.process.as_mut() {
            p.stop_signal = Some(sig);
        }
        if d.state == DaemonState::ShuttingDown {
            self.begin_stop(name);
        }
    }

    pub(super) fn restart_request(&mut self, names: Vec<String>, reply: Reply) {
        let (selected, bad) = self.resolve(&names);
        if !bad.is_empty() || selected.is_empty() {
            let msg = if bad.is_empty() {
                vec![OpResult::failed(
                    "",
                    ErrorCode::BadRequest,
                    "name the daemons to restart",
                )]
            } else {
                bad
            };
            let _ = reply.send(FromSupervisor::Done {
                ok: false,
                results: msg,
            });
            return;
        }
        for name in &selected {
            let d = self.daemons.get_mut(name).expect("resolved");
            d.history.clear();
            d.reason = None;
            if d.stop_queued || d.intent == Intent::Stop {
                d.stop_overrides += 1;
                d.stop_queued = false;
                self.log
                    .info(&format!("{name}: stop overridden by restart"));
            }
            if d.state.has_process() && d.state != DaemonState::ShuttingDown {
                d.intent = Intent::Restart;
                self.begin_stop(name);
            } else if d.state == DaemonState::ShuttingDown {
                d.intent = Intent::Restart;
            } else {
                self.want_up(name);
            }
        }
        // Make sure whatever they depend on is (or comes) up as well.
        let graph = self.config.graph();
        let set = deps::with_dependencies(&graph, &selected.iter().cloned().collect());
        for name in deps::start_order(&graph, &set) {
            if !selected.contains(&name) {
                self.want_up(&name);
            }
        }
        self.add_waiter(selected, Goal::Up, Vec::new(), reply, false);
    }

    pub(super) fn pause_request(&mut self, names: Vec<String>, pause: bool, reply: Reply) {
        let (selected, mut bad) = self.resolve(&names);
        let mut targets = Vec::new();
        for name in selected {
            let d = self.daemons.get_mut(&name).expect("resolved");
            let want = if pause {
                DaemonState::Running
            } else {
                DaemonState::Paused
            };
            if d.state != want {
                let verb = if pause { "pause" } else { "resume" };
                bad.push(OpResult::failed(
                    &name,
                    ErrorCode::Failed,
                    format!("cannot {verb}: it is {}", d.state),
                ));
                continue;
            }
            if d.cfg.protocol {
                if let Some(tx) = d.conn() {
                    let _ = tx.send(if pause {
                        FromSupervisor::Pause
                    } else {
                        FromSupervisor::Resume
                    });
                    targets.push(name);
                } else {
                    bad.push(OpResult::failed(
                        &name,
                        ErrorCode::Failed,
                        "not connected to the supervisor",
                    ));
                }
            } else if let Some(p) = &d.process {
                // The whole tree: cgroup.freeze, or SIGSTOP/SIGCONT to the group and its strays.
                p.unit.freeze(pause);
                let to = if pause {
                    DaemonState::Paused
                } else {
                    DaemonState::Running
                };
                set_state(&self.log, &name, d, to);
                targets.push(name);
            }
        }
        let goal = if pause { Goal::Paused } else { Goal::Resumed };
        self.add_waiter(targets, goal, bad, reply, false);
    }
}

/// A signal `kill --signal` cannot send.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum BadSignal {
    #[error("{0} is not a signal number")]
    Number(i32),
    #[error("unknown signal '{0}' (e.g. KILL, TERM, INT, HUP, USR1, or a number)")]
    Name(String),
}

/// A signal as users write it: `KILL`, `SIGKILL`, `kill` or `9`.
pub(super) fn parse_signal(text: &str) -> Result<Signal, BadSignal> {
    let t = text.trim();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| BadSignal::Number(n));
    }
    let upper = t.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>()
        .map_err(|_| BadSignal::Name(text.to_string()))
}

pub(super) fn dependents_in(
    graph: &deps::Graph,
    name: &str,
    requested: &BTreeSet<String>,
) -> String {
    let users: Vec<&str> = requested
        .iter()
        .filter(|r| {
            deps::with_dependencies(graph, &[r.to_string()].into_iter().collect()).contains(name)
        })
        .map(String::as_str)
        .collect();
    users.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_read_as_users_write_them() {
        for text in ["KILL", "SIGKILL", "kill", "9", " Kill "] {
            assert_eq!(parse_signal(text), Ok(Signal::SIGKILL), "{text}");
        }
        assert_eq!(parse_signal("int"), Ok(Signal::SIGINT));
        assert_eq!(parse_signal("BOGUS"), Err(BadSignal::Name("BOGUS".into())));
        assert_eq!(
            parse_signal("999").unwrap_err().to_string(),
            "999 is not a signal number"
        );
    }
}
