//! Issue 14, bounded data: with a small replay window the training file stays within the window
//! and the games DB within `games_keep` over many exports; a compressed NPZ written by a user's
//! own export program is accepted.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const WITHIN: Duration = Duration::from_secs(180);

/// Selfplay and export only, with small numbers: an export every few dozen games.
const ENV: &[(&str, &str)] = &[
    ("RINGRIFT_HTTP__ENABLED", "false"),
    ("RINGRIFT_DAEMON_INTERVAL", "1"),
    ("RINGRIFT_DEFAULTS__HEARTBEAT_INTERVAL", "0.5"),
    ("RINGRIFT_DAEMONS__QUEUE_POPULATOR__TARGET_DEPTH", "4"),
    ("RINGRIFT_DAEMONS__QUEUE_POPULATOR__GAMES_PER_ITEM", "40"),
    ("RINGRIFT_DAEMONS__SELFPLAY_SCHEDULER__SLOTS", "2"),
    ("RINGRIFT_DAEMONS__AUTO_EXPORT__THRESHOLD_GAMES", "60"),
    ("RINGRIFT_DAEMONS__AUTO_EXPORT__BATCH_TIMEOUT", "1"),
    ("RINGRIFT_DAEMONS__AUTO_EXPORT__REPLAY_WINDOW", "100"),
    ("RINGRIFT_DAEMONS__AUTO_EXPORT__GAMES_KEEP", "150"),
];

const DAEMONS: [&str; 3] = ["queue_populator", "selfplay_scheduler", "auto_export"];

fn start(root: &Root) {
    let mut args = vec!["start"];
    args.extend(DAEMONS);
    root.ok_with_env(&args, ENV);
}

/// Completed games with an id of at most `up_to`, and the highest id.
fn games_in(db: &Path, up_to: i64) -> (i64, i64) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT (SELECT COUNT(*) FROM games WHERE id <= ?1), COALESCE(MAX(id), 0) FROM games",
        [up_to],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[test]
fn the_replay_window_and_games_keep_bound_the_training_file_and_the_games_db() {
    let root = Root::new();
    start(&root);
    let npz = root.path().join("data/training/hex8_2p.npz");
    let db = root.path().join("data/games/hex8_2p.db");
    // Sizes after each export seen, to show they level off rather than grow with the games.
    let mut npz_sizes: Vec<u64> = Vec::new();
    let mut db_sizes: Vec<u64> = Vec::new();
    let mut seen = 0;
    let done = wait_until(WITHIN, || {
        let exports = root.events_of("NPZ_EXPORT_COMPLETE");
        if exports.len() > seen {
            seen = exports.len();
            npz_sizes.push(std::fs::metadata(&npz).map(|m| m.len()).unwrap_or(0));
            db_sizes.push(std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0));
        }
        // Enough games for five windows and more than three times games_keep.
        exports.len() >= 8 && games_in(&db, 0).1 >= 500
    });
    let exports = root.events_of("NPZ_EXPORT_COMPLETE");
    assert!(
        done,
        "{} exports, games DB {:?} (count, max id) within {WITHIN:?}; status: {}",
        exports.len(),
        games_in(&db, 0),
        root.ok(&["status"])
    );
    let progress = root.daemon("auto_export").progress;
    root.ok(&["stop", "--all"]);
    let exports = root.events_of("NPZ_EXPORT_COMPLETE");

    // Every export holds at most the window's 100 games, and the later ones a full window.
    let windows: Vec<u64> = exports
        .iter()
        .map(|e| e.payload["games"].as_u64().unwrap())
        .collect();
    assert!(windows.iter().all(|&g| g <= 100), "{windows:?}");
    assert_eq!(*windows.last().unwrap(), 100, "{windows:?}");
    let data = std::fs::read(&npz).unwrap();
    let ids = npz_game_ids(&data);
    assert_eq!(
        ids.len(),
        100,
        "the training file holds the newest 100 games"
    );
    assert_eq!(*ids.last().unwrap(), ids.iter().copied().max().unwrap());
    let exported = exports.last().unwrap().payload["last_game_id"]
        .as_i64()
        .unwrap();
    let (kept, max_id) = games_in(&db, exported);
    let (all, _) = games_in(&db, i64::MAX);
    // games_keep counts the newest games, exported or not; a game not exported yet is never
    // deleted (selfplay here is far faster than the export interval).
    assert!(
        max_id >= 500 && kept <= 150 && all == kept + (max_id - exported),
        "games_keep 150: {kept} exported games kept, {all} in all, of {max_id} played"
    );
    // The files level off: the last size is no more than half again the size once the window
    // was first full (without the window the NPZ would grow five-fold, the DB three-fold).
    let full = windows.iter().position(|&g| g == 100).unwrap();
    let (npz_full, npz_last) = (npz_sizes[full], *npz_sizes.last().unwrap());
    assert!(
        npz_last <= npz_full * 3 / 2,
        "NPZ sizes by export: {npz_sizes:?}"
    );
    let db_last = std::fs::metadata(&db).unwrap().len();
    assert!(
        db_last <= db_sizes[full].max(1) * 3,
        "games DB sizes by export: {db_sizes:?}, now {db_last}"
    );
    assert!(
        progress.get("games_pruned").copied().unwrap_or(0) >= 300,
        "{progress:?}"
    );
}

