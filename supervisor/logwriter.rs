//! Per-daemon log files: what a daemon prints ends up in `logs/<daemon>.log`, one line each,
//! timestamped and tagged with the stream it came from, in files that rotate by size.
//!
//! ```text
//! 2026-11-28T08:30:00.123Z [out] the line text
//! 2026-11-28T08:30:00.124Z [err] Traceback (most recent call last):
//! 2026-11-28T08:30:00.125Z [out] the first 65536 bytes of a longer line
//! 2026-11-28T08:30:00.125Z [out+] the next bytes of that same line
//! ```
//!
//! A line longer than [`CHUNK`] (64 KiB) is written as one record of its first 64 KiB and
//! continuation records tagged `[out+]` / `[err+]`, each with the next bytes (at most 64 KiB); the
//! line is the concatenation of a record's text and every `+` record that follows it for the same
//! stream, with nothing in between. So memory stays bounded and a reader can still restore the
//! line byte for byte (`logs NAME` shows the records as they are).
//!
//! A [`pump`] per pipe reads whatever the child wrote, turns every complete line into a log line
//! and hands all the lines of one read to [`RotatingFile::write_all`] in a single call. There is
//! no buffering across reads and no timer, so `tail -f` sees a line as soon as the daemon has
//! written it, and a busy daemon costs one `write(2)` per `read(2)`. The pump never stops reading
//! because the log cannot be written: a child blocked on a full pipe is worse than a lost line.
//!
//! The file writes are plain blocking writes under a `std::sync::Mutex`, done on the runtime
//! thread: they go to a local file in the page cache and take microseconds, which is cheaper
//! than handing every batch to a blocking thread.
//!
//! Rotation (`x.log` → `x.log.1` → … → `x.log.{max_files-1}`, the oldest dropped) happens only
//! between two `write_all` calls, and callers only ever pass whole records, so a record is never
//! split across two files (the records of one long line may be, in order).
//!
//! A log file or the `logs/` directory removed while the supervisor runs (by hand, by a cleanup
//! script) is noticed before the next write (a `stat` of the path, cheaper than the write itself)
//! and created again, so lines never go into an unlinked file nobody can read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ringrift::timefmt::TimestampCache;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes asked for per read, and the longest record: a longer line is written as a record and
/// continuation records (see the module doc) so that memory stays bounded.
const CHUNK: usize = 64 * 1024;

/// The read buffer a pump starts with.
const FIRST_CHUNK: usize = 4 * 1024;

/// An append-only log file that rotates by size.
#[derive(Debug)]
pub(crate) struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    /// `x.log` plus `x.log.1` … `x.log.{max_files-1}`; 1 means "truncate instead of rotating".
    max_files: u32,
    file: File,
    /// Bytes in the current `x.log`.
    size: u64,
}

impl RotatingFile {
    /// Opens `path` for appending, creating it and its parent directories if needed.
    /// A `max_files` of 0 is taken as 1.
    pub(crate) fn open(
        path: impl Into<PathBuf>,
        max_bytes: u64,
        max_files: u32,
    ) -> io::Result<Self> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes,
            max_files: max_files.max(1),
            file,
            size,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `buf`, which should hold whole lines, rotating first if it would not fit.
    ///
    /// A `buf` larger than `max_bytes` is written anyway, into a fresh file. If rotating fails
    /// nothing is written and the rotation is tried again on the next call.
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.reopen_if_removed()?;
        if self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.max_bytes {
            self.rotate()?;
        }
        match self.file.write_all(buf) {
            Ok(()) => {
                self.size += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the buffer may have gone out; ask the file how big it really is.
                if let Ok(meta) = self.file.metadata() {
                    self.size = meta.len();
                }
                Err(e)
            }
        }
    }

    /// Opens the path again (creating its directory) when the file this handle writes is no
    /// longer there: removed or renamed away while the supervisor runs.
    fn reopen_if_removed(&mut self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let same = match (fs::metadata(&self.path), self.file.metadata()) {
            (Ok(on_disk), Ok(open)) => on_disk.dev() == open.dev() && on_disk.ino() == open.ino(),
            _ => false,
        };
        if !same {
            if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)?;
            }
            self.file = open_append(&self.path)?;
            self.size = self.file.metadata()?.len();
        }
        Ok(())
    }

    /// Starts a fresh, empty `x.log`, keeping the older ones as `x.log.1` … if allowed.
    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files <= 1 {
            // O_APPEND writes go to the (new) end, so the handle can be kept.
            self.file.set_len(0)?;
        } else {
            remove_if_exists(&self.numbered(self.max_files - 1))?;
            for i in (1..self.max_files - 1).rev() {
                rename_if_exists(&self.numbered(i), &self.numbered(i + 1))?;
            }
            rename_if_exists(&self.path, &self.numbered(1))?;
            self.file = open_append(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }

    /// `x.log.{i}`.
    fn numbered(&self, i: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// One daemon's log, written by the pumps of both its stdout and its stderr.
pub(crate) type SharedLog = Arc<Mutex<RotatingFile>>;

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Out,
    Err,
}

impl Stream {
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
        }
    }
}

