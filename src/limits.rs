//! Resource limits for a daemon's or a job's cgroup: `memory_max` and `cpu_max`, written the way
//! systemd writes MemoryMax= and CPUQuota= (systemd.resource-control(5)), and the exact text the
//! cgroup v2 files `memory.max` and `cpu.max` take (the kernel's cgroup-v2.rst).
//!
//! Plain parsing, no file access: the supervisor writes [`Limits::files`] into the cgroup.

use std::fmt;

/// The period of a CPU quota given as a percentage: 100 ms, systemd's default for CPUQuota=.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// A memory limit: bytes, or no limit (`infinity` / `max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryMax {
    /// At most this many bytes (at least one page, 4096); written to `memory.max` as the number.
    Bytes(u64),
    /// `infinity` or `max` as written: no limit, `max` in `memory.max`.
    Unlimited,
}

/// A CPU limit: `quota_us` of CPU time per `period_us` (both microseconds), or no limit.
/// 50 % is 50 000 per 100 000; 200 % (two CPUs) is 200 000 per 100 000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMax {
    /// At most `quota_us` of CPU time in each `period_us`; written to `cpu.max` as "QUOTA PERIOD".
    Quota {
        /// CPU time allowed per period, in microseconds (at least 1000, the kernel's minimum).
        quota_us: u64,
        /// Length of the period, in microseconds (1000 to 1 000 000; [`DEFAULT_CPU_PERIOD_US`]
        /// for a percentage).
        period_us: u64,
    },
    /// `infinity` or `max` as written: no limit, `max 100000` in `cpu.max`.
    Unlimited,
}

/// The limits configured for one cgroup (None: not configured, the file is left as it is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory_max` (or `job_memory_max`): the cgroup's `memory.max`.
    pub memory_max: Option<MemoryMax>,
    /// `cpu_max` (or `job_cpu_max`): the cgroup's `cpu.max`.
    pub cpu_max: Option<CpuMax>,
}

impl Limits {
    /// Whether no limit is configured (nothing to write).
    pub fn is_empty(&self) -> bool {
        self.memory_max.is_none() && self.cpu_max.is_none()
    }

    /// What to write where: (controller, file name in the cgroup, contents, the config key).
    pub fn files(&self) -> Vec<(&'static str, &'static str, String, &'static str)> {
        let mut out = Vec::new();
        if let Some(m) = self.memory_max {
            out.push(("memory", "memory.max", m.to_string(), "memory_max"));
        }
        if let Some(c) = self.cpu_max {
            out.push(("cpu", "cpu.max", c.to_string(), "cpu_max"));
        }
        out
    }
}

/// The contents of `memory.max`.
impl fmt::Display for MemoryMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryMax::Bytes(b) => write!(f, "{b}"),
            MemoryMax::Unlimited => f.write_str("max"),
        }
    }
}

/// The contents of `cpu.max`: "$QUOTA $PERIOD" or "max $PERIOD".
impl fmt::Display for CpuMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuMax::Quota {
                quota_us,
                period_us,
            } => write!(f, "{quota_us} {period_us}"),
            CpuMax::Unlimited => write!(f, "max {DEFAULT_CPU_PERIOD_US}"),
        }
    }
}

