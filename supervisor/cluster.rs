//! Cluster membership on NATS JetStream (issue 12, part 1): this node's record in a replicated
//! key-value bucket that expires when the node stops renewing it, and the view of every node.
//!
//! One task per supervisor, started only when `cluster.enabled`. Every `heartbeat_interval` it
//! asks the core for the status, writes this node's [`NodeRecord`] to the bucket
//! `ringrift_nodes` (key = node id), then reads every record back: a node seen for the first time
//! is announced as NODE_JOINED, one whose record has expired (the bucket's max age is
//! `node_expiry`) as NODE_LEFT. The view is shared with the core, which answers `cluster status`
//! and `GET /cluster/status` from it. The task never blocks the core: when the bus is unreachable
//! the view says so (`connected: false`, `error`) and the node keeps supervising.
//!
//! Facts from CLUSTER-NOTES.md this relies on (nats-server 2.9 with async-nats 0.51): the bucket's
//! backing stream is made by hand (`create_key_value` fails against 2.9), and 2.9 sends no watch
//! event when a key expires, so departures are found by sweeping the keys (read from the bucket
//! stream's subjects, so that a sweep makes no consumer).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use ringrift::config::ClusterConfig;
use ringrift::protocol::{
    ClusterReport, FromSupervisor, NodeRecord, NodeStatus, Request, StatusReport, StatusRequest,
};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Msg, Requester};
use crate::logwriter::SupervisorLog;

mod bus;
mod lease;
pub(crate) mod work;

pub(crate) use lease::Wanted;

/// The membership bucket.
pub(crate) const BUCKET: &str = "ringrift_nodes";

/// JetStream API calls hang during leader elections until the client's timeout (CLUSTER-NOTES
/// pitfall 7): a short one, and the next heartbeat tries again.
const API_TIMEOUT: Duration = Duration::from_millis(1500);

/// The view of the cluster that `cluster status` shows.
pub(crate) type View = Arc<Mutex<ClusterReport>>;

/// Where the lease task takes a request to release every lease this node holds (set once it
/// runs): the supervisor asks as it exits, so the next node takes over at once.
pub(crate) type ReleaseSlot =
    Arc<Mutex<Option<mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>>>;

/// The cluster part of a running supervisor.
pub(crate) struct Handle {
    /// What `cluster status` shows.
    pub view: View,
    /// Where the shared work queue's task listens, once this node is on the bus.
    pub work: work::Slot,
    release: ReleaseSlot,
}

impl Handle {
    /// Hands every shared work item this node still holds back to the queue (its daemons have
    /// stopped), waiting at most `bound`.
    pub(crate) async fn release_work(&self, bound: Duration) {
        let tx = self.work.lock().expect("work slot lock").clone();
        let Some(tx) = tx else { return };
        let (done, released) = tokio::sync::oneshot::channel();
        if tx.send(work::Cmd::Release(done)).is_ok() {
            let _ = tokio::time::timeout(bound, released).await;
        }
    }

    /// Releases every lease this node holds (its daemons have stopped), waiting at most `bound`.
    pub(crate) async fn release_leases(&self, bound: Duration) {
        let Some(tx) = self.release.lock().expect("release slot lock").take() else {
            return;
        };
        let (done, released) = tokio::sync::oneshot::channel();
        if tx.send(done).is_ok() {
            let _ = tokio::time::timeout(bound, released).await;
        }
    }
}

/// Starts the membership task; returns the view it keeps up to date.
pub(crate) fn start(
    cfg: ClusterConfig,
    scoped: Vec<Wanted>,
    root: std::path::PathBuf,
    http: Option<String>,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) -> Handle {
    let view = Arc::new(Mutex::new(ClusterReport {
        node_id: cfg.node_id.clone(),
        connected: false,
        error: Some("connecting".into()),
        nodes: Vec::new(),
        leases: BTreeMap::new(),
    }));
    let member = Member {
        cfg,
        scoped,
        root,
        http,
        core,
        log,
        view: view.clone(),
        known: None,
        gpus: count_gpus(),
        release: ReleaseSlot::default(),
        work: work::Slot::default(),
        view_error: None,
    };
    let release = member.release.clone();
    let work = member.work.clone();
    tokio::spawn(member.run());
    Handle {
        view,
        work,
        release,
    }
}

