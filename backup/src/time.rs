//! UTC timestamps in snapshot names (`2026-11-27T05:00:00Z`) and the calendar buckets prune
//! keeps by (day, ISO week, month).
//!
//! Written here rather than pulling in a date crate: all we need is whole seconds in UTC, the
//! proleptic Gregorian calendar and ISO weeks, which is a few integer formulas (days from civil
//! date and back); no time zones, leap seconds or parsing of other layouts.

use strata_storage::{Result, StorageError};

/// Seconds since the Unix epoch, UTC.
pub type Epoch = i64;

/// The current time in whole seconds.
pub fn now() -> Epoch {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month 1–12, day 1–31) of a day number.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format(t: Epoch) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SSZ` (years 1970–9999).
pub fn parse(text: &str) -> Result<Epoch> {
    let bad = || {
        StorageError::InvalidInput(format!(
            "'{text}' is not a UTC time like 2026-11-27T05:00:00Z"
        ))
    };
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        let s = &text[r];
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse::<i64>().map_err(|_| bad())
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if y < 1970 || !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return Err(bad());
    }
    if h > 23 || mi > 59 || s > 59 {
        return Err(bad());
    }
    Ok(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The calendar day, as a day number.
pub fn day_bucket(t: Epoch) -> i64 {
    t.div_euclid(86_400)
}

/// The ISO 8601 week, as `year * 100 + week`.
pub fn iso_week_bucket(t: Epoch) -> i64 {
    let days = t.div_euclid(86_400);
    // 1970-01-01 was a Thursday; ISO weekday 1 = Monday.
    let weekday = (days + 3).rem_euclid(7) + 1;
    // The week belongs to the year of its Thursday.
    let thursday = days - weekday + 4;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    year * 100 + week
}

/// The calendar month, as `year * 100 + month`.
pub fn month_bucket(t: Epoch) -> i64 {
    let (y, m, _) = civil_from_days(t.div_euclid(86_400));
    y * 100 + m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates_format_and_parse() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_795_755_600), "2026-11-27T05:00:00Z");
        assert_eq!(parse("2026-11-27T05:00:00Z").unwrap(), 1_795_755_600);
        assert_eq!(parse("2000-02-29T23:59:59Z").unwrap(), 951_868_799);
        for bad in [
            "2026-11-27 05:00:00Z",
            "2026-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "+026-11-27T05:00:00Z",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn format_and_parse_round_trip_over_centuries() {
        let mut t = 0i64;
        while t < 8_000_000_000 {
            assert_eq!(parse(&format(t)).unwrap(), t);
            t += 86_400 * 37 + 3_607;
        }
    }

    #[test]
    fn iso_weeks_match_the_calendar() {
        // 2021-01-03 (Sunday) is in 2020-W53; 2021-01-04 starts 2021-W01.
        assert_eq!(
            iso_week_bucket(parse("2021-01-03T12:00:00Z").unwrap()),
            202053
        );
        assert_eq!(
            iso_week_bucket(parse("2021-01-04T00:00:00Z").unwrap()),
            202101
        );
        // 2024-12-30 (Monday) is in 2025-W01.
        assert_eq!(
            iso_week_bucket(parse("2024-12-30T00:00:00Z").unwrap()),
            202501
        );
        assert_eq!(month_bucket(parse("2026-11-27T05:00:00Z").unwrap()), 202611);
    }
}
