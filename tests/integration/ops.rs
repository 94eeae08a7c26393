//! Operating the repository against real servers: `expire` (window, restore
//! points, holds; WAL per range; during a running backup and stream) and
//! `verify` (each kind of damage named; the ledger of `--since-last`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pitr::{Archived, Recovered};
use crate::support::{wait_until, Walvault};

const SEG: u64 = 16 << 20;

/// `backup --fast --no-expire`; returns the backup's id.
fn backup(a: &Archived) -> String {
    let out = a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--no-expire"]);
    backup_id(&out.stdout)
}

fn backup_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup ")?.split(' ').next())
        .unwrap_or_else(|| panic!("no backup id in {stdout}"))
        .to_owned()
}

fn lsn(v: &serde_json::Value) -> u64 {
    let (hi, lo) = v.as_str().unwrap().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Segment numbers of the WAL files of timeline 1 in the repository
/// (complete segments and `.partial` files).
fn wal_segments(repo: &Path) -> Vec<u64> {
    let dir = repo.join("main/wal/00000001");
    let mut segs: Vec<u64> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let n = n.strip_suffix(".partial").unwrap_or(&n).to_owned();
            (n.len() == 24 && !n.contains('.')).then(|| {
                let log = u64::from_str_radix(&n[8..16], 16).unwrap();
                let seg = u64::from_str_radix(&n[16..24], 16).unwrap();
                log * 0x100 + seg
            })
        })
        .collect();
    segs.sort();
    segs.dedup();
    segs
}

