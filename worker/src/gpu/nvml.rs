//! The NVML inventory: the NVIDIA driver's management library, loaded at run time by
//! `nvml-wrapper` (`libnvidia-ml.so`). Loading fails cleanly on a host without the driver
//! (`LibloadingError`, `DriverNotLoaded`, ...): that is "no NVML", never a crash.
//!
//! Critical XID events arrive through an NVML event set, waited on by one background thread
//! per process; the XIDs seen are kept per GPU UUID and folded into each sample's health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

use super::{GpuError, GpuInfo, GpuProcess, GpuSample, Health, Inventory, classify};

const MIB: u64 = 1 << 20;

/// XIDs seen per GPU UUID since the agent started, oldest first (bounded).
type XidLog = Arc<Mutex<HashMap<String, Vec<u64>>>>;
/// XIDs kept per GPU; only whether a fatal one occurred, and the last, matter.
const XIDS_KEPT: usize = 64;

/// NVML, opened once per process and shared by every agent.
pub struct NvmlInventory {
    nvml: Arc<Nvml>,
    driver: Option<String>,
    xids: XidLog,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlInventory")
            .field("driver", &self.driver)
            .finish()
    }
}

impl NvmlInventory {
    /// Loads NVML. Every failure is [`GpuError::NoNvml`] with the reason.
    pub fn open() -> Result<Self, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::NoNvml(no_nvml_reason(&e)))?;
        let nvml = Arc::new(nvml);
        let driver = nvml.sys_driver_version().ok();
        let xids: XidLog = Arc::default();
        {
            let nvml = Arc::clone(&nvml);
            let xids = Arc::clone(&xids);
            // Detached: it lives as long as the process, blocked in NVML's event wait.
            let spawned = std::thread::Builder::new()
                .name("quarry-xid-watch".into())
                .spawn(move || watch_xids(&nvml, &xids));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot watch XID events; ECC counters still checked");
            }
        }
        Ok(NvmlInventory { nvml, driver, xids })
    }

    /// The NVML handle of `gpu`: by UUID when known (immune to enumeration order), else by
    /// index.
    fn device(&self, gpu: &GpuInfo) -> Result<Device<'_>, NvmlError> {
        match (&gpu.uuid, gpu.index) {
            (Some(u), _) => self.nvml.device_by_uuid(u.as_str()),
            (None, Some(i)) => self.nvml.device_by_index(i),
            (None, None) => Err(NvmlError::InvalidArg),
        }
    }

    fn lock_xids(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u64>>> {
        self.xids.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn no_nvml_reason(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(e) => format!("cannot load libnvidia-ml: {e}"),
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".into(),
        NvmlError::LibraryNotFound => "libnvidia-ml not found".into(),
        other => other.to_string(),
    }
}

impl Inventory for NvmlInventory {
    fn describe(&self) -> String {
        format!("nvml (driver {})", self.driver.as_deref().unwrap_or("?"))
    }

    fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let n = self
            .nvml
            .device_count()
            .map_err(|e| GpuError::Nvml(e.to_string()))?;
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let dev = self
                .nvml
                .device_by_index(i)
                .map_err(|e| GpuError::Nvml(format!("GPU {i}: {e}")))?;
            out.push(GpuInfo {
                id: i.to_string(),
                index: Some(i),
                uuid: dev.uuid().ok(),
                name: dev.name().ok(),
                memory_total_mib: dev.memory_info().ok().map(|m| m.total / MIB),
                driver_version: self.driver.clone(),
            });
        }
        Ok(out)
    }

    fn sample(&self, gpu: &GpuInfo) -> GpuSample {
        if gpu.uuid.is_none() && gpu.index.is_none() {
            return GpuSample::unknown();
        }
        let dev = match self.device(gpu) {
            Ok(d) => d,
            Err(NvmlError::GpuLost) => {
                return GpuSample {
                    health: classify(None, &[], true),
                    ..GpuSample::unknown()
                };
            }
            Err(e) => {
                tracing::debug!(gpu = %gpu.id, error = %e, "NVML cannot open the GPU");
                return GpuSample::unknown();
            }
        };
        let mut lost = false;
        let util = value(dev.utilization_rates().map(|u| u.gpu), &mut lost);
        let mem = value(dev.memory_info(), &mut lost);
        let used = mem.as_ref().map(|m| m.used / MIB);
        let free = mem.as_ref().map(|m| m.free / MIB);
        let temp = value(dev.temperature(TemperatureSensor::Gpu), &mut lost);
        let power = value(dev.power_usage(), &mut lost).map(|mw| mw / 1000);
        // NotSupported on GPUs without ECC (or with it disabled): unknown, not unhealthy.
        let ecc = value(
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            &mut lost,
        );
        let uuid = gpu.uuid.clone().or_else(|| dev.uuid().ok());
        let xids = uuid
            .and_then(|u| self.lock_xids().get(&u).cloned())
            .unwrap_or_default();
        let health = classify(ecc, &xids, lost);
        // A sample where nothing could be read says nothing about health either.
        let health = if util.is_none() && used.is_none() && health == Health::Healthy {
            Health::Unknown
        } else {
            health
        };
        GpuSample {
            health,
            utilization_pct: util,
            memory_used_mib: used,
            memory_free_mib: free,
            temperature_c: temp,
            power_w: power,
            ecc_uncorrected: ecc,
            last_xid: xids.last().copied(),
        }
    }

    fn processes(&self, gpu: &GpuInfo) -> Result<Vec<GpuProcess>, GpuError> {
        let nvml_err =
            |what: &str, e: NvmlError| GpuError::Nvml(format!("GPU {}: {what}: {e}", gpu.id));
        let dev = self
            .device(gpu)
            .map_err(|e| nvml_err("cannot open it", e))?;
        let compute = dev
            .running_compute_processes()
            .map_err(|e| nvml_err("running compute processes", e))?;
        // A GPU without graphics contexts may not support the query at all: none, then.
        let graphics = match dev.running_graphics_processes() {
            Ok(p) => p,
            Err(NvmlError::NotSupported) => Vec::new(),
            Err(e) => return Err(nvml_err("running graphics processes", e)),
        };
        Ok(merge_processes(compute.iter().chain(&graphics)))
    }
}

