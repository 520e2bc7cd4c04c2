//! What the supervisor does next, decided without touching a process.
//!
//! The core loop (supervisor/core.rs) feeds every input (a request, a worker frame, an exit, a timer,
//! a signal) into its daemon records, then asks these functions what follows and carries out the
//! answer:
//!
//! - [`settle`]: which queued stops may go out now (dependents first) and which waiting daemons may
//!   be spawned (dependencies first), and which cannot start at all because a dependency is at rest;
//! - [`announcements`]: which `DAEMON_*` events a change of state announces.
//!
//! What a reload changes is decided in [`crate::reload::plan`]; what follows an exit in
//! [`crate::restart::decide_after_exit`]; which state changes are legal in [`crate::lifecycle`].
//! The tests below drive [`settle`] against a fake process layer, so whole start and stop
//! sequences run in microseconds (as watchexec's supervisor crate tests its state machine).

use std::collections::{BTreeMap, BTreeSet};

use crate::deps::{self, Graph};
use crate::lifecycle::DaemonState;

/// What settling needs to know of one daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Its lifecycle state now.
    pub state: DaemonState,
    /// A stop was asked for, but it waits until the daemon's dependents are gone.
    pub stop_queued: bool,
}

/// One thing to do, in the order [`settle`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Its dependents are gone (or it has none): ask its process to stop now.
    Stop(String),
    /// It is WAITING and every dependency is up: spawn it.
    Spawn(String),
    /// It is WAITING for dependencies that are on their way; `reason` names them and their states
    /// (`waiting for db (INITIALIZING) to be ready`), for `status`.
    Wait {
        /// The daemon.
        name: String,
        /// For `status`: what it waits for.
        reason: String,
    },
    /// A dependency is STOPPED or FAILED and will not come up by itself: this daemon goes to
    /// STOPPED with `reason` (`not started: dependency db is FAILED`).
    GiveUp {
        /// The daemon.
        name: String,
        /// For `status` and the log: which dependency is at rest.
        reason: String,
    },
}

/// What asking a daemon to stop does, by its state (`stop`, `shutdown`, a reload that removes or
/// disables it, a dependency that is stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// WAITING or BACKOFF: no process, so it is STOPPED at once.
    StopNow,
    /// Already STOPPED or FAILED: nothing to do.
    AtRest,
    /// It has a process: the stop is queued, and [`settle`] sends it once its dependents are gone.
    Queue,
}

/// The rule behind [`OnStop`].
pub fn on_stop(state: DaemonState) -> OnStop {
    match state {
        DaemonState::Waiting | DaemonState::Backoff => OnStop::StopNow,
        DaemonState::Stopped | DaemonState::Failed => OnStop::AtRest,
        _ => OnStop::Queue,
    }
}

/// Whether asking a daemon to start puts it in WAITING (where [`settle`] spawns it once its
/// dependencies are up): only from rest; a daemon on its way or running is left as it is.
pub fn on_start(state: DaemonState) -> bool {
    state.is_at_rest()
}

