//! `logs NAME [-n N] [-f]`: the tail of a daemon's (or the supervisor's) log, following rotation.

use super::*;

/// `logs NAME [-n N] [-f]`: reads the files directly, so it works with or without a supervisor.
pub(crate) fn show_logs(path: &Path, lines: usize, follow: bool) -> i32 {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => {
            eprintln!("waiting for {} to appear ...", path.display());
            loop {
                std::thread::sleep(Duration::from_millis(200));
                if let Ok(f) = std::fs::File::open(path) {
                    break f;
                }
            }
        }
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", path.display());
            return EXIT_FAILED;
        }
    };
    let mut pos = match print_tail(&mut file, lines) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", path.display());
            return EXIT_FAILED;
        }
    };
    if !follow {
        return 0;
    }
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            pos += n as u64;
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                return 0;
            }
            continue;
        }
        // Rotated or truncated: start over on the new file.
        let rotated = std::fs::metadata(path)
            .map(|m| m.len() < pos || !same_file(&file, &m))
            .unwrap_or(false);
        if rotated && let Ok(f) = std::fs::File::open(path) {
            file = f;
            pos = 0;
            continue;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn same_file(file: &std::fs::File, other: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map(|m| m.ino() == other.ino() && m.dev() == other.dev())
        .unwrap_or(false)
}

/// Prints the last `n` lines and returns the offset reached.
fn print_tail(file: &mut std::fs::File, n: usize) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut start = len;
    let mut found = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    // Walk backwards until n+1 newlines are seen (the last byte is usually a newline).
    while start > 0 && found <= n {
        let step = (start as usize).min(chunk.len());
        start -= step as u64;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..step])?;
        for (i, &b) in chunk[..step].iter().enumerate().rev() {
            if b == b'\n' && start + i as u64 + 1 != len {
                found += 1;
                if found == n {
                    start += i as u64 + 1;
                    found = n + 1;
                    break;
                }
            }
        }
    }
    if n == 0 {
        start = len;
    }
    file.seek(SeekFrom::Start(start))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    std::io::stdout().write_all(&rest)?;
    Ok(len)
}
