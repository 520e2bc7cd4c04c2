//! CLUSTER_DATA_SYNC: pulls other nodes' games into this node's games DBs.
//!
//! Each entry of `peers` is where another node's `auto_sync` pushes its `<key>.db` snapshots: a
//! local directory (read in place) or `host:path` (fetched with rsync over ssh into
//! data/sync/<peer-slug>/, with a timeout). Each cycle, for every peer and config key whose file
//! changed (size and modification time, kept in data/coordination/cluster_data_sync.json), the file
//! is opened read-only and its completed games with an id above the last one merged from that
//! peer and key are copied into data/games/<key>.db, each batch of games and their moves in one
//! transaction.
//!
//! Never twice, never echoed:
//! - A merged game's `source` is `peer:<peer>:<remote id>`; before merging, the sources already
//!   present for that peer are read, so a lost state file does not merge a game again.
//! - Games whose own source starts with `peer:` were merged there from somewhere else: they are
//!   not taken again (two nodes pulling from each other would otherwise echo games forever). So a
//!   peer must not be this node's own push target either: its own games would come back as new.
//! - A game whose moves are not 1..n with n = total_moves is not merged and is reported; a peer
//!   file that is not a games DB is reported (DATA_SYNC_FAILED) and not read again until it
//!   changes. Neither stops the other peers.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ringrift::events::payload;
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auto_sync::{Fingerprint, fingerprint};
use super::transfer::{
    FailingMap, Passes, Purpose, Target, record_failure, remote_dir, resolve, run, specs,
};
use super::{Pipeline, load_state, now_secs, save_daemon_state, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::jobs::db::{GamesDb, INSERT_GAME, INSERT_MOVE, check_games_tables, has_model_column};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::ClusterSyncSettings;

const NAME: &str = "cluster_data_sync";

/// Games read from a peer per transaction.
const BATCH: i64 = 1000;
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn build(_: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(ClusterSync::default())
}

/// A file-name-safe form of a peer spec, for data/sync/<slug>/.
fn slug(spec: &str) -> String {
    let s: String = spec
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.trim_start_matches('.').to_string()
}

/// What one merge did.
#[derive(Debug, Default, PartialEq)]
struct Merged {
    merged: u64,
    /// Games that were merged before (found by source) or relayed from a third node.
    skipped: u64,
    /// Damaged games, not merged: why.
    rejected: Vec<String>,
    /// The highest peer game id looked at.
    last_id: i64,
    /// Completed games of the key in the local DB afterwards.
    total_games: i64,
}

struct PeerGame {
    id: i64,
    board_type: String,
    num_players: i64,
    created_at: String,
    completed_at: Option<String>,
    winner: Option<i64>,
    total_moves: i64,
    source: String,
    /// Which model played it (NULL from a peer DB written before the column existed).
    model: Option<String>,
}

/// Merges the completed `key` games with id > `since` of the peer DB `peer_db` into `local_db`
/// (created with the games schema if missing).
fn merge(
    peer: &str,
    peer_db: &Path,
    local_db: &Path,
    key: &str,
    since: i64,
) -> anyhow::Result<Merged> {
    let remote = Connection::open_with_flags(
        peer_db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open peer db {}", peer_db.display()))?;
    remote.busy_timeout(BUSY_TIMEOUT)?;
    check_games_tables(&remote, "peer db", peer_db)?;
    // A peer of an earlier version may have no `model` column (read-only here: not migrated).
    let model_column = if has_model_column(&remote)? {
        "model"
    } else {
        "NULL"
    };
    // Creates the file and schema if needed; the merge uses its own connection for the
    // transaction.
    drop(GamesDb::create(local_db)?);
    let mut local = Connection::open(local_db)
        .with_context(|| format!("cannot open games db {}", local_db.display()))?;
    local.busy_timeout(BUSY_TIMEOUT)?;
    local.execute_batch("PRAGMA foreign_keys = ON;")?;
    let prefix = format!("peer:{peer}:");
    let known: HashSet<i64> = {
        let mut stmt =
            local.prepare("SELECT source FROM games WHERE substr(source, 1, length(?1)) = ?1")?;
        let rows = stmt.query_map([&prefix], |r| r.get::<_, String>(0))?;
        let mut known = HashSet::new();
        for source in rows {
            if let Some(id) = source?.strip_prefix(&prefix).and_then(|id| id.parse().ok()) {
                known.insert(id);
            }
        }
        known
    };
    let read = || format!("cannot read games from peer db {}", peer_db.display());
    let mut out = Merged {
        last_id: since,
        ..Merged::default()
    };
    loop {
        let games: Vec<PeerGame> = {
            let mut stmt = remote
                .prepare(&format!(
                    "SELECT id, board_type, num_players, created_at, completed_at, winner,
                            total_moves, source, {model_column}
                     FROM games WHERE config_key = ?1 AND status = 'completed' AND id > ?2
                     ORDER BY id LIMIT ?3"
                ))
                .with_context(read)?;
            let rows = stmt
                .query_map(params![key, out.last_id, BATCH], |r| {
                    Ok(PeerGame {
                        id: r.get(0)?,
                        board_type: r.get(1)?,
                        num_players: r.get(2)?,
                        created_at: r.get(3)?,
                        completed_at: r.get(4)?,
                        winner: r.get(5)?,
                        total_moves: r.get(6)?,
                        source: r.get(7)?,
                        model: r.get(8)?,
                    })
                })
                .with_context(read)?;
            rows.collect::<Result<_, _>>().with_context(read)?
        };
        let (Some(first), Some(last)) = (games.first(), games.last()) else {
            break;
        };
        let mut moves: BTreeMap<i64, Vec<(i64, i64, i64)>> = BTreeMap::new();
        {
            let mut stmt = remote
                .prepare(
                    "SELECT game_id, move_number, player, cell FROM moves
                     WHERE game_id BETWEEN ?1 AND ?2 ORDER BY game_id, move_number",
                )
                .with_context(read)?;
            let rows = stmt
                .query_map(params![first.id, last.id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .with_context(read)?;
            for row in rows {
                let (game, number, player, cell): (i64, i64, i64, i64) = row.with_context(read)?;
                moves.entry(game).or_default().push((number, player, cell));
            }
        }
        let tx = local.transaction()?;
        {
            let mut game_stmt = tx.prepare(INSERT_GAME)?;
            let mut move_stmt = tx.prepare(INSERT_MOVE)?;
            for game in &games {
                if game.source.starts_with("peer:") || known.contains(&game.id) {
                    out.skipped += 1;
                    continue;
                }
                let game_moves = moves.get(&game.id).map(Vec::as_slice).unwrap_or_default();
                let contiguous = game_moves
                    .iter()
                    .enumerate()
                    .all(|(i, (n, _, _))| *n == i as i64 + 1);
                if !contiguous || game_moves.len() as i64 != game.total_moves {
                    out.rejected.push(format!(
                        "game {}: {} moves stored in order 1..n? {contiguous}; total_moves {}",
                        game.id,
                        game_moves.len(),
                        game.total_moves
                    ));
                    continue;
                }
                game_stmt.execute(params![
                    key,
                    game.board_type,
                    game.num_players,
                    game.created_at,
                    game.completed_at,
                    game.winner,
                    game.total_moves,
                    format!("{prefix}{}", game.id),
                    game.model,
                ])?;
                let id = tx.last_insert_rowid();
                for (number, player, cell) in game_moves {
                    move_stmt.execute(params![id, number, player, cell])?;
                }
                out.merged += 1;
            }
        }
        tx.commit()
            .with_context(|| format!("cannot commit merged games to {}", local_db.display()))?;
        out.last_id = last.id;
    }
    out.total_games = local.query_row(
        "SELECT count(*) FROM games WHERE config_key = ?1 AND status = 'completed'",
        [key],
        |r| r.get(0),
    )?;
    Ok(out)
}

/// rsync `host:path/<key>.db` to `dest` (nothing happens when the peer has no such file).
async fn fetch_remote(
    host: &str,
    path: &str,
    key: &str,
    dest: &Path,
    timeout: Duration,
    ssh: &[String],
) -> anyhow::Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let dir = remote_dir(path);
    let args = vec![
        "-a".to_string(),
        "--ignore-missing-args".to_string(),
        "-e".to_string(),
        super::transfer::rsh(ssh),
        format!("{host}:{dir}/{key}.db"),
        dest.display().to_string(),
    ];
    run("rsync", &args, timeout).await.map(drop)
}

/// The last merge from one peer and key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Pulled {
    fingerprint: Fingerprint,
    /// The highest peer game id looked at.
    last_id: i64,
    /// Games merged from there, all told.
    merged: u64,
    at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Peer spec → config key → the last merge.
    peers: BTreeMap<String, BTreeMap<String, Pulled>>,
}

#[derive(Default)]
struct ClusterSync {
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    /// `peers` as configured (`incoming` included).
    configured: Vec<String>,
    /// The peers as last resolved (each pass resolves them again).
    peers: Vec<(String, Target)>,
    timeout: Duration,
    state: State,
    /// (peer, key) → what failed: the file it failed on (`Some`: not read again until it
    /// changes), or `None`: a fetch, tried again after a backoff.
    failing: FailingMap<Option<Fingerprint>>,
    pass: Passes,
    merges: u64,
    games_merged: u64,
    bytes_read: u64,
    sync_failures: u64,
}

impl ClusterSync {
    fn report(&self) -> Report {
        self.pass.report(
            ("peers", &self.peers),
            &if self.configured.is_empty() {
                "no peers configured: nothing to pull".to_string()
            } else {
                super::transfer::idle_message(&self.configured, "peers", None)
            },
            ("pulled", json!(self.state.peers)),
            [
                ("merges", self.merges),
                ("games_merged", self.games_merged),
                ("bytes_read", self.bytes_read),
                ("sync_failures", self.sync_failures),
            ],
        )
    }

    /// Records and reports a failure of (`spec`, `key`).
    fn fail(&mut self, spec: &str, key: &str, fp: Option<Fingerprint>, error: String) {
        self.sync_failures += 1;
        super::emit(
            self.ctx.as_ref(),
            "DATA_SYNC_FAILED",
            payload([
                ("config_key", key.into()),
                ("source", spec.into()),
                ("error", error.as_str().into()),
            ]),
        );
        record_failure(
            &mut self.failing,
            (spec, key),
            fp,
            |_, _| true,
            error,
            5.0,
            1,
        );
    }

    /// One pass over every peer and config key.
    async fn pull(&mut self) {
        self.pass.count += 1;
        let pipeline = self.pipeline.clone().expect("started");
        self.peers = resolve(&self.configured, &pipeline.root, Purpose::Pulled);
        if self.peers.is_empty() {
            return;
        }
        let (mut unchanged, mut absent) = (0usize, 0usize);
        let mut merged: Vec<String> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        for (spec, peer) in self.peers.clone() {
            for key in &pipeline.config_keys {
                let id = (spec.clone(), key.clone());
                let now = now_secs();
                let file = match &peer {
                    Target::Local(dir) => dir.join(format!("{key}.db")),
                    Target::Remote { host, path } => {
                        if let Some(wait) = self
                            .failing
                            .get(&id)
                            .filter(|f| f.on.is_none())
                            .and_then(|f| f.waiting(now, &format!("{key} ← {spec}")))
                        {
                            failures.push(wait);
                            continue;
                        }
                        let dest = pipeline
                            .root
                            .join("data/sync")
                            .join(slug(&spec))
                            .join(format!("{key}.db"));
                        if let Err(e) =
                            fetch_remote(host, path, key, &dest, self.timeout, &pipeline.ssh).await
                        {
                            let error = format!("cannot fetch {key}.db: {e:#}");
                            failures.push(format!("{key} ← {spec}: {error}"));
                            self.fail(&spec, key, None, error);
                            continue;
                        }
                        dest
                    }
                };
                // The file alone: peer files are snapshots in rollback-journal mode, and reading
                // a WAL-mode file would itself touch its -wal.
                let fp = match fingerprint(&file) {
                    Ok(fp) => Fingerprint {
                        wal_size: 0,
                        wal_mtime_ns: 0,
                        ..fp
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        absent += 1;
                        continue;
                    }
                    Err(e) => {
                        let error = format!("cannot read {}: {e}", file.display());
                        failures.push(format!("{key} ← {spec}: {error}"));
                        self.fail(&spec, key, None, error);
                        continue;
                    }
                };
                let prev = self
                    .state
                    .peers
                    .get(&spec)
                    .and_then(|m| m.get(key))
                    .cloned();
                if prev.as_ref().is_some_and(|p| p.fingerprint == fp) {
                    self.failing.remove(&id);
                    unchanged += 1;
                    continue;
                }
                if let Some(f) = self.failing.get(&id)
                    && f.on == Some(fp)
                {
                    failures.push(format!("{key} ← {spec}: {} (until it changes)", f.error));
                    continue;
                }
                let since = prev.as_ref().map_or(0, |p| p.last_id);
                let local_db = pipeline.games_db(key);
                match merge(&spec, &file, &local_db, key, since) {
                    Ok(m) => {
                        self.failing.remove(&id);
                        self.merges += 1;
                        self.games_merged += m.merged;
                        self.bytes_read += fp.size;
                        let at = ringrift::timefmt::now_rfc3339();
                        self.state.peers.entry(spec.clone()).or_default().insert(
                            key.clone(),
                            Pulled {
                                fingerprint: fp,
                                last_id: m.last_id,
                                merged: prev.as_ref().map_or(0, |p| p.merged) + m.merged,
                                at,
                            },
                        );
                        if let Err(e) = save_daemon_state(&pipeline, NAME, &self.state) {
                            failures.push(e.to_string());
                        }
                        println!(
                            "{NAME}: {} new {key} games from {spec} ({} skipped, {} rejected; {} in total)",
                            m.merged,
                            m.skipped,
                            m.rejected.len(),
                            m.total_games
                        );
                        merged.push(format!("{} {key} games from {spec}", m.merged));
                        if !m.rejected.is_empty() {
                            failures.push(format!(
                                "{key} ← {spec}: {} damaged games not merged ({})",
                                m.rejected.len(),
                                m.rejected.join("; ")
                            ));
                        }
                        super::emit(
                            self.ctx.as_ref(),
                            "DATA_SYNC_COMPLETED",
                            payload([
                                ("config_key", key.as_str().into()),
                                ("source", spec.as_str().into()),
                                ("files", 1.into()),
                                ("bytes", fp.size.into()),
                            ]),
                        );
                        if m.merged > 0 {
                            super::emit(
                                self.ctx.as_ref(),
                                "NEW_GAMES_AVAILABLE",
                                payload([
                                    ("config_key", key.as_str().into()),
                                    ("new_games", m.merged.into()),
                                    ("total_games", m.total_games.into()),
                                    ("db_path", local_db.display().to_string().into()),
                                ]),
                            );
                        }
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        failures.push(format!("{key} ← {spec}: {error}"));
                        self.fail(&spec, key, Some(fp), error);
                    }
                }
            }
        }
        let when = ringrift::timefmt::now_rfc3339();
        let mut parts = vec![format!(
            "pass at {when}: {} peer(s), {unchanged} peer DB(s) unchanged, {absent} absent",
            self.peers.len()
        )];
        if !merged.is_empty() {
            parts.push(format!("merged {}", merged.join(", ")));
        } else if let Some((at, key, spec, n)) = self
            .state
            .peers
            .iter()
            .flat_map(|(s, m)| m.iter().map(move |(k, p)| (p.at.as_str(), k, s, p.merged)))
            .max()
        {
            parts.push(format!(
                "last merge {key} ← {spec} at {at} ({n} games from there in all)"
            ));
        }
        self.pass.end(NAME, &when, parts, &failures);
    }
}

impl Daemon for ClusterSync {
    fn name(&self) -> &str {
        NAME
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            self.configured = specs(settings, "peers")?;
            self.peers = resolve(&self.configured, &pipeline.root, Purpose::Pulled);
            self.timeout = typed(settings, ClusterSyncSettings::from_map)?.timeout;
            self.state = load_state(&pipeline.state_path(NAME));
            self.pass.ok = true;
            println!("{NAME}: peers {:?}", self.peers);
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.pull().await;
            self.report()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::auto_sync::tests::add_games;

    fn count(db: &Path, sql: &str) -> i64 {
        Connection::open(db)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    fn daemon(root: &Path, peers: &[String]) -> ClusterSync {
        let settings = Settings::from_config(Some(&json!({ "peers": peers }))).unwrap();
        ClusterSync {
            pipeline: Some(Pipeline::for_test(
                root,
                vec!["hex6_2p".into(), "hex8_2p".into()],
            )),
            configured: specs(&settings, "peers").unwrap(),
            peers: Vec::new(),
            timeout: Duration::from_secs(5),
            pass: Passes {
                ok: true,
                ..Passes::default()
            },
            ..ClusterSync::default()
        }
    }

    use crate::pipeline::tests::block_on;

    #[test]
    fn games_are_merged_once_even_without_state() {
        let dir = tempfile::tempdir().unwrap();
        let peer = dir.path().join("peer/hex6_2p.db");
        let local = dir.path().join("data/games/hex6_2p.db");
        add_games(&peer, 5, 1);
        let m = merge("p", &peer, &local, "hex6_2p", 0).unwrap();
        assert_eq!(
            (m.merged, m.skipped, m.last_id, m.total_games),
            (5, 0, 5, 5)
        );
        // Moves came along, in order, and the source names the peer's id.
        let db = GamesDb::open_existing(&local).unwrap();
        assert_eq!(
            db.completed_games(&crate::jobs::game::GameConfig::parse("hex6_2p").unwrap(), 0)
                .unwrap()
                .games
                .len(),
            5
        );
        assert_eq!(
            count(
                &local,
                "SELECT count(*) FROM games WHERE source = 'peer:p:3'"
            ),
            1
        );
        assert_eq!(
            count(&local, "SELECT count(*) FROM moves"),
            count(&peer, "SELECT count(*) FROM moves")
        );
        // Only newer games next time; with the state lost, sources stop a second merge.
        add_games(&peer, 2, 2);
        let m = merge("p", &peer, &local, "hex6_2p", 5).unwrap();
        assert_eq!((m.merged, m.last_id, m.total_games), (2, 7, 7));
        let m = merge("p", &peer, &local, "hex6_2p", 0).unwrap();
        assert_eq!((m.merged, m.skipped, m.total_games), (0, 7, 7));
        // Relayed games (merged there from elsewhere) are not taken again.
        let m = merge("q", &local, &dir.path().join("other.db"), "hex6_2p", 0).unwrap();
        assert_eq!((m.merged, m.skipped), (0, 7));
    }

    #[test]
    fn damaged_games_and_garbage_files_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let peer = dir.path().join("peer/hex6_2p.db");
        add_games(&peer, 3, 1);
        Connection::open(&peer)
            .unwrap()
            .execute(
                "DELETE FROM moves WHERE game_id = 2 AND move_number = 2",
                [],
            )
            .unwrap();
        let local = dir.path().join("local.db");
        let m = merge("p", &peer, &local, "hex6_2p", 0).unwrap();
        assert_eq!((m.merged, m.rejected.len(), m.last_id), (2, 1, 3));
        assert!(m.rejected[0].starts_with("game 2:"), "{:?}", m.rejected);

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let err = format!(
            "{:#}",
            merge("p", &garbage, &local, "hex6_2p", 0).unwrap_err()
        );
        assert!(
            err.contains("not readable") || err.contains("not a database"),
            "{err}"
        );
    }

    #[test]
    fn a_pass_merges_changed_peer_files_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let good = root.join("good");
        let bad = root.join("bad");
        add_games(&good.join("hex6_2p.db"), 4, 1);
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("hex6_2p.db"), b"not sqlite at all").unwrap();
        let mut d = daemon(
            root,
            &[good.display().to_string(), bad.display().to_string()],
        );
        block_on(d.pull());
        assert_eq!((d.games_merged, d.sync_failures), (4, 1), "{}", d.pass.last);
        assert!(!d.pass.ok);
        assert!(
            d.pass.last.contains("merged 4 hex6_2p games from "),
            "{}",
            d.pass.last
        );
        let local = root.join("data/games/hex6_2p.db");
        assert_eq!(count(&local, "SELECT count(*) FROM games"), 4);
        // Nothing changed: nothing merged, the bad file is not read again.
        block_on(d.pull());
        assert_eq!(
            (d.games_merged, d.sync_failures, d.merges),
            (4, 1, 1),
            "{}",
            d.pass.last
        );
        assert!(d.pass.last.contains("until it changes"), "{}", d.pass.last);
        assert!(
            d.pass.last.contains("1 peer DB(s) unchanged"),
            "{}",
            d.pass.last
        );
        // State survives a restart.
        let saved: State = load_state(&root.join("data/coordination/cluster_data_sync.json"));
        assert_eq!(saved.peers.len(), 1);
        let mut d = daemon(root, &[good.display().to_string()]);
        d.state = saved;
        block_on(d.pull());
        assert_eq!(d.games_merged, 0);
        assert!(d.pass.ok, "{}", d.pass.last);
        assert!(
            d.pass.last.contains("last merge hex6_2p ← "),
            "{}",
            d.pass.last
        );
        assert_eq!(count(&local, "SELECT count(*) FROM games"), 4);
    }

    #[test]
    fn no_peers_is_healthy_and_slugs_are_safe() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(dir.path(), &[]);
        block_on(d.pull());
        let r = d.report();
        assert!(r.health.healthy);
        assert_eq!(r.health.message, "no peers configured: nothing to pull");
        assert_eq!(slug("me@gpu1:/data/sync"), "me_gpu1__data_sync");
        assert_eq!(slug("../x"), "_x");
    }
}
