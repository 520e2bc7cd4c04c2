//! The bearer token that HTTP write routes require, kept in `run/http.token`.
//!
//! The file holds 32 random bytes from the kernel as 64 lowercase hex digits (and a newline), mode
//! 0600 inside run/ (0700), so only the supervisor's user can read it. The file is the truth: before
//! every write request the supervisor looks at it (one `stat`, a read only when it changed) and
//!
//! - uses it as it is when it is valid (64 hex digits, owned by the supervisor's user, unreadable by
//!   group and others), so an operator may also put a token of their own there;
//! - writes a new one when it is missing or invalid (wrong contents, owner or mode: a token others
//!   could read is no secret).
//!
//! So rotating the token is deleting the file: no restart, and the next write request writes the
//! new one (that request itself is refused, since it cannot carry a token that did not exist yet).
//! The token is also written at start-up, before HTTP listens.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use subtle::ConstantTimeEq;

pub(crate) const FILE_NAME: &str = "http.token";
const HEX_LEN: usize = 64;

/// What [`TokenFile::refresh`] found, for the log.
#[derive(Debug)]
pub(crate) enum Change {
    /// The cached token is still the file's.
    Unchanged,
    /// The file changed and holds a valid token, now in use.
    Reloaded,
    /// There was no file; a new token was written.
    Created,
    /// The file was unusable (the reason says why); a new token replaced it.
    Replaced(Unusable),
}

/// Why the token file cannot be used as it is (it is then replaced): "run/http.token was <this>".
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unusable {
    #[error("not a regular file")]
    NotAFile,
    #[error("owned by uid {uid}, not the supervisor's user")]
    Owner { uid: u32 },
    /// `mode` is the file's permission bits (the low 9).
    #[error("readable by others (mode {mode:o})")]
    Mode { mode: u32 },
    #[error("unreadable: {0}")]
    Unreadable(#[source] io::Error),
    #[error("not {HEX_LEN} hex digits")]
    NotHex,
}

pub(crate) struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    identity: Identity,
    token: [u8; HEX_LEN],
}

/// Enough of a file's metadata to notice that it was replaced or rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(m: &fs::Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl TokenFile {
    pub(crate) fn new(run_dir: &Path) -> TokenFile {
        TokenFile {
            path: run_dir.join(FILE_NAME),
            cached: Mutex::new(None),
        }
    }

    /// Makes sure the file holds a valid token and that it is the one in use.
    pub(crate) fn refresh(&self) -> io::Result<Change> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let meta = match fs::symlink_metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let change = match meta {
            Some(m)
                if cached
                    .as_ref()
                    .is_some_and(|c| c.identity == Identity::of(&m)) =>
            {
                return Ok(Change::Unchanged);
            }
            Some(m) => match self.read_valid(&m) {
                Ok(token) => {
                    *cached = Some(Cached {
                        identity: Identity::of(&m),
                        token,
                    });
                    return Ok(Change::Reloaded);
                }
                Err(reason) => Change::Replaced(reason),
            },
            None => Change::Created,
        };
        *cached = Some(self.write_new()?);
        Ok(change)
    }

    /// Whether `presented` is the current token, compared in constant time.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        // Only the length (public: always 64) can leak through timing.
        cached
            .as_ref()
            .is_some_and(|c| bool::from(c.token.as_slice().ct_eq(presented)))
    }

    fn read_valid(&self, m: &fs::Metadata) -> Result<[u8; HEX_LEN], Unusable> {
        if !m.file_type().is_file() {
            return Err(Unusable::NotAFile);
        }
        if m.uid() != nix::unistd::geteuid().as_raw() {
            return Err(Unusable::Owner { uid: m.uid() });
        }
        if m.permissions().mode() & 0o077 != 0 {
            return Err(Unusable::Mode {
                mode: m.permissions().mode() & 0o777,
            });
        }
        let text = fs::read(&self.path).map_err(Unusable::Unreadable)?;
        let text = text.strip_suffix(b"\n").unwrap_or(&text);
        match <[u8; HEX_LEN]>::try_from(text) {
            Ok(token) if token.iter().all(|b| b.is_ascii_hexdigit()) => Ok(token),
            _ => Err(Unusable::NotHex),
        }
    }

    /// Writes a fresh token next to the file and renames it into place, so a reader never sees a
    /// half-written token and the file is 0600 from its first byte.
    fn write_new(&self) -> io::Result<Cached> {
        let mut raw = [0u8; HEX_LEN / 2];
        getrandom::fill(&mut raw)
            .map_err(|e| io::Error::other(format!("no randomness from the kernel: {e}")))?;
        let token = hex(&raw);
        let tmp = self.path.with_extension("token.tmp");
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&token)?;
        f.write_all(b"\n")?;
        drop(f);
        fs::rename(&tmp, &self.path)?;
        let m = fs::symlink_metadata(&self.path)?;
        Ok(Cached {
            identity: Identity::of(&m),
            token,
        })
    }
}

fn hex(raw: &[u8; HEX_LEN / 2]) -> [u8; HEX_LEN] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; HEX_LEN];
    for (i, b) in raw.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn contents(t: &TokenFile) -> Vec<u8> {
        let mut v = fs::read(&t.path).unwrap();
        assert_eq!(v.pop(), Some(b'\n'));
        v
    }

    #[test]
    fn created_once_kept_then_rotated_by_deleting() {
        let d = dir();
        let t = TokenFile::new(d.path());
        assert!(matches!(t.refresh().unwrap(), Change::Created));
        let first = contents(&t);
        assert_eq!(first.len(), 64);
        assert!(first.iter().all(|b| b.is_ascii_hexdigit()));
        let mode = fs::metadata(&t.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(t.matches(&first));
        assert!(!t.matches(b"nope"));
        assert!(matches!(t.refresh().unwrap(), Change::Unchanged));

        // A second supervisor start (a new TokenFile) keeps a valid file.
        let again = TokenFile::new(d.path());
        assert!(matches!(again.refresh().unwrap(), Change::Reloaded));
        assert!(again.matches(&first));

        fs::remove_file(&t.path).unwrap();
        assert!(matches!(t.refresh().unwrap(), Change::Created));
        let second = contents(&t);
        assert_ne!(first, second);
        assert!(!t.matches(&first));
        assert!(t.matches(&second));
    }

    #[test]
    fn an_operator_token_is_adopted_and_bad_files_are_replaced() {
        let d = dir();
        let t = TokenFile::new(d.path());
        t.refresh().unwrap();
        let mine = [b'a'; 64];
        let write = |bytes: &[u8], mode: u32| {
            let _ = fs::remove_file(&t.path);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&t.path)
                .unwrap()
                .write_all(bytes)
                .unwrap();
            fs::set_permissions(&t.path, fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&mine, 0o600);
        assert!(matches!(t.refresh().unwrap(), Change::Reloaded));
        assert!(t.matches(&mine));

        write(&mine, 0o644);
        let change = t.refresh().unwrap();
        assert!(
            matches!(&change, Change::Replaced(r @ Unusable::Mode { mode: 0o644 })
                if r.to_string() == "readable by others (mode 644)"),
            "{change:?}"
        );
        assert!(!t.matches(&mine));
        assert_eq!(
            fs::metadata(&t.path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        write(b"short\n", 0o600);
        let change = t.refresh().unwrap();
        assert!(
            matches!(&change, Change::Replaced(r @ Unusable::NotHex)
                if r.to_string() == "not 64 hex digits"),
            "{change:?}"
        );
        assert_eq!(contents(&t).len(), 64);
    }
}
