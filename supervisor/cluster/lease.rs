//! Leases of cluster-scoped daemons (issue 12, part 3): one key per daemon, or per daemon and
//! config key (`catalog::leases`), in the KV bucket `ringrift_leases`, whose max age is
//! `cluster.lease_ttl`. The core passes each change to the daemon's worker
//! (`FromSupervisor::Lease`), which takes work only while this node holds it, and stamps the
//! held revision (the fencing token) on the daemon's events.
//!
//! A node takes a free lease with `create` (create-if-absent) and keeps it with `update` against
//! the revision it holds (compare-and-set); the revision is the fencing token. It renews every
//! third of the TTL, and steps down by itself once two thirds of the TTL have passed without a
//! renewal it saw acknowledged, so it stops holding before the key can expire on the server and
//! another node can take it (fail closed: never two holders at once). A node that dies stops
//! renewing; the key expires after the TTL and the next `create` of another node wins. A node
//! whose daemon stops deletes the key (compare-and-set on its revision) so another takes it at
//! its next attempt.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use ringrift::protocol::LeaseInfo;
use tokio::sync::{mpsc, oneshot};

use super::View;
use crate::core::Msg;
use crate::logwriter::SupervisorLog;

/// The lease bucket.
pub(crate) const BUCKET: &str = "ringrift_leases";

/// What a lease key holds.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Holder {
    /// The holder's node id.
    pub node: String,
    /// When this holder took the lease: RFC 3339 UTC, by its clock.
    #[serde(default)]
    pub since: String,
}

/// One lease this node contends for.
#[derive(Debug, Clone)]
pub(crate) struct Wanted {
    /// The lease's name: the key in the bucket (`queue_populator`, `auto_promotion.hex8_2p`).
    pub name: String,
    /// The daemon acting under it; this node contends only while that daemon runs here.
    pub daemon: String,
    /// The config key it covers, for a lease per key.
    pub config_key: Option<String>,
}

/// This node's view of one lease.
enum Lease {
    /// Held since `since` (RFC 3339), at `revision` (the fencing token), last renewal
    /// acknowledged for a request sent at `renewed`.
    Held {
        revision: u64,
        renewed: Instant,
        since: String,
    },
    /// Held by another node, or by nobody this node could see.
    Standby,
}

/// Keeps the leases of `member`'s cluster-scoped daemons in `store` (the lease bucket, whose
/// max age `ttl` every node times its leases by: the server expires keys by it).
pub(crate) fn start(store: kv::Store, ttl: Duration, member: &super::Member) {
    if member.scoped.is_empty() {
        return;
    }
    let (release_tx, release_rx) = mpsc::unbounded_channel();
    *member.release.lock().expect("release slot lock") = Some(release_tx);
    tokio::spawn(keep(
        store,
        member.cfg.node_id.clone(),
        ttl,
        member.scoped.clone(),
        member.view.clone(),
        (member.core.clone(), release_rx),
        member.log.clone(),
    ));
}

/// The daemons RUNNING (or PAUSED) here, from the core itself (not this node's membership
/// record, which is a heartbeat old): a daemon that stops hands its lease over at the next round.
/// None when the core did not answer (it is stopping).
async fn running_here(core: &mpsc::UnboundedSender<Msg>) -> Option<Vec<String>> {
    let report = super::status(core).await?;
    Some(
        report
            .daemons
            .into_iter()
            .filter(|d| d.state.satisfies_dependents())
            .map(|d| d.name)
            .collect(),
    )
}

/// How often the lease task runs: a free lease is tried for this often (so a dead leader is
/// replaced within the TTL plus half a second after its last renewal, as DESIGN asks "within the
/// lease time plus a second"), and a held one renewed every third of the TTL.
fn attempt_every(ttl: Duration) -> Duration {
    (ttl / 3).min(Duration::from_millis(500))
}

/// The lease task's state: the leases, and what the core was last told of each.
struct Keeper {
    store: kv::Store,
    node: String,
    ttl: Duration,
    leases: Vec<(Wanted, Lease)>,
    /// What the core was last told, by lease name (it starts every daemon in standby).
    told: BTreeMap<String, LeaseInfo>,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
}

