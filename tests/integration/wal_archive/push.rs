//! `walvault wal-push` as PostgreSQL's archive_command (synchronous and
//! `--async`), and what it refuses: another cluster's segment under an
//! archived name (split brain), damaged, truncated and misnamed segments;
//! `wal-push`/`wal-fetch` on an encrypted repository.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::pg::{PgCluster, PgOptions};
use crate::support::Walvault;

/// A cluster archiving into a fresh repository with `walvault wal-push
/// OPTIONS%p` under pgbench for `seconds`, until every segment up to a
/// final switch is archived without a failure.
struct Archiving {
    work: tempfile::TempDir,
    /// `walvault … --repo REPO`.
    wv: Walvault,
    c: PgCluster,
    /// The segment the final switch ended.
    last: String,
}

fn archiving_under_pgbench(options: &str, seconds: &str) -> Archiving {
    let work = tempfile::tempdir().unwrap();
    // the server's OS user reaches the repository inside
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    crate::support::give_to_postgres(&repo);
    let c = PgCluster::start_with(PgOptions {
        conf: vec![
            "archive_mode = on".into(),
            format!(
                "archive_command = '{} wal-push {options}--repo {} %p'",
                Walvault::bin().display(),
                repo.display()
            ),
            "wal_keep_size = '1GB'".into(),
        ],
        ..Default::default()
    });
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let segment = || c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let first = segment();
    c.pgbench(&["-T", seconds, "-c", "2", "-n"]);
    // at least two segments filled by pgbench, however slow it was on a
    // busy host (the tests take the one before the last as a full one)
    let filled = |now: &str| {
        let n = |s: &str| u64::from_str_radix(&s[8..], 16).unwrap();
        n(now) - n(&first)
    };
    for _ in 0..30 {
        if filled(&segment()) >= 2 {
            break;
        }
        c.pgbench(&["-T", "2", "-c", "2", "-n"]);
    }
    let last = c.switch_and_wait_archived();
    Archiving { work, wv, c, last }
}

#[test]
fn wal_push_as_archive_command() {
    let Archiving { work, wv, c, last } = archiving_under_pgbench("", "60");
    let archived = c.psql("SELECT archived_count FROM pg_stat_archiver");
    assert!(archived.parse::<u32>().unwrap() >= 3, "{archived}");

    // the same segment again: success
    let seg = c.datadir.join("pg_wal").join(&last);
    let copy = work.path().join(&last);
    std::fs::copy(&seg, &copy).unwrap();
    wv.args(["wal-push"]).arg(&copy).ok();
    // another cluster's valid segment under an archived name (split brain):
    // refused, nothing overwritten
    let other = PgCluster::start();
    let name1 = "000000010000000000000001";
    other.psql("SELECT pg_switch_wal()");
    let theirs = work.path().join(name1);
    std::fs::copy(other.datadir.join("pg_wal").join(name1), &theirs).unwrap();
    let err = wv.args(["wal-push"]).arg(&theirs).fails().stderr;
    assert!(err.contains("different content"), "{err}");
    let back1 = work.path().join("back1");
    wv.args(["wal-fetch", name1]).arg(&back1).ok();
    assert!(
        std::fs::read(&back1).unwrap()
            == std::fs::read(c.datadir.join("pg_wal").join(name1)).unwrap()
    );
    let dest = work.path().join("back");
    wv.args(["wal-fetch", &last]).arg(&dest).ok();
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&seg).unwrap());
    // a flipped byte inside a record of a full segment: refused, naming the
    // record's LSN
    let full_name = {
        let seg_no = u64::from_str_radix(&last[16..], 16).unwrap() - 1;
        format!("{}{seg_no:08X}", &last[..16])
    };
    let full = work.path().join(&full_name);
    let mut bytes = std::fs::read(c.datadir.join("pg_wal").join(&full_name)).unwrap();
    bytes[(5 << 20) + 4000] ^= 0x01;
    std::fs::write(&full, &bytes).unwrap();
    let err = wv.args(["wal-push"]).arg(&full).fails().stderr;
    assert!(
        err.contains("fails its CRC check") || err.contains("malformed") || err.contains("claims"),
        "{err}"
    );
    assert!(err.contains("record at "), "no LSN in: {err}");
    // the same damage in a first push (read, checked and sealed in pieces,
    // the sealing ahead of the check): refused with the LSN, nothing stored
    let err = wv
        .args(["wal-push", "--stanza", "fresh"])
        .arg(&full)
        .fails()
        .stderr;
    assert!(err.contains("record at "), "no LSN in: {err}");
    // (a destination of its own: the fetches above prefetch into a spool
    // beside theirs, and the spool is served before any repository)
    let fresh = work.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    // exit 1 is "not found": the refused segment was not stored
    wv.args(["wal-fetch", "--stanza", "fresh", &full_name])
        .arg(fresh.join("back"))
        .fails_with(1);
    // a truncated segment: refused before anything is stored
    let short_name = "0000000100000000000000F0";
    let short = work.path().join(short_name);
    std::fs::write(&short, &std::fs::read(&seg).unwrap()[..3 << 20]).unwrap();
    let err = wv.args(["wal-push"]).arg(&short).fails().stderr;
    assert!(err.contains("not a WAL segment size"), "{err}");
    // a segment under the wrong name: its pages say where they belong
    let wrong = work.path().join("0000000100000000000000F1");
    std::fs::copy(&seg, &wrong).unwrap();
    let err = wv.args(["wal-push"]).arg(&wrong).fails().stderr;
    assert!(err.contains("misnamed"), "{err}");
}