fn listed(wv: &Walvault) -> Vec<serde_json::Value> {
    wv.args(["list", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn expire_keeps_the_window_and_restore_points_and_what_it_keeps_recovers() {
    let mut a = Archived::new(&[]);
    a.c.psql("CREATE TABLE marker(id int PRIMARY KEY)");
    let insert = |a: &Archived, ids: std::ops::RangeInclusive<i32>| {
        for i in ids {
            a.c.psql(&format!("INSERT INTO marker VALUES ({i})"));
        }
    };
    insert(&a, 1..=5);
    let b1 = backup(&a);
    insert(&a, 6..=10);
    let b2 = backup(&a);
    // a moment only b2 plus the WAL after it can reach
    let after_b2 = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(300));
    insert(&a, 11..=15);
    let b3 = backup(&a);
    std::thread::sleep(Duration::from_secs(7));
    insert(&a, 16..=20);
    // the window will start between b3 and this moment
    let m = chrono::Utc::now();
    std::thread::sleep(Duration::from_secs(1));
    insert(&a, 21..=25);
    let b4 = backup(&a);
    insert(&a, 26..=30);
    let b5 = backup(&a);
    a.wait_stream_durable();
    // verify first: retention keeps one more backup while the oldest kept
    // one is unverified
    a.ok(&["verify"]);

    let before = listed(&a.wv);
    assert_eq!(before.len(), 5);
    let wal_before = wal_segments(&a.repo);
    let within = (chrono::Utc::now() - m).as_seconds_f64() + 5.0;
    let policy = [
        "--keep-within".to_owned(),
        format!("{within:.3}s"),
        "--keep-last".to_owned(),
        "4".to_owned(),
        "--pack-grace".to_owned(),
        "0s".to_owned(),
    ];
    let mut dry = vec!["expire", "--dry-run", "--json"];
    dry.extend(policy.iter().map(String::as_str));
    let plan = a.ok(&dry).json();
    let verdict = |r: &serde_json::Value, id: &str| -> serde_json::Value {
        r["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {r}"))
            .clone()
    };
    assert_eq!(verdict(&plan, &b1)["keep"], false, "{plan}");
    assert_eq!(verdict(&plan, &b2)["role"], "point", "{plan}");
    assert_eq!(verdict(&plan, &b3)["role"], "recovery_base", "{plan}");
    assert!(
        verdict(&plan, &b3)["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule"] == "window_base"),
        "{plan}"
    );
    for id in [&b4, &b5] {
        assert_eq!(verdict(&plan, id)["keep"], true, "{plan}");
    }
    assert!(
        !plan["wal_expired"].as_array().unwrap().is_empty(),
        "{plan}"
    );
    // a dry run changes nothing
    assert_eq!(listed(&a.wv).len(), 5);
    assert_eq!(wal_segments(&a.repo), wal_before);

    let mut apply = vec!["expire", "--json"];
    apply.extend(policy.iter().map(String::as_str));
    let done = a.ok(&apply).json();
    assert!(done["bytes_freed"].as_u64().unwrap() > 0, "{done}");
    let after = listed(&a.wv);
    let ids: Vec<&str> = after.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&b2, &b3, &b4, &b5], "{done}");
    // PostgreSQL's manifests: the expired backup's went with it
    let pg_manifests: Vec<String> = std::fs::read_dir(a.repo.join("main/pg-manifest"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!pg_manifests.contains(&b1), "{pg_manifests:?}");
    assert_eq!(pg_manifests.len(), 4, "{pg_manifests:?}");

    // WAL: b2's own range, and everything from b3 on; nothing else
    let range = |id: &str| {
        let b = before.iter().find(|b| b["id"] == id).unwrap();
        (lsn(&b["start_lsn"]) / SEG, lsn(&b["stop_lsn"]) / SEG)
    };
    let (b2_first, b2_last) = range(&b2);
    let (b3_first, _) = range(&b3);
    let wal_after = wal_segments(&a.repo);
    for s in &wal_before {
        let kept = (b2_first..=b2_last).contains(s) || *s >= b3_first;
        assert_eq!(
            wal_after.contains(s),
            kept,
            "segment {s:X}: b2 {b2_first:X}..{b2_last:X}, b3 from {b3_first:X}; after {wal_after:X?}"
        );
    }
    assert!(
        wal_before.iter().any(|s| !wal_after.contains(s)),
        "nothing was expired"
    );
    // wal-verify knows b2 is a restore point with its own WAL
    let v = a.ok(&["wal-verify"]);
    assert!(v.stdout.contains("restore point"), "{}", v.stdout);

    a.finish_stream();
    let rows = |r: &Recovered| r.psql("SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker");
    // the oldest moment of the window, from its base b3
    let (r, report) = a.pitr(&["--target-time", &m.to_rfc3339()]);
    assert_eq!(report["backup"], b3.as_str(), "{report}");
    assert_eq!(rows(&r), "20:20", "{report}");
    r.stop_and_check();
    drop(r);
    // the restore point b2, at its consistency point
    let (r, report) = a.pitr(&["--backup", &b2, "--immediate"]);
    assert_eq!(rows(&r), "10:10", "{report}");
    r.stop_and_check();
    drop(r);
    // and the WAL after b2 is gone: a moment between b2 and b3 cannot be
    // reached any more
    let refused = a.pitr_refused(&["--target-time", &after_b2.to_rfc3339()]);
    assert!(!refused.is_empty());

    // list shows the rule that keeps each backup and its last verify
    let l = listed(&a.wv);
    let entry = |id: &str| l.iter().find(|b| b["id"] == id).unwrap().clone();
    assert!(
        entry(&b3)["retention"]["rules"]
            .to_string()
            .contains("window base"),
        "{l:?}"
    );
    assert_eq!(entry(&b2)["last_verify"]["ok"], true, "{l:?}");
    // a held backup outlives a policy that would expire it
    a.ok(&["hold", &b2, "--reason", "audit 2026"]);
    assert_eq!(listed(&a.wv)[0]["holds"][0]["reason"], "audit 2026");
    a.ok(&["verify"]);
    let r = a.ok(&["expire", "--keep-last", "1", "--json"]).json();
    assert!(
        verdict(&r, &b2)["reasons"].to_string().contains("held"),
        "{r}"
    );
    let ids: Vec<String> = listed(&a.wv)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [b2.clone(), b5.clone()], "{r}");
    a.ok(&["wal-verify"]);
    // --forget: refused for a held backup and for the newest, one line
    // each, nothing removed
    a.wv.args(["expire", "--keep-last", "5", "--forget", &b2])
        .fails_with_one_line(&["cannot forget", &b2, "audit 2026", "release"]);
    a.wv.args(["expire", "--keep-last", "5", "--forget", &b5])
        .fails_with_one_line(&["cannot forget", &b5, "newest"]);
    assert_eq!(listed(&a.wv).len(), 2);
    let out = a.ok(&["release", &b2]);
    assert!(out.stdout.contains("1 hold(s) released"), "{}", out.stdout);
    // released, it goes although the policy keeps it; what stays verifies
    let out = a.ok(&["expire", "--keep-last", "5", "--forget", &b2]);
    assert!(
        out.stdout.contains(&format!("expired  {b2}"))
            && out.stdout.contains("forgotten on request"),
        "{}",
        out.stdout
    );
    let ids: Vec<String> = listed(&a.wv)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&b5));
    a.ok(&["verify"]);
    a.ok(&["wal-verify"]);
}

