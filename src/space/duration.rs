//! Durations as Space manifests write them (`15m`, `48h`, `1h30m`, `never`).
//!
//! Hand-written rather than `humantime`: the CRD schema carries the same
//! grammar as a pattern, so the apiserver and this parser must accept exactly
//! the same strings, and humantime accepts more (spaces, `min`, `sec`...).

use std::time::Duration;

/// The grammar, also enforced by the apiserver through the CRD schema.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";
/// A sleep time: a duration or `never`.
pub const SLEEP_PATTERN: &str = r"^(never|([0-9]+(ms|s|m|h|d))+)$";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: expected digits followed by a unit (ms, s, m, h, d), e.g. 15m, 48h or 1h30m")]
pub struct InvalidDuration {
    pub input: String,
}

/// Parses `1h30m`-style durations.
pub fn parse(input: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration { input: input.to_owned() };
    let mut rest = input;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            match rest.bytes().next() {
                Some(b's') => (1_000, 1),
                Some(b'm') => (60_000, 1),
                Some(b'h') => (3_600_000, 1),
                Some(b'd') => (86_400_000, 1),
                _ => return Err(invalid()),
            }
        };
        rest = &rest[unit_len..];
        let ms = value.checked_mul(unit_ms).ok_or_else(invalid)?;
        total = total.checked_add(Duration::from_millis(ms)).ok_or_else(invalid)?;
    }
    Ok(total)
}

/// Parses a sleep time: `Ok(None)` means `never`.
pub fn parse_sleep(input: &str) -> Result<Option<Duration>, InvalidDuration> {
    if input == "never" { Ok(None) } else { parse(input).map(Some) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse("48h"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_sleep("never"), Ok(None));
        assert_eq!(parse_sleep("20s"), Ok(Some(Duration::from_secs(20))));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in ["", "15", "m", "15 m", "1.5h", "-1h", "15min", "never1", "99999999999999999999h"] {
            assert_eq!(parse(bad), Err(InvalidDuration { input: bad.into() }), "{bad:?}");
        }
        assert!(parse("never").is_err());
    }
}
