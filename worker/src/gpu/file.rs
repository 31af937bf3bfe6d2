//! A simulated inventory: a JSON file describing the host's GPUs, re-read on every poll so a
//! test (or an operator rehearsing a failure) can change a GPU's figures or health while the
//! worker runs. `worker --gpu-inventory FILE`; the format is in docs/worker.md:
//!
//! ```json
//! { "driver_version": "550.54.15",
//!   "gpus": [ { "index": 0, "uuid": "GPU-...", "name": "H100", "memory_total_mib": 81559,
//!               "memory_used_mib": 600, "utilization_pct": 40, "temperature_c": 45,
//!               "power_w": 300, "ecc_uncorrected": 0, "xids": [], "lost": false,
//!               "processes": [ { "pid": 4242, "used_memory_mib": 2048 } ] } ] }
//! ```
//!
//! Health follows from the counters exactly as with NVML ([`super::classify`]); `processes`
//! stands for NVML's running processes of the GPU ([`Inventory::processes`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{GpuError, GpuInfo, GpuProcess, GpuSample, Health, Inventory, classify};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    driver_version: Option<String>,
    gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gpu {
    index: u32,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    memory_total_mib: Option<u64>,
    #[serde(default)]
    memory_used_mib: Option<u64>,
    #[serde(default)]
    utilization_pct: Option<u32>,
    #[serde(default)]
    temperature_c: Option<u32>,
    #[serde(default)]
    power_w: Option<u32>,
    #[serde(default)]
    ecc_uncorrected: Option<u64>,
    /// Critical XIDs reported so far, oldest first.
    #[serde(default)]
    xids: Vec<u64>,
    #[serde(default)]
    lost: bool,
    /// The processes holding memory on this GPU.
    #[serde(default)]
    processes: Vec<Process>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Process {
    pid: u32,
    /// Absent: the driver cannot tell (NVML's `Unavailable`).
    #[serde(default)]
    used_memory_mib: Option<u64>,
}

/// The inventory file at `path`.
#[derive(Debug, Clone)]
pub struct FileInventory {
    path: PathBuf,
}

impl FileInventory {
    /// Opens the file once to check it, so a bad path or format fails at startup.
    pub fn open(path: &Path) -> Result<Self, GpuError> {
        let inv = FileInventory {
            path: path.to_path_buf(),
        };
        inv.read()?;
        Ok(inv)
    }

    fn read(&self) -> Result<Doc, GpuError> {
        let err = |detail: String| GpuError::File {
            path: self.path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(&self.path).map_err(|e| err(e.to_string()))?;
        let doc: Doc = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for g in &doc.gpus {
            if !seen.insert(g.index) {
                return Err(err(format!("index {} appears twice", g.index)));
            }
        }
        Ok(doc)
    }

    /// The entry of `gpu` in `doc`, by index or UUID.
    fn find<'d>(doc: &'d Doc, gpu: &GpuInfo) -> Option<&'d Gpu> {
        doc.gpus
            .iter()
            .find(|g| Some(g.index) == gpu.index || (g.uuid.is_some() && g.uuid == gpu.uuid))
    }

    fn info(doc: &Doc, g: &Gpu) -> GpuInfo {
        GpuInfo {
            id: g.index.to_string(),
            index: Some(g.index),
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total_mib: g.memory_total_mib,
            driver_version: doc.driver_version.clone(),
        }
    }
}

