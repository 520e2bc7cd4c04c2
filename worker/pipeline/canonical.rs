//! Replacing the canonical model of a key, for auto_promotion: from bytes already checked, never
//! leaving a broken or half-written canonical model, never writing through a symlink.
//!
//! Why it is shaped this way:
//! - The swap: copy the current canonical to models/backup/, write the candidate's bytes to a new
//!   temporary file in models/ (`O_EXCL`: never through an existing file or symlink), fsync,
//!   verify it (hash, then that it loads), and rename it over canonical_<key>.bin; then point
//!   ringrift_best_<key> at it by renaming a fresh symlink over the old one. Each step is atomic,
//!   so a crash at any point leaves the old or the new model, never a mix; and a re-run after a
//!   crash recognises (by SHA-256) a candidate that is already canonical.
//! - The caller hands over bytes, not a path: what was hashed and checked is what is installed.
//! - The canonical model's mode is never wider than the candidate's or than the model it
//!   replaces (0644 for the first one). A symlink in place of the canonical model is not a model:
//!   it is neither backed up nor written through, only replaced.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::confine::write_replace;
use super::sha256;

/// The bytes and permission bits of the regular file at `path`, read without following a symlink
/// there; `None` when there is none (a symlink in its place is no model to keep).
fn read_nofollow(path: &Path) -> anyhow::Result<Option<(Vec<u8>, u32)>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ELOOP) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some((bytes, meta.mode() & 0o7777)))
}

/// Retention of models/backup/: deletes the backups of `key` (`canonical_<key>-<unix ms>.bin`)
/// beyond the newest `keep` (0 keeps every one). Returns the paths deleted.
pub(crate) fn prune_backups(backup_dir: &Path, key: &str, keep: u64) -> Vec<PathBuf> {
    if keep == 0 {
        return Vec::new();
    }
    let prefix = format!("canonical_{key}-");
    let Ok(entries) = std::fs::read_dir(backup_dir) else {
        return Vec::new();
    };
    let mut backups: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let ms = name.strip_prefix(&prefix)?.strip_suffix(".bin")?;
            Some((ms.parse().ok()?, e.path()))
        })
        .collect();
    backups.sort();
    let excess = backups.len().saturating_sub(keep as usize);
    backups
        .into_iter()
        .take(excess)
        .filter(|(_, p)| std::fs::remove_file(p).is_ok())
        .map(|(_, p)| p)
        .collect()
}

/// Writes `bytes` over `to` (see [`write_replace`]) and checks the copy by SHA-256, then by `check`.
fn install(
    bytes: &[u8],
    mode: u32,
    to: &Path,
    check: &dyn Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let want = sha256::hex_of(bytes);
    write_replace(to, bytes, mode, |tmp| {
        anyhow::ensure!(
            sha256::file_hex(tmp)? == want,
            "{} differs from what was written",
            tmp.display()
        );
        check(tmp)
    })
}

/// Points `link` at `target` (a name relative to the link's directory) by renaming a fresh symlink
/// over it. Does nothing if it already points there.
pub(super) fn point_link(link: &Path, target: &str) -> anyhow::Result<bool> {
    if std::fs::read_link(link).is_ok_and(|t| t == Path::new(target)) {
        return Ok(false);
    }
    let name = link
        .file_name()
        .context("link has no name")?
        .to_string_lossy();
    let tmp = link.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("cannot create symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, link)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), link.display()))?;
    Ok(true)
}

/// Where a promotion puts things.
pub(super) struct Layout {
    pub(super) canonical: PathBuf,
    pub(super) best_link: PathBuf,
    pub(super) backup_dir: PathBuf,
}

/// The candidate as read for a promotion: its bytes (read once, from a confined handle) and mode.
pub(super) struct Candidate<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) mode: u32,
}