/// One entry per pid from NVML's compute and graphics lists. A process with both kinds of
/// context is listed in both with the same allocation: it counts once, at the larger figure
/// (an unknown figure stays unknown).
fn merge_processes<'a>(listed: impl Iterator<Item = &'a ProcessInfo>) -> Vec<GpuProcess> {
    let mut out: Vec<GpuProcess> = Vec::new();
    for p in listed {
        let used_mib = match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes / MIB),
            UsedGpuMemory::Unavailable => None,
        };
        match out.iter_mut().find(|q| q.pid == p.pid) {
            Some(q) => {
                q.used_mib = match (q.used_mib, used_mib) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                }
            }
            None => out.push(GpuProcess {
                pid: p.pid,
                used_mib,
            }),
        }
    }
    out
}

/// The value of one NVML query; `None` when unsupported or failed, noting a lost GPU.
fn value<T>(r: Result<T, NvmlError>, lost: &mut bool) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::GpuLost) => {
            *lost = true;
            None
        }
        Err(_) => None,
    }
}

/// Waits for critical XID events on every GPU that supports them and logs them in `xids`.
/// Returns only when events are unavailable.
fn watch_xids(nvml: &Nvml, xids: &XidLog) {
    let Ok(mut set) = nvml.create_event_set() else {
        tracing::info!("NVML events unavailable; XIDs are not watched");
        return;
    };
    let n = nvml.device_count().unwrap_or(0);
    let mut registered = 0;
    for i in 0..n {
        let Ok(dev) = nvml.device_by_index(i) else {
            continue;
        };
        let supported = dev
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !supported {
            continue;
        }
        // A failed registration releases the set: stop adding GPUs rather than lose it.
        match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                tracing::warn!(gpu = i, error = %e, "cannot watch XID events");
                return;
            }
        }
    }
    if registered == 0 {
        return;
    }
    loop {
        match set.wait(1000) {
            Ok(ev) => {
                let xid = match ev.event_data {
                    Some(XidError::Value(x)) => x,
                    Some(XidError::Unknown) | None => continue,
                };
                let Ok(uuid) = ev.device.uuid() else {
                    continue;
                };
                tracing::warn!(gpu = %uuid, xid, "critical XID event");
                let mut map = xids.lock().unwrap_or_else(|p| p.into_inner());
                let log = map.entry(uuid).or_default();
                log.push(xid);
                if log.len() > XIDS_KEPT {
                    // Keep the fatal ones: they decide health for good.
                    let drop_at = log
                        .iter()
                        .position(|x| !super::FATAL_XIDS.contains(x))
                        .unwrap_or(0);
                    log.remove(drop_at);
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::debug!(error = %e, "waiting for NVML events");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_both_lists_counts_once_and_unavailable_is_unknown() {
        let info = |pid, used| ProcessInfo {
            pid,
            used_gpu_memory: used,
            gpu_instance_id: None,
            compute_instance_id: None,
        };
        let listed = [
            info(1, UsedGpuMemory::Used(512 * MIB)),
            info(2, UsedGpuMemory::Unavailable),
            info(1, UsedGpuMemory::Used(512 * MIB)),
            info(3, UsedGpuMemory::Used(100 * MIB)),
            info(3, UsedGpuMemory::Unavailable),
        ];
        let merged = merge_processes(listed.iter());
        let p = |pid, used_mib| GpuProcess { pid, used_mib };
        assert_eq!(merged, [p(1, Some(512)), p(2, None), p(3, None)]);
    }

    /// On any host: NVML opens, or the failure is "no NVML" with a reason, never a panic.
    #[test]
    fn opening_nvml_never_fails_otherwise() {
        match NvmlInventory::open() {
            Ok(inv) => {
                let gpus = inv.list().expect("NVML lists GPUs");
                for g in &gpus {
                    let _ = inv.sample(g);
                    let _ = inv.processes(g);
                }
            }
            Err(GpuError::NoNvml(reason)) => assert!(!reason.is_empty()),
            Err(e) => panic!("unexpected NVML error: {e}"),
        }
    }
}