#[test]
fn expire_during_a_running_backup_and_stream_loses_nothing() {
    let mut a = Archived::new(&[]);
    a.c.psql("CREATE TABLE marker(id int PRIMARY KEY)");
    a.c.psql(
        "CREATE TABLE filler AS SELECT g, repeat('x', 500) AS t FROM generate_series(1, 60000) g",
    );
    let old = backup(&a);
    a.ok(&["verify"]);
    // a slow backup, and expire while it runs
    let slow =
        a.wv.args([
            "backup",
            "--pg",
            &a.c.conninfo(),
            "--fast",
            "--no-expire",
            "--max-rate",
            "8MB",
        ])
        .command()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let locks = a.repo.join("main/locks");
    wait_until(Duration::from_secs(30), "the backup's lease", || {
        std::fs::read_dir(&locks).is_ok_and(|mut d| d.next().is_some())
    });
    for i in 1..=20 {
        a.c.psql(&format!("INSERT INTO marker VALUES ({i})"));
    }
    let during = a
        .ok(&["expire", "--keep-last", "1", "--pack-grace", "0s", "--json"])
        .json();
    assert!(
        during["wal_kept_because"]
            .as_str()
            .is_some_and(|w| w.contains("in progress")),
        "{during}"
    );
    assert!(during["wal_expired"].as_array().unwrap().is_empty());
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success());
    let new = backup_id(&String::from_utf8_lossy(&out.stdout));
    for i in 21..=40 {
        a.c.psql(&format!("INSERT INTO marker VALUES ({i})"));
    }
    // backup runs expire with the configured policy after it
    let conf = a.work.path().join("walvault.toml");
    std::fs::write(&conf, "[retention]\nkeep-last = 1\npack-grace = \"0s\"\n").unwrap();
    a.ok(&["verify"]);
    let out =
        a.wv.config(&conf)
            .args(["backup", "--pg", &a.c.conninfo(), "--fast"])
            .ok();
    assert!(out.stdout.contains("expire: "), "{}", out.stdout);
    let newest = backup_id(&out.stdout);
    let ids: Vec<String> = listed(&a.wv)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    // the newest backup is not verified yet: the one before it stays as
    // its fallback until it is
    assert_eq!(ids, [new.clone(), newest.clone()], "{old}");
    a.ok(&["verify"]);
    a.ok(&["expire", "--keep-last", "1", "--pack-grace", "0s"]);
    let ids: Vec<String> = listed(&a.wv)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [newest]);
    a.ok(&["wal-verify"]);
    let want = a.c.psql("SELECT count(*) || ':' || sum(g) FROM filler")
        + "/"
        + &a.c.psql("SELECT count(*) FROM marker");
    a.finish_stream();
    let (r, report) = a.pitr(&["--latest"]);
    let got = r.psql("SELECT count(*) || ':' || sum(g) FROM filler")
        + "/"
        + &r.psql("SELECT count(*) FROM marker");
    assert_eq!(got, want, "{report}");
    r.stop_and_check();
}

/// A copy of the repository in `dir` to damage.
fn copy_repo(from: &Path, dir: &Path) -> PathBuf {
    let to = dir.join(format!("copy-{}", rand::random::<u32>()));
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success());
    to
}

fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push((e.path(), m.len()));
        }
    }
    out.sort();
    out
}

/// `verify ARGS --json` on `repo`, expected to find problems; returns them.
fn problems(repo: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Walvault::new()
        .repo(repo)
        .args(["verify", "--json"])
        .args(args)
        .fails();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["passed"], false);
    v["problems"].as_array().unwrap().clone()
}

