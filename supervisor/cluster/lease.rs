//! Leases of cluster-scoped daemons (issue 12, part 3): one key per daemon in the KV bucket
//! `ringrift_leases`, whose max age is `cluster.lease_ttl`. The core passes each change to the
//! daemon's worker (`FromSupervisor::Lease`), which takes work only while this node holds it.
//!
//! A node takes a free lease with `create` (create-if-absent) and keeps it with `update` against
//! the revision it holds (compare-and-set); the revision is the fencing token. It renews every
//! third of the TTL, and steps down by itself once two thirds of the TTL have passed without a
//! renewal it saw acknowledged, so it stops holding before the key can expire on the server and
//! another node can take it (fail closed: never two holders at once). A node that dies stops
//! renewing; the key expires after the TTL and the next `create` of another node wins.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use ringrift::config::ClusterConfig;
use serde::{Deserialize, Serialize};

use ringrift::protocol::LeaseInfo;
use tokio::sync::mpsc;

use super::View;
use crate::core::Msg;
use crate::logwriter::SupervisorLog;

/// The lease bucket.
pub(crate) const BUCKET: &str = "ringrift_leases";

/// What a lease key holds.
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    node: String,
    /// When this holder took the lease: unix seconds.
    since_unix: f64,
}

/// This node's view of one lease.
enum Lease {
    /// Held since `since` (unix seconds), at `revision` (the fencing token), last renewal
    /// acknowledged for a request sent at `renewed`.
    Held {
        revision: u64,
        renewed: Instant,
        since: f64,
    },
    /// Held by another node, or by nobody this node could see.
    Standby,
}

/// Makes (or finds) the lease bucket and keeps this node's leases of `daemons`.
pub(crate) async fn start(
    js: &jetstream::Context,
    cfg: &ClusterConfig,
    daemons: Vec<String>,
    view: View,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) -> Result<(), String> {
    if daemons.is_empty() {
        return Ok(());
    }
    let ttl = cfg.lease_ttl;
    let (_, store) = super::kv_bucket(js, BUCKET, ttl, super::replicas(cfg)).await?;
    tokio::spawn(keep(
        store,
        cfg.node_id.clone(),
        ttl,
        daemons,
        view,
        core,
        log,
    ));
    Ok(())
}

async fn keep(
    store: kv::Store,
    node: String,
    ttl: Duration,
    daemons: Vec<String>,
    view: View,
    core: mpsc::UnboundedSender<Msg>,
    log: Arc<SupervisorLog>,
) {
    // What each daemon's worker was last told (the core starts them in standby).
    let mut told: BTreeMap<String, LeaseInfo> = BTreeMap::new();
    let mut leases: BTreeMap<String, Lease> =
        daemons.into_iter().map(|d| (d, Lease::Standby)).collect();
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut holders = BTreeMap::new();
        let running: Vec<String> = {
            let v = view.lock().expect("cluster view lock");
            v.nodes
                .iter()
                .find(|n| n.record.node_id == node)
                .map(|n| {
                    n.record
                        .daemons
                        .iter()
                        .filter(|(_, s)| s.satisfies_dependents())
                        .map(|(d, _)| d.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        for (daemon, lease) in leases.iter_mut() {
            let sent = Instant::now();
            let here = running.contains(daemon);
            if !here && let Lease::Held { revision, .. } = lease {
                // Not running here any more: stop renewing; the key expires after the TTL.
                log.info(&format!(
                    "cluster: lease {daemon} released at {} (fencing token {revision}): it does not run here",
                    ringrift::timefmt::now_rfc3339()
                ));
                *lease = Lease::Standby;
            }
            match lease {
                Lease::Held {
                    revision,
                    renewed,
                    since,
                } => {
                    if renewed.elapsed() > ttl * 2 / 3 {
                        log.warn(&format!(
                            "cluster: lease {daemon} lost at {}: not renewed for {:.1}s (fencing token {revision}); standing by",
                            ringrift::timefmt::now_rfc3339(),
                            renewed.elapsed().as_secs_f64()
                        ));
                        *lease = Lease::Standby;
                    } else {
                        let value = holder_bytes(&node, *since);
                        if let Ok(Ok(rev)) = tokio::time::timeout(
                            ttl / 3,
                            store.update(daemon.as_str(), value.into(), *revision),
                        )
                        .await
                        {
                            *revision = rev;
                            *renewed = sent;
                        }
                    }
                }
                Lease::Standby if !here => {}
                Lease::Standby => {
                    let since = super::unix_now();
                    let value = holder_bytes(&node, since);
                    if let Ok(Ok(revision)) =
                        tokio::time::timeout(ttl / 3, store.create(daemon.as_str(), value.into()))
                            .await
                    {
                        log.info(&format!(
                            "cluster: lease {daemon} acquired at {} (fencing token {revision})",
                            ringrift::timefmt::now_rfc3339()
                        ));
                        *lease = Lease::Held {
                            revision,
                            renewed: sent,
                            since,
                        };
                    }
                }
            }
            let holder = match lease {
                Lease::Held { .. } => Some(node.clone()),
                Lease::Standby => match store.get(daemon.as_str()).await {
                    Ok(Some(bytes)) => serde_json::from_slice::<Holder>(&bytes)
                        .ok()
                        .map(|h| h.node),
                    _ => None,
                },
            };
            let info = LeaseInfo {
                leader: matches!(lease, Lease::Held { .. }),
                holder: holder.clone(),
                token: match lease {
                    Lease::Held { revision, .. } => *revision,
                    Lease::Standby => 0,
                },
            };
            // The token changes at every renewal; the worker hears of a change of holder only.
            let changed = told
                .get(daemon)
                .is_none_or(|t| t.leader != info.leader || t.holder != info.holder);
            if changed {
                told.insert(daemon.clone(), info.clone());
                let _ = core.send(Msg::Lease {
                    daemon: daemon.clone(),
                    lease: info,
                });
            }
            holders.insert(daemon.clone(), holder);
        }
        if core.is_closed() {
            return;
        }
        view.lock().expect("cluster view lock").leases = holders;
    }
}

fn holder_bytes(node: &str, since_unix: f64) -> Vec<u8> {
    serde_json::to_vec(&Holder {
        node: node.to_string(),
        since_unix,
    })
    .expect("a holder serializes")
}
