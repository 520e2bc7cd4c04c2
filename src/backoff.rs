//! The failure backoff of the pipeline's steps, as the operator sees it: how long a failing step
//! waits (capped), and `pipeline reset-backoff KEY`, which clears it.
//!
//! A reset is a record, not an edit of the daemons' state: the CLI writes the time of the reset
//! of a key to [`RESETS_FILE`], and each daemon that backs off (training_trigger, auto_export,
//! evaluation) clears every failure of that key it recorded before that time, at its next look
//! at the key (at once when the supervisor runs: the CLI emits `BACKOFF_RESET`). The CLI never
//! writes a file a running daemon writes too, so nothing a daemon saved meanwhile is lost, and a
//! reset made while no supervisor runs applies when the daemons start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the resets are kept, relative to the root: `{"<config key>": <unix seconds>, ...}`.
pub const RESETS_FILE: &str = "data/coordination/backoff_resets.json";

/// The longest wait between two training runs of a key after failures, in seconds (1 hour),
/// unless `failure_backoff` itself is longer: doubling from `failure_backoff` per failed run
/// stops there (it used to reach 17 hours after ten failures).
pub const TRAINING_BACKOFF_CAP_SECS: f64 = 3600.0;

/// Seconds to wait after `failures` consecutive failures: `base`, doubling per failure, at most
/// `cap` (or `base`, if that is longer); 0 without failures.
pub fn capped_doubling(failures: u32, base: f64, cap: f64) -> f64 {
    if failures == 0 {
        return 0.0;
    }
    let doubled = base * 2f64.powi((failures - 1).min(62) as i32);
    doubled.min(cap.max(base))
}

/// The path of [`RESETS_FILE`] under `root`.
pub fn resets_path(root: &Path) -> PathBuf {
    root.join(RESETS_FILE)
}

/// Every recorded reset (config key → unix seconds); empty when there is no file or it cannot
/// be read (a damaged file resets nothing: the daemons' own state is untouched).
pub fn read_resets(root: &Path) -> BTreeMap<String, f64> {
    std::fs::read(resets_path(root))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// When the failure backoff of `key` was last reset, in unix seconds, if ever.
pub fn reset_at(root: &Path, key: &str) -> Option<f64> {
    read_resets(root).get(key).copied()
}

/// Records a reset of `key`'s backoff at `now` (unix seconds): the file is written whole to a
/// temporary name and renamed into place. Errors: the directory or file cannot be written.
pub fn record_reset(root: &Path, key: &str, now: f64) -> std::io::Result<()> {
    let path = resets_path(root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut resets = read_resets(root);
    resets.insert(key.to_string(), now);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(&resets).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(capped_doubling(0, 60.0, 3600.0), 0.0);
        assert_eq!(capped_doubling(1, 60.0, 3600.0), 60.0);
        assert_eq!(capped_doubling(3, 60.0, 3600.0), 240.0);
        assert_eq!(capped_doubling(7, 60.0, 3600.0), 3600.0);
        assert_eq!(capped_doubling(500, 60.0, 3600.0), 3600.0);
        // A base above the cap is kept: the operator asked for it.
        assert_eq!(capped_doubling(4, 7200.0, 3600.0), 7200.0);
    }

    #[test]
    fn resets_are_recorded_per_key() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(reset_at(dir.path(), "hex8_2p"), None);
        record_reset(dir.path(), "hex8_2p", 10.0).unwrap();
        record_reset(dir.path(), "hex6_2p", 20.0).unwrap();
        record_reset(dir.path(), "hex8_2p", 30.0).unwrap();
        assert_eq!(reset_at(dir.path(), "hex8_2p"), Some(30.0));
        assert_eq!(reset_at(dir.path(), "hex6_2p"), Some(20.0));
        std::fs::write(resets_path(dir.path()), "garbage").unwrap();
        assert!(read_resets(dir.path()).is_empty());
    }
}
