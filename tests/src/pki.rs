//! Certificates for tests of TLS: a CA, a server certificate for localhost/127.0.0.1 and a
//! client certificate it signed, and a certificate from another CA, made by the `openssl`
//! command for each test (Debian package `openssl`). Keys are written owner-only.

use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian package openssl) is needed by this test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed
/// by the CA; plus a second CA that signed nothing the server trusts.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir for the certificates");
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=quarry test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            );
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write a certificate extension file");
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .expect("write a certificate extension file");
        for (name, ca) in [("server", "ca"), ("client", "ca"), ("stranger", "other-ca")] {
            let ext = if name == "server" {
                "server.ext"
            } else {
                "client.ext"
            };
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    &format!("/CN={name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        std::fs::write(d.join("token"), "quarry-test-token-1\n").expect("write the token");
        std::fs::write(d.join("wrong-token"), "not-the-token\n").expect("write the token");
        // Keys are secrets: owner-only, as `serve` requires of --etcd-key.
        for name in ["ca", "other-ca", "server", "client", "stranger"] {
            std::fs::set_permissions(
                d.join(format!("{name}.key")),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("chmod 600 a key");
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}
