//! A real single-node Slurm for tests: `munged`, `slurmctld` and `slurmd` (Debian's
//! `slurm-wlm`), with their configuration, state, spool, logs and munge socket under a temp
//! directory and their ports free loopback ones, so nothing of the host's own Slurm (if any) is
//! touched. The node offers `gpus` placeholder GPUs (`Gres=gpu:N` backed by empty files), so
//! `sbatch --gres=gpu:1` schedules like on a GPU cluster. Needs root (munged runs as `munge`)
//! and fails loudly without the packages, never skips.
//!
//! Clients (`sbatch`, `squeue`, `scancel`, `scontrol`) are run through [`Slurm::command`],
//! which points them at this configuration (`SLURM_CONF`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::Killed;
use crate::free_port;

/// One running Slurm; stopped (jobs cancelled, daemons killed) when dropped.
pub struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<Killed>,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short_hostname() -> String {
    run(Command::new("hostname").arg("-s")).trim().to_string()
}

impl Slurm {
    /// Starts munge and Slurm with one node offering `gpus` GPUs and `cpus` CPUs (more than
    /// the machine has is fine: the node's hardware is taken from the configuration), and
    /// waits until the node is idle.
    pub fn start(gpus: u32, cpus: u32) -> Slurm {
        for tool in ["munged", "slurmctld", "slurmd", "sbatch", "setpriv"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
                .unwrap_or(false)
                || Path::new("/usr/sbin").join(tool).exists();
            assert!(
                found,
                "{tool} is not installed: apt-get install -y slurm-wlm munge (see .ci/run)"
            );
        }
        let dir = tempfile::tempdir().expect("slurm dir");
        let d = dir.path();
        // munged (user munge) must reach its socket directory under ours.
        set_mode(d, 0o755);
        for sub in ["state", "spool", "log", "run", "munge"] {
            std::fs::create_dir_all(d.join(sub)).expect("slurm subdir");
        }
        let munge = d.join("munge");
        let key = munge.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("urandom"),
            &mut bytes,
        )
        .expect("random key");
        std::fs::write(&key, bytes).expect("munge key");
        set_mode(&key, 0o400);
        set_mode(&munge, 0o755);
        run(Command::new("chown")
            .args(["-R", "munge:munge"])
            .arg(&munge));
        let socket = munge.join("munge.sock");
        let mut daemons = vec![Killed(
            Command::new("setpriv")
                .args(["--reuid=munge", "--regid=munge", "--init-groups"])
                .arg(sbin("munged"))
                .arg("--foreground")
                .arg("--force")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!("--log-file={}", munge.join("munged.log").display()))
                .arg(format!("--seed-file={}", munge.join("seed").display()))
                .arg("--num-threads=4")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("log/munged.out")).expect("log"))
                .spawn()
                .expect("start munged"),
        )];
        wait("munged's socket", Duration::from_secs(10), || {
            socket.exists()
        });

        let host = short_hostname();
        for i in 0..gpus {
            std::fs::write(d.join(format!("fakegpu{i}")), b"").expect("placeholder gpu");
        }
        let conf = d.join("slurm.conf");
        let p = |sub: &str| d.join(sub).display().to_string();
        let text = format!(
            "ClusterName=quarrytest\n\
             SlurmctldHost={host}\n\
             SlurmctldPort={ctld}\n\
             SlurmdPort={slurmd}\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             SlurmdParameters=config_overrides\n\
             StateSaveLocation={state}\n\
             SlurmdSpoolDir={spool}\n\
             SlurmctldPidFile={run}/slurmctld.pid\n\
             SlurmdPidFile={run}/slurmd.pid\n\
             SlurmctldLogFile={log}/slurmctld.log\n\
             SlurmdLogFile={log}/slurmd.log\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             SchedulerType=sched/backfill\n\
             GresTypes=gpu\n\
             ReturnToService=2\n\
             MpiDefault=none\n\
             JobRequeue=1\n\
             KillWait=5\n\
             MinJobAge=300\n\
             NodeName={host} CPUs={cpus} RealMemory=1000 Gres=gpu:{gpus} State=UNKNOWN\n\
             PartitionName=gpu Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            ctld = free_port(),
            slurmd = free_port(),
            socket = socket.display(),
            state = p("state"),
            spool = p("spool"),
            run = p("run"),
            log = p("log"),
        );
        std::fs::write(&conf, text).expect("slurm.conf");
        let gres = if gpus == 0 {
            String::new()
        } else {
            format!("Name=gpu File={}/fakegpu[0-{}]\n", d.display(), gpus - 1)
        };
        std::fs::write(d.join("gres.conf"), gres).expect("gres.conf");
        for daemon in ["slurmctld", "slurmd"] {
            daemons.push(Killed(
                Command::new(sbin(daemon))
                    .arg("-D")
                    .arg("-f")
                    .arg(&conf)
                    .env("SLURM_CONF", &conf)
                    .stdout(Stdio::null())
                    .stderr(
                        std::fs::File::create(d.join(format!("log/{daemon}.out"))).expect("log"),
                    )
                    .spawn()
                    .unwrap_or_else(|e| panic!("start {daemon}: {e}")),
            ));
        }
        let slurm = Slurm { dir, conf, daemons };
        let started = Instant::now();
        loop {
            let out = slurm
                .command("sinfo")
                .args(["-h", "-o", "%T"])
                .output()
                .expect("sinfo");
            if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the Slurm node is not idle after 60 s: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                slurm.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        slurm
    }

    /// A Slurm client command (`sbatch`, `squeue`, ...) pointed at this Slurm.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// The directory holding this Slurm's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `sbatch --parsable ARGS SCRIPT`; returns the job id.
    pub fn sbatch(&self, args: &[&str], script: &Path) -> String {
        let out = run(self
            .command("sbatch")
            .arg("--parsable")
            .args(args)
            .arg(script));
        out.trim().split(';').next().unwrap_or_default().to_string()
    }

    /// The job's tasks as `squeue` lists them: (id such as `7_2`, state such as `RUNNING`).
    pub fn tasks(&self, job: &str) -> Vec<(String, String)> {
        let out = self
            .command("squeue")
            .args(["-h", "-r", "-j", job, "-o", "%i %T"])
            .output()
            .expect("squeue");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (id, state) = l.trim().split_once(' ')?;
                Some((id.to_string(), state.to_string()))
            })
            .collect()
    }

    /// Runs a Slurm client command to success and returns its output.
    pub fn ok(&self, program: &str, args: &[&str]) -> String {
        run(self.command(program).args(args))
    }

    /// The daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    crate::log_tail(&self.dir.path().join("log").join(f))
                )
            })
            .collect()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Jobs first, so that no step (slurmstepd and its processes) outlives its daemons.
        let _ = self
            .command("scancel")
            .args(["--full", "-u", "root"])
            .output();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let out = self.command("squeue").args(["-h"]).output();
            if out.map_or(true, |o| o.stdout.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.daemons.clear();
        let _ = Command::new("pkill").args(["-KILL", "slurmstepd"]).output();
    }
}

fn sbin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    if p.exists() { p } else { PathBuf::from(name) }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < limit,
            "{what} not ready after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
