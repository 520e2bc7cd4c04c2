//! Which old files to delete so that a directory of outputs stays under its limits: at most
//! `keep` files, none older than `max_age`, and at most `max_bytes` in all (the newest kept
//! first), as logrotate's `rotate`/`maxage` and journald's `SystemMaxUse` bound theirs. Pure: the
//! caller lists the files and deletes what this returns (the supervisor for `logs/jobs/`).

use std::time::Duration;

/// The limits of one directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Files kept at most (0: no limit).
    pub keep: u64,
    /// Files older than this go (zero: no limit).
    pub max_age: Duration,
    /// Bytes kept at most, counted from the newest file (0: no limit).
    pub max_bytes: u64,
}

/// One file of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File<T> {
    /// What the caller names it by.
    pub id: T,
    /// Its modification time, unix seconds.
    pub modified: u64,
    /// Its size, bytes.
    pub bytes: u64,
}

/// The files to delete: every file beyond the `keep` newest, older than `max_age` at `now`
/// (unix seconds), or past `max_bytes` counting from the newest. Files the caller must keep (a
/// running job's log) are not passed in. Oldest first.
pub fn expired<T: Clone>(files: &[File<T>], limits: &Limits, now: u64) -> Vec<T> {
    let mut newest_first: Vec<&File<T>> = files.iter().collect();
    newest_first.sort_by_key(|f| std::cmp::Reverse(f.modified));
    let mut total = 0u64;
    let mut out = Vec::new();
    for (i, f) in newest_first.into_iter().enumerate() {
        total = total.saturating_add(f.bytes);
        let too_many = limits.keep > 0 && i as u64 >= limits.keep;
        let too_old =
            !limits.max_age.is_zero() && now.saturating_sub(f.modified) > limits.max_age.as_secs();
        let too_big = limits.max_bytes > 0 && total > limits.max_bytes;
        if too_many || too_old || too_big {
            out.push(f.id.clone());
        }
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(id: &'static str, modified: u64, bytes: u64) -> File<&'static str> {
        File {
            id,
            modified,
            bytes,
        }
    }

    #[test]
    fn each_limit_takes_the_oldest_first() {
        let files = [f("c", 300, 10), f("a", 100, 10), f("b", 200, 10)];
        let none = Limits {
            keep: 0,
            max_age: Duration::ZERO,
            max_bytes: 0,
        };
        assert!(expired(&files, &none, 1_000).is_empty());
        let keep2 = Limits { keep: 2, ..none };
        assert_eq!(expired(&files, &keep2, 1_000), ["a"]);
        let young = Limits {
            max_age: Duration::from_secs(750),
            ..none
        };
        assert_eq!(expired(&files, &young, 1_000), ["a", "b"]);
        let small = Limits {
            max_bytes: 25,
            ..none
        };
        assert_eq!(expired(&files, &small, 1_000), ["a"]);
        let tiny = Limits {
            max_bytes: 5,
            ..none
        };
        assert_eq!(expired(&files, &tiny, 1_000), ["a", "b", "c"]);
        // A file from the future (a clock step) is young, not a reason to panic.
        assert!(expired(&[f("x", 5_000, 1)], &young, 1_000).is_empty());
    }
}
