//! The control socket: framing, the hello handshake, and routing frames to the core loop.
//!
//! A bad frame is answered with a typed error and a log line; it never ends the supervisor, and
//! only a bad *first* frame (no hello) ends the connection.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ringrift::protocol::{
    self, ErrorCode, FrameError, FromSupervisor, MAX_FRAME_BYTES, PROTOCOL_VERSION, Role,
    ToSupervisor,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Msg, frame_name};
use crate::logwriter::SupervisorLog;

/// Binds run/supervisor.sock with mode 0600, replacing a stale socket file.
pub(crate) fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Counts open connections, so that the supervisor can let its last answers go out before exiting.
#[derive(Clone, Default)]
pub(crate) struct OpenConnections(Arc<()>);

impl OpenConnections {
    pub(crate) fn count(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }
}

pub(crate) async fn serve(
    listener: UnixListener,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    open: OpenConnections,
) {
    let ids = AtomicU64::new(1);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let token = open.clone();
                let (core, log) = (core.clone(), log.clone());
                tokio::spawn(async move {
                    connection(stream, id, core, log).await;
                    drop(token);
                });
            }
            Err(e) => {
                log.error(&format!("accept on the control socket failed: {e}"));
                // EMFILE and friends: give the system a moment instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one newline-terminated frame of at most MAX_FRAME_BYTES. Ok(None) at EOF. An oversized
/// frame is consumed up to its newline and reported, so the stream stays usable.
pub(crate) async fn read_frame<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Result<(), FrameError>>> {
    buf.clear();
    let mut oversized = 0usize;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() && oversized == 0 {
                None
            } else if oversized > 0 {
                Some(Err(FrameError::TooLarge(oversized)))
            } else {
                Some(Ok(()))
            });
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if oversized > 0 || buf.len() + chunk.len() > MAX_FRAME_BYTES {
            oversized += buf.len() + chunk.len();
            buf.clear();
        } else {
            buf.extend_from_slice(chunk);
        }
        let used = done.unwrap_or(available.len());
        r.consume(used);
        if done.is_some() {
            return Ok(Some(if oversized > 0 {
                Err(FrameError::TooLarge(oversized))
            } else {
                Ok(())
            }));
        }
    }
}

