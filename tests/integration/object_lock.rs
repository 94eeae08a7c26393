//! Write-once repositories (`object_lock_days`) on moto, which enforces S3
//! Object Lock: every object is written locked, nothing is rewritten in
//! place, expire removes nothing locked and extends the locks of what kept
//! backups need.

use std::collections::BTreeMap;
use std::time::Duration;

use walvault::storage::{list_all, Storage, S3};

use crate::support::moto::{MotoServer, LOCK_BUCKET};
use crate::support::pg::PgCluster;
use crate::support::stream::Streamer;
use crate::support::Walvault;

fn backup(wv: &Walvault, c: &PgCluster) -> String {
    let out = wv
        .args(["backup", "--pg", &c.conninfo(), "--fast", "--no-expire"])
        .ok();
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup ")?.split(' ').next())
        .unwrap()
        .to_owned()
}

/// A write-once repository (`object_lock_days = 1`) under `prefix` of
/// moto's locked bucket, initialised; its config file is in `dir`.
fn write_once_repo(moto: &MotoServer, dir: &std::path::Path, prefix: &str) -> Walvault {
    let cfg = dir.join("walvault.toml");
    std::fs::write(
        &cfg,
        format!(
            "repo = \"{}\"\n[s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\npath_style = true\nobject_lock_days = 1\n",
            moto.url(prefix),
            moto.endpoint
        ),
    )
    .unwrap();
    let wv = Walvault::new().config(&cfg);
    wv.args(["init"]).ok();
    wv
}

/// Versions and delete markers per key under `prefix`.
async fn versions(moto: &MotoServer, prefix: &str) -> (BTreeMap<String, usize>, usize) {
    let out = moto
        .client()
        .list_object_versions()
        .bucket(LOCK_BUCKET)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for v in out.versions() {
        *per.entry(v.key().unwrap().to_owned()).or_default() += 1;
    }
    (per, out.delete_markers().len())
}

