//! The job a command runs: a job file (TOML), scale_runner-style flags, or flags over a job
//! file. Defaults come from the spec itself ([`JobSpec::legacy`]).

use std::path::Path;

use anyhow::Context;
use quarry_coordinator::spec::JobSpec;

use crate::args::{LegacyFlags, RunArgs};

/// Reads a job file: TOML with the job spec's fields. `root` defaults to the file's directory;
/// a relative `root` is relative to the file.
pub fn read_job_file(path: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading job file {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("job file {}", path.display()))?;
    let dir = std::path::absolute(path)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let root = match table.get("root").and_then(|v| v.as_str()) {
        Some(r) => dir.join(r),
        None => dir,
    };
    table.insert(
        "root".into(),
        toml::Value::String(root.display().to_string()),
    );
    let spec: JobSpec = table
        .try_into()
        .with_context(|| format!("job file {}", path.display()))?;
    Ok(spec)
}

/// Builds the spec of `coordinator run` from flags (and a job file, if given).
pub fn spec_from_flags(a: &RunArgs) -> anyhow::Result<JobSpec> {
    spec_from(&a.legacy, a.job.as_deref(), a.root.as_deref())
}

/// A job spec from scale_runner-style flags over an optional job file; `root` defaults to the
/// job file's directory, or to the current directory without one.
pub fn spec_from(
    l: &LegacyFlags,
    job: Option<&Path>,
    root: Option<&Path>,
) -> anyhow::Result<JobSpec> {
    let mut spec = match job {
        Some(path) => read_job_file(path)?,
        None => {
            let exp_name = l
                .exp_name
                .clone()
                .context("--exp_name is required (the experiment's name)")?;
            let objects = l
                .object_code_list
                .clone()
                .context("--object_code_list is required (space-separated object codes)")?;
            let target = l
                .target_count_per_object
                .context("--target_count_per_object is required (samples per object)")?;
            JobSpec::legacy(exp_name, objects, target)
        }
    };
    if let Some(v) = &l.exp_name {
        spec.exp_name = v.clone();
    }
    if let Some(v) = &l.object_code_list {
        spec.objects = v.clone();
    }
    if let Some(v) = l.target_count_per_object {
        spec.target_count_per_object = v;
    }
    if let Some(v) = l.round_batch_size {
        spec.round_batch_size = v;
    }
    if let Some(v) = &l.filter {
        spec.merge.filter = Some(v.clone());
    }
    if let Some(v) = &l.dedup {
        spec.merge.dedup = v.clone();
    }
    if let Some(v) = l.num_iterations {
        spec.num_iterations = v;
    }
    if let Some(v) = l.seed_base {
        spec.seed_base = v;
    }
    if l.max_rounds.is_some() {
        spec.max_rounds = l.max_rounds;
    }
    if let Some(v) = l.final_dir_mode {
        spec.final_dir_mode = v;
    }
    if l.keep_intermediate {
        spec.keep_intermediate = true;
    }
    if let Some(v) = l.retries {
        spec.retries = v;
    }
    if let Some(v) = l.round_timeout {
        spec.generator.timeout_secs = Some(v);
    }
    if !l.extra.is_empty() {
        spec.generator.extra_args = l.extra.clone();
    }
    if let Some(r) = root {
        spec.root = std::path::absolute(r)?;
    } else if job.is_none() {
        spec.root = std::env::current_dir()?;
    }
    Ok(spec)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn flags_alone_get_the_job_file_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let generator = toml::Value::try_from(JobSpec::legacy_generator()).unwrap();
        let mut table = toml::Table::new();
        table.insert("exp_name".into(), "exp".into());
        table.insert("objects".into(), toml::Value::Array(vec!["a".into()]));
        table.insert("target_count_per_object".into(), 7.into());
        table.insert("generator".into(), generator);
        let path = dir.path().join("job.toml");
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
        let from_file = read_job_file(&path).unwrap();

        let flags = LegacyFlags {
            exp_name: Some("exp".into()),
            object_code_list: Some(vec!["a".into()]),
            target_count_per_object: Some(7),
            ..LegacyFlags::default()
        };
        let from_flags = spec_from(&flags, None, Some(dir.path())).unwrap();
        assert_eq!(from_flags.root, std::path::absolute(dir.path()).unwrap());
        assert_eq!(from_flags, from_file);
    }
}
