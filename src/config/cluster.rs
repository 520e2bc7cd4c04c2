//! The `cluster:` section: opt-in membership of a cluster of nodes on NATS JetStream.
//!
//! Off by default: a single node runs exactly as without it, with no server to start. On, the
//! supervisor keeps this node's record in a replicated key-value bucket that expires when the node
//! stops renewing it (see supervisor/cluster.rs and the README's "Cluster" section).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use super::Validator;

/// Keys of the `cluster:` section.
pub(super) const CLUSTER_KEYS: &[&str] = &[
    "enabled",
    "node_id",
    "servers",
    "roles",
    "credentials",
    "user",
    "password",
    "tls",
    "heartbeat_interval",
    "node_expiry",
    "lease_ttl",
    "data_address",
    "cost_per_hour",
    "work_ack_wait",
];
const TLS_KEYS: &[&str] = &["ca", "cert", "key"];

/// The parts of the loop a node can take part in (`cluster.roles`).
pub const ROLES: &[&str] = &["coordinator", "training", "selfplay", "evaluation"];

/// The `cluster:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Whether this node joins a cluster at all (default false: a single node, no NATS).
    pub enabled: bool,
    /// This node's id in the cluster: a lower-case identifier of at most 64 characters (default:
    /// the host name, lower-cased, with characters other than `a-z0-9_-` replaced by `-`).
    pub node_id: String,
    /// NATS server URLs (`nats://127.0.0.1:4222`); at least one when enabled.
    pub servers: Vec<String>,
    /// The parts of the loop this node takes part in, from [`ROLES`] (default: all of them).
    pub roles: Vec<String>,
    /// A NATS credentials file (`.creds`: a user JWT and its nkey seed), if the bus asks for one.
    pub credentials: Option<PathBuf>,
    /// User and password, if the bus asks for them instead.
    pub user: Option<(String, String)>,
    /// TLS: a CA to trust, and a client certificate and key for mutual TLS.
    pub tls: TlsConfig,
    /// Seconds between two renewals of this node's record (0.1 s to 1 hour; default 2 s).
    pub heartbeat_interval: Duration,
    /// A node whose record is this old is gone: NODE_LEFT (at least three heartbeats; 1 s to 1 day;
    /// default 10 s). The bucket's max age: the record expires by itself.
    pub node_expiry: Duration,
    /// How long a leader's lease lasts unless renewed, for cluster-scoped daemons (1 s to 1 hour;
    /// default 10 s).
    pub lease_ttl: Duration,
    /// Where other nodes send this node data: its root as they reach it, a local directory
    /// (`/srv/ringrift`, on a shared or the same machine) or `host:path` (rsync over ssh to
    /// `host`). Games go under `data/incoming/`, models under `models/` there. None: other nodes
    /// cannot send this node anything.
    pub data_address: Option<String>,
    /// What this node costs per hour (any currency, the same on every node): of several idle
    /// nodes, unified_idle_shutdown shuts the costliest down first. None: unknown (cheapest).
    pub cost_per_hour: Option<f64>,
    /// How long a claimed item of the shared work queue stays this node's without a progress
    /// acknowledgement (JetStream's `ack_wait`): the supervisor acknowledges progress every third
    /// of it while the job runs, and an item whose node died is redelivered to another node this
    /// long after its last acknowledgement (1 s to 1 hour; default 30 s, JetStream's own default).
    pub work_ack_wait: Duration,
}

/// `cluster.tls`: files in PEM form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsConfig {
    /// Certificate authority that signed the servers' certificates.
    pub ca: Option<PathBuf>,
    /// This node's client certificate (with `key`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub key: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node_id: default_node_id(),
            servers: Vec::new(),
            roles: ROLES.iter().map(|r| r.to_string()).collect(),
            credentials: None,
            user: None,
            tls: TlsConfig::default(),
            heartbeat_interval: Duration::from_secs(2),
            node_expiry: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            data_address: None,
            cost_per_hour: None,
            work_ack_wait: Duration::from_secs(30),
        }
    }
}

/// A data address other nodes can use as is: an absolute directory (`/srv/ringrift`) or
/// `host:/path` (rsync over ssh to `host`), without spaces, not starting with `-` (it becomes an
/// argument of rsync). A relative path would be taken from the sender's root.
pub fn valid_data_address(a: &str) -> bool {
    if a.is_empty() || a.contains(char::is_whitespace) || a.starts_with('-') {
        return false;
    }
    match a.split_once(':') {
        Some((host, path)) if !host.is_empty() && !host.contains('/') => path.starts_with('/'),
        _ => a.starts_with('/'),
    }
}

