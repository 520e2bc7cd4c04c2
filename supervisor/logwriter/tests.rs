//! Tests of `supervisor/logwriter.rs`.

use super::*;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::ReadBuf;

/// An AsyncRead that hands out the given chunks one read at a time.
struct Chunks(VecDeque<Vec<u8>>);

impl Chunks {
    fn new<I: IntoIterator<Item = T>, T: AsRef<[u8]>>(chunks: I) -> Self {
        Chunks(chunks.into_iter().map(|c| c.as_ref().to_vec()).collect())
    }

    /// `data` cut into reads of `size` bytes.
    fn sized(data: &[u8], size: usize) -> Self {
        Chunks::new(data.chunks(size))
    }
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut chunk) = self.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn shared(path: &Path, max_bytes: u64, max_files: u32) -> SharedLog {
    Arc::new(Mutex::new(
        RotatingFile::open(path, max_bytes, max_files).unwrap(),
    ))
}

/// The pieces, with continuations flagged: `(bytes, continued)`.
fn split_flagged(chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
    let mut splitter = LineSplitter::default();
    let mut lines = Vec::new();
    for chunk in chunks {
        splitter.feed(chunk, |l, c| lines.push((l.to_vec(), c)));
    }
    splitter.finish(|l, c| lines.push((l.to_vec(), c)));
    lines
}

fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    split_flagged(chunks).into_iter().map(|(l, _)| l).collect()
}

/// The files of a log, oldest first.
fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..100)
        .rev()
        .map(|i| PathBuf::from(format!("{}.{i}", path.display())))
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

fn read_lines(path: &Path) -> Vec<String> {
    log_files(path)
        .iter()
        .flat_map(|f| {
            let text = fs::read(f).unwrap();
            assert!(
                text.is_empty() || text.ends_with(b"\n"),
                "{f:?} ends mid-line"
            );
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `2026-11-28T08:30:00.123Z`, exactly.
fn is_timestamp(stamp: &[u8]) -> bool {
    stamp.len() == 24
        && stamp.iter().enumerate().all(|(i, &b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'.',
            23 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

/// `2026-11-28T08:30:00.123Z [out] text` → `text`, checking the shape of the rest.
fn body<'a>(line: &'a str, tag: &str) -> &'a str {
    assert!(line.len() >= 31, "too short: {line:?}");
    assert!(
        is_timestamp(&line.as_bytes()[..24]),
        "bad timestamp in {line:?}"
    );
    assert_eq!(&line[24..31], format!(" [{tag}] "), "bad tag in {line:?}");
    &line[31..]
}

#[test]
fn open_creates_parent_directories_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/x.log");
    RotatingFile::open(&path, 1000, 3)
        .unwrap()
        .write_all(b"one\n")
        .unwrap();
    let mut again = RotatingFile::open(&path, 1000, 3).unwrap();
    assert_eq!(again.size, 4);
    again.write_all(b"two\n").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"one\ntwo\n");
}

#[test]
fn the_existing_size_counts_towards_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    fs::write(&path, [b'a'; 90]).unwrap();
    let mut file = RotatingFile::open(&path, 100, 2).unwrap();
    file.write_all(b"0123456789\n").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"0123456789\n");
    assert_eq!(fs::read(dir.path().join("x.log.1")).unwrap(), [b'a'; 90]);
}

#[test]
fn rotation_keeps_at_most_max_files_and_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    let mut file = RotatingFile::open(&path, 100, 3).unwrap();
    let written: Vec<String> = (0..200).map(|i| format!("line {i:05}")).collect();
    for line in &written {
        file.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for f in log_files(&path) {
        assert!(fs::metadata(&f).unwrap().len() <= 100, "{f:?}");
    }
    let kept = read_lines(&path);
    assert!(kept.len() >= 2 * (100 / 11), "{}", kept.len());
    assert_eq!(kept[..], written[written.len() - kept.len()..]);
}

