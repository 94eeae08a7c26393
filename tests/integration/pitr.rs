//! `walvault restore-pitr` against real servers: recover to exact points,
//! started by walvault itself (`--start`, as the server's OS user), and
//! unreachable targets refused before anything is written.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::pg::PgCluster;
use crate::support::stream::Streamer;
use crate::support::walvault::Outcome;
use crate::support::{wait_until, Walvault};

/// A cluster archived by `walvault stream` into a repository its OS user
/// can read.
pub struct Archived {
    pub c: PgCluster,
    /// `walvault … --repo REPO`.
    pub wv: Walvault,
    pub repo: PathBuf,
    pub work: tempfile::TempDir,
    stream: Option<Streamer>,
}

impl Archived {
    pub fn new(conf: &[&str]) -> Archived {
        Archived::with(crate::support::pg::PgOptions {
            conf: conf.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    /// A cluster started with `opts`, archived by `walvault stream`.
    pub fn with(opts: crate::support::pg::PgOptions) -> Archived {
        let c = PgCluster::start_with(opts);
        let work = tempfile::tempdir().unwrap();
        // the server's OS user reaches the repository inside
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let repo = work.path().join("repo");
        let wv = Walvault::new().repo(&repo);
        wv.args(["init"]).ok();
        let stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
        Archived {
            c,
            wv,
            repo,
            work,
            stream: Some(stream),
        }
    }

    /// `walvault ARGS --repo REPO`, which must succeed.
    pub fn ok(&self, args: &[&str]) -> Outcome {
        self.wv.args(args).ok()
    }

    /// Wait until the stream made everything up to the server's current
    /// insert position durable.
    pub fn wait_stream_durable(&self) {
        let target = self.c.insert_lsn();
        let stream = self.stream.as_ref().expect("the stream runs");
        stream.wait_durable(target, Duration::from_secs(30));
    }

    /// kill -9 the stream (no final upload), then hand the repository to
    /// the server's OS user.
    pub fn kill_stream(&mut self) {
        if let Some(mut s) = self.stream.take() {
            s.kill9();
        }
        self.chown_repo();
    }

    fn chown_repo(&self) {
        crate::support::give_to_postgres(&self.repo);
    }

    /// Wait until the stream made everything up to the server's current
    /// insert position durable, then stop it (SIGTERM: it uploads the rest).
    pub fn finish_stream(&mut self) {
        self.wait_stream_durable();
        if let Some(mut s) = self.stream.take() {
            s.stop();
        }
        // the server's OS user reads the repository during recovery
        self.chown_repo();
    }

    /// `restore-pitr … --start --json` as the server's OS user into a new
    /// directory; returns the (running) cluster and the report.
    pub fn pitr(&self, target: &[&str]) -> (Recovered, serde_json::Value) {
        pitr_started(&self.c, &self.wv, target)
    }

    /// `restore-pitr` expected to refuse: returns stderr; nothing may be written.
    pub fn pitr_refused(&self, target: &[&str]) -> String {
        let dir = self.work.path().join("refused");
        let out = self
            .wv
            .args(["restore-pitr", "--pgdata"])
            .arg(&dir)
            .args(target)
            .fails();
        assert!(
            !dir.exists(),
            "a refused restore-pitr wrote {}",
            dir.display()
        );
        out.stderr
    }
}

/// Insert rows `ids` into table `marker` through `psql`, one commit each;
/// returns the insert position after each commit. With one writer, the
/// position after commit i lies between commit i and anything of the next
/// row.
fn insert_markers(
    psql: impl Fn(&str) -> String,
    ids: std::ops::RangeInclusive<i32>,
) -> Vec<String> {
    ids.map(|i| {
        psql(&format!("INSERT INTO marker VALUES ({i})"));
        psql("SELECT pg_current_wal_insert_lsn()")
    })
    .collect()
}

/// `wv restore-pitr TARGET --start --json` as `source`'s OS user into a new
/// directory; returns the (running) cluster and the report.
pub(crate) fn pitr_started(
    source: &PgCluster,
    wv: &Walvault,
    target: &[&str],
) -> (Recovered, serde_json::Value) {
    let dst = PgCluster::for_restore(&source.bindir);
    let out = wv
        .as_server_user(source)
        .args(["restore-pitr", "--pgdata"])
        .arg(&dst.datadir)
        .args(target)
        .args(["--start", "--json", "--port", &dst.port.to_string()])
        .arg("--pg-bin")
        .arg(&source.bindir)
        .ok();
    let report = out.json();
    (
        Recovered {
            port: dst.port,
            sockdir: source.sockdir.clone(),
            dst,
        },
        report,
    )
}

/// A server restore-pitr started (it uses the source's socket directory
/// and its own port); stopped cleanly on drop.
pub struct Recovered {
    pub dst: PgCluster,
    pub port: u16,
    pub sockdir: PathBuf,
}

impl Recovered {
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let out = self
            .dst
            .command(&self.dst.client_bin("psql"))
            .args(["-X", "-A", "-t", "-h", self.sockdir.to_str().unwrap(), "-p"])
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
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
        assert!(self.dst.pg_checksums_clean(), "no pg_checksums");
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
    let after = insert_markers(|q| a.c.psql(q), 1..=30);
    a.finish_stream();

    let rows = |r: &Recovered| r.psql("SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker");
    let dry_run = |target: &str| -> serde_json::Value {
        a.ok(&[
            "restore-pitr",
            "--pgdata",
            "/nonexistent/x",
            "--target-lsn",
            target,
            "--dry-run",
            "--json",
        ])
        .json()
    };
    // no recovery measured yet: the estimate says its rates are assumed
    let plan = dry_run(&after[9]);
    assert_eq!(plan["estimate_basis"], "assumed", "{plan}");
    let (r, report) = a.pitr(&["--target-lsn", &after[9]]);
    assert_eq!(rows(&r), "10:10", "{report}");
    assert_eq!(report["state"], "promoted");
    assert!(report["total_seconds"].as_f64().unwrap() > 0.0);
    // promoted by a promote request at the pause: out of recovery, writable,
    // and walvault's recovery settings (which said pause) are gone
    assert_eq!(r.psql("SELECT pg_is_in_recovery()"), "f");
    r.psql("INSERT INTO marker VALUES (1000)");
    let auto = std::fs::read_to_string(r.dst.datadir.join("postgresql.auto.conf")).unwrap();
    assert!(!auto.contains("recovery_target_action"), "{auto}");
    assert!(
        std::fs::read_to_string(r.dst.datadir.join("walvault-recovery.log"))
            .unwrap()
            .contains("received promote request"),
        "not promoted by request"
    );
    r.psql("DELETE FROM marker WHERE id = 1000");
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
    // recovery asked for the segment after the archive's end: "not found"
    // at once, not after waiting for a spool that will get nothing more
    // (restore-pitr held its lock until promotion: 30 s per recovery)
    let log = std::fs::read_to_string(r.dst.datadir.join("walvault-recovery.log")).unwrap();
    assert!(!log.contains("still being filled"), "{log}");
    drop(r);
    // the next plan estimates from what that recovery measured
    let plan = dry_run(&after[19]);
    assert_eq!(plan["estimate_basis"], "measured", "{plan}");
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    // (equal up to JSON's float parsing, which may be an ulp off)
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs();
    let rates = &plan["rates"];
    assert!(
        same(
            f(&rates["restore_bytes_per_s"]),
            f(&report["restore_bytes"]) / f(&report["restore_seconds"])
        ),
        "{plan} {report}"
    );
    assert!(
        same(
            f(&rates["replay_bytes_per_s"]),
            f(&report["wal_bytes_replayed"]) / f(&report["replay_seconds"])
        ),
        "{plan} {report}"
    );

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
    assert!(
        dry.stdout
            .contains("plan: recover to the end of the archive"),
        "{}",
        dry.stdout
    );
    assert!(!Path::new("/nonexistent/x").exists());
}

/// The marker rows (`id`s) matching `pred` on the source, as a digest.
fn expected(c: &PgCluster, pred: &str) -> String {
    c.psql(&format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(id::text, ',' ORDER BY id)), '-') FROM marker_info WHERE {pred}"
    ))
}

