//! Games move between nodes: A's auto_sync pushes snapshots of its games DB to a shared directory,
//! B's cluster_data_sync merges them into its own games DB, once.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use nix::sys::signal::Signal::SIGTERM;

const T: Duration = Duration::from_secs(20);
const KEY: &str = "hex8_2p";

fn config(daemon: &str, list: &str, dir: &Path) -> String {
    format!(
        "http:\n  enabled: false\npipeline:\n  config_keys: [{KEY}]\ndaemons:\n  {daemon}:\n    interval: 0.2\n    heartbeat_interval: 0.2\n    {list}: [{:?}]\n",
        dir.display().to_string()
    )
}

fn count(db: &Path, sql: &str) -> i64 {
    if !db.is_file() {
        return 0;
    }
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
        .unwrap_or(0)
}

#[test]
fn games_pushed_by_one_node_are_merged_by_another_exactly_once() {
    let shared = tempfile::tempdir().unwrap();
    let a = Root::with_config(&config("auto_sync", "targets", shared.path()));
    let b = Root::with_config(&config("cluster_data_sync", "peers", shared.path()));

    let a_db = a.path().join(format!("data/games/{KEY}.db"));
    play_games(&a, &a_db, KEY, 50, 5);

    a.ok(&["start", "auto_sync"]);
    b.ok(&["start", "cluster_data_sync"]);

    let b_db = b.path().join(format!("data/games/{KEY}.db"));
    let completed = "SELECT count(*) FROM games WHERE status = 'completed'";
    assert!(
        wait_until(T, || count(&b_db, completed) >= 50),
        "B merged {} games; A: {:#?}\nB: {:#?}",
        count(&b_db, completed),
        a.daemon("auto_sync").health,
        b.daemon("cluster_data_sync").health
    );
    // More cycles pass (the peer file is seen unchanged) and nothing is merged twice.
    b.wait_health("cluster_data_sync", T, |h| {
        h.message.contains("1 peer DB(s) unchanged")
    });
    // Three more passes, then count again.
    let passes = |r: &Root| {
        r.daemon("cluster_data_sync")
            .progress
            .get("passes")
            .copied()
            .unwrap_or(0)
    };
    let seen = passes(&b);
    assert!(wait_until(T, || passes(&b) >= seen + 3));
    assert_eq!(count(&b_db, completed), 50);
    assert_eq!(count(&b_db, "SELECT count(*) FROM games"), 50);
    assert_eq!(
        count(&b_db, "SELECT count(*) FROM moves"),
        count(&a_db, "SELECT count(*) FROM moves")
    );
    let peer = shared.path().display().to_string();
    let from_peer =
        format!("SELECT count(DISTINCT source) FROM games WHERE source LIKE 'peer:{peer}:%'");
    assert_eq!(count(&b_db, &from_peer), 50);

    let new_games = b.events_of("NEW_GAMES_AVAILABLE");
    assert_eq!(new_games.len(), 1, "{new_games:#?}");
    let p = &new_games[0].payload;
    assert_eq!(p["config_key"], KEY);
    assert_eq!(p["new_games"], 50);
    assert_eq!(p["total_games"], 50);
    assert_eq!(p["db_path"], b_db.display().to_string());
    let pulled = b.events_of("DATA_SYNC_COMPLETED");
    assert_eq!(pulled[0].payload["source"], peer.as_str());

    let pushed = a.events_of("DATA_SYNC_COMPLETED");
    assert_eq!(pushed.len(), 1, "one push while A's DB is unchanged");
    let p = &pushed[0].payload;
    assert_eq!(p["target"], peer.as_str());
    assert_eq!(p["files"], 1);
    assert_eq!(p["source"], a_db.display().to_string());
    let health = a.daemon("auto_sync").health;
    assert!(health.healthy, "{health:#?}");
    assert!(
        health
            .message
            .contains(&format!("last pushed {KEY} → {peer}")),
        "{health:#?}"
    );
}

#[test]
fn a_node_told_to_stop_pushes_its_last_games_before_it_exits() {
    let shared = tempfile::tempdir().unwrap();
    // ephemeral_sync with a long interval: after its first pass, only the stop can push again.
    let a = Root::with_config(&format!(
        "http:\n  enabled: false\npipeline:\n  config_keys: [{KEY}]\ndaemons:\n  ephemeral_sync:\n    \
         enabled: true\n    interval: 3600\n    heartbeat_interval: 0.2\n    targets: [{:?}]\n",
        shared.path().display().to_string()
    ));
    let db = a.path().join(format!("data/games/{KEY}.db"));
    play_games(&a, &db, KEY, 20, 5);
    a.ok(&["start", "ephemeral_sync"]);
    let pushed = shared.path().join(format!("{KEY}.db"));
    let completed = "SELECT count(*) FROM games WHERE status = 'completed'";
    assert!(
        wait_until(T, || count(&pushed, completed) == 20),
        "{:#?}",
        a.daemon("ephemeral_sync").health
    );

    // Selfplay goes on; then the node is told to stop (SIGTERM to its supervisor, as a host's
    // shutdown would): the games written since the last pass are pushed before it exits.
    play_games(&a, &db, KEY, 10, 6);
    assert_eq!(count(&pushed, completed), 20);
    let pid = a.supervisor_pid().unwrap();
    signal(pid, SIGTERM);
    assert!(wait_until(T, || !alive(pid)), "the supervisor did not exit");
    assert_eq!(
        count(&pushed, completed),
        30,
        "the last games were not pushed:\n{}",
        std::fs::read_to_string(a.log_path("ephemeral_sync")).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(a.log_path("ephemeral_sync"))
            .unwrap()
            .contains("stopping: a last push")
    );
}