#[test]
fn verify_names_each_kind_of_damage_and_reads_only_what_is_new() {
    let mut a = Archived::new(&[]);
    let (c, wv, repo) = (&a.c, a.wv.clone(), a.repo.clone());
    let work = tempfile::tempdir().unwrap();
    c.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g");
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
    c.psql("SELECT pg_switch_wal()");
    let clean = wv.args(["verify", "--json"]).ok().json();
    assert_eq!(clean["passed"], true, "{clean}");
    let deep = wv.args(["verify", "--deep", "--json"]).ok().json();
    let packs_before = files_under(&repo.join("main/packs"));
    let total: u64 = packs_before.iter().map(|(_, s)| s).sum();
    assert_eq!(deep["pack_bytes_read"].as_u64().unwrap(), total, "{deep}");

    // a second backup: --since-last reads exactly its new packs
    c.psql("UPDATE t SET g = g + 1 WHERE g < 5000");
    let b2 = backup_id(
        &wv.args(["backup", "--pg", &c.conninfo(), "--fast"])
            .ok()
            .stdout,
    );
    a.finish_stream();
    let b2_start = listed(&wv)
        .iter()
        .find(|b| b["id"] == b2.as_str())
        .map(|b| lsn(&b["start_lsn"]) / SEG)
        .unwrap();
    let new_bytes: u64 = files_under(&repo.join("main/packs"))
        .iter()
        .filter(|f| !packs_before.contains(f))
        .map(|(_, s)| s)
        .sum();
    assert!(new_bytes > 0);
    let since = wv.args(["verify", "--since-last", "--json"]).ok().json();
    assert_eq!(
        since["pack_bytes_read"].as_u64().unwrap(),
        new_bytes,
        "{since}"
    );
    // and a sample re-reads some of the older ones too
    let sampled = wv
        .args(["verify", "--since-last", "--sample", "100", "--json"])
        .ok()
        .json();
    assert_eq!(
        sampled["pack_bytes_read"].as_u64().unwrap(),
        total + new_bytes
    );

    let packs = files_under(&repo.join("main/packs"));
    let (pack, size) = packs.iter().max_by_key(|(_, s)| *s).unwrap().clone();
    let pack_rel = pack.strip_prefix(&repo).unwrap().to_owned();
    let named = |ps: &[serde_json::Value], needle: &str| {
        ps.iter().any(|p| {
            p["object"].as_str().unwrap().contains(needle)
                && !p["backups"].as_array().unwrap().is_empty()
        })
    };
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_owned();

    // a deleted pack
    let r = copy_repo(&repo, work.path());
    std::fs::remove_file(r.join(&pack_rel)).unwrap();
    let ps = problems(&r, &[]);
    assert!(named(&ps, &pack_name), "{ps:?}");
    assert!(ps
        .iter()
        .any(|p| p["what"].as_str().unwrap().contains("missing")));

    // a truncated pack
    let r = copy_repo(&repo, work.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(r.join(&pack_rel))
        .unwrap();
    f.set_len(size - 100).unwrap();
    assert!(named(&problems(&r, &[]), &pack_name));

    // a flipped byte in a blob: the header is intact, only --deep finds it
    let r = copy_repo(&repo, work.path());
    let p = r.join(&pack_rel);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let shallow = Walvault::new()
        .repo(&r)
        .args(["verify", "--json"])
        .ok()
        .json();
    assert_eq!(shallow["passed"], true, "{shallow}");
    let ps = problems(&r, &["--deep"]);
    assert!(named(&ps, &pack_name), "{ps:?}");

    // a missing WAL segment inside a kept range
    let r = copy_repo(&repo, work.path());
    let seg = format!("00000001{:08X}{:08X}", b2_start >> 8, b2_start & 0xff);
    std::fs::remove_file(r.join("main/wal/00000001").join(&seg)).unwrap();
    eprintln!(
        "removed {seg}; b2 {b2} starts in segment {b2_start:X}; left: {:?}; list: {:?}",
        files_under(&r.join("main/wal/00000001")),
        listed(&wv)
    );
    let ps = problems(&r, &[]);
    assert!(named(&ps, &seg), "{ps:?}");

    // a manifest whose blocks are gone from the index (b2's index object)
    let r = copy_repo(&repo, work.path());
    let newest_index = files_under(&r.join("main/index"))
        .into_iter()
        .max_by_key(|(p, _)| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap()
        .0;
    std::fs::remove_file(newest_index).unwrap();
    let ps = problems(&r, &[]);
    assert!(
        ps.iter()
            .any(|p| p["object"].as_str().unwrap().ends_with(&b2)
                && p["what"].as_str().unwrap().contains("not in the index")),
        "{ps:?}"
    );

    // the original is still clean
    assert_eq!(wv.args(["verify", "--json"]).ok().json()["passed"], true);

    // a new backup after the loss is whole: verify recorded the lost pack,
    // so the backup stores its blocks again (before, it deduplicated
    // against the lost pack and could not be restored either), and the
    // older backups stay reported
    let r = copy_repo(&repo, work.path());
    std::fs::remove_file(r.join(&pack_rel)).unwrap();
    assert!(named(&problems(&r, &[]), &pack_name));
    a.c.psql("CREATE TABLE after_loss AS SELECT g FROM generate_series(1, 1000) g");
    let healer = Walvault::new().repo(&r);
    let b3 = backup_id(
        &healer
            .args(["backup", "--pg", &a.c.conninfo(), "--fast"])
            .ok()
            .stdout,
    );
    let ps = problems(&r, &["--deep"]);
    assert!(named(&ps, &pack_name), "{ps:?}");
    assert!(
        ps.iter().all(|p| !p["backups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == b3.as_str())),
        "the new backup needs nothing damaged: {ps:?}"
    );
    let want = a.c.psql("SELECT count(*) || ':' || sum(g) FROM t")
        + "/"
        + &a.c.psql("SELECT count(*) FROM after_loss");
    crate::support::give_to_postgres(&r);
    let (rec, report) = crate::pitr::pitr_started(&a.c, &healer, &["--immediate"]);
    assert_eq!(report["backup"], b3.as_str(), "{report}");
    let got = rec.psql("SELECT count(*) || ':' || sum(g) FROM t")
        + "/"
        + &rec.psql("SELECT count(*) FROM after_loss");
    assert_eq!(got, want, "{report}");
    rec.stop_and_check();

    // the pack put back: a deep verify reads it whole and clears its mark
    let damaged_dir = r.join("main/damaged");
    assert_eq!(files_under(&damaged_dir).len(), 1);
    std::fs::copy(repo.join(&pack_rel), r.join(&pack_rel)).unwrap();
    // (the copy has no WAL between b2 and b3: that gap is still reported)
    let ps = problems(&r, &["--deep"]);
    assert!(!named(&ps, &pack_name), "{ps:?}");
    assert_eq!(files_under(&damaged_dir).len(), 0);
}

/// The packs garbage collection has marked for deletion, from its state.
fn gc_pending(repo: &Path) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(repo).unwrap());
        let r = walvault::repo::Repository::open(storage, None)
            .await
            .unwrap();
        let paths = walvault::repo::StanzaPaths::new("main");
        let state = walvault::repo::gc::GcState::load(&r, &paths).await.unwrap();
        state.pending.keys().cloned().collect()
    })
}

