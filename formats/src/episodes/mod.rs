//! The `episodes` format (being built).

use std::path::{Path, PathBuf};

use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};

fn not_yet() -> DatasetError {
    DatasetError::Unsupported {
        reason: "the episodes format is not built yet".into(),
    }
}

pub fn inspect(_path: &Path, _filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    Err(not_yet())
}

pub fn merge(
    _inputs: &[PathBuf],
    _counts: &[u64],
    _options: &MergeOptions,
    _out: &Path,
) -> Result<MergeSummary, DatasetError> {
    Err(not_yet())
}

pub fn examine(_path: &Path, _observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    Err(not_yet())
}
