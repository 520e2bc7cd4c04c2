//! The dependency graph between daemons: which must be up before which, and in what order to
//! start and stop a set of them.
//!
//! The graph is a plain map from a daemon to the daemons it depends on, so that configuration
//! loading, the supervisor and the tests all share one representation. Every function is pure and
//! deterministic: ties are broken by name (the map's order), never by hash order.

use std::collections::{BTreeMap, BTreeSet};

/// Daemon → the daemons it depends on.
pub type Graph = BTreeMap<String, Vec<String>>;

/// What [`validate`] finds wrong with a graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// The path of one cycle, first node repeated at the end: `["a", "b", "c", "a"]`.
    #[error("dependency cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
    /// An edge to a daemon that is not in the graph.
    #[error("{daemon} depends on unknown daemon {missing}")]
    Missing {
        /// The daemon whose `depends_on` names it.
        daemon: String,
        /// The unknown name, as it appears in the graph.
        missing: String,
    },
}

/// Checks that every edge points at a known daemon and that there is no cycle.
///
/// All missing dependencies are reported (in name order), plus at most one cycle: the first one a
/// depth-first search meets when visiting daemons and their dependencies in name order.
pub fn validate(g: &Graph) -> Result<(), Vec<GraphError>> {
    let mut errors = Vec::new();
    for (daemon, deps) in g {
        let mut seen = BTreeSet::new();
        for dep in deps {
            if !g.contains_key(dep) && seen.insert(dep) {
                errors.push(GraphError::Missing {
                    daemon: daemon.clone(),
                    missing: dep.clone(),
                });
            }
        }
    }
    if let Some(cycle) = find_cycle(g) {
        errors.push(GraphError::Cycle(cycle));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    OnPath,
    Done,
}

fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    let mut path: Vec<&str> = Vec::new();
    for start in g.keys() {
        if !marks.contains_key(start.as_str())
            && let Some(cycle) = visit(g, start, &mut marks, &mut path)
        {
            return Some(cycle);
        }
    }
    None
}

fn visit<'a>(
    g: &'a Graph,
    node: &'a str,
    marks: &mut BTreeMap<&'a str, Mark>,
    path: &mut Vec<&'a str>,
) -> Option<Vec<String>> {
    marks.insert(node, Mark::OnPath);
    path.push(node);
    for dep in sorted_deps(g, node) {
        if !g.contains_key(dep) {
            continue; // reported as Missing
        }
        match marks.get(dep) {
            Some(Mark::OnPath) => {
                let from = path.iter().position(|n| *n == dep).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..].iter().map(|n| n.to_string()).collect();
                cycle.push(dep.to_string());
                return Some(cycle);
            }
            Some(Mark::Done) => {}
            None => {
                if let Some(cycle) = visit(g, dep, marks, path) {
                    return Some(cycle);
                }
            }
        }
    }
    path.pop();
    marks.insert(node, Mark::Done);
    None
}

