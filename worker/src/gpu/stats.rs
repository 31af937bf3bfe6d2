//! GPU figures of one generator run, accumulated from the agent's periodic samples.

use quarry_proto::v1 as pb;

use super::GpuSample;

/// Mean utilization and peak memory over the samples taken while a run was going.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundStats {
    util_sum: u64,
    util_n: u32,
    memory_peak_mib: Option<u64>,
}

impl RoundStats {
    pub fn add(&mut self, s: &GpuSample) {
        if let Some(u) = s.utilization_pct {
            self.util_sum += u64::from(u);
            self.util_n += 1;
        }
        if let Some(m) = s.memory_used_mib {
            self.memory_peak_mib = Some(self.memory_peak_mib.map_or(m, |p| p.max(m)));
        }
    }

    /// How many utilization samples were taken.
    pub fn samples(&self) -> u32 {
        self.util_n
    }

    /// The figures, or `None` when nothing could be measured (no NVML).
    pub fn to_proto(&self) -> Option<pb::RoundGpuStats> {
        if self.util_n == 0 && self.memory_peak_mib.is_none() {
            return None;
        }
        let mean = if self.util_n == 0 {
            0
        } else {
            // Rounded to the nearest percent.
            ((self.util_sum + u64::from(self.util_n) / 2) / u64::from(self.util_n)) as u32
        };
        Some(pb::RoundGpuStats {
            utilization_mean_pct: mean,
            memory_peak_mib: self.memory_peak_mib.unwrap_or(0),
            samples: self.util_n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(util: u32, mem: u64) -> GpuSample {
        GpuSample {
            utilization_pct: Some(util),
            memory_used_mib: Some(mem),
            ..GpuSample::unknown()
        }
    }

    #[test]
    fn mean_and_peak() {
        let mut r = RoundStats::default();
        assert_eq!(r.to_proto(), None);
        r.add(&GpuSample::unknown());
        assert_eq!(r.to_proto(), None);
        r.add(&sample(10, 500));
        r.add(&sample(91, 2000));
        r.add(&sample(50, 1500));
        let p = r.to_proto().unwrap();
        assert_eq!(p.utilization_mean_pct, 50);
        assert_eq!(p.memory_peak_mib, 2000);
        assert_eq!(p.samples, 3);
    }
}