/// The distinct game ids of a training file, in file order, read with Python's zipfile (the
/// test reads the file as a user's own trainer would, not with the worker's reader).
fn npz_game_ids(npz: &[u8]) -> Vec<i64> {
    const READ: &str = "import struct, sys, zipfile
b = zipfile.ZipFile(sys.argv[1]).read('game_ids.npy')
assert b[:6] == b'\\x93NUMPY' and b[6] == 1, b[:8]
d = b[10 + struct.unpack('<H', b[8:10])[0]:]
print(' '.join(str(x) for x in struct.unpack('<%dq' % (len(d) // 8), d)))";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npz");
    std::fs::write(&path, npz).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-c", READ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut ids: Vec<i64> = stdout(&out)
        .split_whitespace()
        .map(|i| i.parse().unwrap())
        .collect();
    ids.dedup();
    ids
}

#[test]
fn a_compressed_npz_from_a_users_own_export_is_accepted() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/export_compressed.py"
    );
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/unified_loop.yaml"
    ))
    .unwrap();
    let builtin = r#"command: ["{worker}", "job", "export", "--config-key", "{config_key}", "--db", "{db_path}", "--output", "{npz_path}", "--window", "{replay_window}", "--previous", "{previous_npz_path}"]"#;
    assert!(
        default.contains(builtin),
        "the shipped export template changed"
    );
    let own = format!(
        r#"command: ["python3", "{script}", "{{worker}}", "{{config_key}}", "{{db_path}}", "{{npz_path}}"]"#
    );
    let root = Root::with_config(&default.replace(builtin, &own));
    start(&root);
    let done = wait_until(WITHIN, || !root.events_of("NPZ_EXPORT_COMPLETE").is_empty());
    assert!(done, "no export accepted; status: {}", root.ok(&["status"]));
    root.ok(&["stop", "--all"]);
    let e = &root.events_of("NPZ_EXPORT_COMPLETE")[0];
    assert!(e.payload["samples"].as_u64().unwrap() > 0, "{e:?}");
    let npz = std::fs::read(root.path().join("data/training/hex8_2p.npz")).unwrap();
    // The first member's local header says how it is stored: 8 is deflate (PKWARE APPNOTE 4.4.5).
    assert_eq!(&npz[..4], b"PK\x03\x04");
    assert_eq!(u16::from_le_bytes([npz[8], npz[9]]), 8, "deflated members");
    assert!(!root.path().join("data/training/hex8_2p.npz.bad").exists());
    let log = std::fs::read_dir(root.path().join("logs/jobs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .find(|l| l.contains("exported hex8_2p compressed"));
    assert!(log.is_some(), "the user's program ran");
}