/// A server URL fit for a log or a status line: its password, if it carries one, replaced by
/// `***` (`nats://ring:***@10.0.0.1:4222`).
pub fn redact(server: &str) -> String {
    match server.parse::<async_nats::ServerAddr>() {
        Ok(addr) if addr.password().is_some() => {
            let mut url = addr.into_inner();
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(_) => server.to_string(),
        // Not parsed: show no more than the scheme and what follows an '@', if any.
        Err(_) => match server.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => server.to_string(),
        },
    }
}

impl ClusterConfig {
    /// The servers as a log line shows them: passwords in URLs redacted ([`redact`]).
    pub fn servers_shown(&self) -> String {
        self.servers
            .iter()
            .map(|s| redact(s))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Validator<'_> {
    /// The credentials and TLS files of an enabled cluster must exist: relative ones are taken
    /// from `root` (and made absolute here, so the supervisor reads the same file whatever its
    /// working directory).
    pub(super) fn check_cluster_files(&mut self, c: &mut ClusterConfig, root: &std::path::Path) {
        let enabled = c.enabled;
        let mut files: Vec<(&str, &mut Option<PathBuf>)> = vec![
            ("credentials", &mut c.credentials),
            ("ca", &mut c.tls.ca),
            ("cert", &mut c.tls.cert),
            ("key", &mut c.tls.key),
        ];
        for (key, file) in files.iter_mut() {
            let Some(path) = file.as_mut() else { continue };
            if path.is_relative() {
                *path = root.join(&*path);
            }
            if enabled && !path.is_file() {
                let at: &[&str] = if *key == "credentials" {
                    &["cluster", "credentials"]
                } else {
                    &["cluster", "tls", key]
                };
                self.problem(at, format!("{} is not a file", path.display()));
            }
        }
    }
}

/// The host name as a node id: lower-cased, characters other than `a-z0-9_-` replaced by `-`,
/// at most 64 characters; `node` when there is no host name.
pub fn default_node_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let id: String = host
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() { "node".into() } else { id }
}