/// Garbage collection deletes a pack it marked a grace period earlier; a
/// verify running then finds it gone. No backup needs it: not a problem,
/// and not recorded as damaged. A missing pack a backup needs still is.
#[test]
fn verify_is_not_fooled_by_a_pack_garbage_collection_deletes_meanwhile() {
    let a = Archived::new(&[]);
    backup(&a);
    // a table of its own packs, then gone
    a.c.psql(
        "CREATE TABLE filler AS SELECT g, md5(g::text) || md5(random()::text) || md5(random()::text) AS t FROM generate_series(1, 1000000) g",
    );
    backup(&a);
    a.c.psql("DROP TABLE filler");
    let kept = backup(&a);
    a.ok(&["verify"]);
    let r = a
        .ok(&["expire", "--keep-last", "1", "--pack-grace", "1h", "--json"])
        .json();
    let marked = r["packs_marked"].as_u64().unwrap();
    assert!(marked >= 1, "{r}");
    let pending = gc_pending(&a.repo);
    assert_eq!(pending.len() as u64, marked, "{r}");
    let pack_file = |id: &str| a.repo.join(format!("main/packs/{}/{id}", &id[..2]));
    std::fs::remove_file(pack_file(&pending[0])).unwrap();
    let v = a.ok(&["verify", "--json"]).json();
    assert_eq!(v["passed"], true, "{v}");
    assert!(files_under(&a.repo.join("main/damaged")).is_empty());

    // a pack the kept backup needs, missing: named, and marked
    let needed = files_under(&a.repo.join("main/packs"))
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            !pending.iter().any(|id| id == name)
        })
        .unwrap();
    std::fs::remove_file(&needed).unwrap();
    let ps = problems(&a.repo, &[]);
    assert!(
        ps.iter()
            .any(|p| p["what"] == "the pack is missing" && p["backups"][0] == kept.as_str()),
        "{ps:?}"
    );
    assert_eq!(files_under(&a.repo.join("main/damaged")).len(), 1);
}

