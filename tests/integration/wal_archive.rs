//! Continuous archiving against real servers: `walvault stream` killed with
//! -9 and restarted, the server restarted, RPO measured, synchronous mode,
//! a timeline switch; `walvault wal-push` as archive_command.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use walvault::pg::{Lsn, WalFileName, WalSegSize};

use crate::support::pg::{PgCluster, PgOptions, StopMode};
use crate::support::stream::StreamFiles;
use crate::support::walvault_bin;

fn walvault(repo: &Path, args: &[&str]) -> Output {
    Command::new(walvault_bin())
        .args(args)
        .arg("--repo")
        .arg(repo)
        .env_remove("WALVAULT_REPO")
        .env_remove("WALVAULT_PASSPHRASE")
        .output()
        .unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "walvault failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `walvault stream` child process.
struct Streamer {
    repo: PathBuf,
    conninfo: String,
    extra: Vec<String>,
    child: Option<Child>,
    files: StreamFiles,
}

impl Streamer {
    fn start(repo: &Path, conninfo: &str, extra: &[&str]) -> Streamer {
        let mut s = Streamer {
            repo: repo.to_owned(),
            conninfo: conninfo.to_owned(),
            files: StreamFiles {
                status: repo.with_extension("status.json"),
                log: repo.with_extension("stream.log"),
            },
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.files.log)
            .unwrap();
        let child = Command::new(walvault_bin())
            .args(["stream", "--pg", &self.conninfo, "--status-interval", "1"])
            .arg("--status-file")
            .arg(&self.files.status)
            .args(&self.extra)
            .arg("--repo")
            .arg(&self.repo)
            .env_remove("WALVAULT_REPO")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM: the stream uploads what it received and exits 0.
    fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            self.files.terminate(c);
        }
    }

    fn log(&self) -> String {
        self.files.log()
    }

    fn durable(&self) -> Option<Lsn> {
        self.files.durable()
    }

    fn wait_durable(&self, lsn: Lsn, within: Duration) {
        self.files.wait_durable(lsn, within)
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A WAL file name of a 16 MiB-segment cluster.
fn wal_name(name: &str) -> WalFileName {
    WalFileName::parse(name, WalSegSize::DEFAULT).unwrap()
}

fn lsn(c: &PgCluster, sql: &str) -> Lsn {
    c.psql(sql).parse().unwrap()
}

/// Every complete segment the repository holds for timeline 1 equals the
/// server's own file, and together they run without a gap from `from`.
async fn assert_repo_matches_server(repo_dir: &Path, c: &PgCluster, from: &str, through: &str) {
    let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(repo_dir).unwrap());
    let repo = walvault::repo::Repository::open(storage, None)
        .await
        .unwrap();
    let paths = walvault::repo::StanzaPaths::new("main");
    let tli = wal_name(from).timeline();
    let names: Vec<String> = repo
        .list_wal(&paths, tli, WalSegSize::DEFAULT)
        .await
        .unwrap()
        .into_iter()
        .filter(|n| matches!(n, WalFileName::Segment(_)))
        .map(|n| n.to_string())
        .filter(|n| n.as_str() >= from && n.as_str() <= through)
        .collect();
    let expected: Vec<String> = {
        let first = u64::from_str_radix(&from[8..], 16).unwrap();
        let last = u64::from_str_radix(&through[8..], 16).unwrap();
        // 16 MiB segments: the low 8 digits run 00..FF, the middle counts 4 GiB
        (first..=last)
            .filter(|n| (n & 0xFFFF_FFFF) <= 0xFF)
            .map(|n| format!("{}{n:016X}", &from[..8]))
            .collect()
    };
    assert_eq!(names, expected, "the repository's segments have a gap");
    for n in &names {
        let ours = repo.load_wal(&paths, &wal_name(n)).await.unwrap().unwrap();
        let theirs = std::fs::read(c.datadir.join("pg_wal").join(n)).unwrap();
        assert!(
            ours[..] == theirs[..],
            "segment {n} differs from the server's"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_survives_kill9_and_server_restart() {
    let mut c = PgCluster::start_with(PgOptions {
        conf: vec!["wal_keep_size = '4GB'".into()],
        ..Default::default()
    });
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    let mut stream = Streamer::start(&repo, &c.conninfo(), &["--partial-interval", "0.2"]);
    ok(walvault(
        &repo,
        &["backup", "--pg", &c.conninfo(), "--fast"],
    ));
    let first: serde_json::Value =
        serde_json::from_slice(&ok(walvault(&repo, &["info", "--json"])).stdout).unwrap();
    let start_lsn: Lsn = first["start_lsn"].as_str().unwrap().parse().unwrap();
    let first_seg = c.psql(&format!("SELECT pg_walfile_name('{start_lsn}')"));

    let bench = |c: &PgCluster, secs: u32| c.pgbench_load(secs).output().unwrap();
    // 60 s of pgbench in four parts, with a kill -9 of the stream, a server
    // restart and another kill -9 between them
    bench(&c, 15);
    stream.kill9();
    stream.spawn();
    bench(&c, 15);
    c.restart();
    bench(&c, 15);
    stream.kill9();
    stream.spawn();
    bench(&c, 15);

    let end = lsn(&c, "SELECT pg_switch_wal()");
    let last_seg = c.psql(&format!("SELECT pg_walfile_name('{end}')"));
    let flushed = lsn(&c, "SELECT pg_current_wal_flush_lsn()");
    stream.wait_durable(flushed, Duration::from_secs(60));
    stream.stop();
    let log = stream.log();
    assert!(
        log.contains("reconnecting"),
        "no reconnection after the server restart:\n{log}"
    );
    assert_repo_matches_server(&repo, &c, &first_seg, &last_seg).await;
    let verified = ok(walvault(&repo, &["wal-verify"]));
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(text.contains("continuous"), "{text}");
    // the newest is the switched segment, or a later .partial (WAL written
    // after the switch)
    let newest = text
        .split("newest ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_default();
    assert!(newest >= last_seg.as_str(), "{text}");

    // wal-fetch serves the first segment and prefetches the next three into
    // the spool in the background; the next call is served from the spool
    let pg_wal = work.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).unwrap();
    let dest = pg_wal.join("RECOVERYXLOG");
    ok(walvault(
        &repo,
        &[
            "wal-fetch",
            "--prefetch",
            "3",
            &first_seg,
            dest.to_str().unwrap(),
        ],
    ));
    let next: Vec<String> = walvault::restore::fetch::following_segments(&wal_name(&first_seg), 3)
        .iter()
        .map(|n| n.to_string())
        .collect();
    let spool = pg_wal.join("walvault-spool");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !next.iter().all(|n| spool.join(n).exists()) {
        assert!(Instant::now() < deadline, "the spool was not filled");
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in &next {
        let server = std::fs::read(c.datadir.join("pg_wal").join(n)).unwrap();
        assert!(
            std::fs::read(spool.join(n)).unwrap() == server,
            "spooled {n} differs"
        );
    }
    ok(walvault(
        &repo,
        &[
            "wal-fetch",
            "--prefetch",
            "0",
            &next[0],
            dest.to_str().unwrap(),
        ],
    ));
    assert!(!spool.join(&next[0]).exists(), "not served from the spool");
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(c.datadir.join("pg_wal").join(&next[0])).unwrap()
    );
    // a segment lost from the repository is reported as a gap, by name
    let lost = &next[1];
    std::fs::remove_file(repo.join("main/wal/00000001").join(lost)).unwrap();
    let out = walvault(&repo, &["wal-verify"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("GAP {lost} .. {lost} (1 segment(s))")),
        "{text}"
    );
    // a segment whose record was damaged before it was archived (stored
    // here behind wal-push's back) is reported with the record's LSN
    let victim = &next[2];
    {
        let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(&repo).unwrap());
        let r = walvault::repo::Repository::open(storage, None)
            .await
            .unwrap();
        let paths = walvault::repo::StanzaPaths::new("main");
        let victim = wal_name(victim);
        let mut bytes = r.load_wal(&paths, &victim).await.unwrap().unwrap().to_vec();
        bytes[(5 << 20) + 4000] ^= 0x01;
        r.store_wal(&paths, &victim, bytes).await.unwrap();
    }
    let out = walvault(&repo, &["wal-verify"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("DAMAGED {victim}: record at ")),
        "{text}"
    );
    c.stop(StopMode::Fast);
}

#[tokio::test(flavor = "multi_thread")]
async fn rpo_is_seconds_on_64mib_segments() {
    let c = PgCluster::start_with(PgOptions {
        wal_segsize_mb: Some(64),
        ..Default::default()
    });
    c.psql("CREATE TABLE rpo(i int)");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    let stream = Streamer::start(&repo, &c.conninfo(), &[]);
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host={} port={} user=postgres dbname=postgres",
            c.sockdir.display(),
            c.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    stream.wait_durable(
        lsn(&c, "SELECT pg_current_wal_insert_lsn()"),
        Duration::from_secs(30),
    );

    // 100 commits, 50 ms apart; for each, when its WAL became durable
    let mut pending: Vec<(Lsn, Instant)> = Vec::new();
    let mut delays = Vec::new();
    for i in 0..100 {
        client
            .execute("INSERT INTO rpo VALUES ($1)", &[&i])
            .await
            .unwrap();
        let row = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap();
        let at: Lsn = row.get::<_, String>(0).parse().unwrap();
        pending.push((at, Instant::now()));
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            if let Some(d) = stream.durable() {
                pending.retain(|(l, t)| {
                    if *l <= d {
                        delays.push(t.elapsed());
                        false
                    } else {
                        true
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() && Instant::now() < deadline {
        if let Some(d) = stream.durable() {
            pending.retain(|(l, t)| {
                if *l <= d {
                    delays.push(t.elapsed());
                    false
                } else {
                    true
                }
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        pending.is_empty(),
        "{} commits never became durable",
        pending.len()
    );
    delays.sort();
    let ms = |d: &Duration| d.as_millis();
    eprintln!(
        "RPO over {} commits: min {} ms, median {} ms, p95 {} ms, max {} ms",
        delays.len(),
        ms(&delays[0]),
        ms(&delays[delays.len() / 2]),
        ms(&delays[delays.len() * 95 / 100]),
        ms(&delays[delays.len() - 1])
    );
    assert!(
        delays[delays.len() - 1] < Duration::from_secs(2),
        "a commit took more than 2 s to become durable"
    );

    // what the status file calls durable is in the repository: fetch the
    // open segment back and compare it with the server's
    let d = stream.durable().unwrap();
    let name = c.psql(&format!("SELECT pg_walfile_name('{d}')"));
    let dest = work.path().join("fetched");
    let out = walvault(&repo, &["wal-fetch", &name, dest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = std::fs::read(&dest).unwrap();
    assert_eq!(fetched.len(), 64 << 20);
    let ours_upto = (d.0 % (64 << 20)) as usize;
    let server = std::fs::read(c.datadir.join("pg_wal").join(&name)).unwrap();
    assert!(
        fetched[..ours_upto] == server[..ours_upto],
        "the fetched segment differs"
    );
    // wal-push of a complete 64 MiB segment into another repository, and back
    let done = c.psql("SELECT pg_walfile_name(pg_switch_wal())");
    let copy = work.path().join(&done);
    std::fs::copy(c.datadir.join("pg_wal").join(&done), &copy).unwrap();
    let other = work.path().join("pushed");
    ok(walvault(&other, &["init"]));
    ok(walvault(&other, &["wal-push", copy.to_str().unwrap()]));
    let back = work.path().join("back");
    ok(walvault(
        &other,
        &["wal-fetch", &done, back.to_str().unwrap()],
    ));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&copy).unwrap());
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 64 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn synchronous_stream_holds_every_acknowledged_commit() {
    let c = PgCluster::start();
    c.psql("CREATE TABLE sync_t(i int)");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    let conninfo = format!("{} application_name=walvault", c.conninfo());
    let mut stream = Streamer::start(&repo, &conninfo, &["--synchronous"]);
    c.psql("ALTER SYSTEM SET synchronous_standby_names = 'walvault'");
    c.psql("SELECT pg_reload_conf()");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walvault' AND sync_state = 'sync'") != "1" {
        assert!(Instant::now() < deadline, "walvault never became the synchronous standby:\n{}", stream.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(&repo).unwrap());
    for i in 0..5 {
        // COMMIT returns only once walvault reported the commit flushed
        c.psql(&format!("INSERT INTO sync_t VALUES ({i})"));
        let acked: Lsn = c
            .psql("SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'walvault'")
            .parse()
            .unwrap();
        stream.kill9();
        // everything acknowledged is in the repository
        let repo_h = walvault::repo::Repository::open(storage.clone(), None)
            .await
            .unwrap();
        let paths = walvault::repo::StanzaPaths::new("main");
        let name = wal_name(&c.psql(&format!("SELECT pg_walfile_name('{acked}')")));
        let off = (acked.0 % (16 << 20)) as usize;
        let WalFileName::Segment(file) = name else {
            panic!("{name} is not a segment")
        };
        let stored = match repo_h
            .load_wal(&paths, &WalFileName::Partial(file))
            .await
            .unwrap()
        {
            Some(p) => p,
            None => repo_h
                .load_wal(&paths, &name)
                .await
                .unwrap()
                .expect("no WAL for the commit"),
        };
        let server = std::fs::read(c.datadir.join("pg_wal").join(name.to_string())).unwrap();
        assert!(
            stored[..off] == server[..off],
            "commit {i}: WAL up to the acknowledged {acked} is not in the repository"
        );
        stream.spawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walvault' AND sync_state = 'sync'") != "1" {
            assert!(Instant::now() < deadline, "no reconnect:\n{}", stream.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    c.psql("ALTER SYSTEM RESET synchronous_standby_names");
    c.psql("SELECT pg_reload_conf()");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_follows_a_promotion_to_the_next_timeline() {
    let primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    let stream = Streamer::start(&repo, &standby.conninfo(), &["--partial-interval", "0.2"]);
    // a backup taken from the standby, on timeline 1
    ok(walvault(
        &repo,
        &["backup", "--pg", &standby.conninfo(), "--fast"],
    ));
    primary.psql("CREATE TABLE t1 AS SELECT g FROM generate_series(1, 1000) g");
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream.durable().is_none() {
        assert!(Instant::now() < deadline, "{}", stream.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    standby.promote();
    standby.psql("CREATE TABLE t2 AS SELECT g FROM generate_series(1, 1000) g");
    let end = lsn(&standby, "SELECT pg_switch_wal()");
    let tli2_seg = standby.psql(&format!("SELECT pg_walfile_name('{end}')"));
    assert!(tli2_seg.starts_with("00000002"), "{tli2_seg}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = repo.join("main/wal/00000002").join(&tli2_seg);
    while !stored.exists() {
        assert!(
            Instant::now() < deadline,
            "timeline 2 not followed:\n{}",
            stream.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(repo.join("main/wal/00000002/00000002.history").exists());
    assert!(
        stream.log().contains("following timeline 2"),
        "{}",
        stream.log()
    );
    // byte for byte the promoted server's segment
    let dest = work.path().join("seg");
    ok(walvault(
        &repo,
        &["wal-fetch", &tli2_seg, dest.to_str().unwrap()],
    ));
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(standby.datadir.join("pg_wal").join(&tli2_seg)).unwrap()
    );
    // continuous from the backup on timeline 1 through the switch to 2
    let out = ok(walvault(&repo, &["wal-verify", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");
    assert_eq!(v["newest"], tli2_seg.as_str(), "{v}");
    assert!(v["segments_read"].as_u64().unwrap() >= 2, "{v}");
}

/// A cluster archiving into a fresh repository with `walvault wal-push
/// OPTIONS%p` under pgbench for `seconds`, until every segment up to a
/// final switch is archived without a failure.
struct Archiving {
    work: tempfile::TempDir,
    repo: PathBuf,
    c: PgCluster,
    /// The segment the final switch ended.
    last: String,
}

fn archiving_under_pgbench(options: &str, seconds: &str) -> Archiving {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = work.path().join("walvault");
    std::fs::copy(walvault_bin(), &bin).unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    crate::support::give_to_postgres(&repo);
    let c = PgCluster::start_with(PgOptions {
        conf: vec![
            "archive_mode = on".into(),
            format!(
                "archive_command = '{} wal-push {options}--repo {} %p'",
                bin.display(),
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
    Archiving {
        work,
        repo,
        c,
        last,
    }
}

#[test]
fn wal_push_as_archive_command() {
    let Archiving {
        work,
        repo,
        c,
        last,
    } = archiving_under_pgbench("", "60");
    let archived = c.psql("SELECT archived_count FROM pg_stat_archiver");
    assert!(archived.parse::<u32>().unwrap() >= 3, "{archived}");

    // the same segment again: success
    let seg = c.datadir.join("pg_wal").join(&last);
    let copy = work.path().join(&last);
    std::fs::copy(&seg, &copy).unwrap();
    ok(walvault(&repo, &["wal-push", copy.to_str().unwrap()]));
    // another cluster's valid segment under an archived name (split brain):
    // refused, nothing overwritten
    let other = PgCluster::start();
    let name1 = "000000010000000000000001";
    other.psql("SELECT pg_switch_wal()");
    let theirs = work.path().join(name1);
    std::fs::copy(other.datadir.join("pg_wal").join(name1), &theirs).unwrap();
    let out = walvault(&repo, &["wal-push", theirs.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different content"), "{err}");
    let back1 = work.path().join("back1");
    ok(walvault(
        &repo,
        &["wal-fetch", name1, back1.to_str().unwrap()],
    ));
    assert!(
        std::fs::read(&back1).unwrap()
            == std::fs::read(c.datadir.join("pg_wal").join(name1)).unwrap()
    );
    let dest = work.path().join("back");
    ok(walvault(
        &repo,
        &["wal-fetch", &last, dest.to_str().unwrap()],
    ));
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
    let out = walvault(&repo, &["wal-push", full.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fails its CRC check") || err.contains("malformed") || err.contains("claims"),
        "{err}"
    );
    assert!(err.contains("record at "), "no LSN in: {err}");
    // the same damage in a first push (read, checked and sealed in pieces,
    // the sealing ahead of the check): refused with the LSN, nothing stored
    let out = walvault(
        &repo,
        &["wal-push", "--stanza", "fresh", full.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("record at "), "no LSN in: {err}");
    // (a destination of its own: the fetches above prefetch into a spool
    // beside theirs, and the spool is served before any repository)
    let fresh = work.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let out = walvault(
        &repo,
        &[
            "wal-fetch",
            "--stanza",
            "fresh",
            &full_name,
            fresh.join("back").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "a refused segment was stored");
    // a truncated segment: refused before anything is stored
    let short_name = "0000000100000000000000F0";
    let short = work.path().join(short_name);
    std::fs::write(&short, &std::fs::read(&seg).unwrap()[..3 << 20]).unwrap();
    let out = walvault(&repo, &["wal-push", short.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a WAL segment size"), "{err}");
    // a segment under the wrong name: its pages say where they belong
    let wrong = work.path().join("0000000100000000000000F1");
    std::fs::copy(&seg, &wrong).unwrap();
    let out = walvault(&repo, &["wal-push", wrong.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("misnamed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `wal-push --async`: a background process archives ahead; PostgreSQL's
/// calls only wait for their file to be durable. Every archived segment
/// equals the server's; failures reach the call that waits for the file.
#[test]
fn wal_push_async_as_archive_command() {
    let Archiving {
        work,
        repo,
        c,
        last,
    } = archiving_under_pgbench("--async ", "20");
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
        ok(walvault(
            &repo,
            &["wal-fetch", name, back.to_str().unwrap()],
        ));
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
    let out = walvault(&repo, &["wal-push", "--async", seg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different content"), "{err}");
    assert!(
        !fake
            .join("walvault-push")
            .join(format!("{name1}.error"))
            .exists(),
        "the error mark was not taken"
    );
    // a background process that cannot open the repository: the call fails
    // with the reason, not a success and not a minute-long wait
    let missing = work.path().join("no-such-repo");
    let fake2 = work.path().join("fake-wal-2");
    std::fs::create_dir_all(fake2.join("archive_status")).unwrap();
    std::fs::copy(&seg, fake2.join(name1)).unwrap();
    std::fs::write(
        fake2.join("archive_status").join(format!("{name1}.ready")),
        "",
    )
    .unwrap();
    let t = Instant::now();
    let out = walvault(
        &missing,
        &["wal-push", "--async", fake2.join(name1).to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-repo"), "{err}");
    // a file PostgreSQL is not waiting for (no .ready): pushed at once
    let manual = work.path().join("manual");
    std::fs::create_dir_all(&manual).unwrap();
    std::fs::copy(wal.join(&done[0]), manual.join(&done[0])).unwrap();
    ok(walvault(
        &repo,
        &[
            "wal-push",
            "--async",
            manual.join(&done[0]).to_str().unwrap(),
        ],
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_started_after_a_backup_leaves_no_gap() {
    let c = PgCluster::start();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    ok(walvault(
        &repo,
        &["backup", "--pg", &c.conninfo(), "--fast"],
    ));
    // WAL written while nothing streams: the stream must fetch it from the
    // server, though its new slot does not hold it
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let stream = Streamer::start(&repo, &c.conninfo(), &["--partial-interval", "0.2"]);
    stream.wait_durable(
        lsn(&c, "SELECT pg_current_wal_insert_lsn()"),
        Duration::from_secs(30),
    );
    let out = ok(walvault(&repo, &["wal-verify"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("continuous"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_down_during_a_promotion_resumes_where_the_new_timeline_began() {
    let primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    let mut stream = Streamer::start(&repo, &standby.conninfo(), &["--partial-interval", "0.2"]);
    primary.psql("CREATE TABLE t1 AS SELECT g FROM generate_series(1, 1000) g");
    stream.wait_durable(
        lsn(&primary, "SELECT pg_current_wal_insert_lsn()"),
        Duration::from_secs(30),
    );
    stream.kill9();
    // promoted while nothing streams, and two segments written on timeline 2
    standby.promote();
    let first2 = standby.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(first2.starts_with("00000002"), "{first2}");
    standby.psql("CREATE TABLE t2 AS SELECT g FROM generate_series(1, 1000) g");
    standby.psql("SELECT pg_switch_wal()");
    standby.psql("CREATE TABLE t3 AS SELECT g FROM generate_series(1, 1000) g");
    standby.psql("SELECT pg_switch_wal()");
    stream.spawn();
    let stored = repo.join("main/wal/00000002").join(&first2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stored.exists() {
        assert!(
            Instant::now() < deadline,
            "the first segment of timeline 2 was skipped:\n{}",
            stream.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dest = work.path().join("seg");
    ok(walvault(
        &repo,
        &["wal-fetch", &first2, dest.to_str().unwrap()],
    ));
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(standby.datadir.join("pg_wal").join(&first2)).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_after_the_server_recycled_wal_logs_the_gap_and_goes_on() {
    let c = PgCluster::start_with(PgOptions {
        conf: vec![
            "min_wal_size = '32MB'".into(),
            "max_wal_size = '32MB'".into(),
        ],
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    ok(walvault(&repo, &["init"]));
    ok(walvault(
        &repo,
        &["backup", "--pg", &c.conninfo(), "--fast"],
    ));
    // WAL nobody keeps: written and checkpointed until the segment the
    // backup ended in is gone from the server
    // the first segment the repository lacks complete: where the stream
    // would start
    let names: Vec<String> = std::fs::read_dir(repo.join("main/wal/00000001"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let last_full = names.iter().filter(|n| n.len() == 24).max();
    let gone = match last_full {
        Some(l) => {
            let next_no = u64::from_str_radix(&l[16..], 16).unwrap() + 1;
            format!("{}{next_no:08X}", &l[..16])
        }
        None => names
            .iter()
            .find_map(|n| n.strip_suffix(".partial"))
            .unwrap()
            .to_owned(),
    };
    for round in 0.. {
        assert!(round < 10, "{gone} was never recycled");
        if !c.datadir.join("pg_wal").join(&gone).exists() {
            break;
        }
        c.pgbench(&["-i", "-s", "1", "-q"]);
        c.psql("SELECT pg_switch_wal()");
        c.psql("CHECKPOINT");
    }
    let stream = Streamer::start(&repo, &c.conninfo(), &["--partial-interval", "0.2"]);
    c.psql("CREATE TABLE after_gap AS SELECT g FROM generate_series(1, 1000) g");
    stream.wait_durable(
        lsn(&c, "SELECT pg_current_wal_insert_lsn()"),
        Duration::from_secs(60),
    );
    let log = stream.log();
    assert!(log.contains("the server no longer has it"), "{log}");
    // and wal-verify names the gap
    let out = walvault(&repo, &["wal-verify", "--names-only"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("GAP "));
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
    let repo = work.path().join("repo");
    let run = |pass: &str, args: &[&str]| {
        Command::new(walvault_bin())
            .args(args)
            .arg("--repo")
            .arg(&repo)
            .env("WALVAULT_PASSPHRASE", pass)
            .env_remove("WALVAULT_REPO")
            .output()
            .unwrap()
    };
    ok(run("correct horse battery", &["init", "--encrypt"]));
    ok(run(
        "correct horse battery",
        &["wal-push", seg.to_str().unwrap()],
    ));
    let back = work.path().join("back");
    ok(run(
        "correct horse battery",
        &["wal-fetch", &name, back.to_str().unwrap()],
    ));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&seg).unwrap());
    // nothing of the segment's plain bytes is in the stored object
    let stored = repo.join("main/wal").join(&name[..8]).join(&name);
    let object = std::fs::read(&stored).unwrap();
    // (the long page header and the first record: never zeros)
    let page = &std::fs::read(&seg).unwrap()[..64];
    assert!(!object.windows(page.len()).any(|w| w == page));

    let out = run(
        "wrong passphrase",
        &["wal-fetch", &name, back.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(255));
    let mut bad = object.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&stored, &bad).unwrap();
    let out = run(
        "correct horse battery",
        &["wal-fetch", &name, back.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&name),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
