//! GPU inventory and health: which GPUs a host has, and how each is doing.
//!
//! [`Inventory`] has three implementations: [`nvml::NvmlInventory`] (the NVIDIA driver's
//! management library, loaded at run time), [`file::FileInventory`] (a JSON file re-read on
//! every poll, for tests and simulation: `worker --gpu-inventory FILE`) and [`NoInventory`]
//! (a host without NVML: explicit `--gpu` ids still work, health is unknown).
//!
//! Health is derived in one place, [`classify`], whatever the source: uncorrectable ECC
//! errors, a critical XID that means the GPU itself is broken, or a GPU lost from the bus make
//! it unhealthy; its agent then stops acquiring rounds.

pub mod file;
pub mod ids;
pub mod nvml;
mod stats;

use std::fmt;
use std::sync::Arc;

use quarry_proto::v1 as pb;

pub use self::stats::RoundStats;

/// One GPU as the agent knows it. Fields the inventory cannot tell are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// How the operator named it (`--gpu 3`, `--gpu GPU-...`), or its index for `--gpu all`.
    pub id: String,
    /// NVML index (PCI bus order).
    pub index: Option<u32>,
    /// `GPU-...` or `MIG-...`.
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_mib: Option<u64>,
    pub driver_version: Option<String>,
}

impl GpuInfo {
    /// A GPU named by the operator on a host whose inventory cannot enumerate GPUs.
    pub fn unlisted(id: &str) -> Self {
        GpuInfo {
            id: id.to_string(),
            index: id.parse().ok(),
            uuid: looks_like_uuid(id).then(|| id.to_string()),
            name: None,
            memory_total_mib: None,
            driver_version: None,
        }
    }

    /// What `CUDA_VISIBLE_DEVICES` should hold to show exactly this GPU: its UUID when known
    /// (immune to enumeration order), else the id as given.
    pub fn visible_devices(&self) -> String {
        self.uuid.clone().unwrap_or_else(|| self.id.clone())
    }

    pub fn to_proto(&self) -> pb::GpuInfo {
        pb::GpuInfo {
            index: self.index,
            uuid: self.uuid.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_default(),
            memory_total_mib: self.memory_total_mib.unwrap_or(0),
            driver_version: self.driver_version.clone().unwrap_or_default(),
        }
    }
}

fn looks_like_uuid(id: &str) -> bool {
    id.starts_with("GPU-") || id.starts_with("MIG-")
}

/// Whether a GPU may be given work.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Health {
    /// Not measurable: no NVML, or the sample failed. Rounds are still run.
    #[default]
    Unknown,
    Healthy,
    /// The agent stops acquiring rounds; the reason is shown in `coordinator status`.
    Unhealthy(String),
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Unknown => f.write_str("unknown"),
            Health::Healthy => f.write_str("healthy"),
            Health::Unhealthy(why) => write!(f, "unhealthy: {why}"),
        }
    }
}

/// Health and metrics of one GPU at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuSample {
    pub health: Health,
    pub utilization_pct: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_free_mib: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<u32>,
    /// Volatile (since the driver loaded) uncorrectable ECC errors.
    pub ecc_uncorrected: Option<u64>,
    /// The last critical XID reported for this GPU since the agent started.
    pub last_xid: Option<u64>,
}

impl GpuSample {
    /// A sample that says nothing: no NVML, or the inventory could not be read.
    pub fn unknown() -> Self {
        GpuSample::default()
    }

    pub fn to_proto(&self) -> pb::GpuHealth {
        let (state, reason) = match &self.health {
            Health::Unknown => (pb::GpuHealthState::Unknown, String::new()),
            Health::Healthy => (pb::GpuHealthState::Healthy, String::new()),
            Health::Unhealthy(why) => (pb::GpuHealthState::Unhealthy, why.clone()),
        };
        pb::GpuHealth {
            state: state as i32,
            reason,
            utilization_pct: self.utilization_pct,
            memory_used_mib: self.memory_used_mib,
            memory_free_mib: self.memory_free_mib,
            temperature_c: self.temperature_c,
            power_w: self.power_w,
            ecc_uncorrected: self.ecc_uncorrected,
            last_xid: self.last_xid,
        }
    }
}

