//! Reading Linux's /proc: the little the supervisor, the reaper and the status view need about a
//! process (state, parent, group, start time, CPU time, memory, environment, command line, open
//! descriptors, resource limits).
//!
//! Parsing is separate from reading so it can be tested on fixed text.

/// The fields of `/proc/<pid>/stat` that are used here (numbered as in proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id (field 1).
    pub pid: u32,
    /// State letter (field 3): `R` running, `S` sleeping, `D` disk sleep, `T` stopped, `Z` zombie,
    /// `X` dead, …
    pub state: char,
    /// Parent's pid (field 4).
    pub ppid: u32,
    /// Process group id (field 5, `pgrp`).
    pub pgid: u32,
    /// User + system CPU time (fields 14 `utime` and 15 `stime`), in clock ticks
    /// ([`ticks_per_sec`]).
    pub cpu_ticks: u64,
    /// When it started, in clock ticks since boot (field 22 `starttime`): with the pid, identifies
    /// a process across pid reuse.
    pub start_time: u64,
    /// Resident set size, in pages (field 24 `rss`; times [`page_size`] for bytes).
    pub rss_pages: u64,
}

impl ProcStat {
    /// Whether it has exited and waits to be reaped (state `Z`, or `X` while going away).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is skipped up to its last `)`,
/// since it may hold spaces and parentheses. None when a needed field is missing or not a number.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let pid = text.split_whitespace().next()?.parse().ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: num(1)? as u32,
        pgid: num(2)? as u32,
        cpu_ticks: num(11)? + num(12)?,
        start_time: num(19)?,
        rss_pages: num(21)?,
    })
}

/// Reads and parses `/proc/<pid>/stat`; None when the process is gone or the text is malformed.
pub fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `NAME=value` pairs of a NUL-separated environment block.
pub fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The environment a process started with, if readable.
pub fn environ(pid: u32) -> Option<Vec<(String, String)>> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .ok()
        .map(|b| parse_environ(&b))
}

/// The arguments of a NUL-separated command line block (`/proc/<pid>/cmdline`), empty ones dropped;
/// bytes that are not UTF-8 are replaced.
pub fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The arguments a process was started with (`argv`, program first). None when the process is
/// gone or its command line cannot be read; empty for a zombie or a kernel thread.
pub fn argv(pid: u32) -> Option<Vec<String>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|b| parse_cmdline(&b))
}

/// The command line, arguments joined by spaces (empty when it cannot be read).
pub fn cmdline(pid: u32) -> String {
    argv(pid).unwrap_or_default().join(" ")
}

/// The open file descriptors of a process, lowest first, each with what it refers to (the target
/// of `/proc/<pid>/fd/<n>`: a path, or `pipe:[inode]`, `socket:[inode]`, ...). None when the
/// directory cannot be read (the process is gone, or belongs to another user); descriptors that
/// close while they are listed are left out.
pub fn fds(pid: u32) -> Option<Vec<(i32, std::path::PathBuf)>> {
    let mut out: Vec<(i32, std::path::PathBuf)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            Some((n, std::fs::read_link(e.path()).ok()?))
        })
        .collect();
    out.sort();
    Some(out)
}

/// One resource limit of a process (a line of `/proc/<pid>/limits`): None means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit (the one enforced; setrlimit(2)), in the limit's units (files, processes,
    /// bytes, seconds: the `Units` column).
    pub soft: Option<u64>,
    /// The hard limit (the ceiling the soft one may be raised to), in the same units.
    pub hard: Option<u64>,
}

/// The limit called `name` ("Max open files", "Max processes", ...) in the text of
/// `/proc/<pid>/limits`, if it is there and its values are numbers or `unlimited`.
pub fn parse_limit(text: &str, name: &str) -> Option<Limit> {
    let value = |v: &str| match v {
        "unlimited" => Some(None),
        n => n.parse().ok().map(Some),
    };
    // The kernel writes the name left-aligned in 25 columns, then the values.
    text.lines().find_map(|line| {
        if line.get(..25)?.trim_end() != name {
            return None;
        }
        let mut f = line[25..].split_whitespace();
        Some(Limit {
            soft: value(f.next()?)?,
            hard: value(f.next()?)?,
        })
    })
}

/// The limit called `name` of a process (see [`parse_limit`]); None when the process is gone or
/// has no such limit.
pub fn limit(pid: u32, name: &str) -> Option<Limit> {
    parse_limit(
        &std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?,
        name,
    )
}

