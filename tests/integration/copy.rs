//! `walvault copy` to a second repository (3-2-1) on a real Garage server,
//! re-encrypted under the copy's own key; recovery from the copy once the
//! first repository is gone, through the fallback of restore-pitr and
//! wal-fetch and its prefetch; bad input.

use std::path::{Path, PathBuf};

use crate::pitr::{pitr_started, Archived};
use crate::support::pg::PgCluster;
use crate::support::s3::S3Server;
use crate::support::Walvault;

/// A config file: the main repository `main`, and `[[repository]]`
/// entries (name, location, extra lines) with the Garage settings.
fn config(dir: &Path, main: &Path, server: &S3Server, entries: &[(&str, &str, &str)]) -> PathBuf {
    let s3 = server.config();
    let mut text = format!("repo = \"{}\"\n", main.display());
    for (name, repo, extra) in entries {
        text.push_str(&format!(
            "\n[[repository]]\nname = \"{name}\"\nrepo = \"{repo}\"\n{extra}\n[repository.s3]\n{}",
            crate::support::s3::s3_keys(&s3)
        ));
    }
    let file = dir.join("walvault.toml");
    std::fs::write(&file, text).unwrap();
    // the recovered server's restore_command reads it as the server's user
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&file).unwrap().permissions(),
        0o644,
    );
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    file
}

fn backup(a: &Archived) -> String {
    let out = a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--no-expire"]);
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup ")?.split(' ').next())
        .unwrap()
        .to_owned()
}

fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in walkdir(dir) {
        out.push((e.clone(), std::fs::metadata(&e).unwrap().len()));
    }
    out.sort();
    out
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(walkdir(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn copy_to_an_encrypted_garage_repository_recovers_the_same_rows_once_the_first_is_gone() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start());
    let mut a = Archived::new(&[]);
    a.c.psql(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
    );
    let b1 = backup(&a);
    a.c.psql("UPDATE t SET v = 'changed' WHERE id % 10 = 0");
    let b2 = backup(&a);
    a.c.psql("INSERT INTO t SELECT g, 'late' FROM generate_series(20001, 20500) g");
    a.finish_stream();
    let want =
        a.c.psql("SELECT count(*) || ' ' || md5(string_agg(v, ',' ORDER BY id)) FROM t");

    // the copy: an encrypted repository on Garage with its own key
    let key = a.work.path().join("offsite.key");
    std::fs::write(
        &key,
        "b2Zmc2l0ZSBrZXkgb2YgdGhlIGNvcHkgdGVzdCwgMzIgYnl0ZXMhIQ==\n",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let url = server.url("offsite");
    Walvault::new()
        .envs(server.env())
        .arg("--repo")
        .arg(&url)
        .arg("--key-file")
        .arg(&key)
        .args(["init", "--encrypt"])
        .ok();
    let cfg = config(
        a.work.path(),
        &a.repo,
        &server,
        &[(
            "offsite",
            &url,
            &format!(
                "key_file = \"{}\"\nstorage_class = \"STANDARD_IA\"",
                key.display()
            ),
        )],
    );
    let wv = Walvault::new().config(&cfg);

    let r = wv.args(["copy", "--to", "offsite", "--json"]).ok().json();
    assert_eq!(r["backups_copied"], serde_json::json!([b1, b2]), "{r}");
    assert_eq!(r["reencrypted"], true, "{r}");
    assert!(r["blocks_new"].as_u64().unwrap() > 0, "{r}");
    assert!(r["wal_files"].as_u64().unwrap() >= 2, "{r}");
    // b2 shares most blocks with b1: fewer new blocks than read
    assert!(
        r["blocks_new"].as_u64().unwrap() < r["blocks_read"].as_u64().unwrap(),
        "{r}"
    );

    // a second run moves nothing
    let again = wv.args(["copy", "--to", "offsite", "--json"]).ok().json();
    assert_eq!(again["backups_copied"], serde_json::json!([]), "{again}");
    assert_eq!(
        again["backups_present"],
        serde_json::json!([b1, b2]),
        "{again}"
    );
    assert_eq!(again["bytes_moved"], 0, "{again}");
    assert_eq!(again["blocks_read"], 0, "{again}");
    assert_eq!(again["wal_files"], 0, "{again}");

    // list shows the copy and its lag; the copy lists the same backups
    let listed = wv.args(["list"]).ok().stdout;
    assert!(
        listed.contains("copy offsite (")
            && listed.contains("2 of 2 backup(s); WAL 0 segment(s) behind"),
        "{listed}"
    );
    let there = wv
        .args(["list", "--repository", "offsite", "--json"])
        .ok()
        .json();
    let ids: Vec<&str> = there
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b1.as_str(), b2.as_str()]);
    // the copy verifies clean, every byte read under its own key
    let v = Walvault::new()
        .envs(server.env())
        .arg("--repo")
        .arg(&url)
        .arg("--key-file")
        .arg(&key)
        .args(["verify", "--deep", "--json"])
        .ok()
        .json();
    assert_eq!(v["passed"], true, "{v}");

    // a WAL file damaged in the main repository and missing from the copy:
    // wal-fetch must not answer "not there" (exit 1 ends recovery early)
    // but fail (255); intact in the main one, it is served from there
    let wal_dir = a.repo.join("main/wal/00000001");
    let mut segs: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    segs.sort();
    let first = segs[0].clone();
    let original = std::fs::read(wal_dir.join(&first)).unwrap();
    let copy_store = rt.block_on(server.storage("offsite"));
    rt.block_on(walvault::storage::Storage::delete(
        &copy_store,
        &format!("main/wal/00000001/{first}"),
    ))
    .unwrap();
    let mut damaged = original.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x01;
    std::fs::write(wal_dir.join(&first), &damaged).unwrap();
    let dest = a.work.path().join("fetched");
    let out = wv.args(["wal-fetch", &first]).arg(&dest).fails_with(255);
    assert!(
        out.stderr.contains("going on with repository offsite")
            && out.stderr.contains("does not have it"),
        "{}",
        out.stderr
    );
    std::fs::write(wal_dir.join(&first), &original).unwrap();
    wv.args(["wal-fetch", &first]).arg(&dest).ok();
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);

    // a flipped byte in the main repository's biggest pack: the restore
    // fails authenticating a block there, goes on from the copy (finishing
    // the directory as a delta restore), and the server recovers every row
    let biggest = walkdir(&a.repo.join("main/packs"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&biggest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&biggest, bytes).unwrap();
    let mut dst = PgCluster::for_restore(&a.c.bindir);
    let out = wv
        .args(["restore", "--backup", &b2, "--pgdata"])
        .arg(&dst.datadir)
        .ok();
    assert!(
        out.stderr.contains("the main repository failed")
            && out.stderr.contains("going on with repository offsite"),
        "{}",
        out.stderr
    );
    dst.start_restored();
    assert_eq!(
        dst.psql("SELECT count(*) || ' ' || md5(string_agg(v, ',' ORDER BY id)) FROM t"),
        want
    );
    drop(dst);

    // the first repository is lost: restore-pitr falls back to the copy,
    // says so, and recovers the same rows (its restore_command too)
    assert!(segs.len() >= 3, "{segs:?}");
    let fetched = a.work.path().join("prefetch-test");
    std::fs::create_dir(&fetched).unwrap();
    wv.args(["wal-fetch", "--prefetch", "0", &segs[2]])
        .arg(fetched.join("want"))
        .ok();
    std::fs::remove_dir_all(&a.repo).unwrap();
    // wal-fetch serves a segment from the copy, and its prefetching copy
    // fills the spool from there too: the next segment comes from the
    // spool, without another fall-back (a lost repository can take long
    // to fail)
    let out = wv.args(["wal-fetch", &segs[1]]).arg(fetched.join("a")).ok();
    assert!(
        out.stderr.contains("going on with repository offsite"),
        "{}",
        out.stderr
    );
    let spooled = fetched.join("walvault-spool").join(&segs[2]);
    crate::support::wait_for(
        std::time::Duration::from_secs(60),
        "the prefetch spools the next segment",
        || {
            spooled
                .exists()
                .then_some(())
                .ok_or_else(|| format!("no {}", spooled.display()))
        },
    );
    let out = wv.args(["wal-fetch", &segs[2]]).arg(fetched.join("b")).ok();
    assert!(!out.stderr.contains("going on with"), "{}", out.stderr);
    assert!(
        std::fs::read(fetched.join("b")).unwrap() == std::fs::read(fetched.join("want")).unwrap(),
        "the spooled segment differs from the one in the main repository"
    );
    let (rec, report) = pitr_started(&a.c, &wv, &["--latest"]);
    assert_eq!(report["backup"], b2.as_str(), "{report}");
    let got = rec.psql("SELECT count(*) || ' ' || md5(string_agg(v, ',' ORDER BY id)) FROM t");
    assert_eq!(got, want);
    // PostgreSQL's manifest of the backup came along with the copy
    let pg_manifest = std::fs::read_to_string(rec.dst.datadir.join("backup_manifest")).unwrap();
    assert!(
        pg_manifest.contains("\"PostgreSQL-Backup-Manifest-Version\"")
            && pg_manifest.contains("\"Files\""),
        "{pg_manifest}"
    );
    rec.stop_and_check();
    // and it said where it read from
    let out = wv
        .args(["restore-pitr", "--latest", "--dry-run", "--pgdata"])
        .arg(a.work.path().join("nowhere"))
        .ok();
    assert!(
        out.stderr.contains("going on with repository offsite"),
        "{}",
        out.stderr
    );
}

#[test]
fn copy_bad_input_is_one_line_and_changes_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start());
    let work = tempfile::tempdir().unwrap();
    let main = work.path().join("repo");
    Walvault::new().repo(&main).args(["init"]).ok();
    let cfg = config(
        work.path(),
        &main,
        &server,
        &[("itself", main.to_str().unwrap(), "")],
    );
    let before = files_under(&main);
    let wv = Walvault::new().config(&cfg);
    wv.args(["copy", "--to", "itself", "--backups", "weekly"])
        .fails_with_one_line(&["--backups \"weekly\"", "all, last or gfs"]);
    wv.args(["copy", "--to", "nowhere"])
        .fails_with_one_line(&["no repository \"nowhere\"", "itself"]);
    wv.args(["copy", "--to", "itself"])
        .fails_with_one_line(&["same repository"]);
    assert_eq!(files_under(&main), before);
}
