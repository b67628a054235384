//! Command-line value parsers shared by `weft-cp`'s commands: durations
//! and counts with the bounds that make them meaningful.
//!
//! A zero poll interval would make the directory watcher spin on a core, a
//! zero deadline closes every connection at once, and a duration of years
//! overflows the clock: such values are refused when the flags are parsed,
//! with the bounds in the message, rather than found out at run time.

use std::ops::RangeInclusive;
use std::time::Duration;

/// Bounds of `weft-cp serve --poll-interval`: polling more often than every
/// 10 ms only burns CPU (each poll lists and stats the directory); less
/// often than hourly is no longer watching.
pub const POLL_INTERVAL: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);

/// Bounds of `weft-cp serve --xds-handshake-timeout`: shorter than 100 ms
/// refuses proxies across any real network; longer than 5 minutes lets a
/// silent peer hold a connection slot for no reason.
pub const HANDSHAKE_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(300);

/// Bounds of `weft-cp serve --svid-ttl`: proxies renew at about half
/// life, so a few seconds is already a renewal every couple of seconds per
/// proxy (useful to watch rotation, never in production).
pub const SVID_TTL: RangeInclusive<Duration> =
    Duration::from_secs(5)..=Duration::from_secs(366 * 24 * 3600);

/// Bounds of `weft-cp serve --max-xds-connections`.
pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1_000_000;

/// Bounds of `weft-cp demo --duration`.
pub const DEMO_DURATION: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(30 * 24 * 3600);

/// Bounds of `weft-cp demo --rate` (requests per second; 0 sends none).
/// More than 1,000 would make its timer's period round towards zero.
pub const DEMO_RATE: RangeInclusive<u64> = 0..=1_000;

/// Why a duration flag's value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationFlagError {
    /// Not a duration (`250ms`, `5s`, `1m`).
    #[error("{value:?} is not a duration (e.g. 250ms, 5s, 1m): {reason}")]
    Syntax {
        /// The value given.
        value: String,
        /// The parser's finding.
        reason: String,
    },
    /// Outside the flag's bounds.
    #[error("{value:?} is out of range: expected {} to {}", humantime::format_duration(*min), humantime::format_duration(*max))]
    OutOfRange {
        /// The value given.
        value: String,
        /// The shortest accepted.
        min: Duration,
        /// The longest accepted.
        max: Duration,
    },
}

/// Parses a duration (humantime syntax) that must lie within `bounds`.
///
/// # Errors
///
/// When `value` is not a duration or lies outside `bounds`.
pub fn duration_in(
    value: &str,
    bounds: &RangeInclusive<Duration>,
) -> Result<Duration, DurationFlagError> {
    let duration = humantime::parse_duration(value).map_err(|error| DurationFlagError::Syntax {
        value: value.to_owned(),
        reason: error.to_string(),
    })?;
    if bounds.contains(&duration) {
        Ok(duration)
    } else {
        Err(DurationFlagError::OutOfRange {
            value: value.to_owned(),
            min: *bounds.start(),
            max: *bounds.end(),
        })
    }
}

/// `--poll-interval`.
///
/// # Errors
///
/// Outside [`POLL_INTERVAL`].
pub fn poll_interval(value: &str) -> Result<Duration, DurationFlagError> {
    duration_in(value, &POLL_INTERVAL)
}

/// `--xds-handshake-timeout`.
///
/// # Errors
///
/// Outside [`HANDSHAKE_TIMEOUT`].
pub fn handshake_timeout(value: &str) -> Result<Duration, DurationFlagError> {
    duration_in(value, &HANDSHAKE_TIMEOUT)
}

/// `weft-cp serve --svid-ttl`.
///
/// # Errors
///
/// Outside [`SVID_TTL`].
pub fn svid_ttl(value: &str) -> Result<Duration, DurationFlagError> {
    duration_in(value, &SVID_TTL)
}

/// `weft-cp demo --duration`.
///
/// # Errors
///
/// Outside [`DEMO_DURATION`].
pub fn demo_duration(value: &str) -> Result<Duration, DurationFlagError> {
    duration_in(value, &DEMO_DURATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parser = fn(&str) -> Result<Duration, DurationFlagError>;

    #[test]
    fn durations_outside_their_bounds_are_refused() {
        let ms = Duration::from_millis;
        let cases: [(&str, Parser, Result<Duration, &str>); 11] = [
            ("250ms", poll_interval, Ok(ms(250))),
            ("10ms", poll_interval, Ok(ms(10))),
            ("1h", poll_interval, Ok(ms(3_600_000))),
            (
                "0s",
                poll_interval,
                Err("\"0s\" is out of range: expected 10ms to 1h"),
            ),
            ("1ms", poll_interval, Err("out of range")),
            ("2h", poll_interval, Err("out of range")),
            ("soon", poll_interval, Err("\"soon\" is not a duration")),
            ("10s", handshake_timeout, Ok(ms(10_000))),
            ("0s", handshake_timeout, Err("expected 100ms to 5m")),
            ("0s", demo_duration, Err("expected 1s to 30days")),
            ("31days", demo_duration, Err("out of range")),
        ];
        for (value, parse, expected) in cases {
            match (parse(value), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{value}"),
                (Err(error), Err(want)) => {
                    assert!(error.to_string().contains(want), "{value}: {error}");
                }
                (got, want) => panic!("{value}: got {got:?}, want {want:?}"),
            }
        }
    }
}