/// The pid holding a flock(2) on the file `(dev, ino)`, from /proc/locks (proc(5)); None when
/// no process holds one or the file cannot be read.
pub fn flock_holder(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    parse_flock_holder(
        &text,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        ino,
    )
}

/// Reads /proc/locks lines such as `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF` (the
/// device as hex `major:minor`, then the inode) for the holder of a flock on that file.
pub fn parse_flock_holder(text: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let i = fields.iter().position(|f| *f == "FLOCK")?;
        let pid: u32 = fields.get(i + 3)?.parse().ok()?;
        let mut id = fields.get(i + 4)?.split(':');
        let (ma, mi, n) = (id.next()?, id.next()?, id.next()?);
        (u64::from_str_radix(ma, 16).ok()? == major
            && u64::from_str_radix(mi, 16).ok()? == minor
            && n.parse::<u64>().ok()? == ino)
            .then_some(pid)
    })
}

/// The aggregate `cpu` line of /proc/stat (proc(5)), in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// idle + iowait
    pub idle: u64,
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is part of user).
    pub total: u64,
}

/// Why /proc/stat gave no CPU times.
#[derive(Debug, thiserror::Error)]
pub enum CpuStatError {
    /// The file could not be read.
    #[error("cannot read /proc/stat: {0}")]
    Read(#[from] std::io::Error),
    /// No line starts with `cpu ` (the aggregate of all CPUs).
    #[error("/proc/stat has no aggregate cpu line")]
    NoCpuLine,
    /// A field of the line is not a number.
    #[error("bad /proc/stat cpu line: {0:?}")]
    BadLine(String),
    /// Fewer than the four fields every kernel has (user, nice, system, idle).
    #[error("bad /proc/stat cpu line (fewer than 4 fields): {0:?}")]
    TooFewFields(String),
}

/// Parses the first (`cpu `) line of /proc/stat. Kernels before 2.6 have only four fields; the
/// missing ones count as 0.
pub fn parse_cpu_times(text: &str) -> Result<CpuTimes, CpuStatError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or(CpuStatError::NoCpuLine)?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| CpuStatError::BadLine(line.to_string()))?;
    if fields.len() < 4 {
        return Err(CpuStatError::TooFewFields(line.to_string()));
    }
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let total: u64 = (0..8).map(get).sum();
    Ok(CpuTimes { idle, total })
}

/// The CPU times of the whole machine now.
pub fn cpu_times() -> Result<CpuTimes, CpuStatError> {
    parse_cpu_times(&std::fs::read_to_string("/proc/stat")?)
}

/// Busy percent (0 to 100) of all CPU time between two readings; `None` when no time passed (or
/// the counters went backwards, as after a CPU went offline).
pub fn cpu_percent(prev: &CpuTimes, cur: &CpuTimes) -> Option<f64> {
    let total = cur.total.checked_sub(prev.total)?;
    let idle = cur.idle.checked_sub(prev.idle)?;
    if total == 0 || idle > total {
        return None;
    }
    Some(100.0 * (total - idle) as f64 / total as f64)
}

/// `MemAvailable` of /proc/meminfo (the kernel's estimate of memory available without swapping),
/// in bytes.
pub fn parse_mem_available(text: &str) -> Option<u64> {
    parse_meminfo_field(text, "MemAvailable")
}

/// A `/proc/meminfo` line's value (`MemTotal:  16318464 kB`), in bytes.
pub fn parse_meminfo_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Total memory of the machine, in bytes (`MemTotal` of /proc/meminfo).
pub fn mem_total() -> Option<u64> {
    parse_meminfo_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal")
}

