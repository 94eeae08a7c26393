//! Repositories written by older walvault builds still open, verify and
//! recover. Both fixtures were written with `tests/fixtures/make-old-repo.sh`:
//! an encrypted repository holding one backup of a small cluster (table
//! `fixture`, 1000 rows), then WAL from `walvault stream` with 500 more
//! rows, the restore point `fixture-rp`, and 250 rows more.
//! - `repo-e2e95b9.tar.gz`, walvault at commit e2e95b9: config version 1
//!   (HMAC-SHA-256 ids), manifest version 2, WAL summary version 2;
//! - `repo-ff98bbb.tar.gz`, walvault at commit ff98bbb: config version 3
//!   (256-bit keyed BLAKE3 ids, zstd groups, 45-byte entries), manifest
//!   version 6 — the format before 128-bit ids (decision 040).

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
fn unpack(dir: &Path, name: &str) -> Walvault {
    let repo = dir.join("repo");
    std::fs::create_dir(&repo).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(fixture(name))
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
fn a_repository_of_config_version_1_lists_verifies_and_recovers() {
    let work = tempfile::tempdir().unwrap();
    lists_verifies_and_recovers(work.path(), "repo-e2e95b9.tar.gz");
}

/// The format before 128-bit ids: it reads, and a backup this build takes
/// into it is written in that format (config version 3 stays, manifests of
/// version 6 with 32-byte ids) and restores.
#[test]
fn a_repository_of_config_version_3_recovers_and_takes_new_backups_in_its_format() {
    let work = tempfile::tempdir().unwrap();
    let (wv, mut dst) = lists_verifies_and_recovers(work.path(), "repo-ff98bbb.tar.gz");
    // a new backup of the recovered cluster, in another stanza, into the
    // old repository (the delta restore put back the fixture's own
    // configuration: it starts as a restored directory, wherever its
    // recovery ends)
    dst.start_restored();
    dst.psql(
        "INSERT INTO fixture SELECT g, md5(g::text) \
         FROM generate_series((SELECT max(i) FROM fixture) + 1, 3000) g",
    );
    let wv2 = wv.env("WALVAULT_STANZA", "second");
    wv2.args(["backup", "--pg", &dst.conninfo(), "--fast"]).ok();
    let repo = work.path().join("repo");
    let config = std::fs::read(repo.join("config")).unwrap();
    let config = String::from_utf8_lossy(&config);
    assert!(
        config.contains("\"version\": 3") && config.contains("\"blake3-keyed\""),
        "the config changed: {config}"
    );
    let pass = std::fs::read_to_string(fixture("fixture-passphrase")).unwrap();
    let secret = walvault::repo::Secret::Passphrase(pass.trim_end().to_owned());
    let versions = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(&repo).unwrap());
        let r = walvault::repo::Repository::open(storage, Some(&secret))
            .await
            .unwrap();
        let mut versions = Vec::new();
        for stanza in ["main", "second"] {
            let paths = walvault::repo::StanzaPaths::new(stanza);
            for id in walvault::repo::Manifest::list_ids(&r, &paths)
                .await
                .unwrap()
            {
                let m = walvault::repo::Manifest::load(&r, &paths, &id)
                    .await
                    .unwrap();
                versions.push((stanza, m.version));
            }
        }
        versions
    });
    assert_eq!(versions, [("main", 6), ("second", 6)]);
    wv2.args(["verify", "--deep"]).ok();
    let mut back = PgCluster::for_restore(&bindir(None));
    wv2.as_server_user(&back)
        .args(["restore", "--pgdata", back.datadir.to_str().unwrap()])
        .ok();
    back.start_restored();
    assert_eq!(
        back.psql("SELECT count(*), max(i), sum(hashtext(t)) FROM fixture"),
        dst.psql("SELECT count(*), max(i), sum(hashtext(t)) FROM fixture"),
    );
    assert_eq!(back.psql("SELECT count(*) FROM fixture"), "3000");
}

/// The fixture `name` lists, verifies, recovers to its restore point and
/// restores in place by block id; returns walvault on it and the stopped
/// recovered cluster.
fn lists_verifies_and_recovers(work: &Path, name: &str) -> (Walvault, PgCluster) {
    std::fs::set_permissions(work, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let wv = unpack(work, name);

    // the old manifest (version 2 or 6) reads, with its typed fields
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

    // the old block id function (HMAC-SHA-256 in config version 1, 256-bit
    // BLAKE3 in 3) is still the one used with it: a delta restore over the
    // copy finds its blocks in place by id (with another function every
    // block would be rewritten)
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
    (wv, dst)
}
