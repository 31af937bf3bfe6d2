//! Merging collection summaries.
//!
//! A summary describes *collection*: how many episodes the collector attempted
//! (`total_episodes`), how many succeeded and were saved (`successful_episodes`), how many
//! failed, their timesteps and the time it took. Merging keeps that meaning: the counts of
//! every input are summed (inputs whose episodes were all cut by the limit included: they were
//! collected all the same), and the averages are recomputed from the sums the way the
//! collector computes them:
//!
//! - `success_rate = successful_episodes / total_episodes`
//! - `avg_timesteps_per_episode = total_timesteps / successful_episodes` (timesteps are those
//!   of the saved episodes)
//! - `avg_duration_per_episode = duration_seconds / total_episodes`
//!
//! (0 when the divisor is 0). What the merged dataset holds after filtering, de-duplication
//! and the cut is `episodes_in_dataset`, which may be less than `successful_episodes`;
//! `merged_from` is the number of inputs. `error_log`s are concatenated in input order; every
//! other field is input 0's.

use serde_json::{Map, Number, Value};

use super::layout::{SUMMARY, SUMMED};
use crate::DatasetError;

/// The merged summary of `summaries` (one per input, in input order) for a dataset of `kept`
/// episodes. A count present in input 0's summary must be present in every input's.
pub(super) fn merge_summaries(
    summaries: &[Map<String, Value>],
    kept: u64,
) -> Result<Map<String, Value>, DatasetError> {
    let Some(first) = summaries.first() else {
        return Err(DatasetError::NoInputs);
    };
    let mut out = first.clone();
    for key in SUMMED {
        if !first.contains_key(key) {
            continue;
        }
        let mut ints: Option<u64> = Some(0);
        let mut float = 0.0f64;
        for (i, s) in summaries.iter().enumerate() {
            let Some(Value::Number(n)) = s.get(key) else {
                return Err(DatasetError::Mismatch {
                    input: i,
                    what: format!("its {SUMMARY} has no number {key} (input 0's has one)"),
                });
            };
            ints = ints.zip(n.as_u64()).and_then(|(a, b)| a.checked_add(b));
            float += n.as_f64().unwrap_or(f64::NAN);
        }
        let v = match ints {
            Some(n) => Value::from(n),
            None => number(float),
        };
        out.insert(key.to_string(), v);
    }
    let get = |k: &str| out.get(k).and_then(Value::as_f64);
    let ratio = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
    let derived = [
        ("success_rate", "successful_episodes", "total_episodes"),
        (
            "avg_timesteps_per_episode",
            "total_timesteps",
            "successful_episodes",
        ),
        (
            "avg_duration_per_episode",
            "duration_seconds",
            "total_episodes",
        ),
    ];
    let derived: Vec<(&str, f64)> = derived
        .into_iter()
        .filter_map(|(k, a, b)| Some((k, ratio(get(a)?, get(b)?))))
        .collect();
    for (k, v) in derived {
        out.insert(k.to_string(), number(v));
    }
    let mut log = Vec::new();
    for s in summaries {
        if let Some(Value::Array(a)) = s.get("error_log") {
            log.extend(a.iter().cloned());
        }
    }
    if first.contains_key("error_log") || !log.is_empty() {
        out.insert("error_log".into(), Value::Array(log));
    }
    out.insert("merged_from".into(), Value::from(summaries.len() as u64));
    out.insert("episodes_in_dataset".into(), Value::from(kept));
    Ok(out)
}

fn number(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        match serde_json::from_str(s).unwrap() {
            Value::Object(m) => m,
            _ => panic!(),
        }
    }

    #[test]
    fn sums_counts_and_recomputes_averages() {
        let a = obj(
            r#"{"env_name": "Stack", "total_episodes": 10, "successful_episodes": 8,
               "failed_episodes": 2, "total_timesteps": 800, "duration_seconds": 20.5,
               "success_rate": 0.8, "avg_timesteps_per_episode": 100.0,
               "avg_duration_per_episode": 2.05, "error_log": ["e1"], "num_points": 128}"#,
        );
        let b = obj(
            r#"{"env_name": "Other", "total_episodes": 10, "successful_episodes": 2,
               "failed_episodes": 8, "total_timesteps": 300, "duration_seconds": 9.5,
               "success_rate": 0.2, "avg_timesteps_per_episode": 150.0,
               "avg_duration_per_episode": 0.95, "error_log": ["e2", "e3"]}"#,
        );
        let m = merge_summaries(&[a.clone(), b], 7).unwrap();
        assert_eq!(m["env_name"], "Stack");
        assert_eq!(m["total_episodes"], 20);
        assert_eq!(m["successful_episodes"], 10);
        assert_eq!(m["failed_episodes"], 10);
        assert_eq!(m["total_timesteps"], 1100);
        assert_eq!(m["duration_seconds"], 30.0);
        assert_eq!(m["success_rate"], 0.5);
        assert_eq!(m["avg_timesteps_per_episode"], 110.0);
        assert_eq!(m["avg_duration_per_episode"], 1.5);
        assert_eq!(m["error_log"], serde_json::json!(["e1", "e2", "e3"]));
        assert_eq!(m["merged_from"], 2);
        assert_eq!(m["episodes_in_dataset"], 7);
        assert_eq!(m["num_points"], 128);

        let mut c = a.clone();
        c.remove("total_timesteps");
        let e = merge_summaries(&[a, c], 0).unwrap_err();
        assert!(matches!(e, DatasetError::Mismatch { input: 1, .. }), "{e}");
    }

    #[test]
    fn zero_attempts_give_zero_rates() {
        let z = obj(
            r#"{"total_episodes": 0, "successful_episodes": 0, "total_timesteps": 0,
               "duration_seconds": 0.0, "success_rate": 0.0}"#,
        );
        let m = merge_summaries(&[z.clone(), z], 0).unwrap();
        assert_eq!(m["success_rate"], 0.0);
        assert_eq!(m["avg_timesteps_per_episode"], 0.0);
    }
}