fn got(r: &Recovered) -> String {
    r.psql("SELECT count(*) || ':' || coalesce(md5(string_agg(id::text, ',' ORDER BY id)), '-') FROM marker")
}

#[test]
fn randomized_pitr_by_time_lsn_xid_name_immediate_latest() {
    use rand::Rng;
    let mut rng = crate::support::seeded_rng();
    let mut a = Archived::new(&[]);
    a.c.psql("CREATE EXTENSION amcheck; CREATE TABLE marker(id bigserial PRIMARY KEY, session int, t timestamptz DEFAULT clock_timestamp())");
    let script = a.work.path().join("marker.sql");
    std::fs::write(
        &script,
        "INSERT INTO marker(session) VALUES (:client_id);\n",
    )
    .unwrap();
    let _ = Command::new("chmod").arg("a+r").arg(&script).status();
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--label", "b1"]);
    // four sessions write 150 rows a second for 60 s (the load's length is
    // the subject: about 9000 commits to aim at); two more backups and a
    // restore point on the way, at row counts that leave thousands of
    // commits between them however a busy machine stretches the timing
    let mut bench =
        a.c.command(&a.c.client_bin("pgbench"))
            .args([
                "-h",
                a.c.sockdir.to_str().unwrap(),
                "-p",
                &a.c.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-n",
                "-c",
                "4",
                "-T",
                "60",
                "-R",
                "150",
                "-f",
                script.to_str().unwrap(),
                "postgres",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let rows = || -> u64 { a.c.psql("SELECT count(*) FROM marker").parse().unwrap() };
    let wait_rows = |n: u64| {
        wait_until(Duration::from_secs(60), &format!("{n} marker rows"), || {
            rows() >= n
        })
    };
    wait_rows(3000);
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--label", "b2"]);
    wait_rows(4500);
    a.c.psql("SELECT pg_create_restore_point('walvault-mid')");
    wait_rows(6000);
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--label", "b3"]);
    // commits after the last backup, for the targets after it
    wait_rows(rows() + 500);
    assert!(bench.wait().unwrap().success());
    // a last row, durable (only in a .partial) when the stream dies without
    // a final upload
    a.c.psql("INSERT INTO marker(session) VALUES (-1)");
    a.wait_stream_durable();
    a.kill_stream();

    // every row with its commit time, xid and (from wal-inspect) commit LSN
    a.c.psql(
        "CREATE TABLE marker_info AS SELECT id, xmin::text::bigint AS xid, \
              pg_xact_commit_timestamp(xmin) AS ts, NULL::pg_lsn AS lsn FROM marker",
    );
    let inspect = a.ok(&[
        "wal-inspect",
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
        "--json",
    ]);
    let mut values = Vec::new();
    let mut rp_lsn = None;
    for v in inspect.json_lines() {
        match v["event"].as_str().unwrap() {
            "COMMIT" => values.push(format!("{}\t{}", v["xid"], v["lsn"].as_str().unwrap())),
            "RESTORE POINT" if v["name"] == "walvault-mid" => {
                rp_lsn = Some(v["lsn"].as_str().unwrap().to_owned())
            }
            _ => {}
        }
    }
    let rp_lsn = rp_lsn.expect("wal-inspect lists the restore point");
    let lsns = a.work.path().join("lsns.tsv");
    std::fs::write(&lsns, values.join("\n") + "\n").unwrap();
    let _ = Command::new("chmod").arg("a+r").arg(&lsns).status();
    a.c.psql(&format!(
        "CREATE TEMP TABLE l(xid bigint, lsn pg_lsn); COPY l FROM '{}'; \
         UPDATE marker_info m SET lsn = l.lsn FROM l WHERE l.xid = m.xid",
        lsns.display()
    ));
    assert_eq!(
        a.c.psql("SELECT count(*) FROM marker_info WHERE lsn IS NULL"),
        "0",
        "wal-inspect missed commits"
    );
    let total: u64 =
        a.c.psql("SELECT count(*) FROM marker_info")
            .parse()
            .unwrap();
    assert!(total > 5000, "only {total} rows");

    let backups = a.ok(&["list", "--json"]).json();
    let backups = backups.as_array().unwrap();
    let id = |label: &str| {
        backups.iter().find(|b| b["label"] == label).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let stop_time = |b: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(b["stop_time"].as_str().unwrap()).unwrap()
    };

    let ts_text = |pred: &str| {
        a.c.psql(&format!(
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') FROM marker_info WHERE {pred}"
        ))
    };
    // five random times: commit times exactly (the boundary), and between
    for k in 0..5 {
        let n: u64 = rng.random_range(1..total);
        let exact = ts_text(&format!("id = {n}"));
        let t = if k % 2 == 0 {
            exact
        } else {
            // 0.3 ms later: between two commits
            a.c.psql(&format!(
                "SELECT to_char((ts + interval '300 microseconds') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') FROM marker_info WHERE id = {n}"
            ))
        };
        for exclusive in [false, true] {
            let mut args = vec!["--target-time", t.as_str()];
            if exclusive {
                args.push("--exclusive");
            }
            let (r, report) = a.pitr(&args);
            let op = if exclusive { "<" } else { "<=" };
            assert_eq!(
                got(&r),
                expected(&a.c, &format!("ts {op} '{t}'")),
                "target time {t} exclusive={exclusive}: {report}"
            );
            // the newest backup consistent before the target was used
            let at = chrono::DateTime::parse_from_rfc3339(&t).unwrap();
            let want = backups.iter().rev().find(|b| stop_time(b) <= at).unwrap();
            assert_eq!(report["backup"], want["id"], "{report}");
        }
    }
    // explicitly: a time between the first and second backup uses the
    // first; a time after the third uses the third
    for (label, pred, want) in [
        (
            "between b1 and b2",
            format!("ts < '{}'", backups[1]["start_time"].as_str().unwrap()),
            "b1",
        ),
        (
            "after b3",
            format!(
                // not the very last transaction: recovery needs one after the target
                "ts > '{}' AND id < (SELECT max(id) FROM marker_info)",
                backups[2]["stop_time"].as_str().unwrap()
            ),
            "b3",
        ),
    ] {
        let t = ts_text(&format!(
            "id = (SELECT max(id) FROM marker_info WHERE {pred})"
        ));
        let (r, report) = a.pitr(&["--target-time", &t]);
        assert_eq!(report["backup"], id(want).as_str(), "{label}: {report}");
        assert_eq!(got(&r), expected(&a.c, &format!("ts <= '{t}'")), "{label}");
    }
    // a commit's LSN, inclusive and exclusive
    let n: u64 = rng.random_range(total / 2..total);
    let l =
        a.c.psql(&format!("SELECT lsn FROM marker_info WHERE id = {n}"));
    let (r, _) = a.pitr(&["--target-lsn", &l]);
    assert_eq!(got(&r), expected(&a.c, &format!("lsn <= '{l}'")), "lsn {l}");
    drop(r);
    let (r, _) = a.pitr(&["--target-lsn", &l, "--exclusive"]);
    assert_eq!(
        got(&r),
        expected(&a.c, &format!("lsn < '{l}'")),
        "lsn {l} exclusive"
    );
    drop(r);
    // a transaction, inclusive and exclusive
    let n: u64 = rng.random_range(1..total);
    let (x, xl) = {
        let v = a.c.psql(&format!(
            "SELECT xid || ' ' || lsn FROM marker_info WHERE id = {n}"
        ));
        let (x, l) = v.split_once(' ').unwrap();
        (x.to_owned(), l.to_owned())
    };
    let (r, _) = a.pitr(&["--target-xid", &x]);
    assert_eq!(
        got(&r),
        expected(&a.c, &format!("lsn <= '{xl}'")),
        "xid {x}"
    );
    drop(r);
    let (r, _) = a.pitr(&["--target-xid", &x, "--exclusive"]);
    assert_eq!(
        got(&r),
        expected(&a.c, &format!("lsn < '{xl}'")),
        "xid {x} exclusive"
    );
    drop(r);
    // the restore point
    let (r, report) = a.pitr(&["--target-name", "walvault-mid"]);
    assert_eq!(
        got(&r),
        expected(&a.c, &format!("lsn < '{rp_lsn}'")),
        "restore point: {report}"
    );
    drop(r);
    // everything, including the last row (only in the .partial)
    let (r, report) = a.pitr(&["--latest"]);
    assert_eq!(got(&r), expected(&a.c, "true"), "latest: {report}");
    assert_eq!(report["backup"], id("b3").as_str());
    // intact: amcheck on the marker table, checksums after a clean stop
    let out = r
        .dst
        .command(&r.dst.client_bin("pg_amcheck"))
        .args([
            "-h",
            a.c.sockdir.to_str().unwrap(),
            "-p",
            &r.dst.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", "postgres", "-t", "marker", "--heapallindexed"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_amcheck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    r.stop_and_check();

    // unreachable targets are refused before anything is written
    let e = a.pitr_refused(&["--target-time", "2000-01-01 00:00:00+00"]);
    assert!(e.contains("before the first usable backup"), "{e}");
    let e = a.pitr_refused(&["--target-time", "2099-01-01 00:00:00+00"]);
    assert!(e.contains("after the last archived transaction end"), "{e}");
    let e = a.pitr_refused(&["--target-xid", "4000000000"]);
    assert!(e.contains("no commit or abort"), "{e}");
    let e = a.pitr_refused(&["--target-name", "no-such-point"]);
    assert!(e.contains("no restore point named"), "{e}");
}

#[test]
fn pitr_along_timelines_after_a_restore_was_promoted() {
    let mut a = Archived::new(&[]);
    a.c.psql("CREATE TABLE marker(id int PRIMARY KEY)");
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast"]);
    let after = insert_markers(|q| a.c.psql(q), 1..=20);
    a.finish_stream();
    let rows = |r: &Recovered| r.psql("SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker");

    // a recovery to row 10 becomes timeline 2, and is archived into the
    // same stanza from then on
    let (branch, report) = a.pitr(&["--target-lsn", &after[9]]);
    assert_eq!(rows(&branch), "10:10", "{report}");
    let branch_conninfo = format!(
        "host={} port={} user=postgres dbname=postgres",
        a.c.sockdir.display(),
        branch.dst.port
    );
    let mut stream = Streamer::start(&a.wv, &branch_conninfo, &["--partial-interval", "0.2"]);
    let after2 = insert_markers(|q| branch.psql(q), 101..=105);
    stream.wait_durable(after2[4].parse().unwrap(), Duration::from_secs(30));
    stream.stop();
    drop(branch);
    a.kill_stream(); // (already stopped) hand the repository to postgres again
    assert!(a.repo.join("main/wal/00000002/00000002.history").exists());

    // timeline 1, before the switch and after it (the original kept writing)
    let (r, _) = a.pitr(&["--target-lsn", &after[4], "--target-timeline", "1"]);
    assert_eq!(rows(&r), "5:5");
    drop(r);
    let (r, _) = a.pitr(&["--target-lsn", &after[14], "--target-timeline", "1"]);
    assert_eq!(rows(&r), "15:15");
    drop(r);
    // timeline 2 after the switch: rows 1-10, then the branch's 101-103
    let (r, report) = a.pitr(&["--target-lsn", &after2[2]]);
    assert_eq!(rows(&r), "13:103", "{report}");
    assert_eq!(report["timeline"], 2);
    assert_eq!(
        r.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM marker WHERE id > 100"),
        "101,102,103"
    );
    // and the newest state of timeline 2
    drop(r);
    let (r, _) = a.pitr(&["--latest"]);
    assert_eq!(rows(&r), "15:105");
}

/// The production shape: an S3 repository (Garage) named in a config file,
/// `archive_command = 'walvault wal-push'` (the piece-wise sealing path over
/// S3), a backup, then `restore-pitr --start` whose restore_command reaches
/// the same store through the config file, as the server's OS user.
#[tokio::test(flavor = "multi_thread")]
async fn pitr_from_an_s3_repository_archived_by_wal_push() {
    let s3 = crate::support::s3::S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, wv) = crate::support::s3::config_repo(work.path(), &s3.url("pitr"), &s3.config());
    wv.args(["init"]).ok();
    let c = PgCluster::start_with(crate::support::pg::PgOptions {
        conf: vec![
            "archive_mode = on".into(),
            format!(
                "archive_command = '{} wal-push --config {} %p'",
                Walvault::bin().display(),
                config.display()
            ),
        ],
        ..Default::default()
    });
    c.psql("CREATE TABLE marker(id int PRIMARY KEY)");
    c.pgbench(&["-i", "-s", "1", "-q"]);
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
    let after = insert_markers(|q| c.psql(q), 1..=20);
    // more WAL after the target, so the archive holds several segments
    c.pgbench(&["-t", "200", "-n"]);
    c.switch_and_wait_archived();
    let v = wv.args(["wal-verify", "--json"]).ok().json();
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");

    let (r, report) = pitr_started(&c, &wv, &["--target-lsn", &after[11]]);
    assert_eq!(report["state"], "promoted", "{report}");
    assert_eq!(
        r.psql("SELECT count(*) || ':' || max(id) FROM marker"),
        "12:12",
        "{report}"
    );
    assert_eq!(r.psql("SELECT pg_is_in_recovery()"), "f");
    // the recovery ran with larger settings (the harness's 32MB
    // shared_buffers, the default 5min checkpoint_timeout): shared_buffers
    // stays until a restart, the others were reverted at promotion
    let raised: Vec<&str> = report["recovery_settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        raised.contains(&"shared_buffers = 128MB (was 32MB)"),
        "{report}"
    );
    assert!(
        raised.contains(&"checkpoint_timeout = 1h (was 300s)"),
        "{report}"
    );
    assert_eq!(r.psql("SHOW shared_buffers"), "128MB");
    crate::support::wait::wait_until(
        std::time::Duration::from_secs(10),
        "checkpoint_timeout reverted",
        || r.psql("SHOW checkpoint_timeout") == "5min",
    );
    let auto = std::fs::read_to_string(r.dst.datadir.join("postgresql.auto.conf")).unwrap();
    assert!(!auto.contains("checkpoint_timeout"), "{auto}");
    r.stop_and_check();
}