/// Copies a child's pipe into its log until EOF, one log line per output line.
///
/// Write errors are reported on stderr once (again only after a write has succeeded in
/// between) and reading goes on, so the child never blocks on a full pipe. A read error other
/// than EINTR ends the pump like EOF does.
pub(crate) async fn pump<R: AsyncRead + Unpin>(mut reader: R, tag: Stream, log: SharedLog) {
    let mut clock = TimestampCache::new();
    let mut splitter = LineSplitter::default();
    // Small at first and grown only for a daemon that fills it: thirty quiet daemons should not
    // cost the supervisor megabytes of buffers. `read_buf` fills spare capacity without zeroing it.
    let mut input: Vec<u8> = Vec::with_capacity(FIRST_CHUNK);
    let mut batch = Vec::new();
    let mut failing = false;
    loop {
        if input.len() == input.capacity() && input.capacity() < CHUNK {
            input.reserve_exact(CHUNK - input.capacity());
        }
        input.clear();
        let n = match reader.read_buf(&mut input).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!(
                    "ringrift-supervisor: reading daemon {} failed: {e}",
                    tag.tag()
                );
                break;
            }
        };
        let mut lines = LineFormatter::new(&mut clock, tag, &mut batch);
        splitter.feed(&input[..n], |line, continued| lines.push(line, continued));
        write_batch(&log, &batch, &mut failing);
    }
    let mut lines = LineFormatter::new(&mut clock, tag, &mut batch);
    splitter.finish(|line, continued| lines.push(line, continued));
    write_batch(&log, &batch, &mut failing);
}

/// Appends `<timestamp> [<tag>] <line>\n` records to a batch (`[<tag>+]` for a continuation).
///
/// All lines of one read arrived together, so they share the timestamp taken when the
/// formatter was made.
struct LineFormatter<'a> {
    /// `<timestamp> [<tag>`
    prefix: Vec<u8>,
    batch: &'a mut Vec<u8>,
}

impl<'a> LineFormatter<'a> {
    /// Clears `batch` and stamps the time.
    fn new(clock: &mut TimestampCache, tag: Stream, batch: &'a mut Vec<u8>) -> Self {
        batch.clear();
        let mut prefix = Vec::with_capacity(32);
        clock.write_now(&mut prefix);
        prefix.extend_from_slice(b" [");
        prefix.extend_from_slice(tag.tag().as_bytes());
        Self { prefix, batch }
    }

    fn push(&mut self, line: &[u8], continued: bool) {
        self.batch.extend_from_slice(&self.prefix);
        self.batch
            .extend_from_slice(if continued { b"+] " } else { b"] " });
        self.batch.extend_from_slice(line);
        self.batch.push(b'\n');
    }
}

fn write_batch(log: &SharedLog, batch: &[u8], failing: &mut bool) {
    if batch.is_empty() {
        return;
    }
    let mut file = lock(log);
    match file.write_all(batch) {
        Ok(()) => *failing = false,
        Err(e) => {
            if !*failing {
                eprintln!(
                    "ringrift-supervisor: writing {} failed, dropping its lines: {e}",
                    file.path().display()
                );
            }
            *failing = true;
        }
    }
}

/// A panic elsewhere while holding the lock leaves the file usable: keep logging.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Cuts a byte stream into lines: `\n` ends a line, a `\r` right before it is dropped, and a
/// line longer than [`CHUNK`] comes out in pieces of [`CHUNK`] bytes, every piece after the
/// first flagged as a continuation (`emit(piece, continued)`).
#[derive(Debug, Default)]
struct LineSplitter {
    /// The start of a line whose end has not been read yet.
    partial: Vec<u8>,
    /// A first piece of the current line has gone out already.
    continuing: bool,
}