#[test]
fn one_file_means_truncate_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    let mut file = RotatingFile::open(&path, 10, 1).unwrap();
    file.write_all(b"12345678\n").unwrap();
    file.write_all(b"abc\n").unwrap();
    file.write_all(b"def\n").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"abc\ndef\n");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    // Zero is taken as one.
    let mut zero = RotatingFile::open(&path, 10, 0).unwrap();
    zero.write_all(b"0123456\n").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"0123456\n");
}

#[test]
fn a_buffer_larger_than_the_limit_gets_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    let mut file = RotatingFile::open(&path, 10, 3).unwrap();
    let big = [b"x".repeat(49), b"\n".to_vec()].concat();
    // Even into an empty file: there is nothing to rotate away.
    file.write_all(&big).unwrap();
    file.write_all(b"a\n").unwrap();
    file.write_all(&big).unwrap();
    assert_eq!(fs::read(&path).unwrap(), big);
    assert_eq!(fs::read(dir.path().join("x.log.1")).unwrap(), b"a\n");
    assert_eq!(fs::read(dir.path().join("x.log.2")).unwrap(), big);
}

#[test]
fn splitter_joins_lines_across_reads() {
    assert_eq!(
        split(&[b"hel", b"lo\nwor", b"ld\n", b"\n", b"last"]),
        [&b"hello"[..], b"world", b"", b"last"]
    );
}

#[test]
fn splitter_drops_the_cr_of_crlf_only() {
    assert_eq!(
        split(&[b"a\r\nb\r", b"\nc\rd\n\r\n", b"e\r"]),
        [&b"a"[..], b"b", b"c\rd", b"", b"e"]
    );
}

#[test]
fn splitter_keeps_invalid_utf8() {
    assert_eq!(split(&[b"\xff\xfe ok\n"]), [&b"\xff\xfe ok"[..]]);
}

#[test]
fn splitter_cuts_long_lines_into_chunks() {
    let long = vec![b'y'; 2 * CHUNK + 5];
    let reads: Vec<&[u8]> = long.chunks(1000).chain([&b"\nz\n"[..]]).collect();
    let lines = split_flagged(&reads);
    let lens: Vec<_> = lines.iter().map(|(l, c)| (l.len(), *c)).collect();
    assert_eq!(lens, [(CHUNK, false), (CHUNK, true), (5, true), (1, false)]);
    // The same when the whole line arrives in one read.
    let mut whole = long.clone();
    whole.extend_from_slice(b"\nz\n");
    assert_eq!(split_flagged(&[&whole]), lines);
}

#[test]
fn splitter_does_not_cut_a_line_of_exactly_one_chunk() {
    let mut line = vec![b'y'; CHUNK];
    line.extend_from_slice(b"\r\n");
    for size in [1000, CHUNK, CHUNK + 1] {
        let reads: Vec<&[u8]> = line.chunks(size).collect();
        assert_eq!(split(&reads), [vec![b'y'; CHUNK]], "reads of {size}");
    }
}

#[tokio::test]
async fn pump_writes_timestamped_tagged_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let log = shared(&path, 1 << 20, 3);
    let reads: [&[u8]; 5] = [
        b"first li",
        b"ne\r\nsecond\n",
        b"\n",
        b"\xffbytes\n",
        b"tail",
    ];
    pump(Chunks::new(reads), Stream::Err, log.clone()).await;
    let raw = fs::read(&path).unwrap();
    assert!(
        raw.windows(6).any(|w| w == b"\xffbytes"),
        "bytes kept as-is"
    );
    let lines = read_lines(&path);
    let bodies: Vec<_> = lines.iter().map(|l| body(l, "err")).collect();
    assert_eq!(
        bodies,
        ["first line", "second", "", "\u{fffd}bytes", "tail"]
    );
}