async fn keep(
    store: kv::Store,
    node: String,
    ttl: Duration,
    wanted: Vec<Wanted>,
    view: View,
    (core, mut release): (
        mpsc::UnboundedSender<Msg>,
        mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    ),
    log: Arc<SupervisorLog>,
) {
    let mut k = Keeper {
        store,
        node,
        ttl,
        leases: wanted.into_iter().map(|w| (w, Lease::Standby)).collect(),
        told: BTreeMap::new(),
        core,
        log,
    };
    let mut tick = tokio::time::interval(attempt_every(ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Wake at the next renewal, or at the moment a held lease must be given up, whichever
        // comes first: stepping down never waits for a slow call.
        let deadline = k.earliest_deadline();
        tokio::select! {
            biased;
            asked = release.recv() => {
                // The supervisor is exiting (its daemons have stopped), or gone.
                k.release_all("the supervisor is stopping").await;
                if let Some(done) = asked {
                    let _ = done.send(());
                }
                return;
            }
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {}
        }
        k.step_down_expired();
        // No answer: the core is stopping; what this node holds is released below.
        let running = running_here(&k.core).await.unwrap_or_default();
        let mut holders = BTreeMap::new();
        for i in 0..k.leases.len() {
            k.renew_or_acquire(i, &running).await;
            k.step_down_expired();
            let info = k.info(i).await;
            holders.insert(k.leases[i].0.name.clone(), info.holder.clone());
            k.tell(i, info);
        }
        if k.core.is_closed() {
            k.release_all("the supervisor is stopping").await;
            return;
        }
        view.lock().expect("cluster view lock").leases = holders;
    }
}

impl Keeper {
    /// When the first held lease must be given up: two thirds of the TTL after the send time of
    /// its last acknowledged renewal, at least a third of the TTL before the server can expire it.
    fn earliest_deadline(&self) -> Option<Instant> {
        self.leases
            .iter()
            .filter_map(|(_, l)| match l {
                Lease::Held { renewed, .. } => Some(*renewed + self.ttl * 2 / 3),
                Lease::Standby => None,
            })
            .min()
    }

    /// How long a call to the bus may take now: a third of the TTL, and never past the moment a
    /// held lease must be given up (a call that cannot finish in time fails, which fails closed).
    fn budget(&self) -> Duration {
        let cap = self.ttl / 3;
        match self.earliest_deadline() {
            Some(d) => cap.min(d.saturating_duration_since(Instant::now())),
            None => cap,
        }
    }

    /// Gives up, and tells the core at once, every held lease whose renewal is overdue.
    fn step_down_expired(&mut self) {
        let now = Instant::now();
        for i in 0..self.leases.len() {
            let (w, lease) = &mut self.leases[i];
            if let Lease::Held {
                revision, renewed, ..
            } = lease
                && now >= *renewed + self.ttl * 2 / 3
            {
                self.log.warn(&format!(
                    "cluster: lease {} lost at {}: not renewed for {:.1}s (fencing token {revision}); standing by",
                    w.name,
                    ringrift::timefmt::now_rfc3339(),
                    renewed.elapsed().as_secs_f64()
                ));
                *lease = Lease::Standby;
                let info = LeaseInfo::unknown(w.config_key.clone());
                self.tell(i, info);
            }
        }
    }

    /// One round for lease `i`: release it if its daemon no longer runs here, renew it if held,
    /// try to take it if free and the daemon runs here.
    async fn renew_or_acquire(&mut self, i: usize, running: &[String]) {
        let budget = self.budget();
        let (w, lease) = &mut self.leases[i];
        let name = w.name.as_str();
        let here = running.contains(&w.daemon);
        let sent = Instant::now();
        match lease {
            Lease::Held { .. } if !here => {
                let why = format!("{} does not run here", w.daemon);
                self.release(i, budget, &why).await;
            }
            // Renewed recently enough that the next round still comes within a third of the
            // TTL of it: nothing to do yet.
            Lease::Held { renewed, .. }
                if sent + attempt_every(self.ttl) < *renewed + self.ttl / 3 => {}
            Lease::Held {
                revision,
                renewed,
                since,
            } => {
                let value = holder_bytes(&self.node, since);
                if let Ok(Ok(rev)) =
                    tokio::time::timeout(budget, self.store.update(name, value.into(), *revision))
                        .await
                {
                    *revision = rev;
                    *renewed = sent;
                }
            }
            Lease::Standby if !here => {}
            Lease::Standby => {
                let since = ringrift::timefmt::now_rfc3339();
                let value = holder_bytes(&self.node, &since);
                if let Ok(Ok(revision)) =
                    tokio::time::timeout(budget, self.store.create(name, value.into())).await
                {
                    self.log.info(&format!(
                        "cluster: lease {name} acquired at {since} (fencing token {revision})"
                    ));
                    *lease = Lease::Held {
                        revision,
                        renewed: sent,
                        since,
                    };
                }
            }
        }
    }

    /// Hands lease `i` over now, if held: the daemon no longer acts under it. The delete is a
    /// compare-and-set on the held revision; if it fails, the key expires after the TTL.
    async fn release(&mut self, i: usize, budget: Duration, why: &str) {
        let (w, lease) = &mut self.leases[i];
        let Lease::Held { revision, .. } = *lease else {
            return;
        };
        *lease = Lease::Standby;
        let deleted = tokio::time::timeout(
            budget,
            self.store
                .delete_expect_revision(w.name.as_str(), Some(revision)),
        )
        .await;
        self.log.info(&format!(
            "cluster: lease {} released at {} (fencing token {revision}): {why}{}",
            w.name,
            ringrift::timefmt::now_rfc3339(),
            if matches!(deleted, Ok(Ok(()))) {
                ""
            } else {
                "; it expires after its TTL"
            }
        ));
    }

    /// Releases every held lease (bounded by the budget of each call).
    async fn release_all(&mut self, why: &str) {
        for i in 0..self.leases.len() {
            let budget = self.budget();
            self.release(i, budget, why).await;
        }
    }

    /// Lease `i` as the core and `cluster status` see it: this node's, or whoever the bucket
    /// says holds it.
    async fn info(&self, i: usize) -> LeaseInfo {
        let (w, lease) = &self.leases[i];
        match lease {
            Lease::Held {
                revision, since, ..
            } => LeaseInfo {
                leader: true,
                holder: Some(self.node.clone()),
                token: *revision,
                config_key: w.config_key.clone(),
                since: Some(since.clone()),
            },
            Lease::Standby => {
                let holder = match tokio::time::timeout(
                    self.budget(),
                    self.store.get(w.name.as_str()),
                )
                .await
                {
                    Ok(Ok(Some(bytes))) => serde_json::from_slice::<Holder>(&bytes).ok(),
                    _ => None,
                };
                LeaseInfo {
                    leader: false,
                    since: holder
                        .as_ref()
                        .map(|h| h.since.clone())
                        .filter(|s| !s.is_empty()),
                    holder: holder.map(|h| h.node),
                    token: 0,
                    config_key: w.config_key.clone(),
                }
            }
        }
    }

    /// Tells the core of a change of lease `i`. The token changes at every renewal: the core
    /// hears every change (it stamps the token on the daemon's events) and tells the worker of a
    /// change of holder only.
    fn tell(&mut self, i: usize, info: LeaseInfo) {
        let w = &self.leases[i].0;
        if self.told.get(&w.name) != Some(&info) {
            self.told.insert(w.name.clone(), info.clone());
            let _ = self.core.send(Msg::Lease {
                daemon: w.daemon.clone(),
                lease: info,
            });
        }
    }
}

fn holder_bytes(node: &str, since: &str) -> Vec<u8> {
    serde_json::to_vec(&Holder {
        node: node.to_string(),
        since: since.to_string(),
    })
    .expect("a holder serializes")
}