/// A node id as `cluster.node_id` allows it: 1 to 64 of `a-z0-9_-`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl Validator<'_> {
    /// Reads the `cluster:` section, noting every problem.
    pub(super) fn cluster(&mut self, v: Option<&Value>) -> ClusterConfig {
        let mut c = ClusterConfig::default();
        let empty = Map::new();
        let map = self.mapping(v, &["cluster"]).unwrap_or(&empty);
        self.unknown_keys(map, &["cluster"], CLUSTER_KEYS);
        if let Some(e) = self.boolean(map.get("enabled"), &["cluster", "enabled"]) {
            c.enabled = e;
        }
        if let Some(id) = self.string(map.get("node_id"), &["cluster", "node_id"]) {
            if valid_node_id(&id) {
                c.node_id = id;
            } else {
                self.problem(
                    &["cluster", "node_id"],
                    format!("'{id}' is not a node id: a-z, 0-9, '_' and '-', 1 to 64 characters"),
                );
            }
        }
        if let Some(servers) = self.string_list(map.get("servers"), &["cluster", "servers"]) {
            for s in &servers {
                let ok = ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|p| s.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
                // The client's own parser (the `url` crate, WHATWG rules): a port over 65535 or
                // a malformed host is refused here rather than at the first connection.
                let parsed = s.parse::<async_nats::ServerAddr>();
                if !ok {
                    self.problem(
                        &["cluster", "servers"],
                        format!("'{s}' is not a NATS URL like nats://127.0.0.1:4222"),
                    );
                } else {
                    match parsed {
                        Err(e) => {
                            self.problem(&["cluster", "servers"], format!("'{}': {e}", redact(s)))
                        }
                        Ok(a) if a.port() == 0 => self.problem(
                            &["cluster", "servers"],
                            format!("'{}': port 0 is not a port a server listens on", redact(s)),
                        ),
                        Ok(_) => {}
                    }
                }
            }
            c.servers = servers;
        }
        if c.enabled && c.servers.is_empty() {
            self.problem(
                &["cluster", "servers"],
                "the cluster is enabled but names no NATS server (e.g. [nats://127.0.0.1:4222])",
            );
        }
        if let Some(roles) = self.string_list(map.get("roles"), &["cluster", "roles"]) {
            for r in &roles {
                if !ROLES.contains(&r.as_str()) {
                    self.problem(
                        &["cluster", "roles"],
                        format!("unknown role '{r}' (roles: {})", ROLES.join(", ")),
                    );
                }
            }
            c.roles = roles;
        }
        c.data_address = self.string(map.get("data_address"), &["cluster", "data_address"]);
        if let Some(a) = &c.data_address
            && !valid_data_address(a)
        {
            self.problem(
                &["cluster", "data_address"],
                format!(
                    "'{a}' is not an absolute directory or host:/path (others reach this node's root there; no spaces, not starting with '-')"
                ),
            );
        }
        match map.get("cost_per_hour") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_f64().is_some_and(|x| x.is_finite() && x >= 0.0) => {
                c.cost_per_hour = n.as_f64();
            }
            Some(other) => self.problem(
                &["cluster", "cost_per_hour"],
                format!(
                    "must be a number of at least 0 (what an hour of this node costs), found {}",
                    super::show_value(other)
                ),
            ),
        }
        c.credentials = self
            .string(map.get("credentials"), &["cluster", "credentials"])
            .map(PathBuf::from);
        let user = self.string(map.get("user"), &["cluster", "user"]);
        let password = self.string(map.get("password"), &["cluster", "password"]);
        match (user, password) {
            (Some(u), Some(p)) => c.user = Some((u, p)),
            (None, None) => {}
            _ => self.problem(
                &["cluster", "user"],
                "user and password go together: give both or neither",
            ),
        }
        if c.credentials.is_some() && c.user.is_some() {
            self.problem(
                &["cluster", "credentials"],
                "give a credentials file or a user and password, not both",
            );
        }
        let tls = self
            .mapping(map.get("tls"), &["cluster", "tls"])
            .unwrap_or(&empty);
        self.unknown_keys(tls, &["cluster", "tls"], TLS_KEYS);
        let file = |s: &mut Self, k: &str| {
            s.string(tls.get(k), &["cluster", "tls", k])
                .map(PathBuf::from)
        };
        c.tls = TlsConfig {
            ca: file(self, "ca"),
            cert: file(self, "cert"),
            key: file(self, "key"),
        };
        if c.tls.cert.is_some() != c.tls.key.is_some() {
            self.problem(
                &["cluster", "tls"],
                "cert and key go together: give both or neither",
            );
        }
        let d = |s: &mut Self, k: &str, min: f64, max: f64| {
            s.duration(map.get(k), &["cluster", k], min, max)
        };
        if let Some(x) = d(self, "heartbeat_interval", 0.1, 3600.0) {
            c.heartbeat_interval = x;
        }
        if let Some(x) = d(self, "node_expiry", 1.0, 86_400.0) {
            c.node_expiry = x;
        }
        if let Some(x) = d(self, "lease_ttl", 1.0, 3600.0) {
            c.lease_ttl = x;
        }
        if let Some(x) = d(self, "work_ack_wait", 1.0, 3600.0) {
            c.work_ack_wait = x;
        }
        if c.node_expiry < c.heartbeat_interval * 3 {
            self.problem(
                &["cluster", "node_expiry"],
                format!(
                    "{} seconds is under three heartbeats ({} seconds): one late renewal would \
                     make the node leave",
                    c.node_expiry.as_secs_f64(),
                    (c.heartbeat_interval * 3).as_secs_f64()
                ),
            );
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn problems(yaml: &str) -> Vec<String> {
        match parse(yaml, "test.yaml", &[]) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn off_by_default_with_the_host_name_and_every_role() {
        let c = parse("daemons: {}\n", "test.yaml", &[]).unwrap().cluster;
        assert!(!c.enabled);
        assert!(valid_node_id(&c.node_id), "{}", c.node_id);
        assert_eq!(c.roles, ROLES);
        assert_eq!(c.node_expiry, Duration::from_secs(10));
    }

    #[test]
    fn daemons_use_the_shared_queue_exactly_while_the_node_is_in_a_cluster() {
        let shared = |c: &crate::config::Config| {
            c.daemons["selfplay_scheduler"].settings[crate::config::SHARED_WORK_QUEUE] == true
        };
        let alone = parse("daemons: {}\n", "test.yaml", &[]).unwrap();
        assert!(!shared(&alone));
        let mut on = parse(
            "cluster:\n  enabled: true\n  servers: [nats://127.0.0.1:4222]\n  work_ack_wait: 5s\n",
            "test.yaml",
            &[],
        )
        .unwrap();
        assert!(shared(&on));
        assert_eq!(on.cluster.work_ack_wait, Duration::from_secs(5));
        // A reload under a supervisor started alone keeps the local queue.
        on.set_shared_work_queue(false);
        assert!(!shared(&on));
    }

    #[test]
    fn a_full_section_reads() {
        let c = parse(
            "cluster:\n  enabled: true\n  node_id: gpu-07\n  servers: [nats://10.0.0.1:4222, tls://b:4222]\n  roles: [selfplay]\n  credentials: /etc/ringrift/node.creds\n  tls:\n    ca: ca.pem\n  heartbeat_interval: 500ms\n  node_expiry: 5s\n",
            "test.yaml",
            &[],
        )
        .unwrap()
        .cluster;
        assert!(c.enabled);
        assert_eq!(c.node_id, "gpu-07");
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.roles, ["selfplay"]);
        assert_eq!(
            c.credentials,
            Some(PathBuf::from("/etc/ringrift/node.creds"))
        );
        assert_eq!(c.tls.ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let p = problems(
            "cluster:\n  enabled: true\n  node_id: GPU 7\n  roles: [trainer]\n  user: a\n  heartbeat_interval: 5s\n  node_expiry: 10s\n  colour: red\n",
        );
        let all = p.join("\n");
        for want in [
            "cluster.node_id: 'GPU 7' is not a node id",
            "cluster.servers: the cluster is enabled but names no NATS server",
            "cluster.roles: unknown role 'trainer'",
            "cluster.user: user and password go together",
            "cluster.node_expiry: 10 seconds is under three heartbeats",
            "cluster.colour",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(
            problems("cluster:\n  servers: [http://x]\n")
                .join("")
                .contains("is not a NATS URL")
        );
    }

    #[test]
    fn a_server_url_must_parse_and_its_password_stays_out_of_logs() {
        let p = problems("cluster:\n  servers: [nats://127.0.0.1:99999]\n");
        assert!(
            p.iter()
                .any(|p| p.contains("cluster.servers") && p.contains("invalid port")),
            "{p:?}"
        );
        assert_eq!(
            redact("nats://ring:secretpw@10.0.0.1:4222"),
            "nats://ring:***@10.0.0.1:4222"
        );
        assert_eq!(redact("nats://10.0.0.1:4222"), "nats://10.0.0.1:4222");
        let c = ClusterConfig {
            servers: vec!["nats://a:pw@h:1".into(), "tls://h2:2".into()],
            ..Default::default()
        };
        assert_eq!(c.servers_shown(), "nats://a:***@h:1, tls://h2:2");
    }

    #[test]
    fn credentials_and_tls_files_must_exist_and_are_taken_from_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("node.creds"), "x").unwrap();
        let yaml = |creds: &str| {
            format!(
                "cluster:\n  enabled: true\n  servers: [nats://127.0.0.1:4222]\n  credentials: {creds}\n  tls:\n    ca: missing-ca.pem\n"
            )
        };
        let err = crate::config::parse_in(&yaml("node.creds"), "t.yaml", &[], root.path())
            .map(|(_, missing)| missing.needed)
            .unwrap();
        let text: Vec<String> = err.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].contains("cluster.tls.ca") && text[0].contains("missing-ca.pem is not a file"),
            "{text:?}"
        );
        let (c, _) =
            crate::config::parse_in(&yaml("node.creds"), "t.yaml", &[], root.path()).unwrap();
        assert_eq!(c.cluster.credentials, Some(root.path().join("node.creds")));
    }

    #[test]
    fn a_data_address_is_absolute_or_host_and_absolute_path() {
        for ok in [
            "/srv/ringrift",
            "gpu-07:/srv/ringrift",
            "10.0.0.7:/data/root",
        ] {
            assert!(valid_data_address(ok), "{ok}");
        }
        for bad in [
            "relative/dir",
            "./c",
            "~/x",
            "gpu-07:relative",
            "-e sh",
            "/a b",
            "",
        ] {
            assert!(!valid_data_address(bad), "{bad}");
        }
        let p = problems("cluster:\n  data_address: relative/dir\n");
        assert!(
            p.iter().any(|p| p.contains("cluster.data_address")),
            "{p:?}"
        );
    }
}