/// Why a limit as written cannot be used. Each variant carries the text as written (`text`), and
/// its message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Not a number of bytes with an optional suffix, nor `infinity`/`max`.
    #[error(
        "'{text}' is not a memory size (bytes with an optional K, M, G or T suffix, e.g. 512M, or infinity)"
    )]
    NotAMemorySize {
        /// The limit as written.
        text: String,
    },
    /// More bytes than a u64 holds.
    #[error("'{text}' is too large")]
    TooLarge {
        /// The limit as written.
        text: String,
    },
    /// Less than one page (4096 bytes): the kernel would round it to 0 and nothing could run.
    #[error("'{text}' is below one page (4096 bytes): nothing could run")]
    BelowOnePage {
        /// The limit as written.
        text: String,
    },
    /// Neither a percentage, nor "QUOTA PERIOD", nor `infinity`/`max`.
    #[error(
        "'{text}' is not a CPU limit (a percentage of one CPU such as 50% or 200%, or \"QUOTA PERIOD\" in microseconds such as \"50000 100000\")"
    )]
    NotACpuLimit {
        /// The limit as written.
        text: String,
    },
    /// A percentage of 0 or less (or not finite).
    #[error("'{text}': the percentage must be above 0")]
    PercentageNotPositive {
        /// The limit as written.
        text: String,
    },
    /// A period outside 1000 to 1 000 000 microseconds, the kernel's range.
    #[error("'{text}': the period must be 1000 to 1000000 microseconds")]
    PeriodOutOfRange {
        /// The limit as written.
        text: String,
    },
    /// A quota below 1000 microseconds, the kernel's minimum.
    #[error("'{text}': the quota must be at least 1000 microseconds")]
    QuotaTooSmall {
        /// The limit as written.
        text: String,
    },
}

/// Parses a memory limit: a number of bytes, optionally with a K, M, G or T suffix (powers of
/// 1024, as systemd reads them; a trailing `B`/`iB` is accepted), or `infinity`/`max`.
/// Errors say what was expected.
pub fn parse_memory(text: &str) -> Result<MemoryMax, LimitError> {
    let text_owned = || text.to_string();
    let t = text.trim();
    if t.eq_ignore_ascii_case("infinity") || t.eq_ignore_ascii_case("max") {
        return Ok(MemoryMax::Unlimited);
    }
    let upper = t.to_ascii_uppercase();
    let body = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 10),
        Some('M') => (&body[..body.len() - 1], 20),
        Some('G') => (&body[..body.len() - 1], 30),
        Some('T') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let bad = || LimitError::NotAMemorySize { text: text_owned() };
    let digits = digits.trim();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let value: f64 = digits.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(LimitError::TooLarge { text: text_owned() });
    }
    let bytes = bytes.floor() as u64;
    // The kernel rounds memory.max down to whole pages; 0 would make every allocation fail.
    if bytes < 4096 {
        return Err(LimitError::BelowOnePage { text: text_owned() });
    }
    Ok(MemoryMax::Bytes(bytes))
}

