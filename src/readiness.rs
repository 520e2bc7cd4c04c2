//! When a daemon counts as ready (RUNNING), so that its dependents may start.
//!
//! A worker that speaks the protocol says so itself (its `running` report). A plain program cannot,
//! so its entry may carry `ready:` with one of these forms (issue 10, "readiness for plain programs"):
//!
//! ```yaml
//! ready: {after: 2s}                          # alive for this long
//! ready: {tcp: "127.0.0.1:8080"}              # a TCP connection is accepted
//! ready: {http: "http://127.0.0.1:8080/up"}   # a GET answers 2xx (plain http only)
//! ready: {command: ["pg_isready", "-q"]}      # the command exits 0 (run from the root)
//! ready: {log: "listening on"}                # a line of its output contains this text
//! ```
//!
//! Probes (tcp, http, command) are tried every `interval` (default 200 ms, each attempt bounded by it
//! too, at least 1 s for a command); a probe's own failure is not a failure of the daemon, only not
//! ready yet. `ready_timeout` bounds the whole wait: not ready by then, the process is killed and the
//! restart policy applies. A plain program without `ready:` is ready after being alive for
//! [`DEFAULT_PLAIN_AFTER`], so that one that exits at once (`sh -c "exit 1"`) never counts as ready.
//!
//! `log` matches a plain substring rather than a regular expression: a readiness line is a fixed
//! message in practice, and a substring needs no crate and no escaping (docs/DECISIONS.md).

use std::time::Duration;

/// How long a plain program without `ready:` must stay alive before it counts as ready.
pub const DEFAULT_PLAIN_AFTER: Duration = Duration::from_millis(500);

/// How often a probe is tried when `interval` is not given.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// A daemon's readiness condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Alive for this long after spawn.
    After(Duration),
    /// A TCP connection to `host:port` succeeds.
    Tcp {
        /// `host:port` as written (checked to end in a port number, 0 to 65535).
        addr: String,
        /// Time between attempts, and the bound of each ([`DEFAULT_PROBE_INTERVAL`] unless given).
        interval: Duration,
    },
    /// `GET url` answers with a 2xx status.
    Http {
        /// The URL to ask (plain http only).
        url: HttpUrl,
        /// Time between attempts, and the bound of each ([`DEFAULT_PROBE_INTERVAL`] unless given).
        interval: Duration,
    },
    /// The command (argv) exits 0.
    Command {
        /// Program and arguments, program first, run from the root; never empty.
        argv: Vec<String>,
        /// Time between attempts, and the bound of each (at least 1 s for a command).
        interval: Duration,
    },
    /// A line of the daemon's stdout or stderr contains this text.
    Log(String),
}

/// A plain-http URL taken apart: what the probe connects to and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` (port 80 when the URL names none).
    pub authority: String,
    /// The host as written, without the port (an IPv6 address keeps its brackets): the `Host:`
    /// header of the request.
    pub host: String,
    /// The path and query, at least `/`.
    pub path: String,
    /// The URL as written, for messages.
    pub text: String,
}

impl Ready {
    /// The condition for a daemon with no `ready:` entry; None for a protocol worker (it reports).
    pub fn default_for(protocol: bool) -> Option<Ready> {
        (!protocol).then_some(Ready::After(DEFAULT_PLAIN_AFTER))
    }

    /// How the condition reads in `status` and logs.
    pub fn describe(&self) -> String {
        match self {
            Ready::After(d) => format!("alive for {}s", d.as_secs_f64()),
            Ready::Tcp { addr, .. } => format!("tcp {addr} accepting"),
            Ready::Http { url, .. } => format!("GET {} answering 2xx", url.text),
            Ready::Command { argv, .. } => format!("`{}` exiting 0", argv.join(" ")),
            Ready::Log(s) => format!("a log line containing {s:?}"),
        }
    }
}

/// What is wrong with a readiness URL; each variant carries the URL as written (`text`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The URL does not start with `http://` (https is not supported).
    #[error("'{text}' is not an http:// URL (https is not supported)")]
    NotHttp {
        /// The URL as written.
        text: String,
    },
    /// Nothing between `http://` and the path.
    #[error("'{text}' names no host")]
    NoHost {
        /// The URL as written.
        text: String,
    },
    /// What follows the host's `:` is not a port number (0 to 65535).
    #[error("'{text}': '{port}' is not a port")]
    BadPort {
        /// The URL as written.
        text: String,
        /// What stands where the port should be.
        port: String,
    },
}

/// Parses `http://host[:port][/path]`. Errors say what is wrong with the URL.
pub fn parse_http_url(text: &str) -> Result<HttpUrl, UrlError> {
    let rest = text
        .strip_prefix("http://")
        .ok_or_else(|| UrlError::NotHttp {
            text: text.to_string(),
        })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(UrlError::NoHost {
            text: text.to_string(),
        });
    }
    let (host, authority) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            if p.parse::<u16>().is_err() {
                return Err(UrlError::BadPort {
                    text: text.to_string(),
                    port: p.to_string(),
                });
            }
            (h.to_string(), authority.to_string())
        }
        _ => (authority.to_string(), format!("{authority}:80")),
    };
    Ok(HttpUrl {
        authority,
        host,
        path: path.to_string(),
        text: text.to_string(),
    })
}

/// Whether an HTTP status line (`HTTP/1.1 204 No Content`) says 2xx.
pub fn http_status_ok(status_line: &str) -> bool {
    let mut parts = status_line.split_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(v), Some(code)) if v.starts_with("HTTP/") && code.len() == 3 && code.starts_with('2')
    )
}

/// Whether a line of output satisfies a `log` condition.
pub fn log_line_matches(pattern: &str, line: &str) -> bool {
    line.contains(pattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_programs_wait_a_moment_and_workers_report() {
        assert_eq!(
            Ready::default_for(false),
            Some(Ready::After(DEFAULT_PLAIN_AFTER))
        );
        assert_eq!(Ready::default_for(true), None);
    }

    #[test]
    fn urls_are_taken_apart() {
        let u = parse_http_url("http://127.0.0.1:8080/up?x=1").unwrap();
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.path, "/up?x=1");
        let u = parse_http_url("http://localhost").unwrap();
        assert_eq!(u.authority, "localhost:80");
        assert_eq!(u.path, "/");
        assert_eq!(
            parse_http_url("https://x").unwrap_err().to_string(),
            "'https://x' is not an http:// URL (https is not supported)"
        );
        assert_eq!(
            parse_http_url("http://h:port/").unwrap_err().to_string(),
            "'http://h:port/': 'port' is not a port"
        );
        assert_eq!(
            parse_http_url("http:///x").unwrap_err().to_string(),
            "'http:///x' names no host"
        );
    }

    #[test]
    fn only_2xx_is_ready() {
        assert!(http_status_ok("HTTP/1.1 200 OK"));
        assert!(http_status_ok("HTTP/1.0 204 No Content"));
        assert!(!http_status_ok("HTTP/1.1 503 Service Unavailable"));
        assert!(!http_status_ok("HTTP/1.1 301 Moved"));
        assert!(!http_status_ok("garbage"));
    }

    #[test]
    fn log_lines_match_by_substring() {
        assert!(log_line_matches(
            "listening on",
            "2026 server listening on :80"
        ));
        assert!(!log_line_matches("listening on", "starting"));
    }

    #[test]
    fn conditions_describe_themselves() {
        assert_eq!(
            Ready::After(Duration::from_secs(2)).describe(),
            "alive for 2s"
        );
        assert!(Ready::Log("up".into()).describe().contains("\"up\""));
    }
}
