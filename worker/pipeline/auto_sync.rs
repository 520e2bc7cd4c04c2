//! AUTO_SYNC and EPHEMERAL_SYNC (the same code under two names): push this node's games DBs to the
//! configured `targets`, where other nodes' `cluster_data_sync` pulls them from.
//!
//! Why it is shaped this way:
//! - A live games DB is never copied as a file: selfplay may be writing it (WAL mode). Each push
//!   first makes a consistent snapshot with SQLite's `VACUUM INTO` under data/sync/outgoing/<name>/,
//!   switched to rollback-journal mode so a reader can open it read-only, and delivers that as
//!   `<key>.db`.
//! - A key is pushed to a target only when its DB changed since the last successful push there:
//!   the size and modification time of the DB and of its `-wal` file, kept per target in
//!   data/coordination/<name>.json, so a restart does not push everything again. A local target
//!   whose copy went missing is pushed again.
//! - Delivery is shared with model_distribution (`super::transfer`): a local directory gets a
//!   hidden temporary file, fsynced, renamed into place and hashed again (SHA-256); `host:path` is
//!   rsync over ssh with a timeout, verified with `sha256sum` there. Each delivery is tried `retries` times with an exponential
//!   backoff from `retry_backoff`; a target that still fails is tried again on a later cycle, after
//!   a backoff that keeps doubling (up to an hour).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use ringrift::events::payload;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::transfer::{Delivery, FailingMap, Passes, Purpose, Target, resolve, specs};
use super::{Pipeline, load_state, now_secs, save_daemon_state, typed};
use crate::daemons::{Daemon, LocalBoxFuture, Report, Start};
use crate::runtime::{Ctx, Settings};
use ringrift::settings::SyncSettings;

/// How long the snapshot waits for a writer's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds `auto_sync` or `ephemeral_sync`: the name decides the state file and the log lines.
pub(crate) fn build(name: &'static str, _: &'static str) -> Box<dyn Daemon> {
    Box::new(AutoSync {
        name,
        ..AutoSync::default()
    })
}

/// What a games DB looked like: size and modification time of the file and of its `-wal`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fingerprint {
    pub(crate) size: u64,
    pub(crate) mtime_ns: u64,
    pub(crate) wal_size: u64,
    pub(crate) wal_mtime_ns: u64,
}

fn size_and_mtime(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Ok((meta.len(), mtime))
}

/// The fingerprint of the DB at `db` (an error when it does not exist).
pub(crate) fn fingerprint(db: &Path) -> std::io::Result<Fingerprint> {
    let (size, mtime_ns) = size_and_mtime(db)?;
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let (wal_size, wal_mtime_ns) = size_and_mtime(Path::new(&wal)).unwrap_or((0, 0));
    Ok(Fingerprint {
        size,
        mtime_ns,
        wal_size,
        wal_mtime_ns,
    })
}

/// Writes a consistent copy of the SQLite DB `db` to `out` (replacing it) with `VACUUM INTO`, in
/// rollback-journal mode. Returns its size in bytes.
fn snapshot(db: &Path, out: &Path) -> anyhow::Result<u64> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for stale in [
        out.to_path_buf(),
        PathBuf::from(format!("{}-journal", out.display())),
    ] {
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot remove the old snapshot {}: {e}", stale.display()),
        }
    }
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", db.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let target = out
        .to_str()
        .with_context(|| format!("snapshot path {} is not UTF-8", out.display()))?;
    conn.execute("VACUUM INTO ?1", [target])
        .with_context(|| format!("cannot snapshot {} into {}", db.display(), out.display()))?;
    drop(conn);
    let snap = Connection::open_with_flags(
        out,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the snapshot {}", out.display()))?;
    let mode: String = snap
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .with_context(|| format!("cannot set the journal mode of {}", out.display()))?;
    if !mode.eq_ignore_ascii_case("delete") {
        bail!("snapshot {} stays in journal mode {mode}", out.display());
    }
    drop(snap);
    Ok(std::fs::metadata(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .len())
}

/// One successful push of a key to a target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Pushed {
    fingerprint: Fingerprint,
    bytes: u64,
    sha256: String,
    at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// Target spec → config key → the last successful push there.
    pushed: BTreeMap<String, BTreeMap<String, Pushed>>,
}

