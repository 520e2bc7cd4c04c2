//! `queue list|show|retry|cancel`: the work queue. On a single node it is `data/work_queue.db`,
//! read and changed by the CLI process itself, so it works whether or not the supervisor runs
//! (SQLite's locking, WAL and a busy timeout, keeps the CLI and the daemons out of each other's
//! way). On a node in a cluster it is the cluster's shared queue on JetStream, which the CLI asks
//! its supervisor about (the supervisor is the node's only client of the bus).

use ringrift::protocol::QueueRequest;
use ringrift::work_queue::{Item, OpError, WorkQueue};

use super::*;

/// What to do with the queue.
pub(crate) enum QueueAction {
    /// The items with a status (all when None), newest first, at most `limit`.
    List { status: Option<String>, limit: u64 },
    /// One item.
    Show { id: i64 },
    /// A failed or timed-out item is pending again.
    Retry { id: i64 },
    /// A pending or claimed item becomes failed ("cancelled by the operator").
    Cancel { id: i64 },
}

/// Runs `action` on the root's queue; exit 0, 1 when the queue cannot be read or the item is not
/// in a status the action applies to, 2 for an unknown item or status.
pub(crate) fn queue(root: &Path, action: QueueAction, json: bool) -> i32 {
    let path = root.join("data/work_queue.db");
    if !path.exists() {
        if json {
            println!("[]");
        } else {
            println!(
                "no work queue yet: {} does not exist (queue_populator makes it)",
                path.display()
            );
        }
        return if matches!(action, QueueAction::List { .. }) {
            0
        } else {
            EXIT_USAGE
        };
    }
    let q = match WorkQueue::open(&path) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_FAILED;
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let changed = |r: Result<Item, OpError>, what: &str| match r {
        Ok(item) => {
            if json {
                print_json(&item);
            } else {
                println!("work item {} {what}: now {}", item.id, item.status);
            }
            0
        }
        Err(e @ OpError::NotFound(_)) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAILED
        }
    };
    match action {
        QueueAction::List { status, limit } => {
            if let Some(s) = &status
                && !ringrift::work_queue::STATUSES.contains(&s.as_str())
            {
                eprintln!(
                    "error: unknown status '{s}' (statuses: {})",
                    ringrift::work_queue::STATUSES.join(", ")
                );
                return EXIT_USAGE;
            }
            match q.list(status.as_deref(), limit) {
                Ok(items) if json => {
                    print_json(&items);
                    0
                }
                Ok(items) => {
                    print!("{}", items_table(&items, now));
                    match q.counts() {
                        Ok(counts) => println!(
                            "{}",
                            ringrift::work_queue::STATUSES
                                .iter()
                                .map(|s| format!("{s} {}", counts.get(*s).copied().unwrap_or(0)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        Err(e) => eprintln!("error: {e:#}"),
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    EXIT_FAILED
                }
            }
        }
        QueueAction::Show { id } => match q.item(id) {
            Ok(Some(item)) if json => {
                print_json(&item);
                0
            }
            Ok(Some(item)) => {
                print!("{}", item_text(&item, now));
                0
            }
            Ok(None) => {
                eprintln!("error: {}", OpError::NotFound(id));
                EXIT_USAGE
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                EXIT_FAILED
            }
        },
        QueueAction::Retry { id } => changed(q.retry(id, now), "retried"),
        QueueAction::Cancel { id } => changed(q.cancel(id, now), "cancelled"),
    }
}

/// The statuses an item of the shared queue can have (completed items leave the stream).
const SHARED_STATUSES: &[&str] = &["pending", "running", "failed"];

/// Runs `action` on the cluster's shared queue through this node's supervisor; the same exit
/// codes as [`queue`].
pub(crate) fn shared_queue(client: &mut Client, action: QueueAction, json: bool) -> i32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let (request, what) = match &action {
        QueueAction::List { status, limit } => {
            if let Some(s) = status
                && !SHARED_STATUSES.contains(&s.as_str())
            {
                eprintln!(
                    "error: unknown status '{s}' (statuses of the shared queue: {}; a completed \
                     item leaves it)",
                    SHARED_STATUSES.join(", ")
                );
                return EXIT_USAGE;
            }
            (
                QueueRequest::List {
                    status: status.clone(),
                    limit: *limit,
                },
                "",
            )
        }
        QueueAction::Show { id } => (QueueRequest::Show { id: *id }, ""),
        QueueAction::Retry { id } => (QueueRequest::Retry { id: *id }, "queued again"),
        QueueAction::Cancel { id } => (QueueRequest::Cancel { id: *id }, "cancelled"),
    };
    let (items, counts) = match client.call(&Request::Queue(request), Duration::from_secs(30)) {
        Ok(FromSupervisor::QueueItems { items, counts }) => (items, counts),
        Ok(other) => return report(&other),
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
    };
    match action {
        QueueAction::List { .. } if json => print_json(&items),
        QueueAction::List { .. } => {
            print!("{}", items_table(&items, now));
            println!(
                "{} (the cluster's shared queue)",
                SHARED_STATUSES
                    .iter()
                    .map(|s| format!("{s} {}", counts.get(*s).copied().unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        QueueAction::Show { .. } => match items.first() {
            Some(item) if json => print_json(item),
            Some(item) => print!("{}", item_text(item, now)),
            None => {}
        },
        QueueAction::Retry { id } | QueueAction::Cancel { id } => match items.first() {
            Some(item) if json => print_json(item),
            Some(item) if item.id != id => {
                println!(
                    "work item {id} {what}: now item {} ({})",
                    item.id, item.status
                )
            }
            Some(item) => println!("work item {id} {what}: now {}", item.status),
            None => {}
        },
    }
    0
}

fn print_json<T: serde::Serialize>(v: &T) {
    let mut text = serde_json::to_string_pretty(v).expect("items serialize");
    text.push('\n');
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// How long ago a unix time was, as `status` shows ages; `-` for none.
fn ago(t: Option<f64>, now: f64) -> String {
    t.map_or("-".into(), |t| {
        format!("{} ago", human_duration((now - t).max(0.0)))
    })
}

fn items_table(items: &[Item], now: f64) -> String {
    let rows: Vec<[String; 7]> = items
        .iter()
        .map(|i| {
            [
                i.id.to_string(),
                i.item_type.clone(),
                i.status.clone(),
                i.config["config_key"].as_str().unwrap_or("-").to_string(),
                i.attempts.to_string(),
                ago(Some(i.created_at), now),
                match (&i.error, &i.node) {
                    (Some(e), Some(node)) => format!("{e} (on {node})"),
                    (Some(e), None) => e.clone(),
                    (None, _) => i.claimed_by.clone().unwrap_or_default(),
                },
            ]
        })
        .collect();
    table(
        [
            "ID",
            "TYPE",
            "STATUS",
            "KEY",
            "ATTEMPTS",
            "ADDED",
            "CLAIMED BY / ERROR",
        ],
        &rows,
    )
}

fn item_text(i: &Item, now: f64) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    format!(
        "work item {}\n  type:       {}\n  status:     {}\n  priority:   {}\n  config:     {}\n  attempts:   {}\n  added:      {}\n  claimed:    {}\n  ended:      {}\n  error:      {}\n",
        i.id,
        i.item_type,
        i.status,
        i.priority,
        i.config,
        i.attempts,
        ago(Some(i.created_at), now),
        match (&i.claimed_at, &i.claimed_by) {
            (Some(_), by) => format!("{} by {}", ago(i.claimed_at, now), opt(by)),
            (None, _) => "-".into(),
        },
        ago(i.completed_at, now),
        opt(&i.error),
    ) + &i
        .node
        .as_ref()
        .map(|n| format!("  node:       {n}\n"))
        .unwrap_or_default()
}
