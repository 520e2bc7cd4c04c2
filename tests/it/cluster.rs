//! The cluster on NATS JetStream (issue 12): each test starts its own `nats-server` on free
//! loopback ports, with its store in a temporary directory, and supervisor roots that join it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use ringrift::protocol::ClusterReport;

use nix::sys::signal::Signal::SIGTERM;

use super::common::*;

const T: Duration = Duration::from_secs(20);

/// Where Debian (or another system) installed nats-server.
fn nats_server() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A `nats-server` with JetStream, on loopback only; stopped when dropped.
struct Nats {
    child: Child,
    /// Its client port.
    port: u16,
    /// Its monitoring (HTTP) port.
    monitor: u16,
    /// Its name in the NATS cluster.
    name: String,
    args: Vec<String>,
    _store: tempfile::TempDir,
}

impl Nats {
    /// One server alone.
    fn start() -> Nats {
        let store = tempfile::tempdir().unwrap();
        let (port, monitor) = (free_port(), free_port());
        let name = format!("test-{port}");
        let args: Vec<String> = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &monitor.to_string(),
            "-js",
            "-sd",
            &store.path().display().to_string(),
            "-n",
            &name,
        ]
        .map(String::from)
        .into();
        Nats::with_args(port, monitor, name, args, store)
    }

    /// Three servers in one NATS cluster, each routing to the others (CLUSTER-NOTES).
    fn trio() -> Vec<Nats> {
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, _, r)| format!("nats-route://127.0.0.1:{r}"))
            .collect();
        let confs: Vec<(String, tempfile::TempDir)> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, monitor, route))| {
                let store = tempfile::tempdir().unwrap();
                let conf = store.path().join("nats.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: s{i}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
                         jetstream {{ store_dir: \"{}\" }}\n\
                         cluster {{ name: ringrift-test, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                        store.path().display(),
                        routes.join(", ")
                    ),
                )
                .unwrap();
                (conf.display().to_string(), store)
            })
            .collect();
        let trio: Vec<Nats> = confs
            .into_iter()
            .zip(&ports)
            .enumerate()
            .map(|(i, ((conf, store), (port, monitor, _)))| {
                Nats::with_args(
                    *port,
                    *monitor,
                    format!("s{i}"),
                    vec!["-c".into(), conf],
                    store,
                )
            })
            .collect();
        // Ready once every server answers /healthz (JetStream with a meta leader).
        for s in &trio {
            assert!(
                wait_until(T, || http_get(s.monitor, "/healthz").contains("\"ok\"")),
                "{} is not healthy: {}",
                s.name,
                http_get(s.monitor, "/healthz")
            );
        }
        trio
    }

    fn with_args(
        port: u16,
        monitor: u16,
        name: String,
        args: Vec<String>,
        store: tempfile::TempDir,
    ) -> Nats {
        let child = Nats::spawn(port, &args);
        Nats {
            child,
            port,
            monitor,
            name,
            args,
            _store: store,
        }
    }

    fn spawn(port: u16, args: &[String]) -> Child {
        let program = nats_server()
            .expect("nats-server is not installed (apt-get install nats-server; .ci/run does)");
        let child = std::process::Command::new(program)
            .args(args)
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
        if !matches!(self.child.try_wait(), Ok(None)) {
            return; // stopped (and reaped) already: its pid may be another process's now
        }
        signal(self.child.id(), SIGTERM);
        if !wait_until(T, || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and store.
    fn restart(&mut self) {
        self.child = Nats::spawn(self.port, &self.args);
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

/// The whole answer (status line, headers, body) to `GET path` on a loopback port, or "" when
/// there is none.
fn http_get(port: u16, path: &str) -> String {
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = conn.set_read_timeout(Some(T));
    if conn
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer
}

/// A node: a root whose configuration joins the cluster at `servers` (NATS URLs, comma-separated)
/// as `id`, running `napper` and the daemons in `extra` (YAML entries under `daemons:`).
fn node_at(servers: &str, id: &str, http: Option<u16>, extra: &str) -> Root {
    let http = match http {
        Some(port) => format!("http:\n  addr: 127.0.0.1:{port}\n"),
        None => "http:\n  enabled: false\n".into(),
    };
    Root::with_config(&format!(
        "{http}cluster:\n  enabled: true\n  node_id: {id}\n  servers: [{servers}]\n  \
         heartbeat_interval: 300ms\n  node_expiry: 2s\n  data_address: \"{id}:/srv/ringrift\"\n\
         daemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n{extra}"
    ))
}

fn node(nats: &Nats, id: &str, http: Option<u16>) -> Root {
    node_at(&nats.url(), id, http, "")
}

/// A daemon entry: the fault worker subscribed to NEW_GAMES_AVAILABLE, logging each it receives.
fn subscriber(name: &str) -> String {
    format!(
        "  {name}:\n    command: [\"{WORKER}\", \"fault\", \"--subscribe\", \"NEW_GAMES_AVAILABLE\"]\n    \
         protocol: true\n    heartbeat_interval: 0.2\n"
    )
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
    // Within a few seconds (heartbeats of 300 ms), every node lists all three.
    for r in [&a, &b, &c] {
        assert!(
            wait_until(Duration::from_secs(5), || node_ids(&cluster_view(r)) == all),
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
    assert_eq!(
        b_entry.record.data_address.as_deref(),
        Some("node-b:/srv/ringrift")
    );
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
    assert!(
        wait_until(
            Duration::from_secs(4).saturating_sub(killed.elapsed()),
            || { node_events(&c, "NODE_LEFT", "node-b", 0) == 1 }
        ),
        "no NODE_LEFT for node-b on node-c within 4 s of the kill"
    );
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

/// node-a and node-c on `servers`, started and listed by each other, each with a daemon `sub`
/// subscribed to NEW_GAMES_AVAILABLE (on node-a it hears local events, on node-c remote ones).
fn pair(servers: &str) -> (Root, Root) {
    let a = node_at(servers, "node-a", None, &subscriber("sub"));
    let c = node_at(servers, "node-c", None, &subscriber("sub"));
    for r in [&a, &c] {
        r.ok(&["start", "napper", "sub"]);
    }
    for r in [&a, &c] {
        assert!(wait_until(T, || r
            .master_log()
            .contains("sub: subscribed to")));
        assert!(
            wait_until(T, || node_ids(&cluster_view(r)) == ["node-a", "node-c"]),
            "{}",
            r.master_log()
        );
    }
    (a, c)
}

/// The ids of the NEW_GAMES_AVAILABLE events `sub` on `root` received, each once.
fn received_by_sub(root: &Root) -> BTreeSet<String> {
    received_ids(root, "sub").into_iter().collect()
}

/// The ids of the NEW_GAMES_AVAILABLE events logged on `root` (its own and remote ones).
fn logged_ids(root: &Root) -> BTreeSet<String> {
    root.events_of("NEW_GAMES_AVAILABLE")
        .into_iter()
        .map(|e| e.id)
        .collect()
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
    let (a, c) = pair(&nats.url());

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
    // The daemon on node-c subscribed to the type receives it, like a local event.
    assert!(
        wait_until(T, || received_by_sub(&c).contains(&on_a.id)),
        "node-c's subscriber did not receive {}:\n{}",
        on_a.id,
        std::fs::read_to_string(c.log_path("sub")).unwrap_or_default()
    );

    // Emitted while C is down, it reaches C after C restarts, once.
    c.ok(&["shutdown"]);
    emit_games(&a, 2);
    emit_games(&a, 3);
    c.ok(&["start", "napper", "sub"]);
    assert!(
        wait_until(T, || remote_games(&c, "node-a") == [1, 2, 3]),
        "events sent while node-c was down did not arrive: {:?}\n{}",
        remote_games(&c, "node-a"),
        c.master_log()
    );
    // Later events follow them, and none came twice on the way; `events -f --cluster` on
    // node-c shows each as it arrives, with its node.
    let follower = c.follow(&["events", "-f", "--cluster"]);
    emit_games(&a, 4);
    let deadline = std::time::Instant::now() + T;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("node-a/cli") && l.contains("\"new_games\":4"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match follower.lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("`events -f --cluster` did not show event 4: {seen:#?}"),
        }
    }
    drop(follower);
    assert!(
        wait_until(T, || remote_games(&c, "node-a").len() >= 4),
        "{:?}",
        remote_games(&c, "node-a")
    );
    assert_eq!(remote_games(&c, "node-a"), [1, 2, 3, 4]);
    // node-c's subscriber, restarted with it, received all four.
    let all = logged_ids(&a);
    assert!(
        wait_until(T, || received_by_sub(&c) == all),
        "node-c's subscriber has {:?} of {all:?}",
        received_by_sub(&c)
    );
}

/// The name of the server leading the JetStream stream `stream`, as the servers report it.
fn stream_leader(servers: &[Nats], stream: &str) -> Option<String> {
    servers.iter().find_map(|s| {
        let answer = http_get(s.monitor, "/jsz?accounts=true&streams=true");
        let body: serde_json::Value =
            serde_json::from_str(answer.split("\r\n\r\n").nth(1)?).ok()?;
        body["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|d| d["name"] == stream)
            .and_then(|d| d["cluster"]["leader"].as_str())
            .map(str::to_string)
    })
}

#[test]
fn with_three_servers_killing_the_stream_leader_loses_no_event() {
    let mut trio = Nats::trio();
    let servers: Vec<String> = trio.iter().map(Nats::url).collect();
    let (a, c) = pair(&servers.join(", "));
    emit_games(&a, 1);
    assert!(wait_until(T, || remote_games(&c, "node-a") == [1]));
    let leader = stream_leader(&trio, "RINGRIFT_EVENTS").expect("the event stream has a leader");

    // SIGKILL of the server leading the event stream (replicated on all three), then events
    // emitted on node-a while the others elect a new leader: each reaches node-c once.
    let victim = trio.iter_mut().find(|s| s.name == leader).unwrap();
    victim.child.kill().unwrap();
    let _ = victim.child.wait();
    for n in 2..=20 {
        emit_games(&a, n);
    }
    assert!(
        wait_until(Duration::from_secs(30), || remote_games(&c, "node-a").len()
            >= 20),
        "events lost with the stream leader {leader}: node-c has {:?}\n{}\n{}",
        remote_games(&c, "node-a"),
        a.master_log(),
        c.master_log()
    );
    assert_eq!(remote_games(&c, "node-a"), (1..=20).collect::<Vec<i64>>());
    let ids = logged_ids(&a);
    assert!(
        wait_until(T, || received_by_sub(&c) == ids),
        "node-c's subscriber has {} of 20",
        received_by_sub(&c).len()
    );
    let new_leader = stream_leader(&trio, "RINGRIFT_EVENTS");
    assert!(new_leader.is_some_and(|l| l != leader));
}

/// Publishes `envelope` on the bus as a stranger would: a plain client, no supervisor.
fn publish_raw(url: &str, subject: &str, envelope: serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.expect("connect to the bus");
        let js = async_nats::jetstream::new(client);
        js.publish(subject.to_string(), envelope.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("the stream has it");
    });
}

#[test]
fn forged_events_on_the_bus_are_refused_and_do_not_block_the_real_ones() {
    let nats = Nats::start();
    let (a, c) = pair(&nats.url());
    let forged = |node: &str, kind: &str, source: &str, payload: serde_json::Value, fence| {
        serde_json::json!({"node": node, "event": {
            "seq": 1, "id": format!("forged-{kind}-{source}"), "type": kind, "payload": payload,
            "source": source, "timestamp": "2026-11-29T00:00:00.000Z", "fence": fence}})
    };
    let promoted = serde_json::json!({"config_key": "hex8_2p", "model_path": "models/evil.bin"});
    let poison = serde_json::json!({"lease": "auto_promotion.hex8_2p", "token": 9_000_000_000_000_000_000u64});
    let cases = [
        // Posing as node-b on node-a's subject.
        (
            "ringrift.events.node-a.MODEL_PROMOTED",
            forged(
                "node-b",
                "MODEL_PROMOTED",
                "auto_promotion",
                promoted.clone(),
                serde_json::Value::Null,
            ),
            "not on the subject of node node-b",
        ),
        // A fencing token no lease has reached: it would make every node refuse the real
        // leader's promotions.
        (
            "ringrift.events.node-b.MODEL_PROMOTED",
            forged(
                "node-b",
                "MODEL_PROMOTED",
                "auto_promotion",
                promoted.clone(),
                poison,
            ),
            "is beyond every revision of the lease bucket",
        ),
        // A leader's event without its fencing token: every real one carries it.
        (
            "ringrift.events.node-b.MODEL_PROMOTED",
            serde_json::json!({"node": "node-b", "event": {
                "seq": 1, "id": "forged-unfenced", "type": "MODEL_PROMOTED",
                "payload": promoted.clone(), "source": "auto_promotion",
                "timestamp": "2026-11-29T00:00:00.000Z"}}),
            "carries no fencing token",
        ),
        // A type that stays on its node.
        (
            "ringrift.events.node-b.DAEMON_STARTED",
            forged(
                "node-b",
                "DAEMON_STARTED",
                "supervisor",
                serde_json::json!({"daemon": "x", "pid": 1}),
                serde_json::Value::Null,
            ),
            "does not cross the cluster",
        ),
        // A daemon that may not state this fact.
        (
            "ringrift.events.node-b.MODEL_PROMOTED",
            forged(
                "node-b",
                "MODEL_PROMOTED",
                "evaluation",
                promoted,
                serde_json::Value::Null,
            ),
            "MODEL_PROMOTED",
        ),
    ];
    for (subject, envelope, _) in &cases {
        publish_raw(&nats.url(), subject, envelope.clone());
    }
    for (_, envelope, why) in &cases {
        let id = envelope["event"]["id"].as_str().unwrap();
        assert!(
            wait_until(T, || c.master_log().lines().any(|l| l
                .contains(&format!("refused event {id} "))
                && l.contains(why))),
            "{id} not refused ({why}):\n{}",
            c.master_log()
        );
    }
    assert!(c.events_of("MODEL_PROMOTED").is_empty());
    assert!(
        c.events_of("DAEMON_STARTED")
            .iter()
            .all(|e| e.node.is_none())
    );
    // The real ones still cross.
    emit_games(&a, 7);
    assert!(wait_until(T, || remote_games(&c, "node-a") == [7]));
}

/// A daemon entry: the fault worker emitting NEW_GAMES_AVAILABLE (`new_games` 1, 2, ...) every
/// half second.
fn publisher() -> String {
    format!(
        "  publisher:\n    command: [\"{WORKER}\", \"fault\", \"--emit\", \"NEW_GAMES_AVAILABLE\", \
         \"--emit-payload\", \"{{\\\"config_key\\\": \\\"hex8_2p\\\", \\\"new_games\\\": {{i}}}}\", \
         \"--emit-count\", \"100000\"]\n    protocol: true\n    heartbeat_interval: 0.2\n    interval: 0.5\n"
    )
}

#[test]
fn with_the_bus_away_for_30_s_nodes_go_on_and_their_events_follow_when_it_is_back() {
    let mut nats = Nats::start();
    let servers = nats.url();
    let a = node_at(
        &servers,
        "node-a",
        None,
        &(subscriber("sub") + &publisher()),
    );
    let c = node_at(&servers, "node-c", None, &subscriber("sub"));
    for r in [&a, &c] {
        r.ok(&["start", "napper", "sub"]);
        assert!(wait_until(T, || r
            .master_log()
            .contains("sub: subscribed to")));
    }
    assert!(wait_until(T, || node_ids(&cluster(&c)) == ["node-a", "node-c"]));
    a.ok(&["start", "publisher"]);
    assert!(
        wait_until(T, || remote_games(&c, "node-a").len() >= 2),
        "{}",
        c.master_log()
    );

    nats.stop();
    let down = std::time::Instant::now();
    assert!(wait_until(T, || !cluster_view(&a).connected));
    // For 30 s without a bus the local pipeline goes on: each event the publisher emits reaches
    // node-a's own subscriber, and a daemon restarts.
    let mut heard = received_by_sub(&a).len();
    let mut restarted = false;
    while down.elapsed() < Duration::from_secs(30) {
        assert!(
            wait_until(T, || received_by_sub(&a).len() > heard),
            "node-a's pipeline stalled without the bus:\n{}",
            a.master_log()
        );
        heard = received_by_sub(&a).len();
        if !restarted && down.elapsed() > Duration::from_secs(10) {
            let before = a.pid("napper").unwrap();
            a.ok(&["restart", "napper"]);
            assert_ne!(a.pid("napper"), Some(before));
            restarted = true;
        }
    }
    assert!(!cluster_view(&a).connected && !cluster_view(&c).connected);
    a.ok(&["stop", "publisher"]);
    let emitted = a.events_of("NEW_GAMES_AVAILABLE").len();
    assert!(emitted >= 50, "only {emitted} events in 30 s");

    // The bus is back: every event node-a logged while it was away reaches node-c, in order,
    // once, and node-c's subscriber.
    nats.restart();
    let on_a: Vec<i64> = a
        .events_of("NEW_GAMES_AVAILABLE")
        .iter()
        .map(|e| e.payload["new_games"].as_i64().unwrap())
        .collect();
    assert!(
        wait_until(T, || remote_games(&c, "node-a") == on_a),
        "the events logged while the bus was away did not follow: {} of {}\n{}\n{}",
        remote_games(&c, "node-a").len(),
        on_a.len(),
        a.master_log(),
        c.master_log()
    );
    let ids = logged_ids(&a);
    assert!(wait_until(T, || received_by_sub(&c) == ids));
    assert!(wait_until(T, || cluster_view(&a).connected));
}

/// `cluster status --json` whatever its exit code (1 while not connected).
fn cluster_view(root: &Root) -> ClusterReport {
    serde_json::from_slice(&root.run(&["cluster", "status", "--json"]).stdout)
        .expect("cluster JSON")
}

/// A node running queue_populator, a cluster-scoped daemon, with short leases.
fn leasing_node(nats: &Nats, id: &str) -> Root {
    let root = leasing_root(&nats.url(), id);
    root.ok(&["start", "queue_populator"]);
    root
}

/// The root of a node with queue_populator and a 2 s lease TTL, joining `servers`; not started.
fn leasing_root(servers: &str, id: &str) -> Root {
    Root::with_config(&format!(
        "http:\n  enabled: false\ncluster:\n  enabled: true\n  node_id: {id}\n  servers: [{servers}]\n  \
         heartbeat_interval: 300ms\n  node_expiry: 2s\n  lease_ttl: 2s\n\
         daemons:\n  queue_populator:\n    heartbeat_interval: 0.2\n"
    ))
}

/// The times (RFC 3339, sortable) of `what` ("acquired", "lost", "released") of the lease
/// queue_populator in a node's log.
fn lease_times(root: &Root, what: &str) -> Vec<String> {
    lease_records(root, "queue_populator")
        .into_iter()
        .filter(|(w, _)| w == what)
        .map(|(_, t)| t)
        .collect()
}

/// The records of `lease` in a node's log, in order: ("acquired" | "lost" | "released", time).
fn lease_records(root: &Root, lease: &str) -> Vec<(String, String)> {
    let mark = format!("cluster: lease {lease} ");
    root.master_log()
        .lines()
        .filter_map(|l| {
            let mut words = l.split_once(&mark)?.1.split_whitespace();
            let what = words.next()?;
            (words.next()? == "at").then_some(())?;
            Some((
                what.to_string(),
                words.next()?.trim_end_matches(':').to_string(),
            ))
        })
        .collect()
}

/// The spans in which each node held `lease`, from the records of all of them: from an
/// acquisition to the next loss or release, or to `end` (the node's kill time, or now) for one
/// still open. Panics when two spans overlap in time.
fn assert_no_overlap(lease: &str, nodes: &[(&Root, String)]) -> Vec<(String, String, usize)> {
    let mut spans = Vec::new();
    for (i, (root, end)) in nodes.iter().enumerate() {
        let mut open: Option<String> = None;
        for (what, at) in lease_records(root, lease) {
            match (what.as_str(), open.take()) {
                ("acquired", None) => open = Some(at),
                ("lost" | "released", Some(from)) => spans.push((from, at, i)),
                (w, o) => panic!("node {i}: {w} at {at} while holding since {o:?}"),
            }
        }
        if let Some(from) = open {
            spans.push((from, end.clone(), i));
        }
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "{lease} held by two nodes at once: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    spans
}

#[test]
fn one_node_holds_a_lease_and_another_takes_it_when_the_holder_dies() {
    let nats = Nats::start();
    let nodes = [
        leasing_node(&nats, "node-a"),
        leasing_node(&nats, "node-b"),
        // Configured with another TTL: the bucket's (made by node-a) holds for all.
        {
            let root = leasing_root(&nats.url(), "node-c");
            let yaml = std::fs::read_to_string(root.path().join("config/unified_loop.yaml"))
                .unwrap()
                .replace("lease_ttl: 2s", "lease_ttl: 10s");
            root.write_config(&yaml);
            root.ok(&["start", "queue_populator"]);
            root
        },
    ];
    assert!(
        wait_until(T, || nodes[2].master_log().contains(
            "the bucket ringrift_leases keeps entries 2s, not the 10s of this node's lease_ttl"
        )),
        "{}",
        nodes[2].master_log()
    );
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
    // Only the holder's queue_populator acts; the others stand by and say who leads since when.
    let standby = format!("standby (leader: {first} since ");
    for r in &nodes {
        let holds = lease_times(r, "acquired").len() == 1;
        let d = r.wait_daemon("queue_populator", T, |d| {
            (d.health.status == "standby") != holds
                && (holds || d.health.message.starts_with(&standby))
        });
        assert_eq!(d.state, DaemonState::Running);
    }

    // SIGKILL of the holder: another node holds it within the TTL plus two seconds.
    let dead = nodes
        .iter()
        .position(|r| lease_times(r, "acquired").len() == 1)
        .unwrap();
    let alive: Vec<&Root> = (0..3).filter(|&i| i != dead).map(|i| &nodes[i]).collect();
    let pid = nodes[dead].supervisor_pid().unwrap();
    signal(pid, SIGKILL);
    let killed = std::time::Instant::now();
    assert!(wait_until(T, || !super::common::alive(pid)));
    let killed_at = ringrift::timefmt::now_rfc3339();
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
    // The new holder is the node that logged it; the other's view follows within a round.
    let second = alive
        .iter()
        .find(|r| !lease_times(r, "acquired").is_empty())
        .map(|r| cluster_view(r).node_id)
        .unwrap();
    assert_ne!(second, first);
    assert!(wait_until(T, || alive
        .iter()
        .all(|r| holder_of(r).as_deref() == Some(&second))));

    // The new holder's daemon stops: it releases the lease at once (no wait for the TTL) and
    // the third node takes it.
    let (holder, third): (Vec<&Root>, Vec<&Root>) = alive
        .iter()
        .partition(|r| lease_times(r, "acquired").len() == 1);
    holder[0].ok(&["stop", "queue_populator"]);
    assert!(
        wait_until(Duration::from_secs(2), || lease_times(
            holder[0], "released"
        )
        .len()
            == 1),
        "{}",
        holder[0].master_log()
    );
    assert!(
        wait_until(T, || lease_times(third[0], "acquired").len() == 1),
        "{}",
        third[0].master_log()
    );
    assert!(lease_times(third[0], "acquired")[0] >= lease_times(holder[0], "released")[0]);

    // The third node's supervisor shuts down: it releases the lease as it exits, and the node
    // that runs queue_populator again takes it.
    holder[0].ok(&["start", "queue_populator"]);
    third[0].ok(&["shutdown"]);
    assert!(
        wait_until(T, || third[0]
            .master_log()
            .contains("the supervisor is stopping")),
        "{}",
        third[0].master_log()
    );
    assert!(
        wait_until(T, || lease_times(holder[0], "acquired").len() == 2),
        "{}",
        holder[0].master_log()
    );

    // Over the whole story, the acquire and release records of all nodes show no overlap.
    let now = ringrift::timefmt::now_rfc3339();
    let ends: Vec<(&Root, String)> = (0..3)
        .map(|i| {
            let end = if i == dead { &killed_at } else { &now };
            (&nodes[i], end.clone())
        })
        .collect();
    let spans = assert_no_overlap("queue_populator", &ends);
    assert_eq!(spans.len(), 4, "{spans:?}");
}

/// A node whose `auto_promotion` (a cluster-scoped daemon with a lease per config key) is the
/// fault worker announcing a promotion of hex8_2p every 0.3 s; `keys` are its config keys.
fn promoting_node(nats: &Nats, id: &str, keys: &str) -> Root {
    let root = Root::with_config(&format!(
        "http:\n  enabled: false\ncluster:\n  enabled: true\n  node_id: {id}\n  servers: [{}]\n  \
         heartbeat_interval: 300ms\n  node_expiry: 2s\n  lease_ttl: 2s\n\
         pipeline:\n  config_keys: [{keys}]\n\
         daemons:\n  auto_promotion:\n    command: [\"{WORKER}\", \"fault\", \"--emit\", \"MODEL_PROMOTED\", \
         \"--emit-payload\", \"{{\\\"config_key\\\": \\\"hex8_2p\\\", \\\"model_path\\\": \\\"models/m{{i}}.bin\\\"}}\", \
         \"--emit-count\", \"100000\"]\n    protocol: true\n    depends_on: []\n    \
         heartbeat_interval: 0.2\n    interval: 0.3\n",
        nats.url()
    ));
    root.ok(&["start", "auto_promotion"]);
    root
}

/// The MODEL_PROMOTED events on `root` emitted by `node` (None: this node) with their fence.
fn promotions(root: &Root, node: Option<&str>) -> Vec<ringrift::events::Fence> {
    root.events_of("MODEL_PROMOTED")
        .into_iter()
        .filter(|e| e.node.as_deref() == node)
        .map(|e| e.fence.expect("a promotion carries its fencing token"))
        .collect()
}

#[test]
fn promotion_leads_per_config_key_and_carries_its_fencing_token() {
    let nats = Nats::start();
    // node-a promotes hex8_2p only; node-b both keys. node-a leads hex8_2p, node-b hex6_2p.
    let a = promoting_node(&nats, "node-a", "hex8_2p");
    let lease_of = |r: &Root, key: &str| {
        cluster_view(r)
            .leases
            .get(&format!("auto_promotion.{key}"))
            .cloned()
            .flatten()
    };
    assert!(wait_until(T, || lease_of(&a, "hex8_2p").as_deref() == Some("node-a")));
    let b = promoting_node(&nats, "node-b", "hex8_2p, hex6_2p");
    assert!(
        wait_until(T, || lease_of(&b, "hex6_2p").as_deref() == Some("node-b")
            && lease_of(&b, "hex8_2p").as_deref() == Some("node-a")),
        "{:?}\n{}",
        cluster_view(&b).leases,
        b.master_log()
    );

    // node-a's promotions of hex8_2p carry its lease and token, on node-a and on node-b.
    assert!(
        wait_until(T, || promotions(&b, Some("node-a")).len() >= 3),
        "{}",
        b.master_log()
    );
    for f in promotions(&a, None)
        .iter()
        .chain(&promotions(&b, Some("node-a")))
    {
        assert_eq!(f.lease, "auto_promotion.hex8_2p");
        assert!(f.token > 0);
    }
    // node-b's daemon acts (it leads hex6_2p), but what it says about hex8_2p, whose lease
    // node-a holds, is refused: fenced.
    assert!(
        wait_until(T, || {
            b
            .master_log()
            .contains("auto_promotion: event refused: fenced: this node does not hold the lease auto_promotion.hex8_2p (hex8_2p leader: node-a since ")
        }),
        "{}",
        b.master_log()
    );
    assert!(promotions(&b, None).is_empty());

    // node-a dies: node-b takes hex8_2p, and its promotions carry a higher token than any of
    // node-a's, so a late one of node-a's would be refused everywhere.
    let old_max = promotions(&b, Some("node-a"))
        .iter()
        .map(|f| f.token)
        .max()
        .unwrap();
    signal(a.supervisor_pid().unwrap(), SIGKILL);
    assert!(
        wait_until(T, || !promotions(&b, None).is_empty()),
        "{}",
        b.master_log()
    );
    for f in promotions(&b, None) {
        assert_eq!(f.lease, "auto_promotion.hex8_2p");
        assert!(f.token > old_max, "token {} after {old_max}", f.token);
    }
}

#[test]
fn a_partitioned_leader_stops_acting_before_another_node_takes_over() {
    partition::run();
}

/// The partition test: root only, in network namespaces it makes and removes.
mod partition {
    use std::process::Command;

    use super::*;

    /// Network namespaces and their veth pair, removed when dropped.
    struct Net {
        bus: String,
        cut: String,
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl Net {
        /// Two namespaces: `bus` (the NATS server and two nodes, on its loopback, and 10.213.0.1)
        /// and `cut` (one node, 10.213.0.2), joined by a veth pair.
        fn new() -> Net {
            let id = std::process::id();
            let net = Net {
                bus: format!("rrt{id}b"),
                cut: format!("rrt{id}c"),
            };
            ip(&["netns", "add", &net.bus]);
            ip(&["netns", "add", &net.cut]);
            let (vb, vc) = (format!("rrv{id}b"), format!("rrv{id}c"));
            ip(&[
                "link", "add", &vb, "netns", &net.bus, "type", "veth", "peer", "name", &vc,
                "netns", &net.cut,
            ]);
            for (ns, dev, addr) in [
                (&net.bus, &vb, "10.213.0.1/24"),
                (&net.cut, &vc, "10.213.0.2/24"),
            ] {
                ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
            }
            net
        }

        /// Cuts `cut` off: its end of the pair goes down.
        fn partition(&self) {
            ip(&[
                "-n",
                &self.cut,
                "link",
                "set",
                &format!("rrv{}c", std::process::id()),
                "down",
            ]);
        }

        fn enter(ns: &str) -> Command {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"));
            c
        }
    }

    impl Drop for Net {
        fn drop(&mut self) {
            // Deleting a namespace removes its end of the pair, and with it the other end.
            for ns in [&self.bus, &self.cut] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }

    /// The `nats-server` in the bus namespace; SIGTERM when dropped.
    struct Server {
        child: std::process::Child,
        _store: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) {
                signal(self.child.id(), SIGTERM);
                if !wait_until(T, || matches!(self.child.try_wait(), Ok(Some(_)))) {
                    let _ = self.child.kill();
                }
            }
            let _ = self.child.wait();
        }
    }

    /// Starts `root`'s supervisor (and queue_populator) inside `ns`.
    fn start_in(ns: &str, root: &Root) {
        let out = root
            .cmd_via(
                &["nsenter", &format!("--net=/run/netns/{ns}")],
                &["start", "queue_populator"],
            )
            .output()
            .expect("run nsenter");
        assert!(out.status.success(), "{out:?}\n{}", root.master_log());
    }

    pub(super) fn run() {
        let usable = nix::unistd::geteuid().is_root()
            && Command::new("ip")
                .args(["netns", "list"])
                .output()
                .is_ok_and(|o| o.status.success())
            && Command::new("nsenter").arg("--version").output().is_ok();
        if !usable {
            eprintln!("skipped: the partition test needs root, `ip netns` and nsenter");
            return;
        }
        let net = Net::new();
        let program = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nats-server is installed");
        let store = tempfile::tempdir().unwrap();
        let server = Server {
            child: Net::enter(&net.bus)
                .args([program, "-a", "0.0.0.0", "-p", "4222", "-js", "-sd"])
                .arg(store.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server"),
            _store: store,
        };
        // The leader-to-be, cut off later, reaches the bus over the pair; the others on the bus
        // namespace's loopback.
        let a = leasing_root("nats://10.213.0.1:4222", "node-a");
        start_in(&net.cut, &a);
        assert!(
            wait_until(T, || lease_times(&a, "acquired").len() == 1),
            "node-a never held the lease:\n{}",
            a.master_log()
        );
        let others = [
            leasing_root("nats://127.0.0.1:4222", "node-b"),
            leasing_root("nats://127.0.0.1:4222", "node-c"),
        ];
        for r in &others {
            start_in(&net.bus, r);
        }
        for r in &others {
            assert!(
                wait_until(T, || r
                    .wait_daemon("queue_populator", T, |_| true)
                    .health
                    .message
                    .starts_with("standby (leader: node-a since ")),
                "{}",
                r.master_log()
            );
        }

        // node-a is cut off from the bus and the other nodes. It cannot renew: it stops acting
        // (its daemon stands by) before the key expires, and only then does another node take it.
        net.partition();
        assert!(
            wait_until(T, || lease_times(&a, "lost").len() == 1),
            "node-a did not step down:\n{}",
            a.master_log()
        );
        a.wait_daemon("queue_populator", T, |d| d.health.status == "standby");
        assert!(
            wait_until(T, || others
                .iter()
                .any(|r| lease_times(r, "acquired").len() == 1)),
            "no node took over"
        );
        let lost = lease_times(&a, "lost")[0].clone();
        let taken: Vec<String> = others
            .iter()
            .flat_map(|r| lease_times(r, "acquired"))
            .collect();
        assert_eq!(taken.len(), 1, "{taken:?}");
        eprintln!(
            "node-a stepped down at {lost}; the lease was taken at {}",
            taken[0]
        );
        assert!(
            lost < taken[0],
            "node-a stepped down at {lost}, after the takeover at {}",
            taken[0]
        );
        let now = ringrift::timefmt::now_rfc3339();
        assert_no_overlap(
            "queue_populator",
            &[
                (&a, now.clone()),
                (&others[0], now.clone()),
                (&others[1], now),
            ],
        );
        drop(others);
        drop(a);
        drop(server);
        drop(net);
    }
}

/// `text` with `from` replaced by `to`, which must occur exactly once (so that a change to the
/// shipped files that this test edits fails here, not in some later assertion).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} once in:\n{text}");
    text.replacen(from, to, 1)
}

/// The bus as a daemon: the embedded default's `nats` entry, enabled, runs nats-server with the
/// shipped config/nats.conf (on this test's ports) from the root, is RUNNING once the monitoring
/// port says healthy, keeps its JetStream store under the root, and `stop nats` ends the server.
#[test]
fn the_nats_entry_runs_the_bus_as_a_daemon() {
    let Some(program) = nats_server() else {
        eprintln!("skipped: nats-server is not installed (apt-get install nats-server)");
        return;
    };
    let (client, monitor) = (free_port(), free_port());
    // The shipped files, changed only where this test must: this test's ports, HTTP off (tests
    // run side by side), and the entry enabled.
    let yaml = replace_once(
        ringrift::config::DEFAULT_YAML,
        "http:\n  enabled: true",
        "http:\n  enabled: false",
    );
    let yaml = replace_once(
        &yaml,
        "  nats:\n    enabled: false",
        "  nats:\n    enabled: true",
    );
    let yaml = replace_once(
        &yaml,
        "http://127.0.0.1:8222/healthz",
        &format!("http://127.0.0.1:{monitor}/healthz"),
    );
    let root = Root::with_config(&yaml);
    let conf = include_str!("../../config/nats.conf");
    let conf = replace_once(
        conf,
        "\nlisten: 127.0.0.1:4222",
        &format!("\nlisten: 127.0.0.1:{client}"),
    );
    let conf = replace_once(
        &conf,
        "\nhttp: 127.0.0.1:8222",
        &format!("\nhttp: 127.0.0.1:{monitor}"),
    );
    std::fs::write(root.path().join("config/nats.conf"), conf).unwrap();
    // nats-server is found on the PATH the supervisor is started with, as a user would have it.
    let dir = program.parent().unwrap().display().to_string();
    let path = format!("{dir}:{}", std::env::var("PATH").unwrap_or_default());
    let env = [("PATH", path.as_str())];

    let check = root.ok_with_env(&["config", "check"], &env);
    assert!(
        check.contains("14 enabled") && check.contains("nats"),
        "{check}"
    );
    // `start` returns once nats is RUNNING: its /healthz answered.
    root.ok_with_env(&["start", "nats"], &env);
    let d = root.wait_state("nats", DaemonState::Running, T);
    assert_eq!(d.kind, "external", "{d:#?}");
    let pid = d.pid.expect("a RUNNING daemon has a pid");
    assert_eq!(
        procfs::stat(pid).map(|s| s.ppid),
        root.supervisor_pid(),
        "nats-server is the supervisor's child"
    );
    // Clients are served on the configured port: the server greets with INFO.
    let mut greeting = [0u8; 5];
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", client)).expect("client port");
    conn.set_read_timeout(Some(T)).unwrap();
    conn.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"INFO ");
    drop(conn);
    // The store is under the root (2.9 resolves store_dir from its working directory, the root).
    assert!(
        root.path().join("data/nats/jetstream").is_dir(),
        "no JetStream store under {}",
        root.path().display()
    );
    root.wait_log("nats", "Server is ready", T);

    root.ok(&["stop", "nats"]);
    assert_eq!(root.state("nats"), DaemonState::Stopped);
    assert!(
        wait_until(T, || !alive(pid)),
        "nats-server {pid} outlived `stop nats`"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", client)).is_err(),
        "the client port is closed"
    );
}

/// A node of the loop test: `roles`, its root as its data address, and `daemons` (YAML entries).
fn loop_node(nats: &Nats, id: &str, roles: &str, daemons: &str) -> Root {
    let root = Root::new();
    root.write_config(&format!(
        "http:\n  enabled: false\npipeline:\n  config_keys: [hex8_2p]\ncluster:\n  enabled: true\n  \
         node_id: {id}\n  servers: [{}]\n  roles: [{roles}]\n  data_address: {:?}\n  \
         heartbeat_interval: 300ms\n  node_expiry: 2s\ndaemons:\n  napper:\n    command: [\"sleep\", \"1000\"]\n{daemons}",
        nats.url(),
        root.path().display().to_string()
    ));
    root
}

#[test]
fn games_go_to_the_nodes_that_train_and_models_to_the_nodes_that_play() {
    let nats = Nats::start();
    let quick = "    interval: 0.2\n    heartbeat_interval: 0.2\n";
    // node-a and node-c play; node-b trains. Nobody lists another node's address: `role:`
    // targets are resolved from the cluster's records.
    let a = loop_node(
        &nats,
        "node-a",
        "selfplay",
        &format!("  auto_sync:\n{quick}    targets: [\"role:training\"]\n"),
    );
    let b = loop_node(
        &nats,
        "node-b",
        "training",
        &format!(
            "  cluster_data_sync:\n{quick}    peers: [incoming]\n  model_distribution:\n{quick}    targets: [\"role:selfplay\"]\n"
        ),
    );
    let c = loop_node(&nats, "node-c", "selfplay", "");
    let a_db = a.path().join("data/games/hex8_2p.db");
    play_games(&a, &a_db, "hex8_2p", 30, 7);
    let model = b.path().join("models/canonical_hex8_2p.bin");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    std::fs::write(&model, b"a promoted model").unwrap();

    a.ok(&["start", "napper", "auto_sync"]);
    b.ok(&["start", "napper", "cluster_data_sync", "model_distribution"]);
    c.ok(&["start", "napper"]);

    // a's games reach b, the trainer, under data/incoming/games/node-a, and are merged there.
    let b_db = b.path().join("data/games/hex8_2p.db");
    let completed = |db: &std::path::Path| -> i64 {
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM games WHERE status = 'completed'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(T, || completed(&b_db) >= 30),
        "node-b merged {} games\nauto_sync on a: {:#?}\ncluster_data_sync on b: {:#?}",
        completed(&b_db),
        a.daemon("auto_sync").health,
        b.daemon("cluster_data_sync").health
    );
    assert!(
        b.path()
            .join("data/incoming/games/node-a/hex8_2p.db")
            .is_file()
    );
    // b's model reaches both players, a and c, in place of their canonical model.
    for player in [&a, &c] {
        let theirs = player.path().join("models/canonical_hex8_2p.bin");
        assert!(
            wait_until(T, || std::fs::read(&theirs)
                .is_ok_and(|m| m == b"a promoted model")),
            "not on {}: {:#?}",
            player.path().display(),
            b.daemon("model_distribution").health
        );
    }
    // Nothing went to a node without the role, nor back to the sender.
    assert!(!a.path().join("data/incoming").exists());
    assert!(!c.path().join("data/incoming").exists());
    assert!(!b.path().join("data/incoming/games/node-b").exists());
}

#[test]
fn idle_nodes_leave_costliest_first_and_min_nodes_stay() {
    let nats = Nats::start();
    // Idle at once (any CPU load counts, no jobs): each would run its shutdown command (here it
    // only leaves a file behind). min_nodes 1: of three, two may go, the costliest first.
    let node = |id: &str, cost: f64| {
        Root::with_config(&format!(
            "http:\n  enabled: false\ncluster:\n  enabled: true\n  node_id: {id}\n  servers: [{}]\n  \
             heartbeat_interval: 300ms\n  node_expiry: 2s\n  cost_per_hour: {cost}\n\
             daemons:\n  unified_idle_shutdown:\n    enabled: true\n    interval: 0.2\n    heartbeat_interval: 0.2\n    \
             shutdown_command: [\"touch\", \"left\"]\n    idle_minutes: 0.005\n    cpu_threshold: 100\n    min_nodes: 1\n",
            nats.url()
        ))
    };
    let nodes = [
        node("node-a", 1.0),
        node("node-b", 3.0),
        node("node-c", 2.0),
    ];
    for r in &nodes {
        r.ok(&["start", "unified_idle_shutdown"]);
    }
    let left = |r: &Root| r.path().join("left");
    let [a, b, c] = &nodes;
    // node-b, the costliest, goes first; the others wait for it, one at a time.
    assert!(
        wait_until(T, || left(b).exists()),
        "node-b never left:\n{:#?}",
        b.daemon("unified_idle_shutdown").health
    );
    c.wait_health("unified_idle_shutdown", T, |h| {
        h.message.contains("node node-b (cost 3/h")
    });
    assert!(!left(c).exists() && !left(a).exists());
    // node-b is gone (its supervisor stops, as the host would): node-c, next in cost, leaves;
    // node-a stays, the one node min_nodes keeps.
    b.ok(&["shutdown"]);
    assert!(
        wait_until(T, || left(c).exists()),
        "node-c never left:\n{:#?}",
        c.daemon("unified_idle_shutdown").health
    );
    // node-c gone too, node-a is the last node: it stays.
    c.ok(&["shutdown"]);
    a.wait_health("unified_idle_shutdown", T, |h| {
        h.message
            .contains("only 0 other node(s) would stay (min_nodes 1)")
    });
    assert!(!left(a).exists());
}

/// A node of the shared-queue tests: selfplay (and, with `populator`, the queue's producer) on
/// `keys`. Each selfplay job first appends `<unix time> start <node> <item> <key>` to `records`;
/// hex6_2p jobs always fail (exit 3), hex8_2p jobs take a second and a half.
fn queue_node(
    nats: &Nats,
    id: &str,
    records: &std::path::Path,
    keys: &str,
    populator: bool,
    ack_wait: &str,
) -> Root {
    let root = Root::new();
    let quick = "    interval: 0.2\n    heartbeat_interval: 0.2\n";
    let populator = if populator {
        format!("  queue_populator:\n{quick}    target_depth: 3\n    games_per_item: 2\n")
    } else {
        String::new()
    };
    root.write_config(&format!(
        concat!(
            "http:\n  enabled: false\n",
            "pipeline:\n  config_keys: [{keys}]\n  jobs:\n    selfplay:\n",
            "      command: [\"sh\", \"-c\", \"echo \\\"$(date +%s.%N) start {id} $RINGRIFT_WORK_ITEM $1\\\" >> {records}; ",
            "if [ \\\"$1\\\" = hex6_2p ]; then echo \\\"no board for $1\\\" >&2; exit 3; fi; sleep 1.5; ",
            "exec \\\"$0\\\" job selfplay --config-key \\\"$1\\\" --games \\\"$2\\\" --db \\\"$3\\\" --seed \\\"$4\\\"\", ",
            "\"{{worker}}\", \"{{config_key}}\", \"{{games}}\", \"{{db_path}}\", \"{{seed}}\"]\n",
            "      max_runtime: 60\n",
            "cluster:\n  enabled: true\n  node_id: {id}\n  servers: [{url}]\n  roles: [selfplay]\n  ",
            "heartbeat_interval: 300ms\n  node_expiry: 2s\n  work_ack_wait: {ack_wait}\n",
            "daemons:\n{populator}",
            "  selfplay_scheduler:\n{quick}    slots: 2\n    retry_backoff: 0.1\n    grace_period: 1\n",
        ),
        id = id,
        ack_wait = ack_wait,
        keys = keys,
        records = records.display(),
        url = nats.url(),
        populator = populator,
        quick = quick,
    ));
    root
}

/// Two [`queue_node`]s of hex8_2p playing: node-a fills the shared queue and plays, node-b
/// plays.
fn playing_pair(nats: &Nats, records: &std::path::Path, ack_wait: &str) -> (Root, Root) {
    let a = queue_node(nats, "node-a", records, "hex8_2p", true, ack_wait);
    let b = queue_node(nats, "node-b", records, "hex8_2p", false, ack_wait);
    a.ok(&["start", "queue_populator", "selfplay_scheduler"]);
    b.ok(&["start", "selfplay_scheduler"]);
    (a, b)
}

/// The records' `start` lines: (unix time, node, item, key).
fn starts(records: &std::path::Path) -> Vec<(f64, String, i64, String)> {
    std::fs::read_to_string(records)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                [t, "start", node, item, key] => Some((
                    t.parse().ok()?,
                    node.to_string(),
                    item.parse().ok()?,
                    key.to_string(),
                )),
                _ => None,
            }
        })
        .collect()
}

fn shared_items(root: &Root, args: &[&str]) -> Vec<ringrift::work_queue::Item> {
    let mut all = vec!["queue", "list", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&root.ok(&all)).expect("queue list --json")
}

/// As [`shared_items`], for a condition polled until a deadline: nothing while the node cannot
/// answer yet (it has just started and is not on the bus).
fn shared_items_now(root: &Root, args: &[&str]) -> Vec<ringrift::work_queue::Item> {
    let mut all = vec!["queue", "list", "--json"];
    all.extend_from_slice(args);
    let out = root.run(&all);
    if out.status.success() {
        serde_json::from_slice(&out.stdout).expect("queue list --json")
    } else {
        Vec::new()
    }
}

#[test]
fn the_shared_queue_feeds_every_node_and_a_dead_nodes_item_runs_elsewhere_once() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    let (a, b) = playing_pair(&nats, &records, "2s");

    // Both nodes take items from the one queue.
    let ran_on = |node: &str| starts(&records).iter().any(|s| s.1 == node);
    assert!(
        wait_until(T, || ran_on("node-a") && ran_on("node-b")),
        "records:\n{}\nqueue:\n{}\nscheduler on b:\n{}",
        std::fs::read_to_string(&records).unwrap_or_default(),
        a.ok(&["queue", "list"]),
        std::fs::read_to_string(b.log_path("selfplay_scheduler")).unwrap_or_default()
    );

    // node-b dies in the middle of a hex8_2p job: its supervisor is killed (and the job with it).
    let running_on_b = || {
        shared_items_now(&a, &["--status", "running"])
            .into_iter()
            .find(|i| i.node.as_deref() == Some("node-b"))
    };
    let mut victim = None;
    assert!(
        wait_until(T, || {
            victim = running_on_b();
            victim.is_some()
        }),
        "no hex8_2p item running on node-b:\n{}",
        a.ok(&["queue", "list"])
    );
    let victim = victim.unwrap();
    assert!(
        victim
            .claimed_by
            .as_deref()
            .unwrap()
            .starts_with("node-b/selfplay_scheduler")
    );
    // Seen from node-a: node-b's slots and the item running there.
    let b_record = || {
        cluster(&a)
            .nodes
            .into_iter()
            .find(|n| n.record.node_id == "node-b")
            .map(|n| n.record)
    };
    assert!(
        wait_until(T, || b_record().is_some_and(
            |r| r.slots == Some(2) && r.running_items.contains(&victim.id)
        )),
        "{:?}",
        b_record()
    );
    let b_pid = b.supervisor_pid().unwrap();
    signal(b_pid, nix::sys::signal::Signal::SIGKILL);
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(wait_until(T, || !alive(b_pid)));

    // After work_ack_wait the item is delivered to node-a, which runs it to the end.
    let on_a = || {
        starts(&records)
            .into_iter()
            .find(|s| s.2 == victim.id && s.1 == "node-a")
    };
    assert!(
        wait_until(T, || on_a().is_some()),
        "item {} never ran on node-a:\n{}\n{}",
        victim.id,
        std::fs::read_to_string(&records).unwrap_or_default(),
        a.master_log()
    );
    let gone = || {
        a.run(&["queue", "show", &victim.id.to_string()])
            .status
            .code()
            == Some(2)
    };
    assert!(
        wait_until(T, gone),
        "item {} not completed: {}",
        victim.id,
        a.ok(&["queue", "show", &victim.id.to_string()])
    );
    // Never on two nodes at once: node-a started it after node-b's job was killed, and no other
    // item was started by two nodes.
    let (started_on_a, ..) = on_a().unwrap();
    assert!(
        started_on_a > killed_at,
        "node-a started item {} before node-b died",
        victim.id
    );
    let records_now = starts(&records);
    for s in &records_now {
        if s.2 != victim.id {
            let nodes: BTreeSet<&str> = records_now
                .iter()
                .filter(|o| o.2 == s.2)
                .map(|o| o.1.as_str())
                .collect();
            assert_eq!(nodes.len(), 1, "item {} ran on {nodes:?}", s.2);
        }
    }

    // An item cancelled while it runs: its node finds its claim gone and stops the job.
    let mut running = None;
    assert!(wait_until(T, || {
        running = shared_items_now(&a, &["--status", "running"])
            .into_iter()
            .next();
        running.is_some()
    }));
    let running = running.unwrap();
    a.ok(&["queue", "cancel", &running.id.to_string()]);
    a.wait_log(
        "master_loop",
        &format!("this node lost the claim of work item {}", running.id),
        T,
    );
    // What someone else put on the bus: an item that is not one (removed, said in the log) and
    // one for a key no node plays (handed back by each node without counting as a failed
    // attempt, then set aside once no node could run it).
    assert!(wait_until(T, || a
        .master_log()
        .contains("claimed by selfplay_scheduler")));
    publish_raw(
        &nats.url(),
        "ringrift.work.selfplay.hex8_2p",
        serde_json::json!({"hello": "world"}),
    );
    let foreign = serde_json::json!({"config_key": "square8_2p", "games": 1}).to_string();
    publish_raw(
        &nats.url(),
        "ringrift.work.selfplay.square8_2p",
        serde_json::json!({"item_type": "selfplay", "config_key": "square8_2p", "priority": 1.0,
                           "config": foreign, "created_unix": 0.0}),
    );
    // An item whose key cannot even name a subject: set aside all the same.
    let dotted = serde_json::json!({"config_key": "a.b", "games": 1}).to_string();
    publish_raw(
        &nats.url(),
        "ringrift.work.selfplay.x",
        serde_json::json!({"item_type": "selfplay", "config_key": "a.b", "priority": 1.0,
                           "config": dotted, "created_unix": 0.0}),
    );
    a.wait_log("master_loop", "is unreadable (missing field", T);
    assert!(
        wait_until(Duration::from_secs(60), || shared_items_now(
            &a,
            &["--status", "failed"]
        )
        .iter()
        .any(|i| i.config["config_key"] == "a.b")),
        "{}",
        a.ok(&["queue", "list"])
    );
    let set_aside = |key: &str| {
        a.events_of("WORK_FAILED")
            .into_iter()
            .find(|e| e.payload["config_key"] == key)
    };
    assert!(
        wait_until(Duration::from_secs(60), || set_aside("square8_2p")
            .is_some()),
        "{}",
        a.ok(&["queue", "list"])
    );
    let e = set_aside("square8_2p").unwrap();
    assert_eq!(e.payload["attempts"], ringrift::work_queue::MAX_RELEASES);
    assert!(
        e.payload["error"]
            .as_str()
            .unwrap()
            .contains("config key square8_2p is not in pipeline.config_keys"),
        "{e:?}"
    );
}

#[test]
fn a_shared_item_that_always_fails_is_set_aside_and_the_operator_can_retry_and_cancel() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    let a = queue_node(&nats, "node-a", &records, "hex8_2p, hex6_2p", true, "2s");
    a.ok(&["start", "queue_populator", "selfplay_scheduler"]);
    let set_aside = |key: &str| {
        a.events_of("WORK_FAILED")
            .into_iter()
            .find(|e| e.payload["config_key"] == key)
    };

    // hex6_2p items always fail: after their third attempt they are set aside, with WORK_FAILED
    // naming the item, the node and the job's last error, and the queue goes on.
    let failed = || set_aside("hex6_2p");
    assert!(
        wait_until(Duration::from_secs(60), || failed().is_some()),
        "no WORK_FAILED:\n{}",
        a.ok(&["queue", "list"])
    );
    let e = failed().unwrap();
    assert_eq!(e.payload["config_key"], "hex6_2p");
    assert_eq!(e.payload["attempts"], 3);
    assert_eq!(e.payload["node"], "node-a");
    assert!(
        e.payload["error"]
            .as_str()
            .unwrap()
            .contains("no board for hex6_2p"),
        "{e:?}"
    );
    let dead_id = e.payload["item_id"].as_i64().unwrap();
    let dead = shared_items(&a, &["--status", "failed"]);
    let d = dead
        .iter()
        .find(|i| i.id == dead_id)
        .expect("listed as failed");
    assert_eq!((d.attempts, d.node.as_deref()), (3, Some("node-a")));
    assert_eq!(
        starts(&records).iter().filter(|s| s.2 == dead_id).count(),
        3,
        "ran three times"
    );
    let hex8_done = starts(&records).iter().filter(|s| s.3 == "hex8_2p").count();
    assert!(wait_until(T, || starts(&records)
        .iter()
        .filter(|s| s.3 == "hex8_2p")
        .count()
        > hex8_done + 1));

    // The operator: retry the dead item (queued again as a new item), cancel a pending one.
    let out = a.ok(&["queue", "retry", &dead_id.to_string()]);
    assert!(
        out.contains(&format!("work item {dead_id} queued again: now item")),
        "{out}"
    );
    a.ok(&["stop", "selfplay_scheduler", "queue_populator"]);
    let pending = shared_items(&a, &["--status", "pending"]);
    let p = pending.first().expect("a pending item");
    let out = a.ok(&["queue", "cancel", &p.id.to_string()]);
    assert!(out.contains("cancelled: now cancelled"), "{out}");
    assert!(!shared_items(&a, &[]).iter().any(|i| i.id == p.id));
    for (args, code, says) in [
        (vec!["queue", "show", "999999"], 2, "no work item 999999"),
        (
            vec!["queue", "list", "--status", "completed"],
            2,
            "unknown status 'completed'",
        ),
        (vec!["queue", "retry", &p.id.to_string()], 2, "no work item"),
    ] {
        let out = a.run(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {out:?}");
    }
}

/// An sshd on a free loopback port that lets in one key, for rsync between roots; stopped when
/// dropped. None where sshd is not installed (apt-get install openssh-server).
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sshd {
    fn start() -> Option<Sshd> {
        let sshd = PathBuf::from("/usr/sbin/sshd");
        if !sshd.exists() {
            eprintln!("skipped: sshd is not installed (apt-get install openssh-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "id_ed25519"] {
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nLogLevel FATAL\nMaxStartups 100\n",
                dir = d.display()
            ),
        )
        .unwrap();
        // sshd's privilege separation needs this directory (made by its service otherwise).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = std::process::Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let sshd = Sshd { child, port, dir };
        assert!(
            wait_until(T, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "sshd does not listen on {port}"
        );
        Some(sshd)
    }

    /// `pipeline.ssh` for this server, as YAML.
    fn ssh_yaml(&self) -> String {
        format!(
            "[ssh, -p, \"{}\", -i, {:?}, -o, BatchMode=yes, -o, StrictHostKeyChecking=no, -o, \
             UserKnownHostsFile=/dev/null, -o, LogLevel=ERROR]",
            self.port,
            self.dir.path().join("id_ed25519").display().to_string()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node of the three-node loop: the shipped configuration with this test's bus, id and roles,
/// its root reached over ssh on loopback as its data address (`127.0.0.1:<root>`, rsync over
/// `sshd`), `role:` targets for games and models, and the train job slowed by three seconds (so
/// that it can be interrupted). Numbers are made small by `pipeline::SMALL_ENV`.
fn loop_root(nats: &Nats, sshd: &Sshd, id: &str, roles: &str, http: u16) -> Root {
    let root = Root::new();
    let mut yaml = ringrift::config::DEFAULT_YAML.to_string();
    for (from, to) in [
        (
            "pipeline:\n  config_keys: [hex8_2p]",
            format!("pipeline:\n  config_keys: [hex8_2p]\n  ssh: {}", sshd.ssh_yaml()),
        ),
        (
            "  addr: 127.0.0.1:8770",
            format!("  addr: 127.0.0.1:{http}"),
        ),
        (
            "  enabled: false\n  # node_id: gpu-07",
            format!("  enabled: true\n  node_id: {id}"),
        ),
        ("  servers: []", format!("  servers: [{}]", nats.url())),
        (
            "  roles: [coordinator, training, selfplay, evaluation]",
            format!(
                "  roles: [{roles}]\n  data_address: \"127.0.0.1:{}\"",
                root.path().display()
            ),
        ),
        ("  heartbeat_interval: 2s", "  heartbeat_interval: 300ms".into()),
        ("  node_expiry: 10s", "  node_expiry: 2s".into()),
        ("  lease_ttl: 10s", "  lease_ttl: 2s".into()),
        ("  work_ack_wait: 30s", "  work_ack_wait: 2s".into()),
        (
            "    targets: []               # directories, or host:path (rsync over ssh), to push",
            "    targets: [\"role:training\"] #".into(),
        ),
        (
            "    targets: []               # directories, or host:path (rsync over ssh), to copy",
            "    targets: [\"role:selfplay\"] #".into(),
        ),
        ("    peers: []", "    peers: [incoming]".into()),
        (
            "      command: [\"{worker}\", \"job\", \"train\",",
            "      command: [\"sh\", \"-c\", \"sleep 3; exec \\\"$0\\\" \\\"$@\\\"\", \"{worker}\", \"job\", \"train\",".into(),
        ),
    ] {
        yaml = replace_once(&yaml, from, &to);
    }
    root.write_config(&yaml);
    root
}

/// `"model": "<path>"` in a selfplay job's summary: the jobs of `root` that played `model`.
fn played_with(root: &Root, model: &std::path::Path) -> bool {
    let needle = format!("\"model\":\"{}\"", model.display());
    std::fs::read_dir(root.path().join("logs/jobs"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|t| t.replace(": ", ":").contains(&needle))
        })
}

#[test]
fn three_nodes_run_the_whole_loop_and_a_training_node_killed_mid_training_finishes_it() {
    let Some(sshd) = Sshd::start() else { return };
    let nats = Nats::start();
    // node-b trains, evaluates, promotes and fills the shared queue; node-a and node-c play.
    // Games and models go between them with rsync over ssh.
    let b_http = free_port();
    let b = loop_root(
        &nats,
        &sshd,
        "node-b",
        "coordinator, training, evaluation",
        b_http,
    );
    let a = loop_root(&nats, &sshd, "node-a", "selfplay", free_port());
    let c = loop_root(&nats, &sshd, "node-c", "selfplay", free_port());
    // The pipeline test's small numbers, each node on its own HTTP port (not any free one).
    let small: Vec<(&str, &str)> = crate::pipeline::SMALL_ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "RINGRIFT_HTTP__ADDR")
        .collect();
    let trainer = [
        "start",
        "queue_populator",
        "cluster_data_sync",
        "auto_export",
        "quality_monitor",
        "training_trigger",
        "evaluation",
        "auto_promotion",
        "model_distribution",
    ];
    b.ok_with_env(&trainer, &small);
    for player in [&a, &c] {
        player.ok_with_env(&["start", "selfplay_scheduler", "auto_sync"], &small);
    }

    // Games from both players reach the trainer, which starts training on them.
    let incoming = |from: &str| {
        b.path()
            .join(format!("data/incoming/games/{from}/hex8_2p.db"))
            .is_file()
    };
    let training = || !b.events_of("TRAINING_STARTED").is_empty();
    assert!(
        wait_until(Duration::from_secs(240), || incoming("node-a")
            && incoming("node-c")
            && training()),
        "incoming from a: {}, from c: {}, training: {}\n{}",
        incoming("node-a"),
        incoming("node-c"),
        training(),
        b.ok(&["status"])
    );

    // Seen from one place: node-b's GET /cluster/status lists the three nodes, and the players'
    // selfplay slots.
    let report: ClusterReport = serde_json::from_str(
        http_get(b_http, "/cluster/status")
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default(),
    )
    .expect("GET /cluster/status");
    assert_eq!(node_ids(&report).len(), 3, "{report:?}");
    assert!(
        report
            .nodes
            .iter()
            .filter(|n| n.record.node_id != "node-b")
            .all(|n| n.record.slots.is_some()),
        "{report:?}"
    );
    // The trainer's supervisor dies in the middle of training (the train job sleeps 3 s first).
    assert!(
        b.events_of("TRAINING_COMPLETED").is_empty(),
        "training ended before the kill"
    );
    let b_pid = b.supervisor_pid().unwrap();
    signal(b_pid, SIGKILL);
    assert!(wait_until(T, || !alive(b_pid)));
    // It comes back; its training item is delivered to it again (it is the only training node)
    // and trained to the end, evaluated and promoted there.
    b.ok_with_env(&trainer, &small);
    let promoted = || b.events_of("MODEL_PROMOTED").into_iter().next();
    assert!(
        wait_until(Duration::from_secs(240), || promoted().is_some()),
        "no promotion on node-b: {:?}\n{}",
        b.events(&[])
            .iter()
            .filter(|e| e.event_type.starts_with("TRAINING")
                || e.event_type.starts_with("EVALUATION")
                || e.event_type.starts_with("PROMOTION"))
            .map(|e| format!("{} {}", e.event_type, e.payload))
            .collect::<Vec<_>>(),
        b.ok(&["status"])
    );
    // The training item was delivered again once the node was back, and trained to the end:
    // a second TRAINING_STARTED.
    assert!(
        b.master_log().contains(
            "(training hex8_2p) claimed by training_trigger (delivered again: delivery 2)"
        ),
        "{}",
        b.master_log()
    );
    assert!(b.events_of("TRAINING_STARTED").len() >= 2);
    let canonical = b.path().join("models/canonical_hex8_2p.bin");
    let model = std::fs::read(&canonical).unwrap();

    // The promoted model reaches both players, over ssh, which then play with it.
    let over_ssh = |player: &Root| {
        let to = format!("to 127.0.0.1:{}/models (sha256", player.path().display());
        std::fs::read_to_string(b.log_path("model_distribution")).is_ok_and(|l| l.contains(&to))
    };
    for player in [&a, &c] {
        assert!(
            wait_until(T, || over_ssh(player)),
            "{}",
            std::fs::read_to_string(b.log_path("model_distribution")).unwrap_or_default()
        );
        let theirs = player.path().join("models/canonical_hex8_2p.bin");
        assert!(
            wait_until(T, || std::fs::read(&theirs).is_ok_and(|m| m == model)),
            "the model is not on {}: {:#?}",
            player.path().display(),
            b.daemon("model_distribution").health
        );
        assert!(
            wait_until(Duration::from_secs(60), || played_with(player, &theirs)),
            "no selfplay job on {} played {}",
            player.path().display(),
            theirs.display()
        );
    }
}

#[test]
fn a_node_that_shuts_down_hands_its_items_back_at_once() {
    // work_ack_wait is 60 s: an item that came back after it would take a minute.
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    let (a, b) = playing_pair(&nats, &records, "60s");
    let mut held = Vec::new();
    assert!(wait_until(T, || {
        held = shared_items_now(&b, &["--status", "running"])
            .into_iter()
            .filter(|i| i.node.as_deref() == Some("node-a"))
            .map(|i| i.id)
            .collect();
        !held.is_empty()
    }));
    a.ok(&["shutdown"]);
    let stopped = std::time::Instant::now();
    // Each comes back at once and node-b runs it (as its slots free up), long before 60 s.
    for id in &held {
        assert!(
            wait_until(Duration::from_secs(30), || starts(&records)
                .iter()
                .any(|s| s.2 == *id && s.1 == "node-b")),
            "item {id} did not run on node-b within 30 s of node-a's shutdown:\n{}",
            b.ok(&["queue", "list"])
        );
    }
    assert!(stopped.elapsed() < Duration::from_secs(30));
    assert!(
        a.master_log()
            .contains("handed back: this supervisor is exiting")
    );
}

/// A candidate of hex8_2p trained by hand on `root` (selfplay, export and train, the reference
/// jobs), as training_trigger leaves one: models/candidates/hex8_2p/`name`.
fn trained_candidate(root: &Root, name: &str) -> PathBuf {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("games.db");
    play_games(root, &db, "hex8_2p", 30, 11);
    let npz = work.path().join("samples.npz");
    let (db_s, npz_s) = (db.display().to_string(), npz.display().to_string());
    worker_job(
        root,
        &[
            "export",
            "--config-key",
            "hex8_2p",
            "--db",
            &db_s,
            "--output",
            &npz_s,
        ],
    );
    let candidate = root.path().join("models/candidates/hex8_2p").join(name);
    std::fs::create_dir_all(candidate.parent().unwrap()).unwrap();
    let out = candidate.display().to_string();
    worker_job(
        root,
        &[
            "train",
            "--config-key",
            "hex8_2p",
            "--input",
            &npz_s,
            "--output",
            &out,
            "--epochs",
            "2",
        ],
    );
    candidate
}

/// The SHA-256 of a file, by `sha256sum`.
fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Issue 13, evaluation where there is capacity: a training node's candidate becomes an item of
/// the shared queue, which an evaluation node (another root, rsync over ssh on loopback) claims:
/// it fetches the candidate, plays the gauntlet, and delivers the results file back beside the
/// candidate, where the training node's auto_promotion decides on it. A gauntlet that always
/// fails sets the item aside after its attempts (WORK_FAILED), the training node does not queue
/// that candidate again by itself, and `queue retry` evaluates it once the evaluator is fixed.
#[test]
fn an_evaluation_node_plays_another_nodes_candidate_and_delivers_its_results_back() {
    let Some(sshd) = Sshd::start() else { return };
    let nats = Nats::start();
    // node-b trains (here: by hand) and promotes, and does not evaluate; node-e only evaluates.
    let b = loop_root(&nats, &sshd, "node-b", "coordinator, training", free_port());
    let e = loop_root(&nats, &sshd, "node-e", "evaluation", free_port());
    let config = e.path().join("config/unified_loop.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    // At first node-e's gauntlet always fails.
    let gauntlet = "      command: [\"{worker}\", \"job\", \"gauntlet\",";
    let broken = replace_once(
        &good,
        gauntlet,
        "      command: [\"sh\", \"-c\", \"echo no gauntlet on this node >&2; exit 3\", \"{worker}\", \"job\", \"gauntlet\",",
    );
    e.write_config(&broken);
    // node-b has a canonical model (another trained one); node-e has none of its own, so the
    // baseline it plays can only be node-b's, fetched with the candidate.
    let canonical = b.path().join("models/canonical_hex8_2p.bin");
    std::fs::rename(trained_candidate(&b, "first.bin"), &canonical).unwrap();
    let candidate = trained_candidate(&b, "cand-1.bin");
    let sha = sha256_of(&candidate);
    let small: Vec<(&str, &str)> = crate::pipeline::SMALL_ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "RINGRIFT_HTTP__ADDR")
        .collect();
    b.ok_with_env(&["start", "evaluation", "auto_promotion"], &small);
    e.ok_with_env(&["start", "evaluation"], &small);

    // Three failed attempts on node-e, then set aside: WORK_FAILED names the item, the node and
    // the gauntlet's error, on both nodes.
    let failed = |r: &Root| {
        r.events_of("WORK_FAILED")
            .into_iter()
            .find(|ev| ev.payload["item_type"] == "evaluation")
    };
    assert!(
        wait_until(Duration::from_secs(90), || failed(&b).is_some()),
        "{}\n{}",
        std::fs::read_to_string(e.log_path("evaluation")).unwrap_or_default(),
        e.master_log()
    );
    let dead = failed(&e).expect("WORK_FAILED on node-e");
    assert_eq!(dead.payload["node"], "node-e", "{dead:?}");
    assert_eq!(dead.payload["attempts"], 3, "{dead:?}");
    assert!(
        dead.payload["error"]
            .as_str()
            .is_some_and(|m| m.contains("gauntlet job")),
        "{dead:?}"
    );
    let id = dead.payload["item_id"].as_i64().unwrap();
    assert!(e.events_of("EVALUATION_FAILED").len() >= 3);
    // node-b says so, and queues no new item for that candidate by itself.
    assert!(
        wait_until(T, || b
            .daemon("evaluation")
            .health
            .message
            .contains(&format!("queue retry {id}"))),
        "{:?}",
        b.daemon("evaluation").health
    );
    let items = shared_items(&b, &[]);
    let evaluation: Vec<_> = items
        .iter()
        .filter(|i| i.item_type == "evaluation")
        .collect();
    assert_eq!(evaluation.len(), 1, "{items:#?}");
    assert_eq!(evaluation[0].id, id);
    assert_eq!(evaluation[0].status, "failed");
    assert_eq!(evaluation[0].config["model_sha256"], sha.as_str());
    assert!(!candidate.with_extension("eval.json").exists());

    // node-e is fixed and the operator retries the item: node-e fetches the candidate over ssh,
    // plays it, and delivers the results file beside it on node-b.
    e.ok(&["shutdown"]);
    e.write_config(&good);
    e.ok_with_env(&["start", "evaluation"], &small);
    b.ok(&["queue", "retry", &id.to_string()]);
    let results = candidate.with_extension("eval.json");
    assert!(
        wait_until(Duration::from_secs(90), || results.is_file()),
        "{}",
        std::fs::read_to_string(e.log_path("evaluation")).unwrap_or_default()
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    assert_eq!(record["model_sha256"], sha.as_str(), "{record}");
    assert_eq!(
        record["baseline_sha256"],
        sha256_of(&canonical).as_str(),
        "the baseline played is node-b's canonical model: {record}"
    );
    assert!(!e.path().join("models/canonical_hex8_2p.bin").exists());
    assert_eq!(
        record["model_path"],
        candidate.display().to_string().as_str(),
        "{record}"
    );
    // EVALUATION_COMPLETED from node-e names node-b's candidate, and node-b decides on it from
    // the results on its own disk.
    let completed = || b.events_of("EVALUATION_COMPLETED").into_iter().next();
    assert!(
        wait_until(T, || completed().is_some()),
        "EVALUATION_COMPLETED does not reach node-b"
    );
    let completed = completed().unwrap();
    assert_eq!(completed.node.as_deref(), Some("node-e"), "{completed:?}");
    assert_eq!(completed.payload["candidate_node"], "node-b");
    let decided = || {
        b.events(&[]).into_iter().find(|ev| {
            (ev.event_type == "MODEL_PROMOTED" || ev.event_type == "PROMOTION_REJECTED")
                && ev.node.is_none()
        })
    };
    assert!(
        wait_until(T, || decided().is_some()),
        "{}",
        std::fs::read_to_string(b.log_path("auto_promotion")).unwrap_or_default()
    );
    assert!(
        decided().unwrap().payload.to_string().contains("cand-1"),
        "{:?}",
        decided()
    );
    // The copy on node-e was only for the gauntlet; the item is done.
    assert!(wait_until(T, || !e
        .path()
        .join("models/evaluating/node-b")
        .exists()));
    assert!(
        wait_until(T, || shared_items(&b, &[])
            .iter()
            .all(|i| i.item_type != "evaluation")),
        "{:#?}",
        shared_items(&b, &[])
    );
    // node-b never evaluated (it has no evaluation role): no gauntlet job ran there.
    assert!(
        !std::fs::read_to_string(b.log_path("evaluation"))
            .unwrap_or_default()
            .contains("gauntlet for"),
    );
}

/// Issue 13, item 2: idle_resource on a node in a cluster adds work from the shared queue (the
/// leader's pending selfplay items, run bound to their claims and completed), and only on a node
/// whose roles include selfplay.
#[test]
fn an_idle_node_takes_the_clusters_pending_selfplay_items() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    let a = queue_node(&nats, "node-a", &records, "hex8_2p", true, "5s");
    let b = queue_node(&nats, "node-b", &records, "hex8_2p", false, "5s");
    let c = queue_node(&nats, "node-c", &records, "hex8_2p", false, "5s");
    // Idle at once (any CPU use under 100 %), two extra jobs at a time.
    let idle = "  idle_resource:\n    interval: 0.2\n    heartbeat_interval: 0.2\n    cpu_threshold: 100\n    idle_window: 0\n    max_extra_jobs: 2\n";
    let config = |r: &Root| r.path().join("config/unified_loop.yaml");
    for (r, roles) in [(&b, "[selfplay]"), (&c, "[training]")] {
        let yaml = std::fs::read_to_string(config(r)).unwrap();
        let yaml = replace_once(&yaml, "roles: [selfplay]", &format!("roles: {roles}"));
        r.write_config(&format!("{yaml}{idle}"));
    }
    a.ok(&["start", "queue_populator"]);
    b.ok(&["start", "idle_resource"]);
    c.ok(&["start", "idle_resource"]);
    let on = |node: &str| -> Vec<i64> {
        starts(&records)
            .into_iter()
            .filter(|s| s.1 == node)
            .map(|s| s.2)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || on("node-b").len() >= 4),
        "{:?}\n{}",
        b.daemon("idle_resource").health,
        b.master_log()
    );
    // They were the cluster's items, and each is done once its job ends.
    let first = on("node-b")[0];
    assert!(
        wait_until(T, || shared_items(&b, &[]).iter().all(|i| i.id != first)),
        "{:#?}",
        shared_items(&b, &[])
    );
    assert!(b.master_log().contains("claimed by idle_resource"));
    // node-c, without the selfplay role, took none and says why.
    assert!(on("node-c").is_empty());
    assert!(
        wait_until(T, || c
            .daemon("idle_resource")
            .health
            .message
            .contains("do not include selfplay")),
        "{:?}",
        c.daemon("idle_resource").health
    );
}

/// An item whose node died is not shown as running there for ever: once its claim has not been
/// renewed for `work_ack_wait`, `queue list` shows it pending, naming the lapsed claim, until a
/// node claims it (here none does: the only other node runs no selfplay).
#[test]
fn a_dead_nodes_items_list_as_pending_with_the_lapsed_claim() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    let a = queue_node(&nats, "node-a", &records, "hex8_2p", true, "2s");
    let b = queue_node(&nats, "node-b", &records, "hex8_2p", false, "2s");
    a.ok(&["start", "queue_populator"]);
    b.ok(&["start", "selfplay_scheduler"]);
    let mut held = Vec::new();
    assert!(wait_until(T, || {
        held = shared_items_now(&a, &["--status", "running"])
            .into_iter()
            .filter(|i| i.node.as_deref() == Some("node-b"))
            .map(|i| i.id)
            .collect();
        !held.is_empty()
    }));
    let b_pid = b.supervisor_pid().unwrap();
    signal(b_pid, SIGKILL);
    assert!(wait_until(T, || !alive(b_pid)));
    let lapsed = |id: i64| {
        shared_items(&a, &["--status", "pending"])
            .into_iter()
            .any(|i| {
                i.id == id
                    && i.error
                        .as_deref()
                        .is_some_and(|e| e.contains("node-b/selfplay_scheduler lapsed"))
            })
    };
    for id in &held {
        assert!(
            wait_until(T, || lapsed(*id)),
            "item {id}:\n{}",
            a.ok(&["queue", "show", &id.to_string()])
        );
    }
    assert!(
        shared_items(&a, &["--status", "running"]).is_empty(),
        "{}",
        a.ok(&["queue", "list"])
    );
}
