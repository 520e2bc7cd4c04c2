//! UTC timestamps for log lines, without a date library.
//!
//! Every line a daemon prints gets a timestamp, and a chatty daemon prints a lot of lines, so the
//! formatting has to be cheap: [`TimestampCache`] formats the `YYYY-MM-DDTHH:MM:SS` part once per
//! second and only appends the milliseconds for each call. The calendar arithmetic is Howard
//! Hinnant's `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>), on
//! unsigned numbers because the clock never goes before 1970 here (a clock that does reads as
//! the epoch).

use std::time::{SystemTime, UNIX_EPOCH};

const SECS_PER_DAY: u64 = 86_400;

/// Seconds and milliseconds since the Unix epoch; a clock set before 1970 reads as `(0, 0)`.
pub fn unix_now() -> (u64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => (since.as_secs(), since.subsec_millis()),
        Err(_) => (0, 0),
    }
}

/// Appends an RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-28T08:30:00.123Z`.
///
/// `millis` of 1000 or more carries into the seconds. Years past 9999 are written with all
/// their digits (no longer RFC 3339, but still unambiguous).
pub fn format_utc_millis(secs: u64, millis: u32, out: &mut Vec<u8>) {
    let (secs, millis) = carry_millis(secs, millis);
    push_second_prefix(secs, out);
    push_millis_suffix(millis, out);
}

/// The current time as an RFC 3339 UTC string with milliseconds.
pub fn now_rfc3339() -> String {
    let (secs, millis) = unix_now();
    let mut out = Vec::with_capacity(24);
    format_utc_millis(secs, millis, &mut out);
    // Only ASCII digits and punctuation were written, so bytes and chars coincide.
    out.into_iter().map(char::from).collect()
}

