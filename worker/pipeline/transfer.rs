//! Moving files between this node and others, for the daemons that do it (auto_sync and
//! ephemeral_sync push games DB snapshots, model_distribution pushes canonical models,
//! cluster_data_sync fetches peers' snapshots): where a file goes ([`Target`], read from the
//! `targets`/`peers` setting by [`specs`] and [`resolve`]), a verified copy ([`copy_local`], [`copy_remote`],
//! tried several times by [`Delivery::deliver`]), the backoff of a destination that keeps
//! failing ([`Failing`]) and the pass bookkeeping behind their health ([`Passes`]).
//!
//! A local copy goes to a hidden temporary file, is fsynced, renamed into place and hashed again
//! (SHA-256); a `host:path` copy is `rsync -a` over ssh (a child process with a timeout, killed if
//! it overruns), verified with `sha256sum` there.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::sha256;
use crate::daemons::Report;
use crate::runtime::Settings;

/// Where a file goes (or, for cluster_data_sync, comes from): a local directory or `host:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Local(PathBuf),
    /// `host:path`, copied with rsync over ssh.
    Remote {
        host: String,
        path: String,
    },
}

/// `host:path` (no `/` before the colon) is remote; anything else is a local directory, relative
/// paths taken from the root.
pub(super) fn parse_target(spec: &str, root: &Path) -> Target {
    if let Some((host, path)) = spec.split_once(':')
        && !host.is_empty()
        && !host.contains('/')
        && !spec.starts_with('.')
        && !spec.starts_with('~')
    {
        return Target::Remote {
            host: host.to_string(),
            path: path.to_string(),
        };
    }
    Target::Local(root.join(spec))
}

/// The `targets` (or `peers`) setting: a list of strings, blanks dropped (see [`resolve`]).
pub(super) fn specs(settings: &Settings, key: &str) -> anyhow::Result<Vec<String>> {
    let specs: Vec<String> = match settings.config.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{key} must be a list of strings"))
            })
            .collect::<anyhow::Result<_>>()?,
        Some(other) => bail!("{key} must be a list of strings, not {other}"),
    };
    Ok(specs.into_iter().filter(|s| !s.trim().is_empty()).collect())
}

/// The cluster view the supervisor writes at each heartbeat (`run/cluster.json`, the JSON of
/// `cluster status --json`), from which `role:` entries are resolved. Absent when this node is not
/// in a cluster (the supervisor removes it at start).
pub(crate) const CLUSTER_VIEW: &str = "run/cluster.json";