struct Member {
    cfg: ClusterConfig,
    /// The leases of the cluster-scoped daemons of this node's configuration (`catalog::leases`).
    scoped: Vec<Wanted>,
    /// Where the lease task listens for the supervisor's last request.
    release: ReleaseSlot,
    /// Where the work task listens.
    work: work::Slot,
    /// Why run/cluster.json could not be written last time, if it could not.
    view_error: Option<String>,
    root: std::path::PathBuf,
    http: Option<String>,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
    view: View,
    /// Nodes seen in the last sweep, with when they last renewed (unix seconds); None before the
    /// first sweep, whose nodes were there already (only this node is announced as joining then).
    known: Option<BTreeMap<String, f64>>,
    gpus: u32,
}

impl Member {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut store: Option<(stream::Stream, kv::Store)> = None;
        let mut last_error: Option<String> = None;
        loop {
            tick.tick().await;
            if self.core.is_closed() {
                return;
            }
            if store.is_none() {
                match self.open().await {
                    Ok((bucket, s)) => {
                        self.log.info(&format!(
                            "cluster: node {} joined the bus at {}",
                            self.cfg.node_id,
                            self.cfg.servers_shown()
                        ));
                        store = Some((bucket, s));
                    }
                    Err(e) => {
                        self.note_error(&mut last_error, format!("cannot join the bus: {e}"));
                        continue;
                    }
                }
            }
            let (bucket, s) = store.as_ref().expect("opened above");
            match self.beat(bucket, s).await {
                Ok(()) => {
                    if last_error.take().is_some() {
                        self.log.info("cluster: membership up to date again");
                    }
                }
                Err(e) => self.note_error(&mut last_error, e),
            }
        }
    }

    /// Logs an error once until it changes, and shows it in the view.
    fn note_error(&mut self, last: &mut Option<String>, e: String) {
        if last.as_deref() != Some(e.as_str()) {
            self.log.warn(&format!("cluster: {e}"));
        }
        let view = {
            let mut v = self.view.lock().expect("cluster view lock");
            v.connected = false;
            v.error = Some(e.clone());
            serde_json::to_vec_pretty(&*v).expect("the view serializes")
        };
        // The daemons reading run/cluster.json see that the view is not current (a node that
        // cannot see the cluster does not decide by it).
        self.write_view(&view);
        *last = Some(e);
    }

    /// Connects and makes (or finds) the membership bucket.
    /// Connects, makes (or finds) the buckets and the event stream, and starts the lease task,
    /// the outbox and the inbox; returns the membership bucket.
    async fn open(&self) -> Result<(stream::Stream, kv::Store), String> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("ringrift-supervisor {}", self.cfg.node_id))
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(API_TIMEOUT));
        if let Some(creds) = &self.cfg.credentials {
            opts = opts
                .credentials_file(creds)
                .await
                .map_err(|e| format!("cannot read {}: {e}", creds.display()))?;
        }
        if let Some((user, password)) = &self.cfg.user {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &self.cfg.tls.ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.cfg.tls.cert, &self.cfg.tls.key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let client = opts
            .connect(self.cfg.servers.clone())
            .await
            .map_err(|e| e.to_string())?;
        let js = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client);
        let replicas = replicas(&self.cfg, &js.client());
        let Bucket { stream, store, .. } = kv_bucket(
            &js,
            BUCKET,
            self.cfg.node_expiry,
            replicas,
            "node_expiry",
            &self.log,
        )
        .await?;
        // The lease bucket, made by every node: the inbox checks fencing tokens against it.
        let leases = kv_bucket(
            &js,
            lease::BUCKET,
            self.cfg.lease_ttl,
            replicas,
            "lease_ttl",
            &self.log,
        )
        .await?;
        bus::ensure_stream(&js, replicas, &self.log).await?;
        work::start(
            js.clone(),
            self.cfg.node_id.clone(),
            self.cfg.work_ack_wait,
            replicas,
            self.core.clone(),
            self.log.clone(),
            self.work.clone(),
        )
        .await?;
        lease::start(leases.store.clone(), leases.max_age, self);
        bus::start(
            js,
            self.cfg.node_id.clone(),
            self.root.clone(),
            self.core.clone(),
            self.log.clone(),
            leases,
        );
        Ok((stream, store))
    }

    /// One heartbeat: renew this node's record, then read every record and announce changes.
    async fn beat(&mut self, bucket: &stream::Stream, store: &kv::Store) -> Result<(), String> {
        let record = self.record().await;
        let bytes = serde_json::to_vec(&record).expect("a record serializes");
        store
            .put(&self.cfg.node_id, bytes.into())
            .await
            .map_err(|e| format!("cannot renew this node's record: {e}"))?;
        // The keys from the stream's subjects: no consumer per sweep, as `kv.keys()` would make.
        let prefix = format!("$KV.{BUCKET}.");
        let mut subjects = bucket
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| format!("cannot list the nodes: {e}"))?;
        let mut keys = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|e| format!("cannot list the nodes: {e}"))?;
            if let Some(key) = subject.strip_prefix(&prefix) {
                keys.push(key.to_string());
            }
        }
        let mut nodes = Vec::new();
        for key in keys {
            let Ok(Some(value)) = store.get(&key).await else {
                continue;
            };
            match serde_json::from_slice::<NodeRecord>(&value) {
                // A node's record is under its own id, which names paths and subjects elsewhere.
                Ok(r) if r.node_id != key || !ringrift::config::valid_node_id(&r.node_id) => {
                    self.log.warn(&format!(
                        "cluster: ignored the record of '{key}': its node_id {:?} is not that \
                         key, or not a node id (1 to 64 of a-z, 0-9, _ and -)",
                        r.node_id
                    ))
                }
                Ok(r) => nodes.push(r),
                Err(e) => self
                    .log
                    .warn(&format!("cluster: ignored the record of '{key}': {e}")),
            }
        }
        let now = unix_now();
        let seen: BTreeSet<&str> = nodes.iter().map(|r| r.node_id.as_str()).collect();
        let known = self.known.take();
        for r in &nodes {
            let new = match &known {
                Some(k) => !k.contains_key(&r.node_id),
                None => r.node_id == self.cfg.node_id,
            };
            if new {
                self.log
                    .info(&format!("cluster: node {} joined", r.node_id));
                self.announce(
                    "NODE_JOINED",
                    serde_json::json!({"node_id": r.node_id, "roles": r.roles.join(","), "version": r.version}),
                );
            }
        }
        let left: Vec<(String, f64)> = known
            .iter()
            .flatten()
            .filter(|(id, _)| !seen.contains(id.as_str()))
            .map(|(id, t)| (id.clone(), *t))
            .collect();
        for (id, last) in left {
            let ago = (now - last).max(0.0);
            self.log.warn(&format!(
                "cluster: node {id} left (its record expired; last renewed {ago:.1}s ago)"
            ));
            self.announce(
                "NODE_LEFT",
                serde_json::json!({"node_id": id, "last_seen_secs": (ago * 1000.0).round() / 1000.0}),
            );
        }
        self.known = Some(
            nodes
                .iter()
                .map(|r| (r.node_id.clone(), r.updated_unix))
                .collect(),
        );
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let view = {
            let mut v = self.view.lock().expect("cluster view lock");
            v.connected = true;
            v.error = None;
            v.nodes = nodes
                .into_iter()
                .map(|record| NodeStatus {
                    last_seen_secs: ((now - record.updated_unix).max(0.0) * 1000.0).round()
                        / 1000.0,
                    record,
                })
                .collect();
            serde_json::to_vec_pretty(&*v).expect("the view serializes")
        };
        self.write_view(&view);
        Ok(())
    }

    /// Writes the view to `run/cluster.json` (renamed into place), where the daemons resolve
    /// `role:` targets from (worker/pipeline/transfer.rs). A failure is logged once until it
    /// changes.
    fn write_view(&mut self, bytes: &[u8]) {
        let path = self.root.join("run/cluster.json");
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => self.view_error = None,
            Err(e) => {
                let e = e.to_string();
                if self.view_error.as_deref() != Some(e.as_str()) {
                    self.log
                        .warn(&format!("cluster: cannot write {}: {e}", path.display()));
                }
                self.view_error = Some(e);
            }
        }
    }

    /// This node's record now.
    async fn record(&self) -> NodeRecord {
        let status = self.status().await;
        let daemons = status
            .as_ref()
            .map(|s| {
                s.daemons
                    .iter()
                    .map(|d| (d.name.clone(), d.state))
                    .collect()
            })
            .unwrap_or_default();
        let health = status.as_ref().and_then(|s| {
            s.daemons
                .iter()
                .find(|d| d.name == "unified_node_health" && d.pid.is_some())
                .map(|d| (d.health.healthy, d.health.message.clone()))
        });
        let jobs = status.as_ref().map_or(0, |s| s.jobs.len() as u32);
        let running_items = status
            .as_ref()
            .map(|s| s.jobs.iter().filter_map(|j| j.work_item).collect())
            .unwrap_or_default();
        // The selfplay slots, from selfplay_scheduler's health details while it runs.
        let slots = status.as_ref().and_then(|s| {
            s.daemons
                .iter()
                .find(|d| d.name == "selfplay_scheduler" && d.pid.is_some())
                .and_then(|d| d.health.details.get("slots"))
                .and_then(|v| v.as_u64())
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        });
        // unified_idle_shutdown's own measure and intent, from its health details while it runs.
        let idle = status.as_ref().and_then(|s| {
            s.daemons
                .iter()
                .find(|d| d.name == "unified_idle_shutdown" && d.pid.is_some())
                .map(|d| d.health.details.clone())
        });
        let idle_secs = idle
            .as_ref()
            .and_then(|d| d.get("idle_secs"))
            .and_then(|v| v.as_f64());
        let leaving = idle
            .as_ref()
            .and_then(|d| d.get("leaving"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        NodeRecord {
            node_id: self.cfg.node_id.clone(),
            roles: self.cfg.roles.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            http: self.http.clone(),
            data_address: self.cfg.data_address.clone(),
            cost_per_hour: self.cfg.cost_per_hour,
            idle_secs,
            leaving,
            heartbeat_secs: self.cfg.heartbeat_interval.as_secs_f64(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: ringrift::procfs::mem_total().unwrap_or(0),
            gpus: self.gpus,
            free_disk_bytes: nix::sys::statvfs::statvfs(&self.root)
                .map(|st| st.blocks_available() * st.fragment_size())
                .unwrap_or(0),
            health,
            daemons,
            jobs,
            slots,
            running_items,
            updated_unix: unix_now(),
        }
    }

    /// The core's status report, as `status --json` shows it.
    async fn status(&self) -> Option<StatusReport> {
        status(&self.core).await
    }

    /// Publishes a NODE_* event through the core, as the supervisor.
    fn announce(&self, event_type: &str, payload: serde_json::Value) {
        let (reply, _answer) = oneshot::channel();
        let _ = self.core.send(Msg::Request {
            frame: Request::Emit(ringrift::protocol::Emit {
                event_type: event_type.to_string(),
                payload,
                source: None,
            }),
            reply,
            stream: None,
            from: Requester::Supervisor,
        });
    }
}

/// GPUs that `nvidia-smi -L` lists; 0 without it.
fn count_gpus() -> u32 {
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count() as u32
        })
}