/// Formats many timestamps per second cheaply by remembering the formatted current second.
#[derive(Debug, Default)]
pub struct TimestampCache {
    /// The second `prefix` was formatted for; `None` until the first call.
    secs: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS` for `secs`.
    prefix: Vec<u8>,
}

impl TimestampCache {
    /// An empty cache: the first timestamp written formats its second in full.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the current time, like [`format_utc_millis`] with [`unix_now`].
    pub fn write_now(&mut self, out: &mut Vec<u8>) {
        let (secs, millis) = unix_now();
        self.write_at(secs, millis, out);
    }

    /// Appends the given time; reformats the date and time of day only when the second changed.
    pub fn write_at(&mut self, secs: u64, millis: u32, out: &mut Vec<u8>) {
        let (secs, millis) = carry_millis(secs, millis);
        if self.secs != Some(secs) {
            self.prefix.clear();
            push_second_prefix(secs, &mut self.prefix);
            self.secs = Some(secs);
        }
        out.extend_from_slice(&self.prefix);
        push_millis_suffix(millis, out);
    }
}

fn carry_millis(secs: u64, millis: u32) -> (u64, u32) {
    (secs.saturating_add(u64::from(millis / 1000)), millis % 1000)
}

/// `YYYY-MM-DDTHH:MM:SS`.
fn push_second_prefix(secs: u64, out: &mut Vec<u8>) {
    let (year, month, day) = civil_from_days(secs / SECS_PER_DAY);
    let of_day = secs % SECS_PER_DAY;
    push_year(year, out);
    out.push(b'-');
    push_two(u64::from(month), out);
    out.push(b'-');
    push_two(u64::from(day), out);
    out.push(b'T');
    push_two(of_day / 3600, out);
    out.push(b':');
    push_two(of_day / 60 % 60, out);
    out.push(b':');
    push_two(of_day % 60, out);
}

/// `.mmmZ`; `millis` is below 1000.
fn push_millis_suffix(millis: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&[
        b'.',
        digit(u64::from(millis / 100)),
        digit(u64::from(millis / 10 % 10)),
        digit(u64::from(millis % 10)),
        b'Z',
    ]);
}

fn push_year(year: u64, out: &mut Vec<u8>) {
    if year <= 9999 {
        push_two(year / 100, out);
        push_two(year % 100, out);
    } else {
        out.extend_from_slice(year.to_string().as_bytes());
    }
}

/// Two digits of `n`, which is below 100.
fn push_two(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&[digit(n / 10), digit(n % 10)]);
}

fn digit(n: u64) -> u8 {
    b'0' + (n % 10) as u8
}

/// (year, month 1..=12, day 1..=31) of the day `days` after 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u32, u32) {
    // Shift the epoch to 0000-03-01 so that the leap day is the last day of the year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of (March-based) year, [0, 365]
    let mp = (5 * doy + 2) / 153; // month, March = 0, [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(secs: u64, millis: u32) -> String {
        let mut out = Vec::new();
        format_utc_millis(secs, millis, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_epoch() {
        assert_eq!(fmt(0, 0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_known_moment() {
        // `date -u -d @1795854600` → Sat Nov 28 08:30:00 UTC 2026
        assert_eq!(fmt(1_795_854_600, 123), "2026-11-28T08:30:00.123Z");
        assert_eq!(fmt(1_795_681_800, 0), "2026-11-26T08:30:00.000Z");
    }

    #[test]
    fn leap_days() {
        assert_eq!(fmt(1_709_164_799, 999), "2024-02-28T23:59:59.999Z");
        assert_eq!(fmt(1_709_164_800, 0), "2024-02-29T00:00:00.000Z");
        assert_eq!(fmt(1_709_208_000, 0), "2024-02-29T12:00:00.000Z");
        assert_eq!(fmt(1_709_251_199, 0), "2024-02-29T23:59:59.000Z");
        assert_eq!(fmt(1_709_251_200, 0), "2024-03-01T00:00:00.000Z");
        // 2023 is not a leap year, 2000 is (divisible by 400), 2100 is not (divisible by 100).
        assert_eq!(fmt(1_677_628_800, 0), "2023-03-01T00:00:00.000Z");
        assert_eq!(fmt(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(fmt(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
        assert_eq!(fmt(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn year_boundaries() {
        assert_eq!(fmt(946_684_799, 999), "1999-12-31T23:59:59.999Z");
        assert_eq!(fmt(946_684_800, 0), "2000-01-01T00:00:00.000Z");
        assert_eq!(fmt(1_735_689_599, 999), "2024-12-31T23:59:59.999Z");
        assert_eq!(fmt(1_735_689_600, 0), "2025-01-01T00:00:00.000Z");
        assert_eq!(fmt(253_402_300_799, 999), "9999-12-31T23:59:59.999Z");
        assert_eq!(fmt(253_402_300_800, 0), "10000-01-01T00:00:00.000Z");
    }

    #[test]
    fn millis_are_zero_padded_and_carry() {
        assert_eq!(fmt(0, 7), "1970-01-01T00:00:00.007Z");
        assert_eq!(fmt(0, 40), "1970-01-01T00:00:00.040Z");
        assert_eq!(fmt(59, 1_500), "1970-01-01T00:01:00.500Z");
    }

    #[test]
    fn every_day_until_2401_matches_a_naive_calendar() {
        let (mut year, mut month, mut day) = (1970u64, 1u32, 1u32);
        for days in 0..(431 * 366) {
            assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            let month_len = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > month_len {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }

    #[test]
    fn the_largest_time_does_not_overflow() {
        let mut out = Vec::new();
        format_utc_millis(u64::MAX, 999, &mut out);
        assert!(out.ends_with(b".999Z"));
    }

    #[test]
    fn the_cache_agrees_with_direct_formatting() {
        let mut cache = TimestampCache::new();
        let moments = [
            (0, 0),
            (0, 999),
            (1, 0),
            (1_795_854_600, 123),
            (1_795_854_600, 124),
            (1_795_854_601, 0),
            (59, 1_000),
        ];
        for (secs, millis) in moments {
            let mut cached = Vec::new();
            cache.write_at(secs, millis, &mut cached);
            assert_eq!(String::from_utf8(cached).unwrap(), fmt(secs, millis));
        }
    }

    #[test]
    fn the_cache_appends() {
        let mut cache = TimestampCache::new();
        let mut out = b"> ".to_vec();
        cache.write_at(1_795_854_600, 123, &mut out);
        cache.write_at(1_795_854_600, 456, &mut out);
        assert_eq!(out, b"> 2026-11-28T08:30:00.123Z2026-11-28T08:30:00.456Z");
    }

    #[test]
    fn now_is_well_formed_and_after_2025() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.as_str() > "2025-01-01T00:00:00.000Z", "{now}");
        let mut cache = TimestampCache::new();
        let mut out = Vec::new();
        cache.write_now(&mut out);
        assert_eq!(out.len(), 24);
        assert!(out.ends_with(b"Z"));
    }
}