/// Memory available now, in bytes (see [`parse_mem_available`]).
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The 1-minute load average, the first field of /proc/loadavg.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The 1-minute load average now (not per core).
pub fn loadavg() -> Option<f64> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// Every pid in /proc.
pub fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Seconds since boot (from /proc/uptime).
pub fn uptime_secs() -> Option<f64> {
    std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (for start_time and cpu_ticks).
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Page size in bytes (for rss_pages).
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 98765 1000 200 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 1234,
                state: 'S',
                ppid: 1,
                pgid: 1234,
                cpu_ticks: 8,
                start_time: 98765,
                rss_pages: 200
            }
        );
    }

    #[test]
    fn own_stat_is_readable() {
        let me = stat(std::process::id()).unwrap();
        assert!("RSD".contains(me.state), "{me:?}");
        assert!(me.start_time > 0 && me.rss_pages > 0);
        assert!(!cmdline(std::process::id()).is_empty());
        assert!(environ(std::process::id()).is_some());
    }

    #[test]
    fn command_lines_split_on_nul_and_drop_empty_arguments() {
        assert_eq!(
            parse_cmdline(b"sleep\x001003\0\0"),
            vec!["sleep".to_string(), "1003".to_string()]
        );
        assert!(parse_cmdline(b"").is_empty());
        let me = argv(std::process::id()).unwrap();
        assert_eq!(cmdline(std::process::id()), me.join(" "));
    }

    #[test]
    fn own_descriptors_include_a_file_just_opened() {
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let listed = fds(std::process::id()).unwrap();
        assert!(listed.windows(2).all(|w| w[0].0 < w[1].0), "{listed:?}");
        let target = &listed.iter().find(|(n, _)| *n == fd).unwrap().1;
        assert!(target.ends_with("stat"), "{target:?}");
        drop(file);
        assert!(fds(u32::MAX).is_none());
    }

    #[test]
    fn limits_are_read_by_name_with_unlimited_as_none() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max processes             63448                63448                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(
            parse_limit(text, "Max open files"),
            Some(Limit {
                soft: Some(1024),
                hard: Some(524288)
            })
        );
        assert_eq!(
            parse_limit(text, "Max cpu time"),
            Some(Limit {
                soft: None,
                hard: None
            })
        );
        assert_eq!(parse_limit(text, "Max open"), None, "whole names only");
        assert_eq!(parse_limit(text, "Max locked memory"), None);
        let own = limit(std::process::id(), "Max open files").unwrap();
        assert!(own.soft.is_some_and(|s| s > 0), "{own:?}");
    }

    #[test]
    fn environ_blocks_split_on_nul() {
        let env = parse_environ(b"A=1\0B=x=y\0broken\0\0");
        assert_eq!(
            env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn the_holder_of_a_flock_is_read_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 99 08:01:5678 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 77 fd:00:42 0 EOF\n";
        assert_eq!(parse_flock_holder(text, 8, 1, 5678), Some(1234));
        assert_eq!(parse_flock_holder(text, 0xfd, 0, 42), Some(77));
        assert_eq!(parse_flock_holder(text, 8, 1, 1), None);
    }

    const STAT_A: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
    const STAT_B: &str = "cpu  160 0 70 900 70 0 0 0 0 0\ncpu0 80 0 35 450 35 0 0 0 0 0\nintr 2\n";

    #[test]
    fn cpu_percent_is_the_busy_share_between_two_readings() {
        let a = parse_cpu_times(STAT_A).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                idle: 850,
                total: 1000
            }
        );
        let b = parse_cpu_times(STAT_B).unwrap();
        // +80 busy (60 user, 20 system), +120 idle (100 idle, 20 iowait): 40 %.
        assert_eq!(cpu_percent(&a, &b), Some(40.0));
        assert_eq!(cpu_percent(&a, &a), None, "no time passed");
        assert_eq!(cpu_percent(&b, &a), None, "counters went backwards");
        // Older kernels have only four fields.
        assert_eq!(
            parse_cpu_times("cpu 1 2 3 4\n").unwrap(),
            CpuTimes { idle: 4, total: 10 }
        );
        assert!(matches!(
            parse_cpu_times("cpu0 1 2 3 4\n"),
            Err(CpuStatError::NoCpuLine)
        ));
        assert!(matches!(
            parse_cpu_times("cpu  1 x 3 4\n"),
            Err(CpuStatError::BadLine(_))
        ));
        assert!(matches!(
            parse_cpu_times("cpu  1 2\n"),
            Err(CpuStatError::TooFewFields(_))
        ));
        assert!(cpu_times().is_ok(), "this machine's /proc/stat reads");
    }

    #[test]
    fn memory_and_load_parse() {
        assert_eq!(
            parse_mem_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_mem_available("nothing"), None);
        assert_eq!(
            parse_meminfo_field("MemTotal: 100 kB\n", "MemTotal"),
            Some(100 * 1024)
        );
        assert!(mem_total().is_some_and(|t| t > 0));
        assert_eq!(parse_loadavg("0.52 0.40 0.30 1/200 1234\n"), Some(0.52));
        assert!(mem_available().is_some() && loadavg().is_some());
    }
}
