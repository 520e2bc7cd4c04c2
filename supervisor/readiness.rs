//! Carrying out a plain program's `ready:` condition (the rules are in `ringrift::readiness`).
//!
//! Probes run as one task per spawn, told apart by the spawn's generation; the core aborts the task
//! when the process ends or a new one is spawned. A `log` condition watches the output on its way
//! to the log writer ([`WatchOutput`]), so the log writer itself knows nothing about readiness.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ringrift::readiness::{self, HttpUrl, Ready};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use crate::core::Msg;

/// The longest line prefix a `log` condition looks at; the rest of a longer line is not searched.
const MAX_WATCHED_LINE: usize = 64 * 1024;

/// Starts the probe loop of a tcp, http or command condition; None for the other forms.
///
/// The task sends [`Msg::Ready`] once the probe succeeds and ends; it runs commands from `cwd`
/// with `env`, each in its own process group, killed when its attempt's time is up.
pub(crate) fn spawn_probe(
    ready: &Ready,
    daemon: String,
    generation: u64,
    cwd: std::path::PathBuf,
    env: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Msg>,
) -> Option<tokio::task::AbortHandle> {
    let ready = ready.clone();
    let interval = match &ready {
        Ready::Tcp { interval, .. }
        | Ready::Http { interval, .. }
        | Ready::Command { interval, .. } => *interval,
        Ready::After(_) | Ready::Log(_) => return None,
    };
    let task = tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let ok = match &ready {
                Ready::Tcp { addr, .. } => {
                    tokio::time::timeout(interval, tokio::net::TcpStream::connect(addr.as_str()))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
                Ready::Http { url, .. } => tokio::time::timeout(interval, http_get_ok(url))
                    .await
                    .unwrap_or(false),
                Ready::Command { argv, .. } => {
                    run_command(argv, &cwd, &env, interval.max(Duration::from_secs(1))).await
                }
                Ready::After(_) | Ready::Log(_) => false,
            };
            if ok {
                let _ = tx.send(Msg::Ready {
                    daemon: daemon.clone(),
                    generation,
                });
                return;
            }
            tokio::time::sleep_until(started + interval).await;
        }
    });
    Some(task.abort_handle())
}

/// One GET over a fresh connection; true for a 2xx status line.
async fn http_get_ok(url: &HttpUrl) -> bool {
    let Ok(mut conn) = tokio::net::TcpStream::connect(url.authority.as_str()).await else {
        return false;
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringrift-supervisor\r\nConnection: close\r\n\r\n",
        url.path, url.host
    );
    if conn.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // The status line is all that matters; it comes first and is short.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    readiness::http_status_ok(&String::from_utf8_lossy(line))
}

/// Runs a probe command to its end (or kills its group after `limit`); true when it exited 0.
async fn run_command(
    argv: &[String],
    cwd: &std::path::Path,
    env: &[(String, String)],
    limit: Duration,
) -> bool {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let pid = child.id();
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            if let Some(pid) = pid {
                crate::unix::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
            false
        }
    }
}

/// Fires once, the first time a complete line of output contains the pattern.
pub(crate) struct LineWatch {
    pattern: String,
    line: Vec<u8>,
    fire: Option<Box<dyn FnOnce() + Send>>,
}

/// A `log` condition shared by a daemon's stdout and stderr watchers.
pub(crate) type SharedWatch = Arc<Mutex<LineWatch>>;

impl LineWatch {
    pub(crate) fn new(pattern: String, fire: Box<dyn FnOnce() + Send>) -> SharedWatch {
        Arc::new(Mutex::new(LineWatch {
            pattern,
            line: Vec::new(),
            fire: Some(fire),
        }))
    }

    fn feed(&mut self, bytes: &[u8]) {
        if self.fire.is_none() {
            return;
        }
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let room = MAX_WATCHED_LINE.saturating_sub(self.line.len());
            let body = chunk.strip_suffix(b"\n").unwrap_or(chunk);
            self.line.extend_from_slice(&body[..body.len().min(room)]);
            if chunk.ends_with(b"\n") {
                let text = String::from_utf8_lossy(&self.line);
                let hit = readiness::log_line_matches(&self.pattern, &text);
                self.line.clear();
                if hit {
                    if let Some(fire) = self.fire.take() {
                        fire();
                    }
                    return;
                }
            }
        }
    }
}

/// A reader that shows every byte it passes on to a [`LineWatch`].
pub(crate) struct WatchOutput<R> {
    inner: R,
    watch: SharedWatch,
}

impl<R> WatchOutput<R> {
    pub(crate) fn new(inner: R, watch: SharedWatch) -> Self {
        WatchOutput { inner, watch }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for WatchOutput<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.watch.lock().expect("line watch lock").feed(new);
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_watch_fires_once_on_a_whole_line() {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let w = LineWatch::new(
            "listening".into(),
            Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let mut w = w.lock().unwrap();
        w.feed(b"starting\nlis");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        w.feed(b"tening on 80");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "not before the line ends");
        w.feed(b"\nlistening again\n");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
