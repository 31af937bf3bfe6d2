//! What a generator run is told about its GPU and its share of the host's CPUs.
//!
//! The generator must see exactly its GPU: `CUDA_VISIBLE_DEVICES` holds the GPU's UUID when
//! the inventory knows it (immune to enumeration order), else the id the operator gave, with
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that an index means the same GPU to CUDA as to NVML and
//! `nvidia-smi`. Inside, the GPU is device 0, which is what the legacy generator's `--gpu 0`
//! expects. Thread pools (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`) are sized so that the agents
//! of one host do not oversubscribe its CPUs.

use crate::gpu::GpuInfo;

/// Threads per generator run when the job does not say: the host's CPUs (as this process may
/// use them: affinity and cgroup quota) divided among the agents of this process, at least 1.
pub fn default_threads(agents: usize) -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from((cpus / agents.max(1)).max(1)).unwrap_or(u32::MAX)
}

/// The environment of one generator run, in the order it is applied (later wins):
/// thread counts (the job's `env` may override them), the job's `env`, then the GPU binding
/// and Quarry's own variables, which the job cannot override.
///
/// `bind_gpu`: the job's `generator.bind_gpu`. `threads`: the job's `threads_per_gpu`, or
/// `None` for [`default_threads`] of `agents`.
pub fn environment(
    gpu: &GpuInfo,
    bind_gpu: bool,
    threads: Option<u32>,
    agents: usize,
    job_env: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = Vec::with_capacity(6 + job_env.len());
    let n = threads
        .filter(|&t| t > 0)
        .unwrap_or_else(|| default_threads(agents))
        .to_string();
    env.push(("OMP_NUM_THREADS".into(), n.clone()));
    env.push(("MKL_NUM_THREADS".into(), n));
    env.extend(job_env.iter().cloned());
    if bind_gpu {
        env.push(("CUDA_VISIBLE_DEVICES".into(), gpu.visible_devices()));
        env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
    }
    env.push(("QUARRY_GPU".into(), gpu.id.clone()));
    if let Some(u) = &gpu.uuid {
        env.push(("QUARRY_GPU_UUID".into(), u.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value a child sees: the last setting wins.
    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn uuid_when_known_else_the_id() {
        let mut g = GpuInfo::unlisted("3");
        let env = environment(&g, true, Some(4), 2, &[]);
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES"), Some("3"));
        assert_eq!(get(&env, "CUDA_DEVICE_ORDER"), Some("PCI_BUS_ID"));
        assert_eq!(get(&env, "OMP_NUM_THREADS"), Some("4"));
        assert_eq!(get(&env, "MKL_NUM_THREADS"), Some("4"));
        g.uuid = Some("GPU-abc".into());
        let env = environment(&g, true, None, 1, &[]);
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES"), Some("GPU-abc"));
        assert_eq!(get(&env, "QUARRY_GPU"), Some("3"));
        let env = environment(&g, false, None, 1, &[]);
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES"), None);
    }

    #[test]
    fn the_job_may_set_threads_but_not_the_gpu() {
        let g = GpuInfo::unlisted("1");
        let job = vec![
            ("OMP_NUM_THREADS".to_string(), "2".to_string()),
            ("CUDA_VISIBLE_DEVICES".to_string(), "0,1,2".to_string()),
            ("MY_VAR".to_string(), "x".to_string()),
        ];
        let env = environment(&g, true, Some(8), 1, &job);
        assert_eq!(get(&env, "OMP_NUM_THREADS"), Some("2"));
        assert_eq!(get(&env, "MKL_NUM_THREADS"), Some("8"));
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES"), Some("1"));
        assert_eq!(get(&env, "MY_VAR"), Some("x"));
    }

    #[test]
    fn default_threads_split_the_host_and_are_at_least_one() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert_eq!(default_threads(1), cpus);
        assert_eq!(default_threads(10_000), 1);
        assert_eq!(default_threads(0), cpus);
    }
}
