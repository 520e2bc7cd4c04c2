//! Worker connections: hello, state reports, heartbeats, job requests, emits, subscriptions, acks.

use ringrift::protocol::{Ack, Emit, Heartbeat, SpawnJob, StateReport, Subscribe, WorkerFrame};

use super::*;

/// Why a worker's hello is refused although it came on a connection the supervisor made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloRefused {
    /// A reload removed the daemon meanwhile.
    #[error("unknown daemon '{0}'")]
    Unknown(String),
    /// The process this connection was made for has ended (a newer spawn may be running).
    #[error("daemon {name}'s process of this connection is gone (state {state})")]
    Gone { name: String, state: DaemonState },
    #[error("daemon {0} is already connected")]
    AlreadyConnected(String),
}

impl Core {
    /// A hello on the socket pair made for spawn `generation` of `name`: the connection is the
    /// proof of identity, so all that is left to check is that this spawn is still the current one.
    pub(super) fn worker_hello(
        &mut self,
        name: &str,
        generation: u64,
        conn_id: u64,
        tx: ConnTx,
    ) -> Result<(serde_json::Value, Vec<protocol::LeaseInfo>), HelloRefused> {
        let Some(d) = self.daemons.get_mut(name) else {
            return Err(HelloRefused::Unknown(name.to_string()));
        };
        let current = d.generation == generation;
        let Some(p) = d.process.as_mut().filter(|p| current && p.leader_alive()) else {
            return Err(HelloRefused::Gone {
                name: name.to_string(),
                state: d.state,
            });
        };
        if p.conn.is_some() {
            return Err(HelloRefused::AlreadyConnected(name.to_string()));
        }
        p.conn = Some((conn_id, tx));
        p.last_heartbeat = Some(Instant::now());
        Ok((d.cfg.settings.clone(), d.leases.values().cloned().collect()))
    }

    pub(super) fn worker_frame(&mut self, name: &str, conn_id: u64, frame: WorkerFrame) {
        let Some(d) = self.daemons.get_mut(name) else {
            return;
        };
        if !d.is_connection(conn_id) {
            return;
        }
        match frame {
            WorkerFrame::State(StateReport { state, message }) => {
                if let Some(m) = message {
                    d.health.message = m;
                }
                let Some(to) = lifecycle::apply_report(d.state, state) else {
                    self.log.warn(&format!(
                        "{name}: ignored report {state:?} while {}",
                        d.state
                    ));
                    return;
                };
                if to == d.state {
                    return;
                }
                if to == DaemonState::ShuttingDown && d.intent == Intent::None {
                    // The daemon decided to stop by itself: treat its exit as a stop, not a crash.
                    d.intent = Intent::Stop;
                }
                let was = d.state;
                set_state(&self.log, name, d, to);
                if to == DaemonState::ShuttingDown && d.state == to {
                    // Its grace period starts with the report, like any stop's: a worker that says
                    // it is shutting down and then hangs is killed at its end.
                    let (generation, grace) = (d.generation, d.cfg.grace_period);
                    self.schedule(name, generation, TimerKind::Grace, grace);
                    return;
                }
                // A report comes on the live process's connection.
                let Some(p) = d.process.as_mut() else { return };
                if to == DaemonState::Running && was == DaemonState::Paused {
                    p.last_progress_change = Instant::now();
                }
                if to == DaemonState::Running && was == DaemonState::Initializing {
                    let now = Instant::now();
                    p.running_since = Some(now);
                    p.last_heartbeat = Some(now);
                    p.last_progress_change = now;
                    let (generation, timeout) = (
                        d.generation,
                        d.cfg
                            .heartbeat_timeout
                            .min(d.cfg.stall_timeout.unwrap_or(Duration::MAX)),
                    );
                    self.schedule(name, generation, TimerKind::Watchdog, timeout);
                }
            }
            WorkerFrame::Heartbeat(Heartbeat { health, progress }) => {
                let Some(p) = d.process.as_mut() else { return };
                let now = Instant::now();
                p.last_heartbeat = Some(now);
                if progress != d.progress {
                    p.last_progress_change = now;
                }
                d.health = health;
                d.progress = progress;
                if let Some(since) = p.running_since {
                    d.history
                        .note_stable(since - self.started, now - self.started, &d.cfg.restart);
                }
            }
            WorkerFrame::SpawnJob(SpawnJob {
                request_id,
                command,
                max_runtime_secs,
                env,
                work_item,
            }) => {
                self.spawn_job(name, request_id, command, max_runtime_secs, env, work_item);
            }
            WorkerFrame::Work(protocol::WorkRequest { request_id, op }) => {
                let Some(conn) = d.conn().cloned() else {
                    return;
                };
                // Filling and reaping the queue is the leader's: fenced like its events.
                let fenced = matches!(
                    op,
                    protocol::WorkOp::TopUp { .. } | protocol::WorkOp::Reap { .. }
                )
                .then(|| self.fence_for(name, &serde_json::json!({})).err())
                .flatten()
                .map(|(_, e)| e);
                if let Some(message) = fenced.or_else(|| op.may_ask(name).err()) {
                    self.log
                        .warn(&format!("{name}: work request refused: {message}"));
                    let _ = conn.send(FromSupervisor::Work {
                        request_id,
                        answer: protocol::WorkAnswer::Refused { message },
                    });
                    return;
                }
                let cmd = crate::cluster::work::Cmd::Op {
                    daemon: name.to_string(),
                    conn: conn.clone(),
                    request_id,
                    op,
                };
                if !self.work_cmd(cmd) {
                    let message = if self.work.is_some() {
                        "not reachable yet: this node is not on the bus"
                    } else {
                        "this node is not in a cluster: there is none"
                    };
                    let _ = conn.send(FromSupervisor::Work {
                        request_id,
                        answer: protocol::WorkAnswer::Refused {
                            message: message.into(),
                        },
                    });
                }
            }
            WorkerFrame::Emit(Emit {
                event_type,
                payload,
                ..
            }) => {
                let name = name.to_string();
                let published = self.fence_for(&name, &payload).and_then(|fence| {
                    self.publish_fenced(Origin::Daemon(&name), &event_type, payload, fence)
                });
                if let Err((code, e)) = published {
                    self.log.warn(&format!("{name}: event refused: {e}"));
                    self.send_to_worker(&name, error(code, &e));
                }
            }
            WorkerFrame::Subscribe(Subscribe { event_types }) => {
                let tx = self.daemons.get(name).and_then(|d| d.conn().cloned());
                if let Some(tx) = tx {
                    match self.events.subscribe(name, &event_types, tx) {
                        Ok(()) => self
                            .log
                            .info(&format!("{name}: subscribed to {}", event_types.join(", "))),
                        Err(e) => {
                            let e = e.to_string();
                            self.log.warn(&format!("{name}: {e}"));
                            self.send_to_worker(name, error(protocol::ErrorCode::BadRequest, &e));
                        }
                    }
                }
            }
            WorkerFrame::Ack(Ack { seq }) => self.events.ack(name, seq),
        }
    }