impl LineSplitter {
    /// Emits every line completed by `data` and keeps the rest.
    fn feed(&mut self, data: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                emit_pieces(strip_cr(&rest[..end]), self.continuing, &mut emit);
            } else {
                self.partial.extend_from_slice(&rest[..end]);
                emit_pieces(strip_cr(&self.partial), self.continuing, &mut emit);
                self.partial.clear();
            }
            self.continuing = false;
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        self.emit_overflow(&mut emit);
    }

    /// Emits what is left of an unterminated last line.
    fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.partial.is_empty() {
            emit_pieces(strip_cr(&self.partial), self.continuing, &mut emit);
            self.partial.clear();
        }
        self.continuing = false;
    }

    /// Bounds memory: while the unfinished line is longer than [`CHUNK`], its first
    /// [`CHUNK`] bytes go out as a line of their own. A trailing `\r` does not count, as it
    /// may be half of a `\r\n`; at least one byte of the line stays behind, so the newline
    /// that ends it never yields an empty line.
    fn emit_overflow(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        let mut start = 0;
        while strip_cr(&self.partial[start..]).len() > CHUNK {
            emit(&self.partial[start..start + CHUNK], self.continuing);
            self.continuing = true;
            start += CHUNK;
        }
        self.partial.drain(..start);
    }
}

/// Emits `line` in pieces of at most [`CHUNK`] bytes, all but the first (unless `continued`: the
/// line began in an earlier piece) flagged as continuations; an empty line is emitted as one.
fn emit_pieces(line: &[u8], continued: bool, emit: &mut impl FnMut(&[u8], bool)) {
    if line.is_empty() && !continued {
        emit(line, false);
    }
    for (i, piece) in line.chunks(CHUNK).enumerate() {
        emit(piece, continued || i > 0);
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The supervisor's own log (`logs/master_loop.log`), optionally mirrored to stderr.
#[derive(Debug)]
pub(crate) struct SupervisorLog {
    inner: Mutex<SupervisorLogInner>,
    mirror_stderr: bool,
}

#[derive(Debug)]
struct SupervisorLogInner {
    file: RotatingFile,
    clock: TimestampCache,
    line: Vec<u8>,
    failing: bool,
}

impl SupervisorLog {
    /// Opens the log; lines are not mirrored to stderr unless [`Self::mirror_stderr`] says so.
    pub(crate) fn open(
        path: impl Into<PathBuf>,
        max_bytes: u64,
        max_files: u32,
    ) -> io::Result<Self> {
        let file = RotatingFile::open(path, max_bytes, max_files)?;
        Ok(Self {
            inner: Mutex::new(SupervisorLogInner {
                file,
                clock: TimestampCache::new(),
                line: Vec::with_capacity(256),
                failing: false,
            }),
            mirror_stderr: false,
        })
    }

    /// Also writes every line to stderr (`--foreground`).
    pub(crate) fn mirror_stderr(mut self, on: bool) -> Self {
        self.mirror_stderr = on;
        self
    }

    /// Writes `<timestamp> <LEVEL> <msg>` with the level padded to 5 columns. Each line of a
    /// multi-line `msg` gets its own timestamp and level, so every log line can be grepped.
    pub(crate) fn line(&self, level: &str, msg: &str) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        inner.line.clear();
        let msg = msg.strip_suffix('\n').unwrap_or(msg);
        for text in msg.split('\n') {
            inner.clock.write_now(&mut inner.line);
            inner
                .line
                .extend_from_slice(format!(" {level:<5} ").as_bytes());
            inner.line.extend_from_slice(strip_cr(text.as_bytes()));
            inner.line.push(b'\n');
        }
        match inner.file.write_all(&inner.line) {
            Ok(()) => inner.failing = false,
            Err(e) => {
                if !inner.failing {
                    eprintln!(
                        "ringrift-supervisor: writing {} failed: {e}",
                        inner.file.path().display()
                    );
                }
                inner.failing = true;
            }
        }
        if self.mirror_stderr {
            // Nothing sensible to do if stderr is gone; the file has the line.
            let _ = io::stderr().lock().write_all(&inner.line);
        }
    }

    pub(crate) fn info(&self, msg: &str) {
        self.line("INFO", msg);
    }

    pub(crate) fn warn(&self, msg: &str) {
        self.line("WARN", msg);
    }

    pub(crate) fn error(&self, msg: &str) {
        self.line("ERROR", msg);
    }
}

#[cfg(test)]
mod tests;
