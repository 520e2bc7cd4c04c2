//! The cluster on NATS JetStream (issue 12): each test starts its own `nats-server` on free
//! loopback ports, with its store in a temporary directory, and supervisor roots that join it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use ringrift::protocol::ClusterReport;

use nix::sys::signal::Signal::SIGTERM;

use super::common::*;

const T: Duration = Duration::from_secs(20);

/// A `nats-server` with JetStream, on loopback only; stopped when dropped.
struct Nats {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Nats::spawn(port, store.path());
        Nats {
            child,
            port,
            _store: store,
        }
    }

    fn spawn(port: u16, store: &std::path::Path) -> Child {
        let program = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("nats-server is not installed (apt-get install nats-server; .ci/run does)");
        let child = std::process::Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .args(["-n", &format!("test-{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        assert!(
            wait_until(T, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "nats-server did not listen on {port}"
        );
        child
    }

    /// Stops the server (SIGTERM, as an operator would), keeping its store.
    fn stop(&mut self) {
        signal(self.child.id(), SIGTERM);
        if !wait_until(T, || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and store.
    fn restart(&mut self) {
        self.child = Nats::spawn(self.port, self._store.path());
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node: a root whose configuration joins the cluster at `nats` as `id`.
fn node(nats: &Nats, id: &str, http: Option<u16>) -> Root {
    let http = match http {
        Some(port) => format!("http:\n  addr: 127.0.0.1:{port}\n"),
        None => "http:\n  enabled: false\n".into(),
    };
    Root::with_config(&format!(
        "{http}cluster:\n  enabled: true\n  node_id: {id}\n  servers: [{}]\n  \
         heartbeat_interval: 300ms\n  node_expiry: 2s\n\
         daemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n",
        nats.url()
    ))
}

fn cluster(root: &Root) -> ClusterReport {
    serde_json::from_str(&root.ok(&["cluster", "status", "--json"])).expect("cluster JSON")
}

fn node_ids(report: &ClusterReport) -> Vec<String> {
    report
        .nodes
        .iter()
        .map(|n| n.record.node_id.clone())
        .collect()
}

/// NODE_JOINED or NODE_LEFT events about `id` after sequence number `after`.
fn node_events(root: &Root, kind: &str, id: &str, after: u64) -> usize {
    root.events_of(kind)
        .iter()
        .filter(|e| e.seq > after && e.payload["node_id"] == id)
        .count()
}

#[test]
fn three_nodes_see_each_other_and_a_killed_one_leaves_and_comes_back() {
    let nats = Nats::start();
    let http = free_port();
    let a = node(&nats, "node-a", Some(http));
    let b = node(&nats, "node-b", None);
    let c = node(&nats, "node-c", None);
    for r in [&a, &b, &c] {
        r.ok(&["start", "napper"]);
    }
    let all = ["node-a", "node-b", "node-c"];
    for r in [&a, &b, &c] {
        assert!(
            wait_until(T, || node_ids(&cluster(r)) == all),
            "not every node listed: {:#?}\nmaster log:\n{}",
            cluster(r),
            r.master_log()
        );
    }
    let report = cluster(&a);
    assert!(report.connected && report.error.is_none(), "{report:#?}");
    let b_entry = &report.nodes[1];
    assert_eq!(b_entry.record.daemons["napper"], DaemonState::Running);
    assert!(b_entry.record.cores >= 1 && b_entry.record.memory_bytes > 0);
    assert!(b_entry.last_seen_secs < 2.0, "{b_entry:#?}");
    // The table names every node, and GET /cluster/status returns the same view.
    let table = a.ok(&["cluster", "status"]);
    for id in all {
        assert!(table.contains(id), "{table}");
    }
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    conn.write_all(b"GET /cluster/status HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let over_http: ClusterReport = serde_json::from_str(body).unwrap();
    assert_eq!(node_ids(&over_http), all);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut metrics = String::new();
    conn.read_to_string(&mut metrics).unwrap();
    assert!(metrics.contains("ringrift_cluster_nodes 3\n"), "{metrics}");
    assert!(
        metrics.contains("ringrift_cluster_node_daemons_running{node=\"node-b\"} 1\n"),
        "{metrics}"
    );

    // SIGKILL of b's supervisor: its record expires (node_expiry 2 s) and the others announce
    // NODE_LEFT within the expiry plus two seconds.
    let mark = a.events(&[]).last().map_or(0, |e| e.seq);
    let b_pid = b.supervisor_pid().unwrap();
    signal(b_pid, SIGKILL);
    let killed = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(4), || node_events(
            &a,
            "NODE_LEFT",
            "node-b",
            mark
        ) == 1),
        "no NODE_LEFT for node-b on node-a within 4 s:\n{}",
        a.master_log()
    );
    eprintln!("NODE_LEFT after {:?}", killed.elapsed());
    assert!(wait_until(T, || node_events(&c, "NODE_LEFT", "node-b", 0) == 1));
    assert_eq!(node_ids(&cluster(&a)), ["node-a", "node-c"]);

    // b comes back: NODE_JOINED on the others.
    b.ok(&["start", "napper"]);
    assert!(
        wait_until(T, || node_events(&a, "NODE_JOINED", "node-b", mark) == 1),
        "no NODE_JOINED for node-b after its restart:\n{}",
        a.master_log()
    );
    assert!(wait_until(T, || node_ids(&cluster(&c)) == all));
}

#[test]
fn a_node_without_a_cluster_says_so_and_one_without_a_bus_keeps_supervising() {
    let single = Root::with_config(
        "http:\n  enabled: false\ndaemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n",
    );
    single.ok(&["start", "napper"]);
    let out = single.run(&["cluster", "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in a cluster"),
        "{out:?}"
    );

    // A bus that is not there: the node runs its daemons, and `cluster status` says why it is
    // not connected (exit 1).
    let port = free_port();
    let lonely = Root::with_config(&format!(
        "http:\n  enabled: false\ncluster:\n  enabled: true\n  node_id: lonely\n  \
         servers: [nats://127.0.0.1:{port}]\n  heartbeat_interval: 300ms\n  node_expiry: 2s\n\
         daemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n"
    ));
    lonely.ok(&["start", "napper"]);
    assert_eq!(lonely.state("napper"), DaemonState::Running);
    assert!(wait_until(T, || {
        let out = lonely.run(&["cluster", "status", "--json"]);
        let r: ClusterReport = serde_json::from_slice(&out.stdout).unwrap();
        out.status.code() == Some(1) && !r.connected && r.error.is_some_and(|e| e.contains("bus"))
    }));
}

/// node-a and node-c, started and listed by each other.
fn pair(nats: &Nats) -> (Root, Root) {
    let a = node(nats, "node-a", None);
    let c = node(nats, "node-c", None);
    for r in [&a, &c] {
        r.ok(&["start", "napper"]);
    }
    assert!(wait_until(T, || node_ids(&cluster(&c)) == ["node-a", "node-c"]));
    (a, c)
}

/// NEW_GAMES_AVAILABLE events on `root` that came from `node`, by their `new_games`.
fn remote_games(root: &Root, node: &str) -> Vec<i64> {
    root.events_of("NEW_GAMES_AVAILABLE")
        .iter()
        .filter(|e| e.node.as_deref() == Some(node))
        .map(|e| e.payload["new_games"].as_i64().unwrap())
        .collect()
}

fn emit_games(root: &Root, n: u32) {
    root.ok(&[
        "emit",
        "NEW_GAMES_AVAILABLE",
        &format!("{{\"config_key\":\"hex8_2p\",\"new_games\":{n}}}"),
    ]);
}

#[test]
fn events_cross_the_cluster_and_wait_for_a_node_that_is_down() {
    let nats = Nats::start();
    let (a, c) = pair(&nats);

    // Emitted on A, it reaches C's log with A as its node, its id and source kept; a type that
    // stays on its node (DAEMON_*) does not cross.
    emit_games(&a, 1);
    assert!(
        wait_until(T, || remote_games(&c, "node-a") == [1]),
        "not on node-c:\n{}",
        c.master_log()
    );
    let on_a = &a.events_of("NEW_GAMES_AVAILABLE")[0];
    let on_c = c
        .events_of("NEW_GAMES_AVAILABLE")
        .into_iter()
        .find(|e| e.node.is_some())
        .unwrap();
    assert_eq!((&on_c.id, &on_c.source), (&on_a.id, &on_a.source));
    assert!(on_a.node.is_none(), "A's own event has no node");
    assert!(
        c.events_of("DAEMON_STARTED")
            .iter()
            .all(|e| e.node.is_none())
    );
    let table = c.ok(&["events", "--cluster"]);
    assert!(table.contains("node-a/cli"), "{table}");

    // Emitted while C is down, it reaches C after C restarts, once.
    c.ok(&["shutdown"]);
    emit_games(&a, 2);
    emit_games(&a, 3);
    c.ok(&["start", "napper"]);
    assert!(
        wait_until(T, || remote_games(&c, "node-a") == [1, 2, 3]),
        "events sent while node-c was down did not arrive: {:?}\n{}",
        remote_games(&c, "node-a"),
        c.master_log()
    );
    // Later events follow them, and none came twice on the way.
    emit_games(&a, 4);
    assert!(
        wait_until(T, || remote_games(&c, "node-a").len() >= 4),
        "{:?}",
        remote_games(&c, "node-a")
    );
    assert_eq!(remote_games(&c, "node-a"), [1, 2, 3, 4]);
}

#[test]
fn with_the_bus_away_nodes_go_on_and_their_events_follow_when_it_is_back() {
    let mut nats = Nats::start();
    let (a, c) = pair(&nats);
    emit_games(&a, 1);
    assert!(wait_until(T, || remote_games(&c, "node-a") == [1]));

    nats.stop();
    // Both nodes notice, and go on: a daemon restarts, events are logged locally.
    assert!(wait_until(T, || !cluster_view(&a).connected));
    let before = a.pid("napper").unwrap();
    a.ok(&["restart", "napper"]);
    assert_ne!(a.pid("napper"), Some(before));
    emit_games(&a, 2);
    emit_games(&a, 3);
    assert_eq!(a.events_of("NEW_GAMES_AVAILABLE").len(), 3);

    nats.restart();
    assert!(
        wait_until(T, || remote_games(&c, "node-a") == [1, 2, 3]),
        "the events logged while the bus was away did not follow: {:?}\n{}\n{}",
        remote_games(&c, "node-a"),
        a.master_log(),
        c.master_log()
    );
    assert!(wait_until(T, || cluster_view(&a).connected));
}

/// `cluster status --json` whatever its exit code (1 while not connected).
fn cluster_view(root: &Root) -> ClusterReport {
    serde_json::from_slice(&root.run(&["cluster", "status", "--json"]).stdout)
        .expect("cluster JSON")
}

/// A node running queue_populator, a cluster-scoped daemon, with short leases.
fn leasing_node(nats: &Nats, id: &str) -> Root {
    let root = Root::with_config(&format!(
        "http:\n  enabled: false\ncluster:\n  enabled: true\n  node_id: {id}\n  servers: [{}]\n  \
         heartbeat_interval: 300ms\n  node_expiry: 2s\n  lease_ttl: 2s\n\
         daemons:\n  queue_populator:\n    heartbeat_interval: 0.2\n",
        nats.url()
    ));
    root.ok(&["start", "queue_populator"]);
    root
}

/// The times (RFC 3339, sortable) of `what` ("acquired", "lost", "released") in a node's log.
fn lease_times(root: &Root, what: &str) -> Vec<String> {
    root.master_log()
        .lines()
        .filter_map(|l| {
            let rest = l
                .split_once(&format!("lease queue_populator {what} at "))?
                .1;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .collect()
}

#[test]
fn one_node_holds_a_lease_and_another_takes_it_when_the_holder_dies() {
    let nats = Nats::start();
    let nodes = [
        leasing_node(&nats, "node-a"),
        leasing_node(&nats, "node-b"),
        leasing_node(&nats, "node-c"),
    ];
    let holder_of = |r: &Root| {
        cluster_view(r)
            .leases
            .get("queue_populator")
            .cloned()
            .flatten()
    };
    assert!(
        wait_until(T, || {
            let h = holder_of(&nodes[0]);
            h.is_some() && nodes.iter().all(|r| holder_of(r) == h)
        }),
        "no agreed holder: {:?}",
        nodes.iter().map(holder_of).collect::<Vec<_>>()
    );
    let first = holder_of(&nodes[0]).unwrap();
    let acquired: usize = nodes.iter().map(|r| lease_times(r, "acquired").len()).sum();
    assert_eq!(acquired, 1, "exactly one node took the lease");
    // Only the holder's queue_populator acts; the others stand by and say who leads.
    let standby = format!("standby (leader: {first})");
    for r in &nodes {
        let holds = lease_times(r, "acquired").len() == 1;
        let d = r.wait_daemon("queue_populator", T, |d| {
            (d.health.status == "standby") != holds && (holds || d.health.message == standby)
        });
        assert_eq!(d.state, DaemonState::Running);
    }

    // SIGKILL of the holder: another node holds it within the TTL plus two seconds.
    let (dead, alive): (Vec<&Root>, Vec<&Root>) = nodes
        .iter()
        .partition(|r| lease_times(r, "acquired").len() == 1);
    let killed_at = ringrift::timefmt::now_rfc3339();
    signal(dead[0].supervisor_pid().unwrap(), SIGKILL);
    let killed = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(4), || {
            alive.iter().any(|r| !lease_times(r, "acquired").is_empty())
        }),
        "no node took the lease of {first} within 4 s"
    );
    eprintln!("lease moved after {:?}", killed.elapsed());
    let taken: Vec<String> = alive
        .iter()
        .flat_map(|r| lease_times(r, "acquired"))
        .collect();
    assert_eq!(taken.len(), 1, "one new holder: {taken:?}");
    assert!(
        taken[0] > killed_at,
        "taken at {} before the kill at {killed_at}",
        taken[0]
    );
    let second = holder_of(alive[0]).unwrap();
    assert_ne!(second, first);
    assert!(wait_until(T, || alive
        .iter()
        .all(|r| holder_of(r).as_deref() == Some(&second))));
}