#[tokio::test]
async fn pump_splits_a_long_line_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let log = shared(&path, 1 << 20, 3);
    let mut data = b"short\n".to_vec();
    data.extend(std::iter::repeat_n(b'L', CHUNK + 10));
    data.extend_from_slice(b"\nafter\n");
    pump(Chunks::sized(&data, 4096), Stream::Out, log).await;
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 4);
    assert_eq!(body(&lines[0], "out"), "short");
    assert_eq!(body(&lines[1], "out"), "L".repeat(CHUNK));
    assert_eq!(&lines[2][24..], format!(" [out+] {}", "L".repeat(10)));
    assert_eq!(body(&lines[3], "out"), "after");
}

#[tokio::test]
async fn pump_over_a_duplex_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let log = shared(&path, 1 << 20, 3);
    let (mut tx, rx) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for i in 0..100 {
            tx.write_all(format!("message number {i}\n").as_bytes())
                .await
                .unwrap();
        }
    });
    pump(rx, Stream::Out, log).await;
    writer.await.unwrap();
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 100);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(body(line, "out"), format!("message number {i}"));
    }
}

#[tokio::test]
async fn pump_loses_no_line_across_rotations() {
    const LINES: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.log");
    let log = shared(&path, 1 << 20, 64);
    let mut data = Vec::with_capacity(LINES * 12);
    for i in 0..LINES {
        data.extend_from_slice(format!("{i}\n").as_bytes());
    }
    // An odd read size puts line ends everywhere in the buffer.
    pump(Chunks::sized(&data, 7_919), Stream::Out, log).await;
    let files = log_files(&path);
    assert!(files.len() > 2, "expected rotations, got {files:?}");
    let lines = read_lines(&path);
    assert_eq!(lines.len(), LINES);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(body(line, "out"), i.to_string());
    }
}

#[tokio::test]
async fn pump_keeps_draining_when_the_log_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    fs::write(&path, b"0123456789\n").unwrap();
    // Rotation must delete `d.log.1`, which cannot be done to a directory.
    fs::create_dir(dir.path().join("d.log.1")).unwrap();
    let log = shared(&path, 10, 2);
    let data = b"lost\n".repeat(100_000);
    // Returning at all (rather than stopping at the first error) is the point.
    pump(Chunks::sized(&data, 4096), Stream::Out, log).await;
    assert_eq!(fs::read(&path).unwrap(), b"0123456789\n");
}

#[tokio::test]
async fn a_removed_log_and_its_directory_are_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let path = logs.join("d.log");
    let log = shared(&path, 1 << 20, 3);
    pump(Chunks::new([b"before\n"]), Stream::Out, log.clone()).await;
    fs::remove_dir_all(&logs).unwrap();
    pump(Chunks::new([b"after\n"]), Stream::Out, log.clone()).await;
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(body(&lines[0], "out"), "after");
    // A file removed (not its directory) too.
    fs::remove_file(&path).unwrap();
    pump(Chunks::new([b"again\n"]), Stream::Err, log).await;
    assert_eq!(body(&read_lines(&path)[0], "err"), "again");
}

#[test]
fn supervisor_log_pads_the_level() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/master_loop.log");
    let log = SupervisorLog::open(&path, 1 << 20, 3)
        .unwrap()
        .mirror_stderr(false);
    log.info("started");
    log.warn("slow");
    log.error("two\nlines\n");
    log.line("DEBUG", "x");
    let text = fs::read_to_string(&path).unwrap();
    let tails: Vec<_> = text.lines().map(|l| &l[24..]).collect();
    assert_eq!(
        tails,
        [
            " INFO  started",
            " WARN  slow",
            " ERROR two",
            " ERROR lines",
            " DEBUG x"
        ]
    );
    for line in text.lines() {
        assert!(is_timestamp(&line.as_bytes()[..24]), "{line:?}");
    }
}

#[test]
fn supervisor_log_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master_loop.log");
    let log = SupervisorLog::open(&path, 200, 2).unwrap();
    for i in 0..100 {
        log.info(&format!("event {i}"));
    }
    assert!(fs::metadata(&path).unwrap().len() <= 200);
    assert!(dir.path().join("master_loop.log.1").exists());
    assert!(!dir.path().join("master_loop.log.2").exists());
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.ends_with(" INFO  event 99\n"), "{text}");
}
