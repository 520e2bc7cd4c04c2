//! Requests waiting for daemons to reach a state, and the answer each gets.

use super::*;

impl Core {
    pub(super) fn add_waiter(
        &mut self,
        targets: Vec<String>,
        goal: Goal,
        early: Vec<OpResult>,
        reply: Reply,
        no_wait: bool,
    ) {
        if no_wait {
            let mut results = early;
            results.extend(
                targets
                    .iter()
                    .map(|n| OpResult::done(n, self.daemons[n].state.as_str())),
            );
            let ok = results.iter().all(|r| r.ok);
            let _ = reply.send(FromSupervisor::Done { ok, results });
            return;
        }
        let marks = targets
            .iter()
            .map(|n| {
                let d = &self.daemons[n];
                (d.stop_overrides, d.failures)
            })
            .collect();
        let within = self.request_deadline(&targets, goal);
        self.waiter_seq += 1;
        let id = self.waiter_seq;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(within).await;
            let _ = tx.send(Msg::WaiterDeadline { id });
        });
        self.waiters.push(Waiter {
            id,
            targets,
            marks,
            deadline: Instant::now() + within,
            goal,
            reply,
            early,
        });
    }

    /// How long a request may take: per level of the dependency chain among its targets, the
    /// longest grace period (stops) or ready timeout (starts) of its daemons, plus a margin.
    pub(super) fn request_deadline(&self, targets: &[String], goal: Goal) -> Duration {
        const MARGIN: Duration = Duration::from_secs(5);
        let set: BTreeSet<&String> = targets.iter().collect();
        let graph = self.config.graph();
        let order = deps::start_order(&graph, &targets.iter().cloned().collect());
        let mut level: BTreeMap<&str, u32> = BTreeMap::new();
        for n in &order {
            let l = self.daemons[n]
                .cfg
                .depends_on
                .iter()
                .filter(|d| set.contains(d))
                .filter_map(|d| level.get(d.as_str()))
                .max()
                .map_or(1, |l| l + 1);
            level.insert(n, l);
        }
        let levels = level.values().copied().max().unwrap_or(1);
        let each = targets
            .iter()
            .map(|n| {
                let c = &self.daemons[n].cfg;
                match goal {
                    Goal::Down => c.grace_period,
                    // A start may also wait out a restart or two before it is ready.
                    _ => c.ready_timeout + c.grace_period,
                }
            })
            .max()
            .unwrap_or_default();
        each * levels + MARGIN
    }

    /// A request's deadline: every target not yet settled is answered with its state now.
    pub(super) fn waiter_deadline(&mut self, id: u64) {
        let Some(i) = self.waiters.iter().position(|w| w.id == id) else {
            return;
        };
        let w = self.waiters.swap_remove(i);
        let outcomes = self.outcomes(&w);
        self.answer(w, outcomes);
    }

    /// Answers every waiter whose daemons have all reached a final state for its goal.
    pub(super) fn resolve_waiters(&mut self) {
        // A client that gave up (timed out, Ctrl-C) no longer needs an answer.
        self.waiters.retain(|w| !w.reply.is_closed());
        let mut i = 0;
        while i < self.waiters.len() {
            let outcomes = self.outcomes(&self.waiters[i]);
            if outcomes.iter().all(Option::is_some) {
                let w = self.waiters.swap_remove(i);
                self.answer(w, outcomes);
            } else {
                i += 1;
            }
        }
    }

    /// Sends a waiter its answer: per target its outcome, or (None, at the deadline) its state now.
    fn answer(&self, w: Waiter, outcomes: Vec<Option<Outcome>>) {
        let mut results = w.early;
        for (name, outcome) in w.targets.iter().zip(outcomes) {
            results.push(match outcome {
                Some(Outcome::Reached(m)) => OpResult::done(name, m),
                Some(Outcome::Missed(m)) => OpResult::failed(name, ErrorCode::Failed, m),
                None => {
                    let d = &self.daemons[name];
                    let why = d
                        .reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default();
                    let m = format!("still {} at the request's deadline{why}", d.state);
                    OpResult::failed(name, ErrorCode::Failed, m)
                }
            });
        }
        let ok = results.iter().all(|r| r.ok);
        let _ = w.reply.send(FromSupervisor::Done { ok, results });
    }

    /// What became of each of a waiter's targets so far: None while it is still on its way.
    pub(super) fn outcomes(&self, w: &Waiter) -> Vec<Option<Outcome>> {
        let mut out: Vec<Option<Outcome>> = Vec::with_capacity(w.targets.len());
        for (k, name) in w.targets.iter().enumerate() {
            let d = &self.daemons[name];
            let (overrides, failures) = w.marks[k];
            let reason = || {
                d.reason
                    .clone()
                    .or_else(|| d.last_exit.clone())
                    .unwrap_or_else(|| "stopped".into())
            };
            let outcome = match (w.goal, d.state) {
                (Goal::Down, _) if d.stop_overrides != overrides => Some(Outcome::Missed(format!(
                    "stop overridden by a later start or restart (now {})",
                    d.state
                ))),
                (Goal::Down, s) if s.is_at_rest() => Some(Outcome::Reached(match &d.stop_how {
                    Some(how) => format!("{s} ({how})"),
                    None => format!("{s}"),
                })),
                (Goal::Up, DaemonState::Running | DaemonState::Paused) => Some(Outcome::Reached(
                    format!("{} (pid {})", d.state, d.pid().unwrap_or(0)),
                )),
                (Goal::Up, DaemonState::Failed | DaemonState::Stopped) => {
                    Some(Outcome::Missed(format!("{}: {}", d.state, reason())))
                }
                // An attempt made for this request failed, and the next one will not come soon
                // enough to answer by the deadline (or the program cannot be started at all).
                (Goal::Up, DaemonState::Backoff)
                    if d.failures > failures
                        && (d.spawn_failed || d.next_attempt.is_none_or(|t| t >= w.deadline)) =>
                {
                    let next = d
                        .next_attempt
                        .map(|t| {
                            format!(
                                "; next attempt in {:.1}s",
                                t.saturating_duration_since(Instant::now()).as_secs_f64()
                            )
                        })
                        .unwrap_or_default();
                    Some(Outcome::Missed(format!("BACKOFF: {}{next}", reason())))
                }
                // Waiting for a dependency that has already failed this request.
                (Goal::Up, DaemonState::Waiting) => d.cfg.depends_on.iter().find_map(|dep| {
                    let j = w.targets.iter().position(|t| t == dep)?;
                    match out.get(j)? {
                        Some(Outcome::Missed(m)) => Some(Outcome::Missed(format!(
                            "WAITING: dependency {dep} is not ready ({m})"
                        ))),
                        _ => None,
                    }
                }),
                (Goal::Paused, DaemonState::Paused) => Some(Outcome::Reached("PAUSED".into())),
                (Goal::Paused, s) if s != DaemonState::Running => {
                    Some(Outcome::Missed(format!("{s}")))
                }
                (Goal::Resumed, DaemonState::Running) => Some(Outcome::Reached("RUNNING".into())),
                (Goal::Resumed, s) if s != DaemonState::Paused => {
                    Some(Outcome::Missed(format!("{s}")))
                }
                _ => None,
            };
            out.push(outcome);
        }
        out
    }
}

/// A CLI request waiting for daemons to reach a state.
pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) targets: Vec<String>,
    /// Per target, its (stop_overrides, failures) when the request came: what happened since is news.
    pub(super) marks: Vec<(u64, u64)>,
    /// The request answers by then whatever the daemons' states (grace or ready timeouts plus a margin).
    pub(super) deadline: Instant,
    pub(super) goal: Goal,
    pub(super) reply: Reply,
    /// Results already known (names refused up front, ...).
    pub(super) early: Vec<OpResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Goal {
    Up,
    Down,
    Paused,
    Resumed,
}

/// What became of one target of a request: the goal reached (its state, `RUNNING (pid 42)`), or
/// missed for good (why: `FAILED: exit 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Reached(String),
    Missed(String),
}