#[derive(Default)]
struct AutoSync {
    name: &'static str,
    ctx: Option<Ctx>,
    pipeline: Option<Pipeline>,
    /// `targets` as configured (`role:` entries included).
    configured: Vec<String>,
    /// The targets as last resolved (each pass resolves them again).
    targets: Vec<(String, Target)>,
    delivery: Delivery,
    state: State,
    failing: FailingMap<()>,
    pass: Passes,
    pushes: u64,
    push_failures: u64,
    bytes_pushed: u64,
}

impl AutoSync {
    fn outgoing(&self, pipeline: &Pipeline) -> PathBuf {
        pipeline.root.join("data/sync/outgoing").join(self.name)
    }

    /// `key → target at time` of the most recent push recorded.
    fn latest_push(&self) -> Option<String> {
        self.state
            .pushed
            .iter()
            .flat_map(|(spec, keys)| keys.iter().map(move |(key, p)| (p.at.as_str(), key, spec)))
            .max()
            .map(|(at, key, spec)| format!("{key} → {spec} at {at}"))
    }

    fn report(&self) -> Report {
        self.pass.report(
            ("targets", &self.targets),
            &if self.configured.is_empty() {
                "no targets configured: nothing to push".to_string()
            } else {
                super::transfer::idle_message(
                    &self.configured,
                    "targets",
                    self.pipeline.as_ref().map(|p| p.root.as_path()),
                )
            },
            ("pushed", json!(self.state.pushed)),
            [
                ("pushes", self.pushes),
                ("push_failures", self.push_failures),
                ("bytes_pushed", self.bytes_pushed),
            ],
        )
    }

    fn fail(&mut self, spec: &str, key: &str, error: String) {
        self.push_failures += 1;
        self.delivery
            .record_failure(&mut self.failing, (spec, key), (), |_, _| true, error);
    }

    /// One pass: every changed DB to every target that needs it.
    async fn push(&mut self) {
        self.pass.count += 1;
        let pipeline = self.pipeline.clone().expect("started");
        self.targets = resolve(&self.configured, &pipeline.root, Purpose::Games);
        if self.targets.is_empty() {
            return;
        }
        let outgoing = self.outgoing(&pipeline);
        let (mut in_sync, mut no_db) = (0usize, Vec::new());
        let mut pushed: Vec<String> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        for key in &pipeline.config_keys {
            let db = pipeline.games_db(key);
            let fp = match fingerprint(&db) {
                Ok(fp) => fp,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    no_db.push(key.clone());
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{key}: cannot read {}: {e}", db.display()));
                    continue;
                }
            };
            let now = now_secs();
            let mut due: Vec<(String, Target)> = Vec::new();
            for (spec, target) in &self.targets {
                let last = self.state.pushed.get(spec).and_then(|m| m.get(key));
                let missing = match target {
                    Target::Local(dir) => !dir.join(format!("{key}.db")).is_file(),
                    Target::Remote { .. } => false,
                };
                if !missing && last.is_some_and(|p| p.fingerprint == fp) {
                    in_sync += 1;
                    self.failing.remove(&(spec.clone(), key.clone()));
                    continue;
                }
                if let Some(wait) = self
                    .failing
                    .get(&(spec.clone(), key.clone()))
                    .and_then(|f| f.waiting(now, &format!("{key} → {spec}")))
                {
                    failures.push(wait);
                    continue;
                }
                due.push((spec.clone(), target.clone()));
            }
            if due.is_empty() {
                continue;
            }
            let snap = outgoing.join(format!("{key}.db"));
            let source = db.display().to_string();
            let bytes = match snapshot(&db, &snap) {
                Ok(b) => b,
                Err(e) => {
                    let error = format!("{e:#}");
                    super::emit(
                        self.ctx.as_ref(),
                        "DATA_SYNC_FAILED",
                        payload([
                            ("config_key", key.as_str().into()),
                            ("source", source.as_str().into()),
                            ("error", error.as_str().into()),
                        ]),
                    );
                    failures.push(format!("{key}: {error}"));
                    for (spec, _) in &due {
                        self.fail(spec, key, error.clone());
                    }
                    continue;
                }
            };
            for (spec, target) in due {
                let delivered = self
                    .delivery
                    .deliver(self.name, &snap, &target)
                    .await
                    .map_err(|e| e.to_string());
                match delivered {
                    Ok(sha) => {
                        let at = ringrift::timefmt::now_rfc3339();
                        self.failing.remove(&(spec.clone(), key.clone()));
                        self.pushes += 1;
                        self.bytes_pushed += bytes;
                        in_sync += 1;
                        pushed.push(format!("{key} → {spec} ({bytes} bytes)"));
                        println!(
                            "{}: pushed {source} to {spec} ({bytes} bytes, sha256 {sha})",
                            self.name
                        );
                        self.state.pushed.entry(spec.clone()).or_default().insert(
                            key.clone(),
                            Pushed {
                                fingerprint: fp,
                                bytes,
                                sha256: sha,
                                at,
                            },
                        );
                        if let Err(e) = save_daemon_state(&pipeline, self.name, &self.state) {
                            failures.push(e.to_string());
                        }
                        super::emit(
                            self.ctx.as_ref(),
                            "DATA_SYNC_COMPLETED",
                            payload([
                                ("config_key", key.as_str().into()),
                                ("source", source.as_str().into()),
                                ("target", spec.as_str().into()),
                                ("files", 1.into()),
                                ("bytes", bytes.into()),
                            ]),
                        );
                    }
                    Err(error) => {
                        super::emit(
                            self.ctx.as_ref(),
                            "DATA_SYNC_FAILED",
                            payload([
                                ("config_key", key.as_str().into()),
                                ("target", spec.as_str().into()),
                                ("error", error.as_str().into()),
                            ]),
                        );
                        failures.push(format!("{key} → {spec}: {error}"));
                        self.fail(&spec, key, error);
                    }
                }
            }
            let _ = std::fs::remove_file(&snap);
        }
        let when = ringrift::timefmt::now_rfc3339();
        let mut parts = vec![format!(
            "pass at {when}: {in_sync} DB copies up to date on {} target(s)",
            self.targets.len()
        )];
        if !pushed.is_empty() {
            parts.push(format!("pushed {}", pushed.join(", ")));
        } else if let Some(latest) = self.latest_push() {
            parts.push(format!("last pushed {latest}"));
        }
        if !no_db.is_empty() {
            parts.push(format!("no games DB yet for {}", no_db.join(", ")));
        }
        self.pass.end(self.name, &when, parts, &failures);
    }
}