/// Parses a CPU limit: a percentage of one CPU (`50%`, `200%` for two CPUs; CPUQuota= in
/// systemd), `"QUOTA PERIOD"` in microseconds as cpu.max takes it (`"50000 100000"`), or
/// `infinity`/`max`. Errors say what was expected.
pub fn parse_cpu(text: &str) -> Result<CpuMax, LimitError> {
    let text_owned = || text.to_string();
    let t = text.trim();
    if t.eq_ignore_ascii_case("infinity") || t.eq_ignore_ascii_case("max") {
        return Ok(CpuMax::Unlimited);
    }
    let bad = || LimitError::NotACpuLimit { text: text_owned() };
    if let Some(pct) = t.strip_suffix('%') {
        let pct: f64 = pct.trim().parse().map_err(|_| bad())?;
        if !(pct.is_finite() && pct > 0.0) {
            return Err(LimitError::PercentageNotPositive { text: text_owned() });
        }
        // systemd: quota per period = percentage × period / 100, at least 1 ms (the kernel's minimum).
        let quota_us = ((pct / 100.0) * DEFAULT_CPU_PERIOD_US as f64).round() as u64;
        return Ok(CpuMax::Quota {
            quota_us: quota_us.max(1000),
            period_us: DEFAULT_CPU_PERIOD_US,
        });
    }
    let mut it = t.split_whitespace();
    let (Some(q), Some(p), None) = (it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    let quota_us: u64 = q.parse().map_err(|_| bad())?;
    let period_us: u64 = p.parse().map_err(|_| bad())?;
    // The kernel accepts a period of 1 ms to 1 s and a quota of at least 1 ms.
    if !(1000..=1_000_000).contains(&period_us) {
        return Err(LimitError::PeriodOutOfRange { text: text_owned() });
    }
    if quota_us < 1000 {
        return Err(LimitError::QuotaTooSmall { text: text_owned() });
    }
    Ok(CpuMax::Quota {
        quota_us,
        period_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_read_like_systemd() {
        assert_eq!(parse_memory("512M"), Ok(MemoryMax::Bytes(512 << 20)));
        assert_eq!(parse_memory("2G"), Ok(MemoryMax::Bytes(2 << 30)));
        assert_eq!(parse_memory("1.5G"), Ok(MemoryMax::Bytes(3 << 29)));
        assert_eq!(parse_memory("64k"), Ok(MemoryMax::Bytes(64 << 10)));
        assert_eq!(parse_memory("1T"), Ok(MemoryMax::Bytes(1 << 40)));
        assert_eq!(parse_memory("256MiB"), Ok(MemoryMax::Bytes(256 << 20)));
        assert_eq!(parse_memory("1048576"), Ok(MemoryMax::Bytes(1 << 20)));
        assert_eq!(parse_memory("infinity"), Ok(MemoryMax::Unlimited));
        for bad in ["", "lots", "12X", "-5M", "M", "100"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_limits_read_like_cpuquota() {
        assert_eq!(
            parse_cpu("50%"),
            Ok(CpuMax::Quota {
                quota_us: 50_000,
                period_us: 100_000
            })
        );
        assert_eq!(
            parse_cpu("200%"),
            Ok(CpuMax::Quota {
                quota_us: 200_000,
                period_us: 100_000
            })
        );
        assert_eq!(
            parse_cpu("25000 50000"),
            Ok(CpuMax::Quota {
                quota_us: 25_000,
                period_us: 50_000
            })
        );
        assert_eq!(parse_cpu("max"), Ok(CpuMax::Unlimited));
        for bad in [
            "",
            "fast",
            "0%",
            "-5%",
            "50",
            "10 100000",
            "5000 10",
            "1 2 3",
        ] {
            assert!(parse_cpu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_read_as_before() {
        let msg = |r: Result<CpuMax, LimitError>| r.unwrap_err().to_string();
        assert_eq!(
            parse_memory("lots").unwrap_err().to_string(),
            "'lots' is not a memory size (bytes with an optional K, M, G or T suffix, e.g. 512M, or infinity)"
        );
        assert_eq!(
            parse_memory("100").unwrap_err().to_string(),
            "'100' is below one page (4096 bytes): nothing could run"
        );
        assert_eq!(
            parse_memory("99999999999T").unwrap_err(),
            LimitError::TooLarge {
                text: "99999999999T".into()
            }
        );
        assert_eq!(
            msg(parse_cpu("fast")),
            "'fast' is not a CPU limit (a percentage of one CPU such as 50% or 200%, or \"QUOTA PERIOD\" in microseconds such as \"50000 100000\")"
        );
        assert_eq!(msg(parse_cpu("0%")), "'0%': the percentage must be above 0");
        assert_eq!(
            msg(parse_cpu("5000 10")),
            "'5000 10': the period must be 1000 to 1000000 microseconds"
        );
        assert_eq!(
            msg(parse_cpu("10 100000")),
            "'10 100000': the quota must be at least 1000 microseconds"
        );
    }

    #[test]
    fn file_contents_are_what_the_kernel_takes() {
        let l = Limits {
            memory_max: Some(MemoryMax::Bytes(512 << 20)),
            cpu_max: Some(CpuMax::Quota {
                quota_us: 50_000,
                period_us: 100_000,
            }),
        };
        assert_eq!(
            l.files(),
            vec![
                (
                    "memory",
                    "memory.max",
                    "536870912".to_string(),
                    "memory_max"
                ),
                ("cpu", "cpu.max", "50000 100000".to_string(), "cpu_max"),
            ]
        );
        let none = Limits {
            memory_max: Some(MemoryMax::Unlimited),
            cpu_max: Some(CpuMax::Unlimited),
        };
        assert_eq!(none.files()[0].2, "max");
        assert_eq!(none.files()[1].2, "max 100000");
        assert!(Limits::default().files().is_empty());
    }
}
