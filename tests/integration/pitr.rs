//! `walvault restore-pitr` against real servers: recover to exact points,
//! started by walvault itself (`--start`, as the server's OS user), and
//! unreachable targets refused before anything is written.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use walvault::pg::Lsn;

use crate::support::pg::PgCluster;
use crate::support::walvault_bin;

/// A cluster archived by `walvault stream`, with a copy of the binary the
/// server's OS user can run.
pub struct Archived {
    pub c: PgCluster,
    pub bin: PathBuf,
    pub repo: PathBuf,
    pub _work: tempfile::TempDir,
    stream: Option<std::process::Child>,
    status: PathBuf,
}

impl Archived {
    pub fn new(conf: &[&str]) -> Archived {
        let c = PgCluster::start_with(crate::support::pg::PgOptions {
            conf: conf.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        let work = tempfile::tempdir().unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = work.path().join("walvault");
        std::fs::copy(walvault_bin(), &bin).unwrap();
        let repo = work.path().join("repo");
        let mut a = Archived {
            c,
            bin,
            status: work.path().join("status.json"),
            repo,
            _work: work,
            stream: None,
        };
        a.ok(&["init"]);
        let child = Command::new(&a.bin)
            .args([
                "stream",
                "--pg",
                &a.c.conninfo(),
                "--partial-interval",
                "0.2",
            ])
            .arg("--status-file")
            .arg(&a.status)
            .arg("--repo")
            .arg(&a.repo)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        a.stream = Some(child);
        a
    }

    pub fn walvault(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .arg("--repo")
            .arg(&self.repo)
            .env_remove("WALVAULT_REPO")
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.walvault(args);
        assert!(
            out.status.success(),
            "walvault {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Wait until the stream made everything up to the server's current
    /// insert position durable, then stop it (SIGTERM: it uploads the rest).
    pub fn finish_stream(&mut self) {
        let target: Lsn = self
            .c
            .psql("SELECT pg_current_wal_insert_lsn()")
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let durable = std::fs::read_to_string(&self.status)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    v["durable_lsn"]
                        .as_str()
                        .and_then(|s| s.parse::<Lsn>().ok())
                });
            if durable.is_some_and(|d| d >= target) {
                break;
            }
            assert!(Instant::now() < deadline, "stream never reached {target}");
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(mut c) = self.stream.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            assert!(c.wait().unwrap().success());
        }
        // the server's OS user reads the repository during recovery
        if nix::unistd::geteuid().is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.repo)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }

    /// `restore-pitr … --start --json` as the server's OS user into a new
    /// directory; returns the (running) cluster and the report.
    pub fn pitr(&self, target: &[&str]) -> (Recovered, serde_json::Value) {
        let dst = PgCluster::for_restore(&self.c.bindir);
        let mut cmd = self.c.command(&self.bin);
        cmd.args(["restore-pitr", "--pgdata", dst.datadir.to_str().unwrap()])
            .args(target)
            .args(["--start", "--json", "--port", &dst.port.to_string()])
            .arg("--pg-bin")
            .arg(&self.c.bindir)
            .arg("--repo")
            .arg(&self.repo);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "restore-pitr {target:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            Recovered {
                port: dst.port,
                sockdir: self.c.sockdir.clone(),
                dst,
            },
            report,
        )
    }

    /// `restore-pitr` expected to refuse: returns stderr; nothing may be written.
    pub fn pitr_refused(&self, target: &[&str]) -> String {
        let dir = self._work.path().join("refused");
        let out =
            self.walvault(&[&["restore-pitr", "--pgdata", dir.to_str().unwrap()], target].concat());
        assert!(
            !out.status.success(),
            "restore-pitr {target:?} was not refused"
        );
        assert!(
            !dir.exists(),
            "a refused restore-pitr wrote {}",
            dir.display()
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// A server restore-pitr started (it uses the source's socket directory
/// and its own port); stopped cleanly on drop.
pub struct Recovered {
    pub dst: PgCluster,
    port: u16,
    sockdir: PathBuf,
}

impl Recovered {
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .dst
            .command(&self.dst.client_bin("psql"))
            .args(["-X", "-A", "-t", "-h", self.sockdir.to_str().unwrap(), "-p"])
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stop cleanly, then check every page checksum.
    pub fn stop_and_check(&self) {
        stop(&self.dst, &self.dst.datadir);
        let out = self
            .dst
            .command(&self.dst.client_bin("pg_checksums"))
            .args(["--check", "-D", self.dst.datadir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_checksums: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn stop(c: &PgCluster, datadir: &Path) {
    if datadir.join("postmaster.pid").exists() {
        let _ = c
            .command(&c.bin("pg_ctl"))
            .args(["-D", datadir.to_str().unwrap(), "-m", "fast", "-w", "stop"])
            .output();
    }
}

impl Drop for Recovered {
    fn drop(&mut self) {
        stop(&self.dst, &self.dst.datadir);
    }
}

#[test]
fn pitr_to_lsns_immediate_latest_and_refusals() {
    let mut a = Archived::new(&[]);
    a.c.psql("CREATE TABLE marker(id int PRIMARY KEY)");
    let before_backup: String = a.c.psql("SELECT pg_current_wal_insert_lsn()");
    a.c.psql("SELECT pg_switch_wal()");
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast"]);
    // one writer: after commit i, the insert position lies between commit i
    // and anything of row i + 1
    let mut after = Vec::new();
    for i in 1..=30 {
        a.c.psql(&format!("INSERT INTO marker VALUES ({i})"));
        after.push(a.c.psql("SELECT pg_current_wal_insert_lsn()"));
    }
    a.finish_stream();

    let rows = |r: &Recovered| r.psql("SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker");
    let (r, report) = a.pitr(&["--target-lsn", &after[9]]);
    assert_eq!(rows(&r), "10:10", "{report}");
    assert_eq!(report["state"], "promoted");
    assert!(report["total_seconds"].as_f64().unwrap() > 0.0);
    r.stop_and_check();
    let (r, _) = a.pitr(&["--target-lsn", &after[19], "--exclusive"]);
    assert_eq!(rows(&r), "20:20");
    drop(r);
    let (r, _) = a.pitr(&["--immediate"]);
    assert_eq!(rows(&r), "0:0");
    drop(r);
    // everything, including the newest rows only in the .partial
    let (r, report) = a.pitr(&["--latest"]);
    assert_eq!(rows(&r), "30:30", "{report}");
    drop(r);

    let e = a.pitr_refused(&["--target-lsn", &before_backup]);
    assert!(e.contains("before the first usable backup"), "{e}");
    let e = a.pitr_refused(&["--target-lsn", "FF/0"]);
    assert!(e.contains("beyond the archive"), "{e}");
    let dry = a.ok(&[
        "restore-pitr",
        "--pgdata",
        "/nonexistent/x",
        "--latest",
        "--dry-run",
    ]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains("plan: recover to the end of the archive"),
        "{text}"
    );
    assert!(!Path::new("/nonexistent/x").exists());
}
