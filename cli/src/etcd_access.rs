//! `serve`'s etcd flags (`--etcd-ca`, `--etcd-cert`, `--etcd-key`, `--etcd-user`,
//! `--etcd-password-file` or `QUARRY_ETCD_PASSWORD`) read and checked into an
//! [`EtcdAccess`]. Files that hold secrets (the key, the password) must be readable by their
//! owner only; every mistake is a usage error naming the flag and the fix.

use std::path::Path;

use anyhow::anyhow;
use quarry_coordinator::state::etcd::EtcdAccess;

use crate::args::EtcdArgs;
use crate::exit::usage;

/// The environment variable that may hold the etcd password instead of a file.
pub const PASSWORD_ENV: &str = "QUARRY_ETCD_PASSWORD";

/// Access to etcd at `endpoints` (`http://host:port`), with TLS when `tls_url` (the
/// `etcd+tls://` scheme) or `--etcd-ca` says so; `env_password` is [`PASSWORD_ENV`]'s value.
pub fn load(
    a: &EtcdArgs,
    endpoints: &[String],
    tls_url: bool,
    env_password: Option<String>,
) -> anyhow::Result<EtcdAccess> {
    let mut access = EtcdAccess::plain(endpoints);
    match (&a.ca, tls_url) {
        (Some(ca), _) => {
            let client = match (&a.cert, &a.key) {
                (None, None) => None,
                (Some(c), Some(k)) => {
                    Some((read("--etcd-cert", c)?, read_secret("--etcd-key", k)?))
                }
                _ => {
                    return Err(usage(anyhow!(
                        "--etcd-cert/--etcd-key: only one of the pair is given; give both the \
                         client certificate and its key, or neither"
                    )));
                }
            };
            access = access.with_tls(read("--etcd-ca", ca)?, client);
        }
        (None, true) => {
            return Err(usage(anyhow!(
                "--state etcd+tls://... needs --etcd-ca PEM, the CA that signed etcd's server \
                 certificate"
            )));
        }
        (None, false) => {
            if a.cert.is_some() || a.key.is_some() {
                return Err(usage(anyhow!(
                    "--etcd-cert/--etcd-key need TLS to etcd; add --etcd-ca PEM (the CA that \
                     signed etcd's certificate)"
                )));
            }
        }
    }
    let password = match (&a.password_file, env_password.filter(|p| !p.is_empty())) {
        (Some(_), Some(_)) => {
            return Err(usage(anyhow!(
                "--etcd-password-file and {PASSWORD_ENV} are both set; keep one"
            )));
        }
        (Some(f), None) => Some(password_from_file(f)?),
        (None, p) => p,
    };
    match (&a.user, password) {
        (Some(user), Some(password)) => access = access.with_user(user.clone(), password),
        (None, None) => {}
        (Some(_), None) => {
            return Err(usage(anyhow!(
                "--etcd-user needs the password: put it in a file only you can read and pass \
                 --etcd-password-file FILE, or set {PASSWORD_ENV}"
            )));
        }
        (None, Some(_)) => {
            return Err(usage(anyhow!(
                "an etcd password is given (--etcd-password-file or {PASSWORD_ENV}) without \
                 --etcd-user; name the user"
            )));
        }
    }
    Ok(access)
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| usage(anyhow!("{flag} {}: {e}", path.display())))
}

/// Reads a file that holds a secret, refusing one that others may read, or its group unless
/// root owns it: the rule PostgreSQL applies to its key, which admits a Kubernetes Secret
/// volume (owned by root, group-readable by the pod's fsGroup) and refuses a `chmod 644` file.
fn read_secret(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta =
        std::fs::metadata(path).map_err(|e| usage(anyhow!("{flag} {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o740 } else { 0o700 };
    if mode & !allowed != 0 {
        return Err(usage(anyhow!(
            "{flag} {}: the file holds a secret but its group or others may read it (mode \
             {mode:03o}); make it owner-only with chmod 600",
            path.display()
        )));
    }
    read(flag, path)
}

fn password_from_file(path: &Path) -> anyhow::Result<String> {
    let bytes = read_secret("--etcd-password-file", path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        usage(anyhow!(
            "--etcd-password-file {}: the password is not UTF-8 text",
            path.display()
        ))
    })?;
    // One line: the newline an editor adds is not part of the password.
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(usage(anyhow!(
            "--etcd-password-file {}: the file is empty; write the etcd user's password into it",
            path.display()
        )));
    }
    Ok(password.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn eps() -> Vec<String> {
        vec!["http://127.0.0.1:2379".into()]
    }

    fn err(a: &EtcdArgs, tls: bool, env: Option<&str>) -> String {
        format!(
            "{:#}",
            load(a, &eps(), tls, env.map(str::to_string)).unwrap_err()
        )
    }

    #[test]
    fn each_mistake_names_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let loose = dir.path().join("loose");
        std::fs::write(&loose, "pw\n").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tight = dir.path().join("tight");
        std::fs::write(&tight, "pw\n").unwrap();
        std::fs::set_permissions(&tight, std::fs::Permissions::from_mode(0o600)).unwrap();

        let e = err(&EtcdArgs::default(), true, None);
        assert!(e.contains("etcd+tls") && e.contains("--etcd-ca"), "{e}");
        let a = EtcdArgs {
            cert: Some(tight.clone()),
            ..Default::default()
        };
        assert!(err(&a, false, None).contains("--etcd-ca"));
        let a = EtcdArgs {
            user: Some("root".into()),
            ..Default::default()
        };
        let e = err(&a, false, None);
        assert!(
            e.contains("--etcd-password-file") && e.contains(PASSWORD_ENV),
            "{e}"
        );
        let a = EtcdArgs {
            user: Some("root".into()),
            password_file: Some(loose.clone()),
            ..Default::default()
        };
        let e = err(&a, false, None);
        assert!(
            e.contains("--etcd-password-file") && e.contains("644") && e.contains("chmod 600"),
            "{e}"
        );
        let a = EtcdArgs {
            user: Some("root".into()),
            password_file: Some(tight.clone()),
            ..Default::default()
        };
        assert!(load(&a, &eps(), false, None).is_ok());
        assert!(err(&a, false, Some("x")).contains(PASSWORD_ENV));
        let a = EtcdArgs {
            user: Some("root".into()),
            ..Default::default()
        };
        assert!(load(&a, &eps(), false, Some("pw".into())).is_ok());
        // Every one is a usage error (exit status 2).
        let e = load(&EtcdArgs::default(), &eps(), true, None).unwrap_err();
        assert_eq!(crate::exit::of_error(&e).code(), 2);
    }
}