/// One process holding memory on a GPU, as the inventory lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory it holds (MiB); `None` when the driver cannot tell (NVML's
    /// `Unavailable`, e.g. under some virtualization or without the right privileges).
    pub used_mib: Option<u64>,
}

/// The GPU memory (MiB) held by the processes of `gpu_processes` whose pid is in `pids` (a
/// warm generator's process group): their sum, saturating. `None` when one of them holds an
/// amount the driver cannot tell: the total is unknown then, not smaller.
pub fn held_by(gpu_processes: &[GpuProcess], pids: &[u32]) -> Option<u64> {
    let mut total = 0u64;
    for p in gpu_processes.iter().filter(|p| pids.contains(&p.pid)) {
        total = total.saturating_add(p.used_mib?);
    }
    Some(total)
}

/// XIDs that mean the GPU itself (not the program on it) is broken and needs a reset or a
/// replacement: double-bit / uncontained / unrecovered ECC errors (48, 95, 140), row-remapping
/// or page-retirement failure (64), high single-bit ECC rate (92), NVLink errors (74), GPU
/// fallen off the bus (79), internal micro-controller halts (61, 62) and GSP errors (119, 120).
/// Other critical XIDs (13, 31, 43, 45, 94, ...) blame the application: they are reported but
/// leave the GPU healthy.
pub const FATAL_XIDS: &[u64] = &[48, 61, 62, 64, 74, 79, 92, 95, 119, 120, 140];

/// The health a GPU's counters imply. `lost`: NVML says the GPU fell off the bus.
pub fn classify(ecc_uncorrected: Option<u64>, xids: &[u64], lost: bool) -> Health {
    if lost {
        return Health::Unhealthy("GPU lost (fallen off the bus or inaccessible)".into());
    }
    if let Some(n) = ecc_uncorrected
        && n > 0
    {
        return Health::Unhealthy(format!("{n} uncorrectable ECC error(s)"));
    }
    if let Some(x) = xids.iter().rev().find(|x| FATAL_XIDS.contains(x)) {
        return Health::Unhealthy(format!("critical XID {x}"));
    }
    Health::Healthy
}

/// Why GPUs could not be listed or resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// No NVML on this host: no driver, no `libnvidia-ml.so`, or no permission.
    #[error("no NVML on this host ({0})")]
    NoNvml(String),
    #[error(
        "{flag} all needs NVML to list this host's GPUs, and {why}; list the ids instead, e.g. {flag} 0,1,2,3"
    )]
    AllWithoutNvml { flag: String, why: String },
    #[error("{flag} {id}: no such GPU here; this host has {available}")]
    NotFound {
        flag: String,
        id: String,
        available: String,
    },
    #[error("{flag} {id} names a GPU given earlier in the list; name each GPU once")]
    Duplicate { flag: String, id: String },
    /// The ids are not GPU ids at all (see [`ids::parse`]).
    #[error(transparent)]
    Id(#[from] ids::GpuIdError),
    #[error("GPU inventory file {path}: {detail}")]
    File { path: String, detail: String },
    #[error("NVML: {0}")]
    Nvml(String),
}