impl Daemon for AutoSync {
    fn name(&self) -> &str {
        self.name
    }

    /// One more push as the node stops: on a rented host that is about to vanish, what selfplay
    /// wrote since the last pass goes out now (ephemeral_sync's reason to exist).
    fn on_stop(&mut self) -> LocalBoxFuture<'_, Option<Report>> {
        Box::pin(async move {
            self.pipeline.as_ref()?;
            println!("{}: stopping: a last push", self.name);
            self.push().await;
            Some(self.report())
        })
    }

    fn start<'a>(&'a mut self, ctx: Ctx, settings: &'a Settings) -> Start<'a> {
        self.ctx = Some(ctx);
        Box::pin(async move {
            let pipeline = Pipeline::from_settings(settings)?;
            self.configured = specs(settings, "targets")?;
            self.targets = resolve(&self.configured, &pipeline.root, Purpose::Games);
            let s = typed(settings, SyncSettings::from_map)?;
            self.delivery = Delivery {
                retries: s.retries,
                retry_backoff: s.retry_backoff.as_secs_f64(),
                timeout: s.timeout,
                ssh: pipeline.ssh.clone(),
            };
            self.state = load_state(&pipeline.state_path(self.name));
            self.pass.ok = true;
            println!(
                "{}: targets {:?} ({})",
                self.name, self.targets, self.delivery
            );
            self.pipeline = Some(pipeline);
            Ok(self.report())
        })
    }

    fn cycle(&mut self, _n: u64) -> LocalBoxFuture<'_, Report> {
        Box::pin(async move {
            self.push().await;
            self.report()
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::jobs::db::{GamesDb, NewGame};
    use crate::jobs::game::{GameConfig, play_game};
    use fastrand::Rng;

    /// A games DB at `path` with `n` more games of hex6_2p.
    pub(crate) fn add_games(path: &Path, n: usize, seed: u64) {
        let config = GameConfig::parse("hex6_2p").unwrap();
        let mut rng = Rng::with_seed(seed);
        let records: Vec<_> = (0..n)
            .map(|_| play_game(&config, [None, None], 0.0, &mut rng))
            .collect();
        let games: Vec<NewGame> = records
            .iter()
            .map(|record| NewGame {
                record,
                created_at: "2026-01-01T00:00:00.000Z".into(),
                completed_at: "2026-01-01T00:00:01.000Z".into(),
            })
            .collect();
        GamesDb::create(path)
            .unwrap()
            .insert_games(&config, "selfplay", &games)
            .unwrap();
    }

    fn daemon(root: &Path, targets: &[String]) -> AutoSync {
        let settings = Settings::from_config(Some(&json!({
            "pipeline": {"config_keys": ["hex6_2p", "hex8_2p"]},
            "targets": targets,
            "retries": 1,
            "retry_backoff": 0,
        })))
        .unwrap();
        let mut d = AutoSync {
            name: "auto_sync",
            ..AutoSync::default()
        };
        d.pipeline = Some(Pipeline::for_test(
            root,
            vec!["hex6_2p".into(), "hex8_2p".into()],
        ));
        d.configured = specs(&settings, "targets").unwrap();
        d.delivery = Delivery {
            retries: 1,
            retry_backoff: 0.0,
            timeout: Duration::from_secs(5),
            ssh: vec!["ssh".into()],
        };
        d.pass.ok = true;
        d
    }

    use crate::pipeline::tests::block_on;

    #[test]
    fn a_snapshot_is_a_complete_readable_copy_in_rollback_mode() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("g.db");
        add_games(&db, 4, 1);
        // Keep a writer connection open so the games may sit in the WAL.
        let _writer = GamesDb::create(&db).unwrap();
        let out = dir.path().join("out/hex6_2p.db");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(&out, b"stale").unwrap();
        let bytes = snapshot(&db, &out).unwrap();
        assert_eq!(bytes, std::fs::metadata(&out).unwrap().len());
        let conn = Connection::open_with_flags(&out, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM games", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 4);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        assert!(snapshot(&dir.path().join("missing.db"), &out).is_err());
    }

    #[test]
    fn changed_dbs_are_pushed_once_and_failures_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let shared = root.join("shared");
        let blocked = root.join("blocked");
        std::fs::write(&blocked, b"a file, not a directory").unwrap();
        let mut d = daemon(
            root,
            &[shared.display().to_string(), blocked.display().to_string()],
        );
        block_on(d.push());
        assert!(d.pass.ok, "{}", d.pass.last);
        assert!(
            d.pass.last.contains("no games DB yet for hex6_2p, hex8_2p"),
            "{}",
            d.pass.last
        );
        assert_eq!(d.pushes, 0);

        add_games(&root.join("data/games/hex6_2p.db"), 3, 2);
        block_on(d.push());
        assert_eq!((d.pushes, d.push_failures), (1, 1), "{}", d.pass.last);
        assert!(!d.pass.ok);
        assert!(d.pass.last.contains("pushed hex6_2p → "), "{}", d.pass.last);
        assert!(d.pass.last.contains("FAILED hex6_2p → "), "{}", d.pass.last);
        let copy = shared.join("hex6_2p.db");
        let conn = Connection::open_with_flags(&copy, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM games", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(d.bytes_pushed, std::fs::metadata(&copy).unwrap().len());

        // Unchanged: nothing pushed; the failed target waits for its backoff.
        block_on(d.push());
        assert_eq!((d.pushes, d.push_failures), (1, 1), "{}", d.pass.last);
        assert!(d.pass.last.contains("next try in"), "{}", d.pass.last);
        assert!(
            d.pass.last.contains("1 DB copies up to date"),
            "{}",
            d.pass.last
        );

        // State survives a restart: a new daemon does not push again; a change is pushed.
        let saved: State = load_state(&root.join("data/coordination/auto_sync.json"));
        assert_eq!(saved.pushed.len(), 1);
        let mut d = daemon(root, &[shared.display().to_string()]);
        d.state = saved;
        block_on(d.push());
        assert_eq!(d.pushes, 0, "{}", d.pass.last);
        assert!(
            d.pass.last.contains("last pushed hex6_2p → "),
            "{}",
            d.pass.last
        );
        add_games(&root.join("data/games/hex6_2p.db"), 2, 3);
        block_on(d.push());
        assert_eq!(d.pushes, 1, "{}", d.pass.last);
        // A copy that went missing is delivered again.
        std::fs::remove_file(&copy).unwrap();
        block_on(d.push());
        assert_eq!(d.pushes, 2, "{}", d.pass.last);
        let conn = Connection::open_with_flags(&copy, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM games", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 5);
        assert!(d.pass.ok, "{}", d.pass.last);
    }

    #[test]
    fn no_targets_is_healthy_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(dir.path(), &[]);
        block_on(d.push());
        let r = d.report();
        assert!(r.health.healthy);
        assert_eq!(r.health.message, "no targets configured: nothing to push");
        assert_eq!(r.counters["passes"], 1);
    }
}
