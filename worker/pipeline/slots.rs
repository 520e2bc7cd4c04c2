//! The node's selfplay slots, shared between processes: selfplay_scheduler and idle_resource
//! each hold one slot per selfplay job they run, so their jobs together never exceed
//! `pipeline.capacity.selfplay_slots`.
//!
//! A slot is an exclusive `flock` on `data/coordination/slots/<kind>-<n>.lock`, held for as long
//! as its job runs. The kernel drops the lock when its holder ends, however it ends, so a killed
//! daemon never leaves a slot taken (a count in a file would). A lock file that cannot be opened
//! counts as a free slot: capacity is a bound on load, not something to stall the loop on.
//!
//! Training and evaluation need no such lock: only their own daemon runs their jobs, and it
//! counts its slots itself.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

/// A slot held: free again when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Which slot (0-based).
    #[allow(dead_code)]
    pub index: usize,
    /// The locked file; None when it could not be opened (see the module's notes).
    _lock: Option<File>,
}

/// Takes a free slot of `kind` among `slots` under `root`, or None when all are held (by this
/// process or any other).
pub(crate) fn try_take(root: &Path, kind: &str, slots: usize) -> Option<Slot> {
    let dir = root.join("data/coordination/slots");
    let _ = std::fs::create_dir_all(&dir);
    for index in 0..slots.max(1) {
        let path = dir.join(format!("{kind}-{index}.lock"));
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!(
                    "cannot open {}: {e}; slot {index} taken unguarded",
                    path.display()
                );
                return Some(Slot { index, _lock: None });
            }
        };
        match file.try_lock() {
            Ok(()) => {
                return Some(Slot {
                    index,
                    _lock: Some(file),
                });
            }
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => {
                eprintln!(
                    "cannot lock {}: {e}; slot {index} taken unguarded",
                    path.display()
                );
                return Some(Slot { index, _lock: None });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_once_and_free_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = try_take(dir.path(), "selfplay", 2).unwrap();
        let b = try_take(dir.path(), "selfplay", 2).unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        assert!(try_take(dir.path(), "selfplay", 2).is_none(), "both held");
        // Another kind has slots of its own.
        assert!(try_take(dir.path(), "other", 1).is_some());
        drop(a);
        assert_eq!(try_take(dir.path(), "selfplay", 2).unwrap().index, 0);
    }
}