/// `wal-push --async`: a background process archives ahead; PostgreSQL's
/// calls only wait for their file to be durable. Every archived segment
/// equals the server's; failures reach the call that waits for the file.
#[test]
fn wal_push_async_as_archive_command() {
    let Archiving { work, wv, c, last } = archiving_under_pgbench("--async ", "20");
    // every segment PostgreSQL counts as archived is stored, byte for byte
    let wal = c.datadir.join("pg_wal");
    let mut done: Vec<String> = std::fs::read_dir(wal.join("archive_status"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".done")
                .filter(|s| s.len() == 24)
                .map(str::to_owned)
        })
        .collect();
    done.sort();
    assert!(done.len() >= 3, "{done:?}");
    assert!(done.contains(&last), "{last} not archived: {done:?}");
    for name in &done {
        let back = work.path().join("back");
        wv.args(["wal-fetch", name]).arg(&back).ok();
        assert!(
            std::fs::read(&back).unwrap() == std::fs::read(wal.join(name)).unwrap(),
            "{name} differs"
        );
    }
    let spool = wal.join("walvault-push");
    let left: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".ok") || n.ends_with(".error"))
        .collect();
    assert!(
        left.iter()
            .all(|n| !done.iter().any(|d| n.starts_with(d.as_str()))),
        "marks left for archived files: {left:?}"
    );

    // a pg_wal of another cluster whose segment 1 differs (split brain):
    // the background process's refusal reaches the waiting call
    let other = PgCluster::start();
    other.psql("SELECT pg_switch_wal()");
    let name1 = "000000010000000000000001";
    let fake = work.path().join("fake-wal");
    std::fs::create_dir_all(fake.join("archive_status")).unwrap();
    std::fs::copy(other.datadir.join("pg_wal").join(name1), fake.join(name1)).unwrap();
    std::fs::write(
        fake.join("archive_status").join(format!("{name1}.ready")),
        "",
    )
    .unwrap();
    let seg = fake.join(name1);
    let err = wv.args(["wal-push", "--async"]).arg(&seg).fails().stderr;
    assert!(err.contains("different content"), "{err}");
    assert!(
        !fake
            .join("walvault-push")
            .join(format!("{name1}.error"))
            .exists(),
        "the error mark was not taken"
    );
    // a background process that cannot open the repository: the call fails
    // with the reason, not a success and not a minute-long wait (the bound
    // only tells one from the other)
    let missing = Walvault::new().repo(work.path().join("no-such-repo"));
    let fake2 = work.path().join("fake-wal-2");
    std::fs::create_dir_all(fake2.join("archive_status")).unwrap();
    std::fs::copy(&seg, fake2.join(name1)).unwrap();
    std::fs::write(
        fake2.join("archive_status").join(format!("{name1}.ready")),
        "",
    )
    .unwrap();
    let t = Instant::now();
    let err = missing
        .args(["wal-push", "--async"])
        .arg(fake2.join(name1))
        .fails()
        .stderr;
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(err.contains("no-such-repo"), "{err}");
    // a file PostgreSQL is not waiting for (no .ready): pushed at once
    let manual = work.path().join("manual");
    std::fs::create_dir_all(&manual).unwrap();
    std::fs::copy(wal.join(&done[0]), manual.join(&done[0])).unwrap();
    wv.args(["wal-push", "--async"])
        .arg(manual.join(&done[0]))
        .ok();
}