    /// Publishes an event for `origin` after checking that it may emit that type
    /// (`ringrift::events::may_emit`); the event's `source` is the origin, never what a sender claims.
    pub(super) fn publish_from(
        &mut self,
        origin: Origin<'_>,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<Arc<ringrift::events::Event>, (protocol::ErrorCode, String)> {
        self.publish_fenced(origin, event_type, payload, None)
    }

    /// As [`Core::publish_from`], with the fencing token of the lease the daemon acts under.
    fn publish_fenced(
        &mut self,
        origin: Origin<'_>,
        event_type: &str,
        payload: serde_json::Value,
        fence: Option<ringrift::events::Fence>,
    ) -> Result<Arc<ringrift::events::Event>, (protocol::ErrorCode, String)> {
        if let Some(spec) = ringrift::events::find(&ringrift::events::normalize(event_type))
            && let Err(e) = ringrift::events::may_emit(spec, origin)
        {
            return Err((protocol::ErrorCode::Forbidden, e.0));
        }
        self.events
            .publish_fenced(event_type, payload, origin.as_str(), fence)
            .map_err(|e| match e {
                crate::events::PublishError::Fenced { .. } => {
                    (protocol::ErrorCode::Forbidden, e.to_string())
                }
                e => (protocol::ErrorCode::BadRequest, e.to_string()),
            })
    }

    /// The fence of an event a cluster-scoped daemon emits: the lease it acts under (for a lease
    /// per config key, the one of the payload's `config_key`) and its token. Refused when this
    /// node does not hold that lease now: a cycle that was under way when the lease went may
    /// finish, but what it would announce is no longer this node's to say (fail closed).
    fn fence_for(
        &self,
        daemon: &str,
        payload: &serde_json::Value,
    ) -> Result<Option<ringrift::events::Fence>, (protocol::ErrorCode, String)> {
        let Some(d) = self.daemons.get(daemon) else {
            return Ok(None);
        };
        if d.leases.is_empty() {
            return Ok(None);
        }
        let Some(name) = ringrift::catalog::event_lease(daemon, payload) else {
            return Ok(None);
        };
        match d.leases.get(&name) {
            Some(l) if l.leader => Ok(Some(ringrift::events::Fence {
                lease: name,
                token: l.token,
            })),
            Some(l) => Err((
                protocol::ErrorCode::Forbidden,
                format!(
                    "fenced: this node does not hold the lease {name} ({})",
                    l.leader_text()
                ),
            )),
            None => Err((
                protocol::ErrorCode::Forbidden,
                format!(
                    "fenced: {daemon} acts under a lease per config key, and this event names none of the configured keys ({name})"
                ),
            )),
        }
    }

    pub(super) fn send_to_worker(&self, name: &str, frame: FromSupervisor) {
        if let Some(tx) = self.daemons.get(name).and_then(|d| d.conn()) {
            let _ = tx.send(frame);
        }
    }
}