/// Dependencies of `node` in name order, without duplicates.
fn sorted_deps<'a>(g: &'a Graph, node: &str) -> BTreeSet<&'a str> {
    g.get(node)
        .map(|deps| deps.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

/// `targets` plus everything they transitively depend on.
pub fn with_dependencies(g: &Graph, targets: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = targets.clone();
    let mut todo: Vec<String> = targets.iter().cloned().collect();
    while let Some(node) = todo.pop() {
        for dep in g.get(&node).into_iter().flatten() {
            if out.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    out
}

/// `targets` plus everything that transitively depends on them.
pub fn with_dependents(g: &Graph, targets: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = targets.clone();
    let mut todo: Vec<String> = targets.iter().cloned().collect();
    while let Some(node) = todo.pop() {
        for dependent in dependents_of(g, &node) {
            if out.insert(dependent.to_string()) {
                todo.push(dependent.to_string());
            }
        }
    }
    out
}

/// Topological order of `set`, dependencies first, ties broken by name.
///
/// Edges to daemons outside `set` are ignored. Meant for a validated graph; should a cycle slip
/// through, the daemons caught in it are appended in name order so that none is lost.
pub fn start_order(g: &Graph, set: &BTreeSet<String>) -> Vec<String> {
    // Number of unplaced dependencies (inside `set`) of each member.
    let mut pending: BTreeMap<&str, usize> = set
        .iter()
        .map(|n| {
            let inside = sorted_deps(g, n)
                .into_iter()
                .filter(|d| set.contains(*d))
                .count();
            (n.as_str(), inside)
        })
        .collect();
    let mut ready: BTreeSet<&str> = pending
        .iter()
        .filter(|(_, count)| **count == 0)
        .map(|(n, _)| *n)
        .collect();
    let mut order = Vec::with_capacity(set.len());
    while let Some(node) = ready.pop_first() {
        pending.remove(node);
        order.push(node.to_string());
        for dependent in dependents_of(g, node) {
            if let Some(count) = pending.get_mut(dependent) {
                *count -= 1;
                if *count == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    order.extend(pending.keys().map(|n| n.to_string()));
    order
}

/// Reverse of [`start_order`]: dependents first.
pub fn stop_order(g: &Graph, set: &BTreeSet<String>) -> Vec<String> {
    let mut order = start_order(g, set);
    order.reverse();
    order
}

/// Dependencies of `name` that are not up according to `is_up`, in the order they are listed.
pub fn unmet<'a>(g: &'a Graph, name: &str, is_up: impl Fn(&str) -> bool) -> Vec<&'a str> {
    let mut out: Vec<&'a str> = Vec::new();
    for dep in g.get(name).into_iter().flatten() {
        if !is_up(dep) && !out.contains(&dep.as_str()) {
            out.push(dep);
        }
    }
    out
}

/// Daemons that depend directly on `name`, in name order.
pub fn dependents_of<'a>(g: &'a Graph, name: &str) -> Vec<&'a str> {
    g.iter()
        .filter(|(_, deps)| deps.iter().any(|d| d == name))
        .map(|(n, _)| n.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: [&str; 4] = [
        "auto_sync",
        "cluster_data_sync",
        "auto_export",
        "quality_monitor",
    ];

    fn graph(edges: &[(&str, &[&str])]) -> Graph {
        edges
            .iter()
            .map(|(n, deps)| (n.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    fn seed() -> Graph {
        graph(&[
            ("auto_sync", &[]),
            ("cluster_data_sync", &[]),
            ("auto_export", &[]),
            ("quality_monitor", &[]),
            ("training_trigger", &SOURCES),
            ("evaluation", &["training_trigger"]),
            ("auto_promotion", &["evaluation"]),
            ("ephemeral_sync", &[]),
            ("model_distribution", &[]),
            ("unified_node_health", &[]),
            ("idle_resource", &[]),
            ("unified_idle_shutdown", &[]),
            ("queue_populator", &[]),
            ("selfplay_scheduler", &[]),
            ("job_reaper", &[]),
        ])
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn all(g: &Graph) -> BTreeSet<String> {
        g.keys().cloned().collect()
    }

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn seed_graph_is_valid() {
        assert_eq!(validate(&seed()), Ok(()));
    }

    #[test]
    fn start_order_puts_dependencies_first() {
        let g = seed();
        let order = start_order(&g, &all(&g));
        assert_eq!(order.len(), g.len());
        let tt = pos(&order, "training_trigger");
        for s in SOURCES {
            assert!(pos(&order, s) < tt, "{s} after training_trigger: {order:?}");
        }
        assert!(tt < pos(&order, "evaluation"));
        assert!(pos(&order, "evaluation") < pos(&order, "auto_promotion"));
        // Ties are broken by name: independent daemons come out alphabetically.
        assert_eq!(order[0], "auto_export");
    }

    #[test]
    fn stop_order_is_the_reverse() {
        let g = seed();
        let mut start = start_order(&g, &all(&g));
        let stop = stop_order(&g, &all(&g));
        assert!(pos(&stop, "auto_promotion") < pos(&stop, "evaluation"));
        assert!(pos(&stop, "evaluation") < pos(&stop, "training_trigger"));
        for s in SOURCES {
            assert!(pos(&stop, "training_trigger") < pos(&stop, s));
        }
        start.reverse();
        assert_eq!(stop, start);
    }

    #[test]
    fn order_ignores_edges_leaving_the_set() {
        let g = seed();
        let order = start_order(&g, &set(&["evaluation", "auto_promotion", "job_reaper"]));
        assert_eq!(order, ["evaluation", "auto_promotion", "job_reaper"]);
    }

    #[test]
    fn cycle_is_reported_as_a_path() {
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]);
        let errors = validate(&g).unwrap_err();
        assert_eq!(
            errors,
            [GraphError::Cycle(vec![
                "a".into(),
                "b".into(),
                "c".into(),
                "a".into()
            ])]
        );
        assert_eq!(errors[0].to_string(), "dependency cycle: a → b → c → a");
        // Even with a cycle, every member still gets a place in the order.
        assert_eq!(start_order(&g, &all(&g)).len(), 4);
    }

    #[test]
    fn self_dependency_is_a_cycle() {
        let g = graph(&[("a", &["a"])]);
        assert_eq!(
            validate(&g),
            Err(vec![GraphError::Cycle(vec!["a".into(), "a".into()])])
        );
    }

    #[test]
    fn missing_dependencies_are_all_reported() {
        let g = graph(&[("a", &["ghost", "b", "ghost"]), ("b", &["phantom"])]);
        let errors = validate(&g).unwrap_err();
        assert_eq!(
            errors,
            [
                GraphError::Missing {
                    daemon: "a".into(),
                    missing: "ghost".into()
                },
                GraphError::Missing {
                    daemon: "b".into(),
                    missing: "phantom".into()
                },
            ]
        );
        assert_eq!(errors[0].to_string(), "a depends on unknown daemon ghost");
    }

    #[test]
    fn missing_and_cycle_together() {
        let g = graph(&[("a", &["b", "nope"]), ("b", &["a"])]);
        let errors = validate(&g).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(matches!(&errors[0], GraphError::Missing { .. }));
        assert_eq!(
            errors[1],
            GraphError::Cycle(vec!["a".into(), "b".into(), "a".into()])
        );
    }

    #[test]
    fn dependencies_of_the_chain_end() {
        let g = seed();
        let mut expected = set(&["auto_promotion", "evaluation", "training_trigger"]);
        expected.extend(set(&SOURCES));
        assert_eq!(with_dependencies(&g, &set(&["auto_promotion"])), expected);
        assert_eq!(
            with_dependencies(&g, &set(&["job_reaper"])),
            set(&["job_reaper"])
        );
    }

    #[test]
    fn dependents_of_a_source() {
        let g = seed();
        assert_eq!(
            with_dependents(&g, &set(&["auto_sync"])),
            set(&[
                "auto_sync",
                "training_trigger",
                "evaluation",
                "auto_promotion"
            ])
        );
        assert_eq!(dependents_of(&g, "auto_sync"), ["training_trigger"]);
        assert_eq!(dependents_of(&g, "auto_promotion"), Vec::<&str>::new());
    }

    #[test]
    fn unmet_lists_what_is_not_up() {
        let g = seed();
        let up = set(&["auto_sync", "auto_export"]);
        assert_eq!(
            unmet(&g, "training_trigger", |d| up.contains(d)),
            ["cluster_data_sync", "quality_monitor"]
        );
        assert!(unmet(&g, "training_trigger", |_| true).is_empty());
        assert!(unmet(&g, "job_reaper", |_| false).is_empty());
        assert!(unmet(&g, "no_such_daemon", |_| false).is_empty());
    }
}
