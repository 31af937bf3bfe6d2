//! Hosts as Linux network namespaces on one machine, joined by a veth pair: a test runs the
//! coordinator in one and a worker in the other, and cuts the link to partition them. Needs
//! root (CAP_NET_ADMIN) and the `ip` command; a test fails, never skips, without them.

use std::process::{Command, Output};

/// Two namespaces joined by a veth pair, `10.77.<n>.1/24` and `10.77.<n>.2/24`; both are
/// deleted when the guard is dropped.
pub struct Link {
    pub a: String,
    pub b: String,
    veth_b: String,
    n: u8,
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("the `ip` command (Debian iproute2) is needed: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Link {
    /// Creates the namespaces `q<pid>a`/`q<pid>b` (names unique per test process and `n`).
    pub fn new(n: u8) -> Link {
        let tag = format!("q{}{n}", std::process::id() % 100_000);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        let (veth_a, veth_b) = (format!("{tag}va"), format!("{tag}vb"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let link = Link {
            a: a.clone(),
            b: b.clone(),
            veth_b: veth_b.clone(),
            n,
        };
        ip(&[
            "link", "add", &veth_a, "netns", &a, "type", "veth", "peer", "name", &veth_b, "netns",
            &b,
        ]);
        ip(&[
            "-n",
            &a,
            "addr",
            "add",
            &format!("{}/24", link.addr_a()),
            "dev",
            &veth_a,
        ]);
        ip(&[
            "-n",
            &b,
            "addr",
            "add",
            &format!("{}/24", link.addr_b()),
            "dev",
            &veth_b,
        ]);
        ip(&["-n", &a, "link", "set", &veth_a, "up"]);
        ip(&["-n", &b, "link", "set", &veth_b, "up"]);
        link
    }

    pub fn addr_a(&self) -> String {
        format!("10.77.{}.1", self.n)
    }

    pub fn addr_b(&self) -> String {
        format!("10.77.{}.2", self.n)
    }

    /// `program` to be run inside namespace `ns` (one of `a`, `b`).
    pub fn command(ns: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Cuts (`false`) or restores (`true`) the link on namespace b's side.
    pub fn set_up(&self, up: bool) {
        ip(&[
            "-n",
            &self.b,
            "link",
            "set",
            &self.veth_b,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