async fn connection(
    stream: UnixStream,
    id: u64,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let mut buf = Vec::new();

    // The handshake.
    let hello = match read_frame(&mut reader, &mut buf).await {
        Ok(Some(Ok(()))) => protocol::decode::<ToSupervisor>(&buf),
        Ok(Some(Err(e))) => Err(e),
        Ok(None) | Err(_) => return,
    };
    let (role, daemon, pid) = match hello {
        Ok(ToSupervisor::Hello {
            protocol: v,
            role,
            daemon,
            pid,
        }) => {
            if v != PROTOCOL_VERSION {
                let msg = format!(
                    "protocol version {v} is not supported; this supervisor speaks version {PROTOCOL_VERSION}"
                );
                log.warn(&format!("connection {id}: {msg}"));
                let _ = write
                    .write_all(&protocol::encode(&error(ErrorCode::ProtocolMismatch, &msg)))
                    .await;
                return;
            }
            (role, daemon, pid)
        }
        Ok(other) => {
            let msg = format!("the first frame must be hello, got {}", frame_name(&other));
            log.warn(&format!("connection {id}: {msg}"));
            let _ = write
                .write_all(&protocol::encode(&error(ErrorCode::UnexpectedFrame, &msg)))
                .await;
            return;
        }
        Err(e) => {
            log.warn(&format!("connection {id}: bad hello: {e}"));
            let code = if matches!(e, FrameError::TooLarge(_)) {
                ErrorCode::FrameTooLarge
            } else {
                ErrorCode::BadFrame
            };
            let _ = write
                .write_all(&protocol::encode(&error(code, &e.to_string())))
                .await;
            return;
        }
    };

    // One writer task per connection, so the core never waits on a socket.
    let (tx, mut rx) = mpsc::unbounded_channel::<FromSupervisor>();
    let writer = tokio::spawn(async move {
        // Whatever is queued goes out in one write: a burst of events costs one syscall, not one each.
        let mut batch = Vec::with_capacity(64 * 1024);
        while let Some(frame) = rx.recv().await {
            batch.clear();
            batch.extend_from_slice(&protocol::encode(&frame));
            while batch.len() < 256 * 1024
                && let Ok(more) = rx.try_recv()
            {
                batch.extend_from_slice(&protocol::encode(&more));
            }
            if write.write_all(&batch).await.is_err() {
                break;
            }
        }
    });

    match role {
        Role::Worker => {
            let Some(daemon) = daemon else {
                let _ = tx.send(error(
                    ErrorCode::BadFrame,
                    "a worker hello must name its daemon",
                ));
                drop(tx);
                let _ = writer.await;
                return;
            };
            let daemon = ringrift::catalog::normalize(&daemon);
            let (reply_tx, reply_rx) = oneshot::channel();
            if core
                .send(Msg::WorkerHello {
                    daemon: daemon.clone(),
                    pid,
                    conn_id: id,
                    tx: tx.clone(),
                    reply: reply_tx,
                })
                .is_err()
            {
                return;
            }
            match reply_rx.await {
                Ok(Ok(config)) => {
                    let _ = tx.send(FromSupervisor::Welcome {
                        protocol: PROTOCOL_VERSION,
                        config: Some(config),
                    });
                }
                Ok(Err(msg)) => {
                    log.warn(&format!("connection {id}: worker hello refused: {msg}"));
                    let _ = tx.send(error(ErrorCode::UnexpectedFrame, &msg));
                    drop(tx);
                    let _ = writer.await;
                    return;
                }
                Err(_) => return,
            }
            loop {
                match read_frame(&mut reader, &mut buf).await {
                    Ok(Some(Ok(()))) => match protocol::decode::<ToSupervisor>(&buf) {
                        Ok(frame) => {
                            let _ = core.send(Msg::WorkerFrame {
                                daemon: daemon.clone(),
                                conn_id: id,
                                frame,
                            });
                        }
                        Err(e) => bad_frame(&log, &tx, &format!("{daemon} (connection {id})"), e),
                    },
                    Ok(Some(Err(e))) => {
                        bad_frame(&log, &tx, &format!("{daemon} (connection {id})"), e)
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = core.send(Msg::WorkerGone {
                daemon,
                conn_id: id,
            });
        }
        Role::Cli => {
            let _ = tx.send(FromSupervisor::Welcome {
                protocol: PROTOCOL_VERSION,
                config: None,
            });
            loop {
                match read_frame(&mut reader, &mut buf).await {
                    Ok(Some(Ok(()))) => match protocol::decode::<ToSupervisor>(&buf) {
                        Ok(frame) => {
                            let (reply_tx, reply_rx) = oneshot::channel();
                            let request = Msg::Request {
                                frame,
                                reply: reply_tx,
                                stream: Some(tx.clone()),
                            };
                            if core.send(request).is_err() {
                                break;
                            }
                            // Requests on one connection are answered in order. A client that
                            // hangs up while waiting (timeout, Ctrl-C) drops its request.
                            let answer = tokio::select! {
                                answer = reply_rx => answer,
                                () = hung_up(&mut reader) => break,
                            };
                            match answer {
                                Ok(answer) => {
                                    let _ = tx.send(answer);
                                }
                                // No answer: the core streams frames on this connection
                                // (`events -f`) until the client hangs up.
                                Err(_) => {
                                    wait_for_hangup(&mut reader).await;
                                    break;
                                }
                            }
                        }
                        Err(e) => bad_frame(&log, &tx, &format!("cli (connection {id})"), e),
                    },
                    Ok(Some(Err(e))) => bad_frame(&log, &tx, &format!("cli (connection {id})"), e),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Resolves when the client has closed its end; never while it is connected (bytes it sends
/// meanwhile are left for the next read).
async fn hung_up<R: AsyncBufRead + Unpin>(r: &mut R) {
    match r.fill_buf().await {
        Ok([]) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Reads and drops whatever the client sends until it closes the connection.
async fn wait_for_hangup<R: AsyncBufRead + Unpin>(r: &mut R) {
    loop {
        match r.fill_buf().await {
            Ok([]) | Err(_) => return,
            Ok(b) => {
                let n = b.len();
                r.consume(n);
            }
        }
    }
}

fn bad_frame(
    log: &SupervisorLog,
    tx: &mpsc::UnboundedSender<FromSupervisor>,
    who: &str,
    e: FrameError,
) {
    log.warn(&format!("{who}: {e}"));
    let code = if matches!(e, FrameError::TooLarge(_)) {
        ErrorCode::FrameTooLarge
    } else {
        ErrorCode::BadFrame
    };
    let _ = tx.send(error(code, &e.to_string()));
}

fn error(code: ErrorCode, message: &str) -> FromSupervisor {
    FromSupervisor::Error {
        code,
        message: message.to_string(),
    }
}