/// Decides one pass of what can move: first the queued stops whose dependents have no process
/// left, then (unless `may_start` is false, during shutdown) the WAITING daemons in dependency
/// order. Within the pass each step's expected effect is taken into account (a daemon told to stop
/// has a process shutting down, a spawned one is INITIALIZING), as if the steps ran one by one.
///
/// The caller carries out the steps and asks again until a pass brings no
/// [`Step::Stop`], [`Step::Spawn`] or [`Step::GiveUp`]: a spawn can make a dependent startable at
/// once (a plain program without a readiness condition is RUNNING as soon as it is spawned).
pub fn settle(graph: &Graph, daemons: &BTreeMap<String, View>, may_start: bool) -> Vec<Step> {
    let mut view = daemons.clone();
    let mut steps = Vec::new();
    let queued: Vec<String> = view
        .iter()
        .filter(|(_, v)| v.stop_queued)
        .map(|(n, _)| n.clone())
        .collect();
    for name in queued {
        let blocked = deps::dependents_of(graph, &name).iter().any(|dep| {
            view.get(*dep)
                .is_some_and(|d| d.stop_queued || d.state.has_process())
        });
        if blocked {
            continue;
        }
        let v = view.get_mut(&name).expect("listed above");
        v.stop_queued = false;
        v.state = if v.state.has_process() {
            DaemonState::ShuttingDown
        } else {
            DaemonState::Stopped
        };
        steps.push(Step::Stop(name));
    }
    if !may_start {
        return steps;
    }
    let waiting: BTreeSet<String> = view
        .iter()
        .filter(|(_, v)| v.state == DaemonState::Waiting)
        .map(|(n, _)| n.clone())
        .collect();
    for name in deps::start_order(graph, &waiting) {
        let state_of = |n: &str| view.get(n).map_or(DaemonState::Stopped, |v| v.state);
        let unmet: Vec<String> = deps::unmet(graph, &name, |n| state_of(n).satisfies_dependents())
            .into_iter()
            .map(str::to_string)
            .collect();
        if unmet.is_empty() {
            view.get_mut(&name).expect("waiting").state = DaemonState::Initializing;
            steps.push(Step::Spawn(name));
            continue;
        }
        if let Some(dead) = unmet.iter().find(|n| state_of(n).is_at_rest()) {
            let reason = format!("not started: dependency {dead} is {}", state_of(dead));
            view.get_mut(&name).expect("waiting").state = DaemonState::Stopped;
            steps.push(Step::GiveUp { name, reason });
            continue;
        }
        let reason = format!(
            "waiting for {} to be ready",
            unmet
                .iter()
                .map(|n| format!("{n} ({})", state_of(n)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        steps.push(Step::Wait { name, reason });
    }
    steps
}

/// True when carrying out `steps` changes some daemon's state, so settling should look again.
pub fn moves(steps: &[Step]) -> bool {
    steps.iter().any(|s| !matches!(s, Step::Wait { .. }))
}

/// The events the supervisor publishes about its daemons (catalog: `ringrift::events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// `DAEMON_STARTED`: it became RUNNING (not on a resume from PAUSED).
    Started,
    /// `DAEMON_STOPPED`: its process is gone (stopped, or waiting to be restarted).
    Stopped,
    /// `DAEMON_FAILED`: it gave up (restart budget spent, or a failure that restarts cannot mend).
    Failed,
}

impl Announcement {
    /// The event type, as in the catalog.
    pub fn event_type(self) -> &'static str {
        match self {
            Announcement::Started => "DAEMON_STARTED",
            Announcement::Stopped => "DAEMON_STOPPED",
            Announcement::Failed => "DAEMON_FAILED",
        }
    }
}

/// What to announce about a daemon last announced in state `was` that is now in `now`.
/// `respawned` is true when a new process was spawned since that announcement: a process that
/// died and was replaced between two looks (a restart without delay) still has its end announced.
/// Returns the announcements in the order they are published (at most two).
pub fn announcements(was: DaemonState, now: DaemonState, respawned: bool) -> Vec<Announcement> {
    use DaemonState::*;
    let mut out = Vec::new();
    if was == now && !respawned {
        return out;
    }
    if respawned && matches!(was, Running | Paused) && now == Initializing {
        out.push(Announcement::Stopped);
    }
    match now {
        Running if was != Paused => out.push(Announcement::Started),
        Stopped | Backoff if matches!(was, Running | Paused | ShuttingDown | Initializing) => {
            out.push(Announcement::Stopped)
        }
        Failed => out.push(Announcement::Failed),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use DaemonState::*;

    fn graph(edges: &[(&str, &[&str])]) -> Graph {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    /// A fake process layer: spawned processes become ready (or fail) and stopped ones exit when
    /// the test says so; every step the planner returns is carried out the way the core does.
    struct World {
        graph: Graph,
        daemons: BTreeMap<String, View>,
        /// Daemons whose spawn fails at once (the program cannot be started): FAILED.
        broken: BTreeSet<String>,
        /// Plain programs without a readiness condition: RUNNING as soon as they are spawned.
        instant: BTreeSet<String>,
        /// Everything done, in order: "spawn a", "stop a", "give up a: ...".
        log: Vec<String>,
        reasons: BTreeMap<String, String>,
        shutting_down: bool,
    }

    impl World {
        fn new(edges: &[(&str, &[&str])]) -> World {
            let graph = graph(edges);
            let daemons = graph
                .keys()
                .map(|n| {
                    let v = View {
                        state: Stopped,
                        stop_queued: false,
                    };
                    (n.clone(), v)
                })
                .collect();
            World {
                graph,
                daemons,
                broken: BTreeSet::new(),
                instant: BTreeSet::new(),
                log: Vec::new(),
                reasons: BTreeMap::new(),
                shutting_down: false,
            }
        }

        fn state(&self, n: &str) -> DaemonState {
            self.daemons[n].state
        }

        fn set(&mut self, n: &str, s: DaemonState) {
            self.daemons.get_mut(n).unwrap().state = s;
        }

        /// `start NAMES`: the names and their dependencies go to WAITING.
        fn start(&mut self, names: &[&str]) {
            let set = names.iter().map(|s| s.to_string()).collect();
            for n in deps::with_dependencies(&self.graph, &set) {
                if on_start(self.state(&n)) {
                    self.set(&n, Waiting);
                }
            }
            self.settle();
        }

        /// `stop NAMES`: the names and their dependents are queued to stop.
        fn stop(&mut self, names: &[&str]) {
            let set = names.iter().map(|s| s.to_string()).collect();
            for n in deps::with_dependents(&self.graph, &set) {
                let v = self.daemons.get_mut(&n).unwrap();
                match on_stop(v.state) {
                    OnStop::StopNow => v.state = Stopped,
                    OnStop::AtRest => {}
                    OnStop::Queue => v.stop_queued = true,
                }
            }
            self.settle();
        }

        /// The supervisor's settle: ask, carry out, ask again until nothing moves.
        fn settle(&mut self) {
            for _ in 0..=self.daemons.len() + 1 {
                let steps = settle(&self.graph, &self.daemons, !self.shutting_down);
                let again = moves(&steps);
                for step in steps {
                    match step {
                        Step::Stop(n) => {
                            self.log.push(format!("stop {n}"));
                            self.daemons.get_mut(&n).unwrap().stop_queued = false;
                            self.set(&n, ShuttingDown);
                        }
                        Step::Spawn(n) => {
                            self.log.push(format!("spawn {n}"));
                            let to = if self.broken.contains(&n) {
                                Failed
                            } else if self.instant.contains(&n) {
                                Running
                            } else {
                                Initializing
                            };
                            self.set(&n, to);
                        }
                        Step::Wait { name, reason } => {
                            self.reasons.insert(name, reason);
                        }
                        Step::GiveUp { name, reason } => {
                            self.log.push(format!("give up {name}: {reason}"));
                            self.set(&name, Stopped);
                        }
                    }
                }
                if !again {
                    return;
                }
            }
            panic!("settling did not come to rest: {:?}", self.log);
        }

        /// Every INITIALIZING process reports ready, every SHUTTING_DOWN one exits; then settle.
        fn tick(&mut self) {
            let names: Vec<String> = self.daemons.keys().cloned().collect();
            for n in names {
                match self.state(&n) {
                    Initializing => self.set(&n, Running),
                    ShuttingDown => self.set(&n, Stopped),
                    _ => {}
                }
            }
            self.settle();
        }

        fn run_until_quiet(&mut self) {
            for _ in 0..20 {
                let before = self.daemons.clone();
                self.tick();
                if before == self.daemons {
                    return;
                }
            }
            panic!("no rest after 20 ticks: {:?}", self.log);
        }
    }

    const CHAIN: &[(&str, &[&str])] = &[("db", &[]), ("api", &["db"]), ("web", &["api"])];

    #[test]
    fn a_chain_starts_one_level_per_readiness() {
        let mut w = World::new(CHAIN);
        w.start(&["web"]);
        assert_eq!(w.log, ["spawn db"]);
        assert_eq!(
            w.reasons["api"],
            "waiting for db (INITIALIZING) to be ready"
        );
        assert_eq!(w.reasons["web"], "waiting for api (WAITING) to be ready");
        w.tick();
        assert_eq!(w.log, ["spawn db", "spawn api"]);
        w.run_until_quiet();
        assert_eq!(w.log, ["spawn db", "spawn api", "spawn web"]);
        assert!(w.daemons.values().all(|v| v.state == Running));
    }

    #[test]
    fn plain_programs_without_readiness_start_a_whole_chain_in_one_settle() {
        let mut w = World::new(CHAIN);
        w.instant = ["db", "api", "web"].map(String::from).into();
        w.start(&["web"]);
        assert_eq!(w.log, ["spawn db", "spawn api", "spawn web"]);
    }

    #[test]
    fn stops_go_dependents_first_and_wait_for_their_exit() {
        let mut w = World::new(CHAIN);
        w.start(&["web"]);
        w.run_until_quiet();
        w.log.clear();
        w.stop(&["db"]);
        assert_eq!(w.log, ["stop web"], "api and db wait for web to exit");
        assert!(w.daemons["db"].stop_queued && w.daemons["api"].stop_queued);
        w.tick();
        assert_eq!(w.log, ["stop web", "stop api"]);
        w.run_until_quiet();
        assert_eq!(w.log, ["stop web", "stop api", "stop db"]);
        assert!(
            w.daemons
                .values()
                .all(|v| v.state == Stopped && !v.stop_queued)
        );
    }

    #[test]
    fn a_failed_dependency_leaves_its_dependents_stopped_with_the_reason() {
        let mut w = World::new(CHAIN);
        w.broken.insert("db".into());
        w.start(&["web"]);
        assert_eq!(
            w.log,
            [
                "spawn db",
                "give up api: not started: dependency db is FAILED",
                "give up web: not started: dependency api is STOPPED",
            ]
        );
        assert_eq!(w.state("web"), Stopped);
    }

    #[test]
    fn independent_daemons_start_together_and_siblings_wait_for_the_shared_dependency() {
        let mut w = World::new(&[("a", &[]), ("b", &[]), ("c", &["a"]), ("d", &["a", "b"])]);
        w.start(&["c", "d"]);
        assert_eq!(w.log, ["spawn a", "spawn b"]);
        assert_eq!(
            w.reasons["d"],
            "waiting for a (INITIALIZING), b (INITIALIZING) to be ready"
        );
        w.tick();
        assert_eq!(w.log, ["spawn a", "spawn b", "spawn c", "spawn d"]);
    }

    #[test]
    fn during_shutdown_nothing_starts_and_stops_still_go_out() {
        let mut w = World::new(CHAIN);
        w.start(&["web"]);
        w.tick();
        w.shutting_down = true;
        w.stop(&["db"]);
        w.run_until_quiet();
        // web was still WAITING: it goes to STOPPED without a process to stop, and never starts.
        assert_eq!(w.log, ["spawn db", "spawn api", "stop api", "stop db"]);
        assert_eq!(w.state("web"), Stopped);
    }

    #[test]
    fn a_queued_stop_without_a_process_ends_stopped() {
        let mut deps = BTreeMap::new();
        deps.insert(
            "a".to_string(),
            View {
                state: Backoff,
                stop_queued: true,
            },
        );
        let steps = settle(&graph(&[("a", &[])]), &deps, true);
        assert_eq!(steps, [Step::Stop("a".into())]);
        assert!(moves(&steps));
        assert!(!moves(&[Step::Wait {
            name: "a".into(),
            reason: String::new()
        }]));
    }

    #[test]
    fn a_stop_or_start_request_depends_only_on_the_state() {
        assert_eq!(on_stop(Waiting), OnStop::StopNow);
        assert_eq!(on_stop(Backoff), OnStop::StopNow);
        assert_eq!(on_stop(Failed), OnStop::AtRest);
        for s in [Initializing, Running, Paused, ShuttingDown] {
            assert_eq!(on_stop(s), OnStop::Queue, "{s}");
        }
        assert!(on_start(Stopped) && on_start(Failed));
        assert!(!on_start(Backoff) && !on_start(Running) && !on_start(ShuttingDown));
    }

    #[test]
    fn announcements_follow_the_transition() {
        use Announcement as A;
        assert_eq!(announcements(Initializing, Running, false), [A::Started]);
        assert_eq!(announcements(Paused, Running, false), []);
        assert_eq!(announcements(Running, Paused, false), []);
        assert_eq!(announcements(ShuttingDown, Stopped, false), [A::Stopped]);
        assert_eq!(announcements(Running, Backoff, false), [A::Stopped]);
        assert_eq!(announcements(Waiting, Stopped, false), [], "never ran");
        assert_eq!(announcements(Backoff, Failed, false), [A::Failed]);
        assert_eq!(announcements(Running, Running, false), []);
        // Died and respawned between two looks: the end is announced, then (once ready) the start.
        assert_eq!(announcements(Running, Initializing, true), [A::Stopped]);
        assert_eq!(announcements(Running, Running, true), [A::Started]);
        assert_eq!(A::Failed.event_type(), "DAEMON_FAILED");
    }
}
