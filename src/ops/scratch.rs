//! Scratch directories where a recovered server runs privately (drills,
//! `extract`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::restore::fetch::Owner;
use crate::restore::server::{self, ServerOptions};

/// A scratch directory for a recovered server (drills, `extract`): the
/// data directory, a private socket directory, and an authentication file
/// that trusts local connections (nothing else can reach the server: no
/// TCP, a socket only its OS user can open).
pub(crate) struct Scratch {
    pub(crate) root: PathBuf,
    pub(crate) pgdata: PathBuf,
    pub(crate) sock: PathBuf,
    pub(crate) hba: PathBuf,
    pub(crate) ident: PathBuf,
    pub(crate) port: u16,
}

impl Scratch {
    /// Make one in `parent`, named `prefix` and random characters, owned
    /// by `owner`.
    pub(crate) fn make(
        parent: &Path,
        prefix: &str,
        owner: Option<Owner>,
    ) -> Result<Scratch, String> {
        let fail = |what: &str, e: std::io::Error| {
            format!(
                "cannot make a scratch directory in {} ({what}: {e}); give another with --scratch",
                parent.display()
            )
        };
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .map_err(|e| fail("create", e))?
            .keep();
        let s = Scratch {
            pgdata: root.join("data"),
            sock: root.join("sock"),
            hba: root.join("pg_hba.conf"),
            ident: root.join("pg_ident.conf"),
            port: free_port().map_err(|e| fail("port", e))?,
            root,
        };
        let made = (|| {
            std::fs::set_permissions(&s.root, std::fs::Permissions::from_mode(0o755))?;
            std::fs::create_dir(&s.sock)?;
            std::fs::set_permissions(&s.sock, std::fs::Permissions::from_mode(0o700))?;
            std::fs::create_dir(&s.pgdata)?;
            std::fs::set_permissions(&s.pgdata, std::fs::Permissions::from_mode(0o700))?;
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = made {
            s.remove();
            return Err(fail("prepare", e));
        }
        let owned = (|| {
            write_owned(&s.hba, "local all all trust\n", owner)?;
            write_owned(&s.ident, "", owner)?;
            if let Some(o) = owner {
                for d in [&s.root, &s.sock, &s.pgdata] {
                    std::os::unix::fs::chown(d, Some(o.0.as_raw()), Some(o.1.as_raw()))
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(())
        })();
        if let Err(e) = owned {
            s.remove();
            return Err(format!(
                "cannot prepare the scratch directory {}: {e}",
                s.root.display()
            ));
        }
        Ok(s)
    }

    /// Where the tablespaces of backup `m` go: inside the scratch
    /// directory, never back to their original locations (on the same
    /// host, the live server's).
    pub(crate) fn tablespaces(
        &self,
        m: &crate::repo::Manifest,
    ) -> std::collections::HashMap<String, PathBuf> {
        m.tablespaces
            .iter()
            .map(|t| {
                (
                    t.oid.to_string(),
                    self.root.join("tablespaces").join(t.oid.to_string()),
                )
            })
            .collect()
    }

    /// How the scratch server runs: no TCP, this directory's socket and
    /// authentication files, as `owner` (`run_as`) when walvault is root,
    /// `extra` settings last. A backup without `postgresql.conf` (a
    /// Debian-style cluster keeps it elsewhere) gets an empty one here.
    pub(crate) fn server_options(
        &self,
        m: &crate::repo::Manifest,
        pg_bin: Option<PathBuf>,
        run_as: Option<&str>,
        owner: Option<Owner>,
        extra: &[(String, String)],
    ) -> Result<ServerOptions, String> {
        let mut settings = vec![
            ("listen_addresses".to_owned(), String::new()),
            (
                "unix_socket_directories".to_owned(),
                self.sock.display().to_string(),
            ),
            ("hba_file".to_owned(), self.hba.display().to_string()),
            ("ident_file".to_owned(), self.ident.display().to_string()),
        ];
        if !m.files.iter().any(|f| f.path == "postgresql.conf") {
            let conf = self.root.join("postgresql.conf");
            write_owned(&conf, "", owner)?;
            settings.push(("config_file".into(), conf.display().to_string()));
        }
        settings.extend(extra.iter().cloned());
        Ok(ServerOptions {
            port: Some(self.port),
            pg_bin,
            run_as: owner.map(|_| run_as.unwrap_or("postgres").to_owned()),
            settings,
        })
    }

    /// Remove it (its server stopped).
    pub(crate) fn remove(&self) {
        // a write still finishing in the blocking pool can add a file
        // while the tree is removed ("Directory not empty"): again, briefly
        let mut last = None;
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.root) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if let Some(e) = last {
            tracing::warn!(
                "cannot remove the scratch directory {}: {e}",
                self.root.display()
            );
        }
    }
}

/// Write `text` to `path`, owned by `owner`.
pub(crate) fn write_owned(path: &Path, text: &str, owner: Option<Owner>) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(path, Some(o.0.as_raw()), Some(o.1.as_raw()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A TCP port nothing listens on now; the scratch server listens on a
/// unix socket only, but the port names the socket and the shared memory.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The OS user a scratch server runs as: `run_as` (default `postgres`) when
/// walvault runs as root, else walvault's own (`None`).
pub(crate) fn owner(run_as: Option<&str>) -> Result<Option<Owner>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    server::os_user(run_as.unwrap_or("postgres"))
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A conninfo value inside single quotes: `\` and `'` escaped.
pub(crate) fn quote(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The last `lines` non-empty lines of a tool's output.
pub(crate) fn tail(out: &std::process::Output, lines: usize) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join("; ")
}

/// A future that resolves with the signal's name when the process is
/// asked to stop (SIGINT, SIGTERM). The handlers are installed when this is
/// called, before the scratch directory is made: a command running a
/// scratch server races its work against the future, then stops the
/// server and removes the directory before it exits.
pub(crate) fn on_interrupt() -> impl std::future::Future<Output = &'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
}