/// Makes the candidate's bytes the canonical model of `key`; `check` must accept the copy (that it
/// loads) before it replaces anything. Returns the backup of the previous canonical model, if there
/// was one (none either when there was no canonical model or when the candidate already is the
/// canonical model, after a crash between the swap and the state file).
pub(super) fn swap_in(
    candidate: &Candidate,
    key: &str,
    l: &Layout,
    unix_ms: u64,
    check: &dyn Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Option<PathBuf>> {
    let models = l
        .canonical
        .parent()
        .context("canonical path has no directory")?;
    std::fs::create_dir_all(models)?;
    let mut backup = None;
    let old = read_nofollow(&l.canonical)?;
    let already = old
        .as_ref()
        .is_some_and(|(bytes, _)| sha256::hex_of(bytes) == sha256::hex_of(candidate.bytes));
    if !already {
        if let Some((bytes, mode)) = &old {
            std::fs::create_dir_all(&l.backup_dir)?;
            let to = l.backup_dir.join(format!("canonical_{key}-{unix_ms}.bin"));
            install(bytes, *mode, &to, &|_| Ok(()))
                .context("cannot back up the canonical model")?;
            backup = Some(to);
        }
        // Never wider than the candidate, nor than the model it replaces.
        let mode = candidate.mode & old.as_ref().map_or(0o644, |(_, m)| *m) & 0o666;
        install(candidate.bytes, mode, &l.canonical, check)
            .context("cannot install the candidate")?;
    }
    let target = l
        .canonical
        .file_name()
        .context("canonical path has no name")?
        .to_string_lossy()
        .to_string();
    point_link(&l.best_link, &target)?;
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use crate::jobs::game::GameConfig;
    use crate::jobs::game::model::Model;

    use super::*;
    use crate::pipeline::training_trigger;

    fn model(config: &GameConfig, bias: f32) -> Vec<u8> {
        let mut m = Model::zeros(config);
        let states = vec![1.0; m.num_features()];
        m.train(&states, &[bias], &Default::default());
        m.to_bytes()
    }

    fn swap(path: &Path, l: &Layout, ms: u64) -> anyhow::Result<Option<PathBuf>> {
        let bytes = std::fs::read(path).unwrap();
        let c = Candidate {
            bytes: &bytes,
            mode: 0o644,
        };
        swap_in(&c, "hex6_2p", l, ms, &|copy| {
            training_trigger::check_model(copy, "hex6_2p")
        })
    }

    fn layout(models: &Path) -> Layout {
        Layout {
            canonical: models.join("canonical_hex6_2p.bin"),
            best_link: models.join("ringrift_best_hex6_2p"),
            backup_dir: models.join("backup"),
        }
    }

    #[test]
    fn swap_backs_up_replaces_atomically_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let models = dir.path().join("models");
        let cand_dir = models.join("candidates/hex6_2p");
        std::fs::create_dir_all(&cand_dir).unwrap();
        let l = layout(&models);
        let first = cand_dir.join("hex6_2p-1.bin");
        std::fs::write(&first, model(&config, 1.0)).unwrap();
        assert_eq!(swap(&first, &l, 1).unwrap(), None);
        assert_eq!(
            std::fs::read(&l.canonical).unwrap(),
            std::fs::read(&first).unwrap()
        );
        assert_eq!(
            std::fs::read_link(&l.best_link).unwrap(),
            Path::new("canonical_hex6_2p.bin")
        );
        Model::load(&l.best_link, &config).unwrap();

        let second = cand_dir.join("hex6_2p-2.bin");
        std::fs::write(&second, model(&config, -1.0)).unwrap();
        let backup = swap(&second, &l, 2).unwrap().unwrap();
        assert_eq!(backup, l.backup_dir.join("canonical_hex6_2p-2.bin"));
        assert_eq!(
            std::fs::read(&backup).unwrap(),
            std::fs::read(&first).unwrap()
        );
        assert_eq!(
            std::fs::read(&l.canonical).unwrap(),
            std::fs::read(&second).unwrap()
        );
        // Re-running after a crash: already canonical, no second backup.
        assert_eq!(swap(&second, &l, 3).unwrap(), None);
        let leftovers: Vec<_> = std::fs::read_dir(&models)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_model_that_does_not_load_never_replaces_the_canonical_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let l = layout(&models);
        std::fs::write(&l.canonical, model(&config, 1.0)).unwrap();
        let before = std::fs::read(&l.canonical).unwrap();
        let junk = dir.path().join("junk.bin");
        std::fs::write(&junk, b"root:x:0:0::/root:/bin/sh").unwrap();
        assert!(swap(&junk, &l, 1).is_err());
        assert_eq!(std::fs::read(&l.canonical).unwrap(), before);
    }

    #[test]
    fn the_canonical_mode_never_widens() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let l = layout(&models);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A private candidate stays private.
        let bytes = model(&config, 1.0);
        let private = Candidate {
            bytes: &bytes,
            mode: 0o600,
        };
        swap_in(&private, "hex6_2p", &l, 1, &|_| Ok(())).unwrap();
        assert_eq!(mode(&l.canonical), 0o600);
        // A world-writable candidate does not make the canonical model any wider.
        let bytes = model(&config, -1.0);
        let open = Candidate {
            bytes: &bytes,
            mode: 0o777,
        };
        swap_in(&open, "hex6_2p", &l, 2, &|_| Ok(())).unwrap();
        assert_eq!(mode(&l.canonical), 0o600);
        assert_eq!(std::fs::read(&l.canonical).unwrap(), bytes);
    }

    #[test]
    fn a_symlink_in_place_of_the_canonical_model_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let config = GameConfig::parse("hex6_2p").unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let l = layout(&models);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        std::os::unix::fs::symlink(&victim, &l.canonical).unwrap();
        let cand = dir.path().join("c.bin");
        std::fs::write(&cand, model(&config, 1.0)).unwrap();
        assert_eq!(
            swap(&cand, &l, 1).unwrap(),
            None,
            "a symlink is no model to back up"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(std::fs::symlink_metadata(&l.canonical).unwrap().is_file());
    }

    #[test]
    fn a_broken_link_is_repointed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ringrift_best_hex6_2p");
        std::os::unix::fs::symlink("elsewhere.bin", &link).unwrap();
        assert!(point_link(&link, "canonical_hex6_2p.bin").unwrap());
        assert!(!point_link(&link, "canonical_hex6_2p.bin").unwrap());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("canonical_hex6_2p.bin")
        );
    }

    #[test]
    fn backups_beyond_the_newest_are_deleted_per_key() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "canonical_hex8_2p-100.bin",
            "canonical_hex8_2p-20.bin",
            "canonical_hex8_2p-300.bin",
            "canonical_hex6_2p-1.bin",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"m").unwrap();
        }
        assert!(
            prune_backups(dir.path(), "hex8_2p", 0).is_empty(),
            "0 keeps all"
        );
        let gone = prune_backups(dir.path(), "hex8_2p", 2);
        assert_eq!(gone, [dir.path().join("canonical_hex8_2p-20.bin")]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "canonical_hex6_2p-1.bin",
                "canonical_hex8_2p-100.bin",
                "canonical_hex8_2p-300.bin",
                "notes.txt"
            ]
        );
    }
}