#[test]
fn retention_bad_input_is_one_line_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let before = files_under(&repo);
    wv.args(["expire", "--keep-last", "0"])
        .fails_with_one_line(&["--keep-last"]);
    wv.args(["expire", "--keep-daily", "3", "--keep-within", "0s"])
        .fails_with_one_line(&["--keep-within"]);
    wv.args(["expire"]).fails_with_one_line(&["--keep-within"]);
    wv.args([
        "expire",
        "--keep-last",
        "2",
        "--retention-timezone",
        "Mars/Olympus",
    ])
    .fails_with_one_line(&["Mars/Olympus"]);
    wv.args(["hold", "20260101T000000Z-0001"])
        .fails_with_one_line(&["no backup 20260101T000000Z-0001"]);
    wv.args(["hold", "../../config"])
        .fails_with_one_line(&["no backup"]);
    wv.args(["hold", "latest"])
        .fails_with_one_line(&["no backup in this stanza"]);
    wv.args(["release", "20260101T000000Z-0001"])
        .fails_with_one_line(&["no backup"]);
    wv.args([
        "expire",
        "--keep-last",
        "2",
        "--forget",
        "20260101T000000Z-0001",
    ])
    .fails_with_one_line(&["no backup 20260101T000000Z-0001"]);
    wv.args(["check", "--pg", "host=127.0.0.1 port=1 user=postgres"])
        .fails_with_one_line(&["127.0.0.1"]);
    assert_eq!(files_under(&repo), before);
}

/// `check --json` with `budgets`; the report and the exit code.
fn check(a: &Archived, budgets: &[&str]) -> (serde_json::Value, Option<i32>) {
    let out =
        a.wv.args(["check", "--pg", &a.c.conninfo(), "--json"])
            .args(budgets)
            .output();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {} {}", out.stdout, out.stderr));
    (v, out.code())
}

