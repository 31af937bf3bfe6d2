//! The members of a process group and the resident host memory they hold, read from `/proc`:
//! what a warm generator and every process it started (its workers, a simulator) are, for
//! `generator.recycle_above_memory_mib` and `generator.recycle_above_gpu_memory_mib`.

use std::io;

/// Sum of the resident set sizes (bytes) of every live process whose process group is
/// `pgid`. Processes that vanish during the walk are skipped.
pub fn group_rss_bytes(pgid: u32) -> io::Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| *p > 0)
        .unwrap_or(4096);
    let mut total = 0u64;
    for pid in group_pids(pgid)? {
        let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
            continue;
        };
        if let Some(pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u64>().ok())
        {
            total = total.saturating_add(pages.saturating_mul(page));
        }
    }
    Ok(total)
}

/// The pids of the processes whose process group is `pgid`. Processes that vanish during
/// the walk are skipped.
pub fn group_pids(pgid: u32) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat_pgrp(&stat) != Some(pgid) {
            continue;
        }
        if let Ok(pid) = pid.parse() {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The process group in a `/proc/<pid>/stat` line: the third field after the command, which
/// is in parentheses and may itself hold spaces and parentheses.
fn stat_pgrp(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    // state ppid pgrp ...
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_read_past_a_command_with_parentheses() {
        assert_eq!(stat_pgrp("42 (a) b (c)) S 1 4242 4242 0"), Some(4242));
        assert_eq!(stat_pgrp("42 (x"), None);
    }

    #[test]
    fn a_group_that_allocates_holds_more() {
        // This test's own group: it holds at least what this process holds.
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() } as u32;
        let before = group_rss_bytes(pgid).unwrap();
        assert!(before > 0);
        let block = vec![1u8; 64 << 20];
        let after = group_rss_bytes(pgid).unwrap();
        assert!(after >= before + (60 << 20), "{before} -> {after}");
        drop(block);
        assert_eq!(group_rss_bytes(u32::MAX).unwrap(), 0);
    }

    #[test]
    fn the_group_lists_this_process() {
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() } as u32;
        assert!(group_pids(pgid).unwrap().contains(&std::process::id()));
        assert!(group_pids(u32::MAX).unwrap().is_empty());
    }
}