/// Where an agent learns about its GPU. Methods may block (NVML calls, file reads): call
/// them from `spawn_blocking` in async code.
pub trait Inventory: Send + Sync + 'static {
    /// A short description for logs: `nvml`, `file /path`, `none`.
    fn describe(&self) -> String;
    /// Every GPU of the host in index order; [`GpuError::NoNvml`] when it cannot tell.
    fn list(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// Health and metrics of `gpu` now. Never fails: what cannot be measured is `None` and
    /// health is [`Health::Unknown`].
    fn sample(&self, gpu: &GpuInfo) -> GpuSample;
    /// The processes holding memory on `gpu` now (compute and graphics), with what each
    /// holds: what `generator.recycle_above_gpu_memory_mib` sums over a warm generator's
    /// process group. An error when the inventory cannot tell; callers treat that as
    /// unknown, never as zero.
    fn processes(&self, gpu: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError>;
}

/// A host without NVML: GPUs are what the operator names; nothing is measured.
#[derive(Debug, Clone)]
pub struct NoInventory {
    /// Why there is no NVML, for messages.
    pub reason: String,
}

impl Inventory for NoInventory {
    fn describe(&self) -> String {
        format!("none ({})", self.reason)
    }
    fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Err(GpuError::NoNvml(self.reason.clone()))
    }
    fn sample(&self, _gpu: &GpuInfo) -> GpuSample {
        GpuSample::unknown()
    }
    fn processes(&self, _gpu: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError> {
        Err(GpuError::NoNvml(self.reason.clone()))
    }
}

/// Environment variable naming a simulated inventory file (or `none`), read by [`detect`]
/// and by `worker --gpu-inventory`.
pub const INVENTORY_ENV: &str = "QUARRY_GPU_INVENTORY";

/// The host's inventory: the file (or `none`) named by `QUARRY_GPU_INVENTORY` when it is set,
/// else NVML when it loads, else [`NoInventory`] saying why.
pub fn detect() -> Result<Arc<dyn Inventory>, GpuError> {
    let from_env = std::env::var_os(INVENTORY_ENV).filter(|v| !v.is_empty());
    open(from_env.as_deref().map(std::path::Path::new))
}

/// `Some(path)`: the simulated inventory in that file (`none`: no inventory at all, as on a
/// host without NVML); `None`: NVML when it loads, else [`NoInventory`]. Only a bad file is
/// an error: a host without NVML still runs generators on explicit ids.
pub fn open(spec: Option<&std::path::Path>) -> Result<Arc<dyn Inventory>, GpuError> {
    match spec {
        Some(p) if p.as_os_str() == "none" => Ok(Arc::new(NoInventory {
            reason: "inventory disabled (none)".into(),
        })),
        Some(p) => Ok(Arc::new(file::FileInventory::open(p)?)),
        None => match nvml::NvmlInventory::open() {
            Ok(inv) => Ok(Arc::new(inv)),
            Err(e) => {
                let reason = match e {
                    GpuError::NoNvml(r) => r,
                    other => other.to_string(),
                };
                tracing::debug!(%reason, "no NVML: GPU health is unknown and --gpu all is unavailable");
                Ok(Arc::new(NoInventory { reason }))
            }
        },
    }
}

/// Resolves the values of `flag` (`--gpu`, `--gpus`) against the inventory: `all` (every
/// listed GPU), indices and UUIDs, checked by [`ids::parse`] first. Without a listing,
/// explicit ids pass through as [`GpuInfo::unlisted`]. Messages name `flag`.
pub fn resolve(
    inv: &dyn Inventory,
    flag: &str,
    values: &[String],
) -> Result<Vec<GpuInfo>, GpuError> {
    let parsed = ids::parse(flag, values, true)?;
    let listed = inv.list();
    if parsed == [ids::GpuId::All] {
        return match listed {
            Ok(gpus) if gpus.is_empty() => Err(GpuError::NotFound {
                flag: flag.into(),
                id: "all".into(),
                available: "no GPUs".into(),
            }),
            Ok(gpus) => Ok(gpus),
            Err(GpuError::NoNvml(why)) => Err(GpuError::AllWithoutNvml {
                flag: flag.into(),
                why,
            }),
            Err(e) => Err(e),
        };
    }
    let mut out: Vec<GpuInfo> = Vec::with_capacity(parsed.len());
    for id in parsed {
        let id = match id {
            ids::GpuId::Index(i) => i.to_string(),
            ids::GpuId::Uuid(u) => u,
            // `all` is alone when it is given (ids::parse).
            ids::GpuId::All => continue,
        };
        let gpu = match &listed {
            Ok(gpus) => {
                let found = gpus.iter().find(|g| {
                    g.index.is_some_and(|i| id.parse::<u32>() == Ok(i))
                        || g.uuid
                            .as_deref()
                            .is_some_and(|u| u.eq_ignore_ascii_case(&id))
                });
                match found {
                    Some(g) => GpuInfo {
                        id: id.clone(),
                        ..g.clone()
                    },
                    None => {
                        return Err(GpuError::NotFound {
                            flag: flag.into(),
                            id,
                            available: describe_available(gpus),
                        });
                    }
                }
            }
            Err(GpuError::NoNvml(_)) => GpuInfo::unlisted(&id),
            Err(e) => return Err(e.clone()),
        };
        // The same GPU by index and by UUID.
        if out
            .iter()
            .any(|g| g.id == gpu.id || (g.uuid.is_some() && g.uuid == gpu.uuid))
        {
            return Err(GpuError::Duplicate {
                flag: flag.into(),
                id,
            });
        }
        out.push(gpu);
    }
    Ok(out)
}

/// [`resolve`], except that ids the inventory does not list are used as given (with a
/// warning) rather than refused: `coordinator run --gpus` keeps the legacy tool's behaviour
/// of trusting the operator's ids.
pub fn resolve_lenient(
    inv: &dyn Inventory,
    flag: &str,
    values: &[String],
) -> Result<Vec<GpuInfo>, GpuError> {
    match resolve(inv, flag, values) {
        Err(GpuError::NotFound { id, available, .. }) if id != "all" => {
            tracing::warn!(gpu = %id, %available, "GPU not listed by the inventory; using the ids as given");
            resolve(
                &NoInventory {
                    reason: String::new(),
                },
                flag,
                values,
            )
        }
        other => other,
    }
}

fn describe_available(gpus: &[GpuInfo]) -> String {
    if gpus.is_empty() {
        return "no GPUs".into();
    }
    let ids: Vec<String> = gpus
        .iter()
        .map(|g| match (g.index, &g.uuid) {
            (Some(i), Some(u)) => format!("{i} ({u})"),
            (Some(i), None) => i.to_string(),
            (None, Some(u)) => u.clone(),
            (None, None) => g.id.clone(),
        })
        .collect();
    format!("GPUs {}", ids.join(", "))
}

/// Renders `worker gpus`: one line per GPU with its live figures.
pub fn table(inv: &dyn Inventory, gpus: &[GpuInfo]) -> String {
    let mut out = format!(
        "{:<5} {:<42} {:<28} {:>19} {:<14} {:>5} {}\n",
        "INDEX", "UUID", "NAME", "MEMORY USED/TOTAL", "DRIVER", "UTIL", "HEALTH"
    );
    let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    for g in gpus {
        let s = inv.sample(g);
        out.push_str(&format!(
            "{:<5} {:<42} {:<28} {:>19} {:<14} {:>5} {}\n",
            g.index.map_or("?".into(), |i| i.to_string()),
            g.uuid.as_deref().unwrap_or("?"),
            g.name.as_deref().unwrap_or("?"),
            format!("{}/{} MiB", opt(s.memory_used_mib), opt(g.memory_total_mib)),
            g.driver_version.as_deref().unwrap_or("?"),
            s.utilization_pct.map_or("?".into(), |u| format!("{u}%")),
            s.health
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Listed(Vec<GpuInfo>);
    impl Inventory for Listed {
        fn describe(&self) -> String {
            "test".into()
        }
        fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
            Ok(self.0.clone())
        }
        fn sample(&self, _: &GpuInfo) -> GpuSample {
            GpuSample::unknown()
        }
        fn processes(&self, _: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError> {
            Ok(Vec::new())
        }
    }

    fn gpu(i: u32) -> GpuInfo {
        GpuInfo {
            id: i.to_string(),
            index: Some(i),
            uuid: Some(format!("GPU-0000000{i}-aaaa")),
            name: Some("Test GPU".into()),
            memory_total_mib: Some(1024),
            driver_version: Some("1.0".into()),
        }
    }

    fn ids(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn explicit_ids_work_without_nvml_and_all_does_not() {
        let none = NoInventory {
            reason: "libnvidia-ml.so not found".into(),
        };
        let got = resolve(&none, "--gpu", &ids(&["3", "0,2"])).unwrap();
        assert_eq!(
            got.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
            ["3", "0", "2"]
        );
        assert_eq!(got[0].index, Some(3));
        assert_eq!(got[0].uuid, None);
        assert_eq!(got[0].visible_devices(), "3");
        let e = resolve(&none, "--gpu", &ids(&["all"])).unwrap_err();
        assert!(matches!(e, GpuError::AllWithoutNvml { .. }), "{e}");
        assert!(e.to_string().contains("--gpu 0,1"), "{e}");
        assert!(e.to_string().contains("libnvidia-ml.so"), "{e}");
        assert!(matches!(
            resolve(&none, "--gpu", &ids(&["1", "1"])).unwrap_err(),
            GpuError::Id(ids::GpuIdError::Duplicate { .. })
        ));
        assert!(matches!(
            resolve(&none, "--gpu", &ids(&["$(id)"])).unwrap_err(),
            GpuError::Id(ids::GpuIdError::Bad { .. })
        ));
        assert!(matches!(
            resolve(&none, "--gpu", &ids(&[])).unwrap_err(),
            GpuError::Id(ids::GpuIdError::Empty { .. })
        ));
    }

    #[test]
    fn listed_gpus_resolve_by_index_or_uuid() {
        let inv = Listed(vec![gpu(0), gpu(1)]);
        let all = resolve(&inv, "--gpu", &ids(&["all"])).unwrap();
        assert_eq!(all.len(), 2);
        let one = resolve(&inv, "--gpu", &ids(&["gpu-00000001-AAAA"])).unwrap();
        assert_eq!(one[0].index, Some(1));
        assert_eq!(one[0].visible_devices(), "GPU-00000001-aaaa");
        let e = resolve(&inv, "--gpu", &ids(&["7"])).unwrap_err();
        assert!(e.to_string().contains("GPUs 0 (GPU-00000000-aaaa)"), "{e}");
        // The same GPU by index and by UUID is a duplicate.
        assert!(matches!(
            resolve(&inv, "--gpu", &ids(&["1", "GPU-00000001-aaaa"])).unwrap_err(),
            GpuError::Duplicate { .. }
        ));
    }

    #[test]
    fn gpu_memory_held_by_a_group_is_the_sum_of_its_processes_or_unknown() {
        let p = |pid, used_mib| GpuProcess { pid, used_mib };
        let on_gpu = [p(10, Some(300)), p(11, Some(200)), p(99, Some(7000))];
        assert_eq!(held_by(&on_gpu, &[10, 11, 12]), Some(500));
        // Other processes on the GPU are not the generator's.
        assert_eq!(held_by(&on_gpu, &[12]), Some(0));
        assert_eq!(held_by(&[], &[10]), Some(0));
        // One member the driver cannot measure makes the whole unknown.
        assert_eq!(held_by(&[p(10, Some(300)), p(11, None)], &[10, 11]), None);
        assert_eq!(held_by(&[p(10, Some(300)), p(11, None)], &[10]), Some(300));
        // Lies do not overflow.
        assert_eq!(
            held_by(&[p(1, Some(u64::MAX)), p(2, Some(u64::MAX))], &[1, 2]),
            Some(u64::MAX)
        );
    }

    #[test]
    fn health_classification() {
        assert_eq!(classify(Some(0), &[], false), Health::Healthy);
        assert_eq!(classify(None, &[13, 31, 43], false), Health::Healthy);
        assert!(
            matches!(classify(Some(2), &[], false), Health::Unhealthy(r) if r.contains("2 uncorrectable ECC"))
        );
        assert!(
            matches!(classify(None, &[13, 79], false), Health::Unhealthy(r) if r.contains("XID 79"))
        );
        assert!(matches!(classify(None, &[], true), Health::Unhealthy(r) if r.contains("lost")));
    }
}