#[test]
fn a_write_once_repository_keeps_everything_locked_and_extends_what_backups_need() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = rt.block_on(MotoServer::start());
    let work = tempfile::tempdir().unwrap();
    let wv = write_once_repo(&moto, work.path(), "repo");
    let c = PgCluster::start();
    c.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g");
    let b1 = backup(&wv, &c);
    c.psql("UPDATE t SET g = g + 1 WHERE g % 7 = 0");
    let b2 = backup(&wv, &c);
    // the WAL between the backups, as archive_command would push it
    let current = c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let mut segs: Vec<String> = std::fs::read_dir(c.datadir.join("pg_wal"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.chars().all(|ch| ch.is_ascii_hexdigit()) && *n < current)
        .collect();
    segs.sort();
    for s in &segs {
        wv.arg("wal-push")
            .arg(c.datadir.join("pg_wal").join(s))
            .ok();
    }
    // the stream writes the open segment as pieces, each object once
    let mut stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    for i in 0..5 {
        c.psql(&format!("INSERT INTO t VALUES ({i})"));
        stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));
    }
    stream.stop();
    let st = rt
        .block_on(S3::connect(LOCK_BUCKET, "repo", &moto.config(1)))
        .unwrap();
    let st: &dyn Storage = &st;

    // every object is locked, for about a day
    let before = rt.block_on(list_all(st, "")).unwrap();
    assert!(before.len() > 10, "{before:?}");
    let soon = chrono::Utc::now() + chrono::Duration::hours(23);
    let mut locks = BTreeMap::new();
    for o in &before {
        let until = rt.block_on(st.locked_until(&o.key)).unwrap();
        assert!(
            until.is_some_and(|u| u > soon),
            "{} is not locked: {until:?}",
            o.key
        );
        locks.insert(o.key.clone(), until.unwrap());
    }
    // nothing was rewritten in place or deleted: one version per key, no
    // delete markers (leases end with a `.released` object instead)
    let (per, markers) = rt.block_on(versions(&moto, "repo/"));
    assert_eq!(markers, 0);
    assert!(per.values().all(|n| *n == 1), "{per:?}");
    let piece = |k: &str| {
        k.starts_with("main/wal/")
            && k.rsplit_once('.')
                .is_some_and(|(_, o)| o.len() == 8 && o.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    assert!(
        before.iter().filter(|o| piece(&o.key)).count() >= 2,
        "{before:?}"
    );
    assert!(
        before
            .iter()
            .any(|o| o.key.starts_with("main/locks/") && o.key.ends_with(".released")),
        "{before:?}"
    );

    // keep-last 1 would expire b1, but its manifest is locked: expire keeps
    // it, says until when, removes nothing, and extends the locks of what
    // the kept backups need
    std::thread::sleep(Duration::from_secs(2));
    // (verified, so the guard for an unverified oldest backup stays out)
    wv.args(["verify"]).ok();
    // nor can it be forgotten on request
    wv.args(["expire", "--keep-last", "5", "--forget", &b1])
        .fails_with_one_line(&["cannot forget", &b1, "locked", "until"]);
    let r = wv
        .args(["expire", "--keep-last", "1", "--json"])
        .ok()
        .json();
    let verdict = |id: &str| {
        r["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(verdict(&b1)["keep"], true, "{r}");
    assert_eq!(verdict(&b1)["reasons"][0]["rule"], "locked", "{r}");
    assert_eq!(verdict(&b1)["role"], "point", "{r}");
    assert_eq!(verdict(&b2)["keep"], true, "{r}");
    assert!(r["locks_extended"].as_u64().unwrap() > 0, "{r}");
    let after = rt.block_on(list_all(st, "")).unwrap();
    for o in &before {
        assert!(
            after.iter().any(|a| a.key == o.key),
            "{} was removed while locked",
            o.key
        );
    }
    let text = wv.args(["expire", "--keep-last", "1"]).ok().stdout;
    assert!(text.contains("locked until"), "{text}");

    // the lock of still-referenced data was extended: b2's manifest, a pack
    // and a WAL file end later than they were written to
    let extended = |key: &str| {
        let now = rt.block_on(st.locked_until(key)).unwrap().unwrap();
        now > locks[key]
    };
    let manifest = format!("main/backups/{b2}");
    assert!(extended(&manifest), "{manifest}");
    let server_manifest = format!("main/pg-manifest/{b2}");
    assert!(extended(&server_manifest), "{server_manifest}");
    let pack = before
        .iter()
        .find(|o| o.key.starts_with("main/packs/"))
        .unwrap();
    assert!(extended(&pack.key), "{}", pack.key);
    let wal = before
        .iter()
        .find(|o| o.key.starts_with("main/wal/"))
        .unwrap();
    assert!(extended(&wal.key), "{}", wal.key);
    assert!(extended("config"));
    // not again before a third of the period has passed
    let again = wv
        .args(["expire", "--keep-last", "1", "--json"])
        .ok()
        .json();
    assert_eq!(again["locks_extended"], 0, "{again}");

    // still nothing rewritten in place: gc state and records are new objects
    let (per, markers) = rt.block_on(versions(&moto, "repo/"));
    assert_eq!(markers, 0);
    assert!(per.values().all(|n| *n == 1), "{per:?}");
    // and both backups restore-plan from the write-once repository
    let v = wv.args(["verify", "--json"]).ok().json();
    assert_eq!(v["passed"], true, "{v}");
}

/// File snapshots in a write-once repository: expire keeps a snapshot the
/// policy lets go while its head is locked (named as such, no error), and
/// the kept snapshots still restore.
#[test]
fn file_snapshots_in_a_write_once_repository_stay_while_locked() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = rt.block_on(MotoServer::start());
    let work = tempfile::tempdir().unwrap();
    let wv = write_once_repo(&moto, work.path(), "files-repo");
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for v in 1..=2 {
        std::fs::write(src.join("app.conf"), format!("version {v}\n")).unwrap();
        wv.args([
            "files",
            "backup",
            "--set",
            "conf",
            "--source",
            src.to_str().unwrap(),
        ])
        .ok();
    }
    let e = wv
        .args(["expire", "--keep-last", "1", "--pack-grace", "0s", "--json"])
        .ok()
        .json();
    let verdicts = e["file_snapshots"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2, "{e}");
    assert!(verdicts.iter().all(|v| v["keep"] == true), "{e}");
    assert_eq!(verdicts[0]["reasons"][0]["rule"], "locked", "{e}");
    let list = wv.args(["files", "list", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let out = work.path().join("out");
    wv.args([
        "files",
        "restore",
        "--set",
        "conf",
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(
        std::fs::read_to_string(out.join("app.conf")).unwrap(),
        "version 2\n"
    );
    wv.args(["files", "verify", "--deep"]).ok();
}