/// The cluster view under `root`, if this node is in a cluster and the supervisor wrote one.
pub(crate) fn cluster_view(root: &Path) -> Option<ringrift::protocol::ClusterReport> {
    let bytes = std::fs::read(root.join(CLUSTER_VIEW)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What the files of a `role:` or `incoming` entry are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// auto_sync's games DB snapshots: `role:<role>` is `<data_address>/data/incoming/games/<this
    /// node>` of every other node with the role.
    Games,
    /// model_distribution's canonical models: `role:<role>` is `<data_address>/models` of every
    /// other node with the role, where they replace that node's canonical models.
    Models,
    /// cluster_data_sync's peers: `incoming` is every directory other nodes pushed their games to
    /// here (`data/incoming/games/<node>`).
    Pulled,
}

/// What a daemon whose configured entries resolve to no location says: `role:` entries while no
/// other node has the role (or the node is not in a cluster), `incoming` while nothing was pushed.
/// Other nodes a `role:` entry would name that publish no usable `data_address` are listed, as
/// they cannot be sent anything until they do.
pub(super) fn idle_message(configured: &[String], what: &str, root: Option<&Path>) -> String {
    let unreachable = root.map(|r| unaddressed(configured, r)).unwrap_or_default();
    format!(
        "no {what} now: {} name no node yet (resolved again every pass){}",
        configured.join(", "),
        if unreachable.is_empty() {
            String::new()
        } else {
            format!(
                "; {} ha{} the role but no usable cluster.data_address",
                unreachable.join(", "),
                if unreachable.len() == 1 { "s" } else { "ve" }
            )
        }
    )
}

/// The other nodes with a role a `role:` entry names that publish no usable `data_address`.
pub(super) fn unaddressed(specs: &[String], root: &Path) -> Vec<String> {
    let Some(v) = cluster_view(root) else {
        return Vec::new();
    };
    let roles: Vec<&str> = specs
        .iter()
        .filter_map(|s| s.strip_prefix("role:"))
        .collect();
    v.nodes
        .iter()
        .map(|n| &n.record)
        .filter(|r| r.node_id != v.node_id && r.roles.iter().any(|x| roles.contains(&x.as_str())))
        .filter(|r| {
            !r.data_address
                .as_ref()
                .is_some_and(|a| ringrift::config::valid_data_address(a))
        })
        .map(|r| r.node_id.clone())
        .collect()
}

/// The configured entries as locations now (read again each pass, as nodes come and go): a
/// directory or `host:path` as is; `role:<role>` (in a cluster) the nodes with that role in the
/// view the supervisor keeps ([`CLUSTER_VIEW`]; none while there is no view, this node itself
/// never); `incoming` the directories under `data/incoming/games/`. The string naming each is
/// what the daemon keeps its per-location state under.
pub(super) fn resolve(specs: &[String], root: &Path, purpose: Purpose) -> Vec<(String, Target)> {
    let mut view: Option<Option<ringrift::protocol::ClusterReport>> = None;
    let mut out = Vec::new();
    for spec in specs {
        if let Some(role) = spec.strip_prefix("role:") {
            let view = view.get_or_insert_with(|| cluster_view(root));
            let Some(v) = view.as_ref() else { continue };
            for n in &v.nodes {
                let r = &n.record;
                if r.node_id == v.node_id || !r.roles.iter().any(|x| x == role) {
                    continue;
                }
                // An address from the bus is checked as this node's own config would be.
                let Some(addr) = r
                    .data_address
                    .as_ref()
                    .filter(|a| ringrift::config::valid_data_address(a))
                else {
                    continue;
                };
                let sub = match purpose {
                    Purpose::Games => format!("data/incoming/games/{}", v.node_id),
                    Purpose::Models => "models".to_string(),
                    Purpose::Pulled => continue,
                };
                let at = format!("{}/{sub}", addr.trim_end_matches('/'));
                out.push((at.clone(), parse_target(&at, root)));
            }
        } else if spec == "incoming" {
            let dir = root.join("data/incoming/games");
            let mut nodes: Vec<String> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.'))
                .collect();
            nodes.sort();
            for n in nodes {
                out.push((format!("incoming/{n}"), Target::Local(dir.join(&n))));
            }
        } else {
            out.push((spec.clone(), parse_target(spec, root)));
        }
    }
    out
}

/// Copies `src` into directory `dir` as the same file name: temporary file, fsync, rename, then
/// checks the SHA-256 of what landed. Returns the hash.
pub(super) fn copy_local(src: &Path, dir: &Path) -> anyhow::Result<String> {
    let name = src
        .file_name()
        .context("model path has no name")?
        .to_string_lossy()
        .to_string();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let want = sha256::hex_of(&bytes);
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(&name);
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot rename into {}", dest.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let got =
        sha256::file_hex(&dest).with_context(|| format!("cannot read back {}", dest.display()))?;
    if got != want {
        bail!(
            "{} has SHA-256 {got} after copying, expected {want}",
            dest.display()
        );
    }
    Ok(want)
}

/// The directory of a `host:path` target as rsync and the remote shell should see it: `.` for an
/// empty path, else the path without trailing slashes.
pub(super) fn remote_dir(path: &str) -> &str {
    if path.is_empty() {
        "."
    } else {
        path.trim_end_matches('/')
    }
}

/// Single-quotes `s` for the remote shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs a command with a timeout; the child is killed if it overruns. Returns its stdout.
pub(super) async fn run(
    program: &str,
    args: &[String],
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => bail!("{program} timed out after {}s", timeout.as_secs_f64()),
        Ok(r) => r.with_context(|| format!("cannot run {program}"))?,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{program} failed ({}): {}", out.status, err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pipeline.ssh` as rsync's `-e` wants it: one string, words separated by spaces, a word with
/// spaces or quotes in quotes (rsync(1), `--rsh`: "single- and/or double-quotes to preserve
/// spaces in an argument (but not backslashes)").
pub(super) fn rsh(ssh: &[String]) -> String {
    ssh.iter()
        .map(|w| {
            if !w.is_empty() && !w.contains([' ', '\'', '"']) {
                w.clone()
            } else if w.contains('"') {
                format!("'{w}'")
            } else {
                format!("\"{w}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// rsync to `host:path/` over `ssh` (`pipeline.ssh`), then `sha256sum` there. Returns the hash.
pub(super) async fn copy_remote(
    src: &Path,
    host: &str,
    path: &str,
    timeout: Duration,
    ssh: &[String],
) -> anyhow::Result<String> {
    let name = src
        .file_name()
        .context("model path has no name")?
        .to_string_lossy()
        .to_string();
    let want = sha256::file_hex(src).with_context(|| format!("cannot read {}", src.display()))?;
    let dir = remote_dir(path);
    let remote_file = format!("{dir}/{name}");
    let args = vec![
        "-a".to_string(),
        "--mkpath".to_string(),
        "-e".to_string(),
        rsh(ssh),
        src.display().to_string(),
        format!("{host}:{remote_file}"),
    ];
    run("rsync", &args, timeout).await?;
    let (program, options) = ssh.split_first().context("pipeline.ssh is empty")?;
    let mut check = options.to_vec();
    check.push(host.to_string());
    check.push(format!("sha256sum -- {}", shell_quote(&remote_file)));
    let out = run(program, &check, timeout).await?;
    let got = out.split_whitespace().next().unwrap_or_default();
    if got != want {
        bail!("{host}:{remote_file} has SHA-256 {got:?} after copying, expected {want}");
    }
    Ok(want)
}

/// Why [`fetch_file`] fetched nothing.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    /// The source has no such file (rsync: "No such file or directory").
    #[error("{name} is not there: {cause:#}")]
    Missing { name: String, cause: anyhow::Error },
    /// It arrived with other content than asked for (changed at the source since).
    #[error("{name} arrived with SHA-256 {got}, not the {want} asked for")]
    Changed {
        name: String,
        got: String,
        want: String,
    },
    /// Anything else: the copy, the hash or the rename failed.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// Copies the file `name` of directory `from` (a local directory, or `host:path` fetched with
/// rsync over `ssh`, which copies only a regular file) to `dest`, by way of a hidden temporary
/// file beside it that is renamed into place only if its SHA-256 is `want` (hex).
pub(super) async fn fetch_file(
    from: &Target,
    name: &str,
    dest: &Path,
    want: &str,
    timeout: Duration,
    ssh: &[String],
) -> Result<(), FetchError> {
    let dir = dest.parent().context("the destination has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.fetch"));
    let _ = std::fs::remove_file(&tmp);
    let missing = |cause: anyhow::Error| FetchError::Missing {
        name: name.to_string(),
        cause,
    };
    match from {
        Target::Local(src) => {
            // Off the daemon's thread: a large model must not hold up its progress messages.
            let (from, to) = (src.join(name), tmp.clone());
            let copied = tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
                .await
                .context("the copy panicked")?;
            match copied {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(missing(e.into()));
                }
                Err(e) => {
                    let e = anyhow::Error::from(e);
                    return Err(e
                        .context(format!("cannot copy {}", src.join(name).display()))
                        .into());
                }
                Ok(_) => {}
            }
        }
        Target::Remote { host, path } => {
            let args = vec![
                "--times".to_string(),
                "-e".to_string(),
                rsh(ssh),
                format!("{host}:{}/{name}", remote_dir(path)),
                tmp.display().to_string(),
            ];
            match run("rsync", &args, timeout).await {
                // rsync(1) reports a missing source as the system's ENOENT text.
                Err(e) if format!("{e:#}").contains("No such file or directory") => {
                    return Err(missing(e));
                }
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
        }
    }
    let got = sha256::file_hex(&tmp).with_context(|| format!("{name} did not arrive"))?;
    if got != want {
        let _ = std::fs::remove_file(&tmp);
        return Err(FetchError::Changed {
            name: name.to_string(),
            got,
            want: want.to_string(),
        });
    }
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot move {name} into place"))?;
    Ok(())
}

/// Seconds before retry `attempt` (1-based) of a copy.
pub(super) fn retry_delay(attempt: u32, base: f64) -> f64 {
    base * f64::from(1u32 << attempt.saturating_sub(1).min(10))
}

/// Seconds before a target that failed `passes` whole passes in a row (each of `retries`
/// attempts) is tried again: it goes on doubling past the in-pass retries, up to an hour, so a dead
/// target is neither hammered every cycle nor given up on.
pub(super) fn pass_backoff(passes: u32, base: f64, retries: u32) -> f64 {
    let doublings = (retries + passes.saturating_sub(1)).min(20);
    (base.max(1.0) * f64::from(1u32 << doublings)).min(3600.0)
}

/// Every attempt of a delivery failed; the message is the last attempt's error with its causes.
#[derive(Debug, thiserror::Error)]
#[error("{last:#}")]
pub(super) struct DeliveryFailed {
    pub(super) last: anyhow::Error,
}

/// How a daemon delivers files: its `retries`, `retry_backoff` and `timeout` settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Delivery {
    /// Attempts per delivery (at least one is made).
    pub(super) retries: u32,
    /// Seconds before the first retry; doubles per attempt.
    pub(super) retry_backoff: f64,
    /// How long one rsync or ssh may run.
    pub(super) timeout: Duration,
    /// `pipeline.ssh`.
    pub(super) ssh: Vec<String>,
}

impl Delivery {
    /// Copies `src` to `target` (see [`copy_local`], [`copy_remote`]): see [`deliver`].
    pub(super) async fn deliver(
        &self,
        who: &str,
        src: &Path,
        target: &Target,
    ) -> Result<String, DeliveryFailed> {
        deliver(
            who,
            src,
            target,
            self.retries,
            self.retry_backoff,
            self.timeout,
            &self.ssh,
        )
        .await
    }

    /// Records one more failed pass of (`spec`, `key`), backing off from `retry_backoff` past
    /// the in-pass retries (see [`record_failure`]).
    pub(super) fn record_failure<T>(
        &self,
        failing: &mut FailingMap<T>,
        id: (&str, &str),
        on: T,
        same: impl Fn(&T, &T) -> bool,
        error: String,
    ) {
        record_failure(
            failing,
            id,
            on,
            same,
            error,
            self.retry_backoff,
            self.retries,
        );
    }
}

impl std::fmt::Display for Delivery {
    /// `3 attempts, backoff 5s`, for the start-up line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} attempts, backoff {}s",
            self.retries, self.retry_backoff
        )
    }
}

/// Copies `src` to `target` (see [`copy_local`], [`copy_remote`]), up to `retries` attempts (at
/// least one) with [`retry_delay`] from `retry_backoff` seconds between them; each failed attempt
/// is logged as `<who>: attempt N of M: <error>`. Returns the verified SHA-256.
async fn deliver(
    who: &str,
    src: &Path,
    target: &Target,
    retries: u32,
    retry_backoff: f64,
    timeout: Duration,
    ssh: &[String],
) -> Result<String, DeliveryFailed> {
    let attempts = retries.max(1);
    let mut attempt = 1;
    loop {
        let result = match target {
            Target::Local(dir) => copy_local(src, dir),
            Target::Remote { host, path } => copy_remote(src, host, path, timeout, ssh).await,
        };
        match result {
            Ok(sha) => return Ok(sha),
            Err(last) => {
                eprintln!("{who}: attempt {attempt} of {attempts}: {last:#}");
                if attempt >= attempts {
                    return Err(DeliveryFailed { last });
                }
            }
        }
        let delay = retry_delay(attempt, retry_backoff);
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        attempt += 1;
    }
}

/// A (destination spec, config key) that failed whole passes in a row: when to try again, and
/// `on`, what it failed on (a daemon-specific fact: the model's hash, the peer file's fingerprint).
#[derive(Debug, Clone)]
pub(super) struct Failing<T> {
    pub(super) on: T,
    pub(super) failed_passes: u32,
    pub(super) next_try: f64,
    pub(super) error: String,
}

impl<T> Failing<T> {
    /// While backing off at `now` (unix seconds): `<what>: <error> (next try in Ns)`, the line
    /// for the pass summary; `None` once it is time to try again.
    pub(super) fn waiting(&self, now: f64, what: &str) -> Option<String> {
        (now < self.next_try).then(|| {
            format!(
                "{what}: {}{NEXT_TRY}{:.0}s)",
                self.error,
                self.next_try - now
            )
        })
    }
}

/// What marks a [`Failing::waiting`] line: a failure already logged when it happened.
const NEXT_TRY: &str = " (next try in ";

/// The failures a daemon is backing off from, by (destination spec, config key).
pub(super) type FailingMap<T> = BTreeMap<(String, String), Failing<T>>;

/// Records one more failed pass of (`spec`, `key`) on `on`: the count goes on from the previous
/// failure when `same` says it failed on the same thing, and the next try waits [`pass_backoff`]
/// from `base` seconds past `retries` in-pass attempts (from now).
pub(super) fn record_failure<T>(
    failing: &mut FailingMap<T>,
    (spec, key): (&str, &str),
    on: T,
    same: impl Fn(&T, &T) -> bool,
    error: String,
    base: f64,
    retries: u32,
) {
    let id = (spec.to_string(), key.to_string());
    let passes = failing
        .get(&id)
        .filter(|f| same(&f.on, &on))
        .map_or(1, |f| f.failed_passes + 1);
    failing.insert(
        id,
        Failing {
            on,
            failed_passes: passes,
            next_try: super::now_secs() + pass_backoff(passes, base, retries),
            error,
        },
    );
}

/// The pass bookkeeping of a daemon that works in passes over its destinations: how many passes,
/// the last one's summary and whether it went well, and the last error with its time.
#[derive(Debug, Default)]
pub(super) struct Passes {
    pub(super) count: u64,
    pub(super) last: String,
    pub(super) ok: bool,
    pub(super) last_error: Option<String>,
}

impl Passes {
    /// Ends a pass at `when`: the summary is `parts` joined with "; ", plus `FAILED <failures>`
    /// when any failed, kept as the last error. The failures of this pass are logged on stderr as
    /// `<who>: ...`; those only waiting out their backoff are not logged again at every pass.
    pub(super) fn end(
        &mut self,
        who: &str,
        when: &str,
        mut parts: Vec<String>,
        failures: &[String],
    ) {
        self.ok = failures.is_empty();
        if !failures.is_empty() {
            parts.push(format!("FAILED {}", failures.join("; ")));
            let new: Vec<&str> = failures
                .iter()
                .map(String::as_str)
                .filter(|f| !f.contains(NEXT_TRY))
                .collect();
            if !new.is_empty() {
                eprintln!("{who}: {}", new.join("; "));
            }
            self.last_error = Some(format!("{when} {}", failures.join("; ")));
        }
        self.last = parts.join("; ");
    }

    /// The daemon's report: health from [`super::pass_health`] (`idle_message` while no
    /// destination is configured), details `<list_name>` (the destination specs), `record`
    /// (what the state file says was delivered) and `last_error`, and the counters with `passes`.
    pub(super) fn report<const N: usize>(
        &self,
        (list_name, specs): (&str, &[(String, Target)]),
        idle_message: &str,
        record: (&str, Value),
        counters: [(&str, u64); N],
    ) -> Report {
        let (healthy, status, message) =
            super::pass_health(!specs.is_empty(), idle_message, &self.last, self.ok);
        let names: Vec<&str> = specs.iter().map(|(s, _)| s.as_str()).collect();
        let mut report = Report::with_status(
            healthy,
            status,
            message,
            BTreeMap::from([
                (list_name.to_string(), json!(names)),
                (record.0.to_string(), record.1),
                ("last_error".to_string(), json!(self.last_error)),
            ]),
            counters,
        );
        report.counters.insert("passes".to_string(), self.count);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_local_dirs_or_host_paths() {
        let root = Path::new("/srv/rr");
        assert_eq!(
            parse_target("/mnt/models", root),
            Target::Local("/mnt/models".into())
        );
        assert_eq!(
            parse_target("shared/models", root),
            Target::Local("/srv/rr/shared/models".into())
        );
        assert_eq!(
            parse_target("./a:b", root),
            Target::Local("/srv/rr/./a:b".into())
        );
        assert_eq!(
            parse_target("gpu1:/data/models", root),
            Target::Remote {
                host: "gpu1".into(),
                path: "/data/models".into()
            }
        );
        assert_eq!(
            parse_target("me@gpu1:models", root),
            Target::Remote {
                host: "me@gpu1".into(),
                path: "models".into()
            }
        );
    }

    #[test]
    fn retries_back_off_exponentially_and_quoting_is_safe() {
        assert_eq!(retry_delay(1, 5.0), 5.0);
        assert_eq!(retry_delay(3, 5.0), 20.0);
        // Between passes: beyond the in-pass retries, capped at an hour.
        assert_eq!(pass_backoff(1, 5.0, 3), 40.0);
        assert_eq!(pass_backoff(2, 5.0, 3), 80.0);
        assert_eq!(pass_backoff(30, 5.0, 3), 3600.0);
        assert_eq!(pass_backoff(1, 0.0, 1), 2.0);
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }

    #[test]
    fn the_ssh_command_is_one_rsync_argument_with_quoted_words() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rsh(&words(&["ssh", "-p", "2222", "-o", "BatchMode=yes"])),
            "ssh -p 2222 -o BatchMode=yes"
        );
        assert_eq!(
            rsh(&words(&[
                "ssh",
                "-i",
                "/keys/my key",
                "-o",
                "ProxyCommand=nc \"h\" 22"
            ])),
            r#"ssh -i "/keys/my key" -o 'ProxyCommand=nc "h" 22'"#
        );
        assert_eq!(rsh(&words(&["ssh", ""])), r#"ssh """#);
    }

    #[test]
    fn nodes_with_a_role_but_no_address_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let node = |id: &str, roles: &[&str], addr: Option<&str>| {
            serde_json::json!({"last_seen_secs": 0.1, "node_id": id, "roles": roles,
                "version": "0", "data_address": addr, "cores": 2, "memory_bytes": 1,
                "free_disk_bytes": 1, "daemons": {}, "jobs": 0, "updated_unix": 0.0})
        };
        let view = serde_json::json!({"node_id": "me", "connected": true, "error": null,
            "nodes": [node("me", &["training"], None), node("t1", &["training"], Some("t1:/srv")),
                      node("t2", &["training"], None), node("t3", &["training"], Some("relative")),
                      node("p1", &["selfplay"], None)]});
        std::fs::write(dir.path().join(CLUSTER_VIEW), view.to_string()).unwrap();
        let specs = vec!["role:training".to_string()];
        assert_eq!(unaddressed(&specs, dir.path()), ["t2", "t3"]);
        let targets: Vec<String> = resolve(&specs, dir.path(), Purpose::Models)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(targets, ["t1:/srv/models"]);
        let msg = idle_message(&specs, "targets", Some(dir.path()));
        assert!(
            msg.ends_with("t2, t3 have the role but no usable cluster.data_address"),
            "{msg}"
        );
    }

    #[test]
    fn a_command_that_overruns_is_killed_and_a_failure_reported() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let err = run("sleep", &["5".into()], Duration::from_millis(100))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("timed out"), "{err}");
            let err = run("false", &[], Duration::from_secs(5)).await.unwrap_err();
            assert!(err.to_string().contains("false failed"), "{err}");
            assert_eq!(
                run("echo", &["hi".into()], Duration::from_secs(5))
                    .await
                    .unwrap(),
                "hi\n"
            );
        });
    }
}