impl Inventory for FileInventory {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let doc = self.read()?;
        let mut gpus: Vec<GpuInfo> = doc.gpus.iter().map(|g| Self::info(&doc, g)).collect();
        gpus.sort_by_key(|g| g.index);
        Ok(gpus)
    }

    fn sample(&self, gpu: &GpuInfo) -> GpuSample {
        let doc = match self.read() {
            Ok(d) => d,
            Err(e) => {
                // A file caught mid-rewrite reads as unknown for one poll, never as a crash.
                tracing::debug!(error = %e, "GPU inventory file unreadable; health unknown");
                return GpuSample::unknown();
            }
        };
        let Some(g) = Self::find(&doc, gpu) else {
            return GpuSample {
                health: Health::Unhealthy("GPU no longer listed by the inventory".into()),
                ..GpuSample::unknown()
            };
        };
        GpuSample {
            health: classify(g.ecc_uncorrected, &g.xids, g.lost),
            utilization_pct: g.utilization_pct,
            memory_used_mib: g.memory_used_mib,
            memory_free_mib: match (g.memory_total_mib, g.memory_used_mib) {
                (Some(t), Some(u)) => Some(t.saturating_sub(u)),
                _ => None,
            },
            temperature_c: g.temperature_c,
            power_w: g.power_w,
            ecc_uncorrected: g.ecc_uncorrected,
            last_xid: g.xids.last().copied(),
        }
    }

    fn processes(&self, gpu: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError> {
        let doc = self.read()?;
        let g = Self::find(&doc, gpu).ok_or_else(|| GpuError::File {
            path: self.path.display().to_string(),
            detail: format!("GPU {} is no longer listed", gpu.id),
        })?;
        Ok(g.processes
            .iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                used_mib: p.used_memory_mib,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_and_samples_and_rereads_on_every_poll() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gpus.json");
        let doc = |ecc: u64| {
            format!(
                r#"{{"driver_version": "550.1", "gpus": [
                {{"index": 1, "uuid": "GPU-b", "name": "Sim", "memory_total_mib": 1000, "memory_used_mib": 300,
                  "utilization_pct": 40, "temperature_c": 50, "power_w": 200, "ecc_uncorrected": {ecc}}},
                {{"index": 0, "uuid": "GPU-a"}}]}}"#
            )
        };
        std::fs::write(&p, doc(0)).unwrap();
        let inv = FileInventory::open(&p).unwrap();
        let gpus = inv.list().unwrap();
        assert_eq!(gpus[0].uuid.as_deref(), Some("GPU-a"));
        assert_eq!(gpus[1].driver_version.as_deref(), Some("550.1"));
        let s = inv.sample(&gpus[1]);
        assert_eq!(s.health, Health::Healthy);
        assert_eq!(s.memory_free_mib, Some(700));
        assert_eq!(s.utilization_pct, Some(40));
        std::fs::write(&p, doc(3)).unwrap();
        assert!(matches!(inv.sample(&gpus[1]).health, Health::Unhealthy(r) if r.contains("ECC")));
        // A GPU with no counters is healthy as far as anyone can tell.
        assert_eq!(inv.sample(&gpus[0]).health, Health::Healthy);
        std::fs::write(&p, "{ not json").unwrap();
        assert_eq!(inv.sample(&gpus[0]), GpuSample::unknown());
    }

    /// `processes` is re-read on every call; entries that are not a pid and a MiB figure
    /// (negative, past u64, a string) make the file unreadable for that call, an error
    /// naming the file and the field, never a panic.
    #[test]
    fn processes_are_reread_and_garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gpus.json");
        let doc = |procs: &str| format!(r#"{{"gpus": [{{"index": 0, "processes": [{procs}]}}]}}"#);
        std::fs::write(&p, doc("")).unwrap();
        let inv = FileInventory::open(&p).unwrap();
        let gpu = &inv.list().unwrap()[0];
        assert!(inv.processes(gpu).unwrap().is_empty());
        std::fs::write(&p, doc(r#"{"pid": 7, "used_memory_mib": 512}, {"pid": 8}"#)).unwrap();
        assert_eq!(
            inv.processes(gpu).unwrap(),
            [
                GpuProcess {
                    pid: 7,
                    used_mib: Some(512)
                },
                GpuProcess {
                    pid: 8,
                    used_mib: None
                }
            ]
        );
        for garbage in [
            r#"{"pid": 7, "used_memory_mib": -5}"#,
            r#"{"pid": 7, "used_memory_mib": 1e400}"#,
            r#"{"pid": 7, "used_memory_mib": 99999999999999999999999}"#,
            r#"{"pid": 7, "used_memory_mib": "lots"}"#,
            r#"{"pid": -1, "used_memory_mib": 5}"#,
            r#"{"pid": 7, "used_memory_mib": 5, "vram": 1}"#,
            r#""7""#,
        ] {
            std::fs::write(&p, doc(garbage)).unwrap();
            let e = inv.processes(gpu).unwrap_err().to_string();
            assert!(e.contains("gpus.json"), "{garbage}: {e}");
            // Health reads as unknown for that poll, as for any unreadable file.
            assert_eq!(inv.sample(gpu), GpuSample::unknown(), "{garbage}");
        }
        // The largest figure that parses is taken as given.
        std::fs::write(
            &p,
            doc(&format!(r#"{{"pid": 7, "used_memory_mib": {}}}"#, u64::MAX)),
        )
        .unwrap();
        assert_eq!(inv.processes(gpu).unwrap()[0].used_mib, Some(u64::MAX));
        // A GPU that left the file.
        std::fs::write(&p, r#"{"gpus": [{"index": 1}]}"#).unwrap();
        assert!(inv.processes(gpu).is_err());
    }

    #[test]
    fn bad_files_fail_at_open_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gpus.json");
        let e = FileInventory::open(&p).unwrap_err();
        assert!(e.to_string().contains("gpus.json"), "{e}");
        std::fs::write(&p, r#"{"gpus": [{"index": 0, "colour": "red"}]}"#).unwrap();
        assert!(
            FileInventory::open(&p)
                .unwrap_err()
                .to_string()
                .contains("colour")
        );
        std::fs::write(&p, r#"{"gpus": [{"index": 0}, {"index": 0}]}"#).unwrap();
        assert!(
            FileInventory::open(&p)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
