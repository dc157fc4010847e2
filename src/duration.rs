//! Durations as people write them (`250ms`, `5s`, `1m 30s`): parsed with
//! PostgreSQL's bounds, shown back the same way, and read from and written
//! to the configuration through serde (`#[serde(with = "...")]`).

use std::time::Duration;

use serde::{Deserializer, Serializer};

/// The longest duration lockjam accepts: PostgreSQL's longest timeout
/// (`statement_timeout` and friends are `int` milliseconds), about 24.8
/// days. Anything longer could not be sent, or would overflow a clock.
pub(crate) const MAX_DURATION: Duration = Duration::from_millis(i32::MAX as u64);

/// Parses a duration from 1ms to [`MAX_DURATION`], or zero (`0s`, `0ms`,
/// `0 s`).
pub(crate) fn parse_or_zero(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write it like 0s, 250ms, 5s or 1m"))?;
    if duration > MAX_DURATION {
        return Err(format!(
            "`{text}` is too long: at most 24d 20h 31m 23s 647ms (PostgreSQL's longest timeout)"
        ));
    }
    if !duration.is_zero() && duration < Duration::from_millis(1) {
        return Err(format!(
            "`{text}` is shorter than 1ms, the finest step PostgreSQL's timeouts take"
        ));
    }
    Ok(duration)
}

/// Parses a duration from 1ms to [`MAX_DURATION`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let duration =
        parse_or_zero(text).map_err(|message| message.replace("write it like 0s, 250ms", "write it like 250ms"))?;
    if duration.is_zero() {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(duration)
}

/// A duration as it is written in the configuration: `0s`, `250ms`, `1m 30s`.
pub fn show(duration: Duration) -> String {
    if duration.is_zero() {
        "0s".into()
    } else {
        humantime::format_duration(duration).to_string()
    }
}

fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as \"250ms\", \"5s\" or \"1m\"")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_string())
        }
    }
    deserializer.deserialize_str(Text)
}

/// A key that must be longer than zero: `#[serde(with = "crate::duration::positive")]`.
pub mod positive {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        parse(&text(deserializer)?).map_err(serde::de::Error::custom)
    }

    pub(crate) fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&show(*duration))
    }
}

/// A key that may be zero: `#[serde(with = "crate::duration::or_zero")]`.
pub mod or_zero {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        parse_or_zero(&text(deserializer)?).map_err(serde::de::Error::custom)
    }

    pub(crate) use super::positive::serialize;
}

/// A key where `"0s"` means never (`None`):
/// `#[serde(with = "crate::duration::zero_is_never")]`.
pub mod zero_is_never {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let duration = super::or_zero::deserialize(deserializer)?;
        Ok((!duration.is_zero()).then_some(duration))
    }

    pub(crate) fn serialize<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&show(duration.unwrap_or(Duration::ZERO)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    struct Keys {
        #[serde(with = "positive")]
        interval: Duration,
        #[serde(with = "or_zero")]
        min_wait: Duration,
        #[serde(with = "zero_is_never")]
        terminate_after: Option<Duration>,
    }

    #[test]
    fn keys_read_and_write_as_people_write_them() {
        let keys: Keys =
            toml::from_str("interval = \"250ms\"\nmin_wait = \"0s\"\nterminate_after = \"0 s\"\n").unwrap();
        assert_eq!(
            keys,
            Keys {
                interval: Duration::from_millis(250),
                min_wait: Duration::ZERO,
                terminate_after: None,
            }
        );
        assert_eq!(
            toml::to_string(&keys).unwrap(),
            "interval = \"250ms\"\nmin_wait = \"0s\"\nterminate_after = \"0s\"\n"
        );
        for (text, expected) in [
            (
                "interval = \"0s\"\nmin_wait = \"0s\"\nterminate_after = \"0s\"\n",
                "`0s` must be longer than zero",
            ),
            (
                "interval = 5\nmin_wait = \"0s\"\nterminate_after = \"0s\"\n",
                "expected a duration such as \"250ms\"",
            ),
            (
                "interval = \"1s\"\nmin_wait = \"1µs\"\nterminate_after = \"0s\"\n",
                "shorter than 1ms",
            ),
            (
                "interval = \"1s\"\nmin_wait = \"0s\"\nterminate_after = \"25d\"\n",
                "`25d` is too long",
            ),
        ] {
            let error = toml::from_str::<Keys>(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        for zero in ["0s", "0ms", "0 s", "00s", " 0s "] {
            assert_eq!(parse_or_zero(zero), Ok(Duration::ZERO), "{zero:?}");
        }
        assert_eq!(parse("24d 20h 31m 23s 647ms"), Ok(MAX_DURATION));
    }
}