fn level(r: &serde_json::Value, check: &str) -> String {
    r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} in {r}"))["level"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn check_is_healthy_then_exits_3_for_the_rto_and_the_rpo_budgets() {
    let mut a = Archived::new(&[]);
    a.c.psql("CREATE TABLE marker(id int)");
    backup(&a);
    a.ok(&["verify"]);
    a.wait_stream_durable();
    let (r, code) = check(
        &a,
        &[
            "--max-rpo",
            "1m",
            "--max-rto",
            "1h",
            "--max-backup-age",
            "1h",
        ],
    );
    assert_eq!(code, Some(0), "{r}");
    for c in [
        "server",
        "wal mode",
        "slot",
        "repository",
        "newest backup",
        "rpo",
        "rto",
        "last verify",
    ] {
        assert_eq!(level(&r, c), "ok", "{c}: {r}");
    }
    assert_eq!(r["rto_basis"], "assumed");

    // WAL since the backup pushes the estimate of "recover to now" past a
    // budget set just above today's estimate
    let before = r["rto_estimate_seconds"].as_f64().unwrap();
    let budget = format!("{:.3}s", before + 1.0);
    a.c.psql(
        "CREATE TABLE filler AS SELECT g, repeat('x', 1000) AS t FROM generate_series(1, 100000) g",
    );
    a.wait_stream_durable();
    let (r, code) = check(&a, &["--max-rto", &budget]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(level(&r, "rto"), "breach", "{r}");
    assert!(
        r["rto_estimate_seconds"].as_f64().unwrap() > before + 1.0,
        "{r}"
    );

    // the stream stops; writes go on; after longer than --max-rpo it breaches
    a.finish_stream();
    a.c.psql("INSERT INTO marker VALUES (1)");
    let (r, code) = check(&a, &["--max-rpo", "1h"]);
    assert_eq!(code, Some(3), "the WAL mode: {r}");
    assert_eq!(level(&r, "wal mode"), "breach", "{r}");
    assert_eq!(level(&r, "rpo"), "ok", "{r}");
    assert!(r["rpo_bytes"].as_u64().unwrap() > 0, "{r}");
    std::thread::sleep(Duration::from_secs(3));
    let (r, code) = check(&a, &["--max-rpo", "2s"]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(level(&r, "rpo"), "breach", "{r}");
    assert!(r["rpo_seconds"].as_f64().unwrap() > 2.0, "{r}");
}

/// `drill ARGS --json --scratch DIR` (as root when the tests are: the
/// server then runs as `postgres`); the record and the exit code.
fn drill(a: &Archived, scratch: &Path, args: &[&str]) -> (serde_json::Value, Option<i32>) {
    let out =
        a.wv.args(["drill", "--json", "--scratch"])
            .arg(scratch)
            .args(args)
            .output();
    let v = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("drill printed no JSON ({e}): {out:?}"));
    (v, out.code())
}

fn status_of<'a>(r: &'a serde_json::Value, name: &str) -> &'a str {
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().starts_with(name))
        .unwrap_or_else(|| panic!("no check {name}: {r}"))["status"]
        .as_str()
        .unwrap()
}

#[test]
fn drill_proves_recovery_and_records_failures_of_lost_wal_and_false_checks() {
    let a = Archived::new(&[]);
    a.c.psql("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 100) g");
    let b = backup(&a);
    a.c.psql("SELECT pg_switch_wal()");
    a.c.psql("INSERT INTO orders SELECT g FROM generate_series(101, 150) g");
    let needed = a.c.walfile_name(a.c.insert_lsn());
    std::thread::sleep(Duration::from_millis(1100));
    let t = a.c.psql("SELECT now()");
    std::thread::sleep(Duration::from_millis(1100));
    a.c.psql("INSERT INTO orders VALUES (1000)");
    a.c.psql("SELECT pg_switch_wal()");
    a.c.psql("INSERT INTO orders VALUES (1001)");
    a.wait_stream_durable();
    let scratch = a.work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let checks = a.work.path().join("checks.sql");
    std::fs::write(
        &checks,
        "-- the rows of the moment\nselect count(*) = 150 from orders;\nselect max(id) = 150 from orders;\n",
    )
    .unwrap();

    // to a time: the rows of that moment, every check run, the scratch
    // directory gone, the result recorded and shown per backup
    let (r, code) = drill(
        &a,
        &scratch,
        &["--target-time", &t, "--sql", checks.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["backup"], b.as_str(), "{r}");
    assert_eq!(r["row_counts"]["postgres.public.orders"], 150, "{r}");
    for c in [
        "plan",
        "recovery",
        "sql: select count(*) = 150 from orders",
        "sql: select max(id) = 150 from orders",
        "row counts",
        "pg_amcheck",
        "pg_checksums",
    ] {
        assert_eq!(status_of(&r, c), "passed", "{c}: {r}");
    }
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["rpo_seconds"].as_f64().is_some(), "{r}");
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch left behind"
    );
    let listed_b = listed(&a.wv)
        .into_iter()
        .find(|x| x["id"] == b.as_str())
        .unwrap();
    assert_eq!(listed_b["last_drill"]["passed"], true, "{listed_b}");
    // `latest` names the newest backup for a hold
    let held = a.ok(&["hold", "latest", "--reason", "audit"]).stdout;
    assert!(held.contains(&format!("backup {b} is held")), "{held}");

    // a random moment of the window (the default) recovers too
    let (r, code) = drill(&a, &scratch, &[]);
    assert_eq!(code, Some(0), "{r}");
    assert!(r["target"].as_str().unwrap().starts_with("time"), "{r}");
    let n = r["row_counts"]["postgres.public.orders"].as_i64().unwrap();
    assert!([100, 150, 151, 152].contains(&n), "{r}");

    // a user check that returns false fails the drill: exit 3, recorded
    let wrong = a.work.path().join("wrong.sql");
    std::fs::write(&wrong, "select count(*) > 1000000 from orders;").unwrap();
    let (r, code) = drill(
        &a,
        &scratch,
        &["--latest", "--sql", wrong.to_str().unwrap()],
    );
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["passed"], false, "{r}");
    assert_eq!(
        status_of(&r, "sql: select count(*) > 1000000"),
        "failed",
        "{r}"
    );
    assert_eq!(r["row_counts"]["postgres.public.orders"], 152, "{r}");
    let (c, _) = check(&a, &["--max-drill-age", "1h"]);
    assert_eq!(level(&c, "last drill"), "breach", "{c}");
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch left behind"
    );

    // a WAL segment the target needs is gone: the drill fails, names it,
    // and is recorded
    std::fs::remove_file(a.repo.join("main/wal/00000001").join(&needed)).unwrap();
    let out =
        a.wv.args(["drill", "--scratch"])
            .arg(&scratch)
            .args(["--target-time", &t])
            .fails_with(3);
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{out:?}");
    assert!(err.contains(&needed) && err.contains("recorded"), "{err}");
    let listed_b = listed(&a.wv)
        .into_iter()
        .find(|x| x["id"] == b.as_str())
        .unwrap();
    assert_eq!(listed_b["last_drill"]["passed"], false, "{listed_b}");
    let (c, code) = check(&a, &["--max-drill-age", "1h"]);
    assert_eq!(code, Some(3), "{c}");
    assert_eq!(level(&c, "last drill"), "breach", "{c}");
}