/// An encrypted repository: a segment pushed (sealed in pieces as it is
/// read) comes back byte for byte with the passphrase; a wrong passphrase
/// and a changed stored byte are errors (exit 255, never "not found").
#[test]
fn wal_push_and_fetch_encrypted() {
    let c = PgCluster::start();
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let name = c.psql("SELECT pg_walfile_name(pg_switch_wal())");
    let work = tempfile::tempdir().unwrap();
    let seg = work.path().join(&name);
    std::fs::copy(c.datadir.join("pg_wal").join(&name), &seg).unwrap();
    let repo: PathBuf = work.path().join("repo");
    let with = |pass: &str| Walvault::new().repo(&repo).env("WALVAULT_PASSPHRASE", pass);
    let wv = with("correct horse battery");
    wv.args(["init", "--encrypt"]).ok();
    wv.args(["wal-push"]).arg(&seg).ok();
    let back = work.path().join("back");
    wv.args(["wal-fetch", &name]).arg(&back).ok();
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&seg).unwrap());
    // nothing of the segment's plain bytes is in the stored object
    let stored = repo.join("main/wal").join(&name[..8]).join(&name);
    let object = std::fs::read(&stored).unwrap();
    // (the long page header and the first record: never zeros)
    let page = &std::fs::read(&seg).unwrap()[..64];
    assert!(!object.windows(page.len()).any(|w| w == page));

    with("wrong passphrase")
        .args(["wal-fetch", &name])
        .arg(&back)
        .fails_with(255);
    let mut bad = object.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&stored, &bad).unwrap();
    let err = wv
        .args(["wal-fetch", &name])
        .arg(&back)
        .fails_with(255)
        .stderr;
    assert!(err.contains(&name), "{err}");
}

/// Regression: names that are no WAL file name (non-ASCII ones included:
/// the spool cleanup sliced the name's first 8 bytes and panicked inside a
/// character) are refused with exit 255 and one line, never a panic; a
/// missing segment is exit 1 (recovery ends cleanly).
#[test]
fn wal_fetch_refuses_names_that_are_no_wal_file() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let dest = work.path().join("RECOVERYXLOG");
    for bad in [
        "0000000ä0000000000000001",
        "ééééééééééé",
        "../x",
        "00000001.history.x",
    ] {
        let out = wv.args(["wal-fetch", bad]).arg(&dest).fails_with(255);
        assert!(
            out.stderr.contains("invalid WAL file name") && !out.stderr.contains("panicked"),
            "{bad}: {}",
            out.stderr
        );
        assert!(!dest.exists());
    }
    wv.args(["wal-fetch", "000000010000000000000001"])
        .arg(&dest)
        .fails_with(1);
    // the prefetching copy of wal-fetch (what a served segment starts)
    // cleaned its spool by slicing the name's first 8 bytes: inside the 'ä'
    // here, a panic as soon as the spool held a segment-long name
    let spool = work.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::write(spool.join("000000010000000000000001"), b"x").unwrap();
    let out = wv
        .args(["wal-fetch", "--spool"])
        .arg(&spool)
        .arg("0000000ä0000000000000001")
        .arg(&dest)
        .env("WALVAULT_PREFETCH_CHILD", "16777216")
        .fails_with(255);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}
