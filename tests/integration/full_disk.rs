//! A full disk, on both sides: a repository whose file system fills up
//! during a backup and a WAL push, and a data directory too small for a
//! restore. Each gets one clear error naming the cause and the remedy, and
//! leaves the repository as it was: no manifest, no half-written object, no
//! lease; once space is freed the same commands succeed and the backup
//! restores to the source's content.
//!
//! Small file systems are tmpfs mounts, so these tests need root and the
//! right to mount (they are skipped, saying so, otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::pg::{PgCluster, StopMode, PASSWORD_USER};
use crate::support::{give_to_postgres, skip, tmp_base, Walvault};

/// A tmpfs of a given size, unmounted (lazily) when dropped.
struct Tmpfs {
    path: PathBuf,
    /// The mount point's own temporary directory, when it made one.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("walvault-tmpfs-")
            .tempdir_in(tmp_base())
            .unwrap();
        Tmpfs::run_mount(&format!("size={mib}m,mode=0755"), dir.path());
        Tmpfs {
            path: dir.path().to_owned(),
            _dir: Some(dir),
        }
    }

    /// Mount at `path` (created), mode 0700 as a data directory needs.
    fn mount_at(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        Tmpfs::run_mount(&format!("size={mib}m,mode=0700"), path);
        Tmpfs {
            path: path.to_owned(),
            _dir: None,
        }
    }

    /// Whether this process may mount a tmpfs.
    fn can_mount() -> bool {
        if !nix::unistd::geteuid().is_root() {
            return false;
        }
        let dir = tempfile::tempdir_in(tmp_base()).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        if mounted {
            let _ = Command::new("umount").arg(dir.path()).status();
        }
        mounted
    }

    fn run_mount(opts: &str, path: &Path) {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Grow (or shrink) the file system, keeping its files.
    fn resize(&self, mib: u64) {
        Tmpfs::run_mount(&format!("remount,size={mib}m"), &self.path);
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Take all but `leave` bytes of the free space with one file.
    fn fill(&self, leave: u64) -> PathBuf {
        let st = nix::sys::statvfs::statvfs(self.path()).unwrap();
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let filler = self.path().join("filler");
        let f = std::fs::File::create(&filler).unwrap();
        nix::fcntl::posix_fallocate(&f, 0, (free - leave) as i64).unwrap();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// `wv` fails with one message naming the full file system and `remedy`.
fn fails_for_space(wv: &Walvault, remedy: &str) {
    let err = wv.fails().stderr;
    eprintln!("{}: {err}", wv.describe());
    assert!(
        err.contains("No space left on device") && err.contains(remedy),
        "{}: {err}",
        wv.describe()
    );
}

fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn accounts_hash(c: &PgCluster) -> String {
    c.psql_db(
        PASSWORD_USER,
        "SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts",
    )
}

#[test]
fn a_full_disk_is_reported_and_leaves_the_repository_whole() {
    if !Tmpfs::can_mount() {
        skip("cannot mount a small file system here (not root, or no CAP_SYS_ADMIN)");
        return;
    }
    let src = PgCluster::start();
    src.pgbench(&["-i", "-s", "3", "-q"]);
    let work = tempfile::tempdir_in(tmp_base()).unwrap();
    let fs = Tmpfs::mount(64);
    let repo = fs.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    let conn = format!(
        "host={} port={} user=postgres",
        src.sockdir.display(),
        src.port
    );
    let backup = |label: &str| wv.args(["backup", "--pg", &conn, "--fast", "--label", label]);
    wv.args(["init"]).ok();
    backup("first").ok();

    // every page changes, so the next backup needs room the disk lacks
    src.psql_db(
        PASSWORD_USER,
        "UPDATE pgbench_accounts SET abalance = abalance + 7; \
         CREATE TABLE marker(t text); INSERT INTO marker VALUES ('second')",
    );
    let segment = src.psql("SELECT pg_walfile_name(pg_switch_wal())");
    // a copy: the next backup's checkpoint may recycle the original
    let segment_path = work.path().join(&segment);
    std::fs::copy(src.datadir.join("pg_wal").join(&segment), &segment_path).unwrap();
    // 16 KiB: less than any segment object (16 MiB of zeros alone make
    // 64 KiB of LZ4), so the push fails whatever the segment holds
    let filler = fs.fill(16 << 10);

    let remedy = "free space on the repository's file system";
    let push = wv.args(["wal-push"]).arg(&segment_path);
    fails_for_space(&backup("second"), remedy);
    fails_for_space(&push, remedy);
    // nothing committed, nothing half-written, nothing held
    let listed = wv.args(["list", "--json"]).ok().json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["label"], "first", "{listed}");
    assert_eq!(entries(&repo.join(".tmp")), Vec::<String>::new());
    assert_eq!(entries(&repo.join("main/locks")), Vec::<String>::new());
    let spool = work.path().join("fetched");
    let fetch = wv.args(["wal-fetch", &segment]).arg(&spool);
    // exit 1 is "not found": a segment whose push failed is not in the repository
    fetch.fails_with(1);

    // space again: the same commands succeed
    std::fs::remove_file(filler).unwrap();
    push.ok();
    backup("second").ok();
    fetch.ok();
    assert!(std::fs::read(&spool).unwrap() == std::fs::read(&segment_path).unwrap());
    give_to_postgres(&repo);

    // a data directory on a file system too small for the backup: the
    // error says the directory is incomplete and how to finish it
    let mut dst = PgCluster::for_restore(&src.bindir);
    let small = Tmpfs::mount_at(&dst.datadir, 8);
    let restore = wv.args(["restore", "--pgdata"]).arg(&dst.datadir);
    fails_for_space(&restore, "run the same restore with --delta to finish it");
    // the same for restore-pitr, whose directory must start empty
    let pitr_fs = Tmpfs::mount(8);
    let pitr_dir = pitr_fs.path().join("data");
    fails_for_space(
        &wv.args(["restore-pitr", "--pgdata"])
            .arg(&pitr_dir)
            .arg("--immediate"),
        "remove it and run the recovery (restore-pitr) again",
    );
    // room again: --delta completes it, and it holds the second backup
    small.resize(256);
    let out = restore.arg("--delta").ok().stdout;
    assert!(out.contains("already in place"), "{out}");
    dst.start_restored();
    assert_eq!(accounts_hash(&dst), accounts_hash(&src));
    assert_eq!(dst.psql_db(PASSWORD_USER, "SELECT t FROM marker"), "second");
    dst.stop(StopMode::Fast);
}
