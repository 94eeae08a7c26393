//! Repositories written by older walvault builds still open, verify and
//! recover. `tests/fixtures/repo-e2e95b9.tar.gz` was written by walvault at
//! commit e2e95b9 (manifest version 2, WAL summary version 2) with
//! `tests/fixtures/make-old-repo.sh`: an encrypted repository holding one
//! backup of a small cluster (table `fixture`, 1000 rows), then WAL from
//! `walvault stream` with 500 more rows, the restore point `fixture-rp`,
//! and 250 rows more.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::pg::{bindir, PgCluster};
use crate::support::{give_to_postgres, Walvault};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture repository unpacked into a fresh directory the server's OS
/// user can read, and walvault pointed at it with a copy of its passphrase.
fn unpack(dir: &Path) -> Walvault {
    let repo = dir.join("repo");
    std::fs::create_dir(&repo).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(fixture("repo-e2e95b9.tar.gz"))
        .arg("-C")
        .arg(&repo)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x of the fixture failed");
    let pass = dir.join("passphrase");
    std::fs::copy(fixture("fixture-passphrase"), &pass).unwrap();
    give_to_postgres(dir);
    Walvault::new()
        .repo(&repo)
        .env("WALVAULT_PASSPHRASE_FILE", &pass)
}

#[test]
fn a_repository_of_the_previous_format_lists_verifies_and_recovers() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let wv = unpack(work.path());

    // the version-2 manifest reads, with its typed fields
    let info = wv.args(["info", "--json"]).ok().json();
    assert_eq!(info["label"], "fixture", "{info}");
    assert_eq!(info["timeline"], 1, "{info}");
    let start: walvault::pg::Lsn = info["start_lsn"].as_str().unwrap().parse().unwrap();
    let stop: walvault::pg::Lsn = info["stop_lsn"].as_str().unwrap().parse().unwrap();
    assert!(start.is_valid() && start < stop, "{info}");

    // WAL objects and version-2 summaries: continuous and intact
    let verify = wv.args(["wal-verify", "--json"]).ok().json();
    assert_eq!(verify["gaps"], serde_json::json!([]), "{verify}");
    assert_eq!(verify["damaged"], serde_json::json!([]), "{verify}");
    assert!(verify["segments_read"].as_u64() >= Some(2), "{verify}");

    // and a recovery to the restore point written by the old build
    let mut dst = PgCluster::for_restore(&bindir(None));
    wv.as_server_user(&dst)
        .args(["restore-pitr", "--pgdata", dst.datadir.to_str().unwrap()])
        .args(["--target-name", "fixture-rp"])
        .ok();
    dst.start_restored();
    assert_eq!(
        dst.psql("SELECT count(*), max(i) FROM fixture"),
        "1500|1500",
        "the rows at the restore point"
    );
    assert_eq!(
        dst.psql("SELECT count(*) FROM fixture WHERE t <> md5(i::text)"),
        "0"
    );

    // the old block id function (HMAC-SHA-256, config version 1) is still
    // the one used with it: a delta restore over the copy finds its blocks
    // in place by id (with another function every block would be rewritten)
    dst.stop(crate::support::pg::StopMode::Fast);
    let out = wv
        .args([
            "restore",
            "--delta",
            "--pgdata",
            dst.datadir.to_str().unwrap(),
        ])
        .ok();
    let (written, in_place) = crate::restore_matrix::delta_summary(&out.stdout);
    assert!(
        in_place > 10 * written && in_place > 1 << 20,
        "{written} written, {in_place} in place: {}",
        out.stdout
    );
}
