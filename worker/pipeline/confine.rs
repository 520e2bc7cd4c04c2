//! Paths that arrive in events are claims, not facts: a daemon acts on a file named in an event only
//! once it has checked that the file is a regular file inside the root's own directory for that
//! step, and it reads and writes the loop's files without following a symlink someone put there.
//!
//! Why it is shaped this way:
//! - [`confined_file`] resolves the path with `std::fs::canonicalize` (so every symlink is
//!   followed) and compares it with the canonical step directory (which may itself be behind a
//!   symlink, e.g. `/tmp` on some systems). It hands back the file named from the step directory as
//!   the daemon spells it, so the result compares equal to the paths the daemon derives itself.
//! - A check by path can be raced (the file swapped for a symlink after the check), so a daemon
//!   that copies or hashes a file uses [`open_confined`]: it opens the checked path without
//!   following a final symlink and asks the kernel (`/proc/self/fd`) which file it actually opened.
//! - [`write_replace`] writes through a temporary file created with `O_EXCL` (never an existing file
//!   or symlink), fsyncs it, and renames it over the destination (a rename replaces a symlink, it
//!   never writes through it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a path named in an event is not acted on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfinementError {
    #[error("{path} is not an absolute path")]
    NotAbsolute { path: PathBuf },
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is outside {root}")]
    Outside { path: PathBuf, root: PathBuf },
    #[error("{path} is a symlink that leads outside {root} (to {target})")]
    SymlinkEscape {
        path: PathBuf,
        target: PathBuf,
        root: PathBuf,
    },
    #[error("{path} is not a regular file ({kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// A hard link can make a file from anywhere on the file system (`ln /etc/shadow
    /// candidate.bin`) a regular file inside the directory; steps write their outputs by rename,
    /// so their files have one link.
    #[error("{path} has {links} hard links: the same file is reachable from outside {root}")]
    HardLinked {
        path: PathBuf,
        links: u64,
        root: PathBuf,
    },
    #[error("cannot check {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ConfinementError {
    fn io(path: &Path, source: std::io::Error) -> ConfinementError {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfinementError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            ConfinementError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn kind_of(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_fifo() {
        "a fifo"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// `path` without `.` and `..` components, resolved lexically (no file system access).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The regular file `path` names, if it resolves (symlinks followed) inside `root_dir`. Returns the
/// file named from `root_dir` as given, with no symlink below it.
pub(crate) fn confined_file(root_dir: &Path, path: &Path) -> Result<PathBuf, ConfinementError> {
    if !path.is_absolute() {
        return Err(ConfinementError::NotAbsolute {
            path: path.to_path_buf(),
        });
    }
    let root = std::fs::canonicalize(root_dir).map_err(|e| ConfinementError::io(root_dir, e))?;
    let resolved = std::fs::canonicalize(path).map_err(|e| ConfinementError::io(path, e))?;
    let Ok(relative) = resolved.strip_prefix(&root) else {
        // Named inside the directory but resolved outside it: a symlink on the way escapes.
        let named_inside =
            lexical(path).starts_with(lexical(root_dir)) || lexical(path).starts_with(&root);
        return Err(if named_inside {
            ConfinementError::SymlinkEscape {
                path: path.to_path_buf(),
                target: resolved,
                root: root_dir.to_path_buf(),
            }
        } else {
            ConfinementError::Outside {
                path: path.to_path_buf(),
                root: root_dir.to_path_buf(),
            }
        });
    };
    let meta = std::fs::metadata(&resolved).map_err(|e| ConfinementError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(ConfinementError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    single_link(path, root_dir, &meta)?;
    Ok(root_dir.join(relative))
}

fn single_link(
    path: &Path,
    root_dir: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), ConfinementError> {
    use std::os::unix::fs::MetadataExt;
    if meta.nlink() > 1 {
        return Err(ConfinementError::HardLinked {
            path: path.to_path_buf(),
            links: meta.nlink(),
            root: root_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Opens the file `path` names for reading, confined as in [`confined_file`], and checks that the
/// file actually opened is that regular file inside `root_dir` (the check and the open cannot be
/// raced apart). Returns the open file and its path as [`confined_file`] gives it.
pub(crate) fn open_confined(
    root_dir: &Path,
    path: &Path,
) -> Result<(File, PathBuf), ConfinementError> {
    let checked = confined_file(root_dir, path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&checked)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                ConfinementError::NotRegular {
                    path: path.to_path_buf(),
                    kind: "a symlink",
                }
            } else {
                ConfinementError::io(path, e)
            }
        })?;
    let meta = file.metadata().map_err(|e| ConfinementError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(ConfinementError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    single_link(path, root_dir, &meta)?;
    // Which file did the kernel open? A directory on the way swapped for a symlink after the
    // check shows here.
    use std::os::fd::AsRawFd;
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| ConfinementError::io(path, e))?;
    let root = std::fs::canonicalize(root_dir).map_err(|e| ConfinementError::io(root_dir, e))?;
    if !opened.starts_with(&root) {
        return Err(ConfinementError::SymlinkEscape {
            path: path.to_path_buf(),
            target: opened,
            root: root_dir.to_path_buf(),
        });
    }
    Ok((file, checked))
}

/// Reads a confined file whole, from one open handle (see [`open_confined`]). Returns the bytes,
/// the file's permission bits, and its path as [`confined_file`] gives it.
pub(crate) fn read_confined(
    root_dir: &Path,
    path: &Path,
) -> Result<(Vec<u8>, u32, PathBuf), ConfinementError> {
    let (mut file, checked) = open_confined(root_dir, path)?;
    let mode = file
        .metadata()
        .map_err(|e| ConfinementError::io(path, e))?
        .mode()
        & 0o7777;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| ConfinementError::io(path, e))?;
    Ok((bytes, mode, checked))
}

/// Replaces `to` with `bytes`: a temporary file in the same directory, created new (`O_EXCL`, so
/// never through a file or symlink already there) with `mode` (narrowed by the umask), written,
/// fsynced, checked by `verify`, renamed over `to` (replacing a symlink there rather than writing
/// through it), and the directory fsynced. On error the temporary file is removed.
pub(crate) fn write_replace(
    to: &Path,
    bytes: &[u8],
    mode: u32,
    verify: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = to.parent().context("the destination has no directory")?;
    let name = to
        .file_name()
        .context("the destination has no name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover of a crashed run (or anything planted there) goes first; `remove_file` removes a
    // symlink itself, never its target.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(f);
        verify(&tmp)?;
        std::fs::rename(&tmp, to)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        base: PathBuf,
        root: PathBuf,
    }

    /// `<tmp>/root/sub/model.bin` inside, `<tmp>/outside/shadow` outside.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(root.join("sub/model.bin"), b"model").unwrap();
        std::fs::write(base.join("outside/shadow"), b"root:secret").unwrap();
        Fixture {
            _dir: dir,
            base,
            root,
        }
    }

    #[test]
    fn a_regular_file_inside_is_accepted_and_named_from_the_root() {
        let f = fixture();
        let inside = f.root.join("sub/model.bin");
        assert_eq!(confined_file(&f.root, &inside).unwrap(), inside);
        let (bytes, _, path) = read_confined(&f.root, &inside).unwrap();
        assert_eq!((bytes.as_slice(), path), (&b"model"[..], inside));
        // A symlink that stays inside resolves to its target.
        symlink(f.root.join("sub/model.bin"), f.root.join("alias.bin")).unwrap();
        assert_eq!(
            confined_file(&f.root, &f.root.join("alias.bin")).unwrap(),
            f.root.join("sub/model.bin")
        );
    }

    #[test]
    fn a_hard_link_to_a_file_outside_is_refused() {
        let f = fixture();
        let link = f.root.join("sub/linked.bin");
        std::fs::hard_link(f.base.join("outside/shadow"), &link).unwrap();
        let err = confined_file(&f.root, &link).unwrap_err();
        assert!(
            matches!(err, ConfinementError::HardLinked { links: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("hard links"), "{err}");
        assert!(matches!(
            read_confined(&f.root, &link),
            Err(ConfinementError::HardLinked { .. })
        ));
    }

    #[test]
    fn files_outside_are_refused_even_through_dot_dot() {
        let f = fixture();
        let outside = f.base.join("outside/shadow");
        assert!(matches!(
            confined_file(&f.root, &outside),
            Err(ConfinementError::Outside { .. })
        ));
        let dotdot = f.root.join("sub/../../outside/shadow");
        let err = confined_file(&f.root, &dotdot).unwrap_err();
        assert!(matches!(err, ConfinementError::Outside { .. }), "{err}");
        assert!(err.to_string().contains("is outside"), "{err}");
        assert!(matches!(
            confined_file(&f.root, Path::new("sub/model.bin")),
            Err(ConfinementError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn a_symlink_inside_that_leads_outside_is_refused() {
        let f = fixture();
        let link = f.root.join("sub/evil.bin");
        symlink(f.base.join("outside/shadow"), &link).unwrap();
        let err = confined_file(&f.root, &link).unwrap_err();
        assert!(
            matches!(err, ConfinementError::SymlinkEscape { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(matches!(
            read_confined(&f.root, &link),
            Err(ConfinementError::SymlinkEscape { .. })
        ));
        // A directory on the way that is a symlink to outside escapes too.
        symlink(f.base.join("outside"), f.root.join("dirlink")).unwrap();
        assert!(matches!(
            confined_file(&f.root, &f.root.join("dirlink/shadow")),
            Err(ConfinementError::SymlinkEscape { .. })
        ));
    }

    #[test]
    fn a_symlink_to_a_system_file_is_refused() {
        let f = fixture();
        let link = f.root.join("sub/passwd.bin");
        symlink("/etc/passwd", &link).unwrap();
        assert!(matches!(
            confined_file(&f.root, &link),
            Err(ConfinementError::SymlinkEscape { .. })
        ));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let f = fixture();
        let err = confined_file(&f.root, &f.root.join("sub")).unwrap_err();
        assert!(
            matches!(
                err,
                ConfinementError::NotRegular {
                    kind: "a directory",
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            confined_file(&f.root, &f.root.join("sub/none.bin")),
            Err(ConfinementError::Missing { .. })
        ));
        symlink(f.root.join("gone"), f.root.join("dangling.bin")).unwrap();
        assert!(matches!(
            confined_file(&f.root, &f.root.join("dangling.bin")),
            Err(ConfinementError::Missing { .. })
        ));
        assert!(matches!(
            confined_file(&f.base.join("no-root"), &f.root.join("sub/model.bin")),
            Err(ConfinementError::Missing { .. })
        ));
    }

    #[test]
    fn a_root_behind_a_symlink_is_compared_by_its_real_path() {
        let f = fixture();
        let via = f.base.join("via");
        symlink(&f.root, &via).unwrap();
        // Named through the link, and named by the real path: both inside.
        let named = via.join("sub/model.bin");
        assert_eq!(confined_file(&via, &named).unwrap(), named);
        assert_eq!(
            confined_file(&via, &f.root.join("sub/model.bin")).unwrap(),
            named
        );
        read_confined(&via, &named).unwrap();
        assert!(matches!(
            confined_file(&via, &f.base.join("outside/shadow")),
            Err(ConfinementError::Outside { .. })
        ));
    }

    #[test]
    fn replacing_never_writes_through_a_symlink_and_keeps_the_mode() {
        let f = fixture();
        let dest = f.root.join("canonical.bin");
        let victim = f.base.join("outside/shadow");
        // A symlink at the destination, and one planted at a temporary name.
        symlink(&victim, &dest).unwrap();
        let planted = f
            .root
            .join(format!(".canonical.bin.{}.tmp", std::process::id()));
        symlink(&victim, &planted).unwrap();
        write_replace(&dest, b"new model", 0o600, |_| Ok(())).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root:secret");
        assert_eq!(std::fs::read(&dest).unwrap(), b"new model");
        let meta = std::fs::symlink_metadata(&dest).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!planted.exists());
        // A failed check leaves the destination alone and no temporary file behind.
        let err = write_replace(&dest, b"bad", 0o644, |_| anyhow::bail!("does not load"));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"new model");
        let leftovers: Vec<_> = std::fs::read_dir(&f.root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