/// The core's status report, asked for as any client would (None when the core is gone).
async fn status(core: &mpsc::UnboundedSender<Msg>) -> Option<StatusReport> {
    let (reply, answer) = oneshot::channel();
    core.send(Msg::Request {
        frame: Request::Status(StatusRequest::default()),
        reply,
        stream: None,
        from: Requester::Supervisor,
    })
    .ok()?;
    match answer.await {
        Ok(FromSupervisor::Status(s)) => Some(s),
        _ => None,
    }
}

/// Replicas of the cluster's streams and buckets: as many servers as the bus has (those this
/// node lists, or those the server it reached advertises, whichever is more), at most 3.
fn replicas(cfg: &ClusterConfig, client: &async_nats::Client) -> usize {
    let advertised = client.server_info().connect_urls.len();
    cfg.servers.len().max(advertised).clamp(1, 3)
}

/// A KV bucket as found on the bus.
pub(crate) struct Bucket {
    /// Its backing stream (`KV_<bucket>`).
    pub stream: stream::Stream,
    pub store: kv::Store,
    /// How long its entries live after their last write: the bucket's own setting, which holds
    /// for the whole cluster (the node that made the bucket chose it).
    pub max_age: Duration,
}

/// Makes (or finds) a KV bucket whose entries expire `max_age` after their last write: its
/// backing stream as async-nats would make it (`create_key_value` fails against nats-server 2.9,
/// CLUSTER-NOTES pitfall 1), then the bucket. A bucket that exists keeps its max age (a warning
/// says so when this node asked for another: every node must time its entries by the same
/// clock), and gains replicas if it has fewer than `replicas`.
async fn kv_bucket(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
    what: &str,
    log: &SupervisorLog,
) -> Result<Bucket, String> {
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            duplicate_window: max_age.min(Duration::from_secs(120)),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot make the bucket {bucket}: {e}"))?;
    let config = stream
        .info()
        .await
        .map_err(|e| format!("cannot read the bucket {bucket}: {e}"))?
        .config
        .clone();
    if config.max_age != max_age {
        log.warn(&format!(
            "cluster: the bucket {bucket} keeps entries {}, not the {} of this node's {what}: \
             the bucket's figure holds for the whole cluster (the node that made it chose it); \
             set the same value on every node, and change the bucket's max age with the NATS \
             tools (natscli: nats stream edit KV_{bucket} --max-age ...) while no node runs",
            humantime::format_duration(config.max_age),
            humantime::format_duration(max_age)
        ));
    }
    scale_up(js, &config, replicas, log).await;
    let store = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("cannot open the bucket {bucket}: {e}"))?;
    Ok(Bucket {
        stream,
        store,
        max_age: config.max_age,
    })
}

/// Gives a stream `replicas` replicas if it has fewer (a node that made it knew of fewer
/// servers); a warning when the bus refuses.
async fn scale_up(
    js: &jetstream::Context,
    config: &stream::Config,
    replicas: usize,
    log: &SupervisorLog,
) {
    if config.num_replicas >= replicas {
        return;
    }
    let wanted = stream::Config {
        num_replicas: replicas,
        ..config.clone()
    };
    match js.update_stream(&wanted).await {
        Ok(_) => log.info(&format!(
            "cluster: the stream {} now has {replicas} replicas (it had {})",
            config.name, config.num_replicas
        )),
        Err(e) => log.warn(&format!(
            "cluster: the stream {} has {} replica(s), fewer than the {replicas} servers of the bus, \
             and cannot be given more: {e}",
            config.name, config.num_replicas
        )),
    }
}

pub(super) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