/// Regression (issue 19): a stream the server waits for
/// (`synchronous_standby_names`) but that runs without `--synchronous` makes
/// every commit wait for its periodic acknowledgement; `check` knows the
/// stream's mode (its record in the repository) and says so.
#[test]
fn check_warns_when_the_server_waits_for_a_stream_without_synchronous() {
    use crate::support::pg::PgCluster;
    use crate::support::stream::Streamer;
    // set after the cluster's setup, whose commits would wait for it
    let c = PgCluster::start();
    c.append_conf(&["synchronous_standby_names = 'walvault_sync'".into()]);
    c.reload_conf();
    let work = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(work.path().join("repo"));
    wv.args(["init"]).ok();
    let conn = format!("{} application_name=walvault_sync", c.conninfo());
    let synchronous = |c: &PgCluster| {
        c.psql(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walvault_sync'",
        ) == "sync"
    };
    let finding = |wv: &Walvault| -> (String, String) {
        let f = wv.check_finding(&c.conninfo(), "synchronous");
        (
            f["level"].as_str().unwrap().to_owned(),
            f["detail"].as_str().unwrap().to_owned(),
        )
    };

    let mut s = Streamer::start(&wv, &conn, &["--partial-interval", "0.5"]);
    wait_until(
        Duration::from_secs(30),
        "the stream is the synchronous standby",
        || synchronous(&c),
    );
    let (level, detail) = finding(&wv);
    assert_eq!(level, "warning", "{detail}");
    assert!(detail.contains("without --synchronous"), "{detail}");
    assert!(
        s.log().contains("restart it with --synchronous"),
        "{}",
        s.log()
    );
    s.stop();

    let mut s = Streamer::start(&wv, &conn, &["--synchronous"]);
    wait_until(
        Duration::from_secs(30),
        "the stream is the synchronous standby",
        || synchronous(&c),
    );
    let (level, detail) = finding(&wv);
    assert_eq!(level, "ok", "{detail}");
    assert!(detail.contains("RPO = 0"), "{detail}");
    s.stop();
}
