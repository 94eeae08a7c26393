//! `walvault stream` on one timeline: killed with -9 and restarted, the
//! server restarted, the RPO measured, synchronous mode, a start after a
//! backup, WAL the server recycled; and on the archive it made,
//! `wal-fetch` (with its prefetch spool) and `wal-verify` (gaps, damage).

use std::path::Path;
use std::time::{Duration, Instant};

use walvault::pg::{Lsn, WalFileName, WalSegSize};

use crate::support::pg::{PgCluster, PgOptions, StopMode};
use crate::support::stream::Streamer;
use crate::support::{wait_until, Walvault};

/// A WAL file name of a 16 MiB-segment cluster.
fn wal_name(name: &str) -> WalFileName {
    WalFileName::parse(name, WalSegSize::DEFAULT).unwrap()
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
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let mut stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
    let first = wv.args(["info", "--json"]).ok().json();
    let start_lsn: Lsn = first["start_lsn"].as_str().unwrap().parse().unwrap();
    let first_seg = c.walfile_name(start_lsn);

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

    let end = c.lsn("SELECT pg_switch_wal()");
    let last_seg = c.walfile_name(end);
    let flushed = c.lsn("SELECT pg_current_wal_flush_lsn()");
    stream.wait_durable(flushed, Duration::from_secs(60));
    stream.stop();
    let log = stream.log();
    assert!(
        log.contains("reconnecting"),
        "no reconnection after the server restart:\n{log}"
    );
    assert_repo_matches_server(&repo, &c, &first_seg, &last_seg).await;
    let text = wv.args(["wal-verify"]).ok().stdout;
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
    wv.args(["wal-fetch", "--prefetch", "3", &first_seg])
        .arg(&dest)
        .ok();
    let next: Vec<String> = walvault::restore::fetch::following_segments(&wal_name(&first_seg), 3)
        .iter()
        .map(|n| n.to_string())
        .collect();
    let spool = pg_wal.join("walvault-spool");
    wait_until(
        Duration::from_secs(30),
        &format!("the spool to hold {next:?}"),
        || next.iter().all(|n| spool.join(n).exists()),
    );
    for n in &next {
        let server = std::fs::read(c.datadir.join("pg_wal").join(n)).unwrap();
        assert!(
            std::fs::read(spool.join(n)).unwrap() == server,
            "spooled {n} differs"
        );
    }
    wv.args(["wal-fetch", "--prefetch", "0", &next[0]])
        .arg(&dest)
        .ok();
    assert!(!spool.join(&next[0]).exists(), "not served from the spool");
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(c.datadir.join("pg_wal").join(&next[0])).unwrap()
    );
    // a segment lost from the repository is reported as a gap, by name
    let lost = &next[1];
    std::fs::remove_file(repo.join("main/wal/00000001").join(lost)).unwrap();
    let text = wv.args(["wal-verify"]).fails().stdout;
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
    let text = wv.args(["wal-verify"]).fails().stdout;
    assert!(
        text.contains(&format!("DAMAGED {victim}: record at ")),
        "{text}"
    );
    c.stop(StopMode::Fast);
}

/// Commits 50 ms apart on 64 MiB segments: each becomes durable (in a
/// `.partial` upload of the open segment) within the partial interval,
/// not when its segment is full.
///
/// The bound asserted here only catches breakage (a stream that stops
/// uploading the open segment would leave commits undurable for as long as
/// a 64 MiB segment takes to fill): 15 s, far above the default partial
/// interval of 1 s, so that a loaded machine cannot fail it. The figure
/// itself (about 1 s median, 1.2 s worst alone on 2 cores) is measured by
/// `bench/rpo.sh`; this test prints what it saw.
#[tokio::test(flavor = "multi_thread")]
async fn rpo_is_seconds_on_64mib_segments() {
    const BOUND: Duration = Duration::from_secs(15);
    let c = PgCluster::start_with(PgOptions {
        wal_segsize_mb: Some(64),
        ..Default::default()
    });
    c.psql("CREATE TABLE rpo(i int)");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let stream = Streamer::start(&wv, &c.conninfo(), &[]);
    let (client, conn) = tokio_postgres::connect(&c.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));

    // 100 commits, 50 ms apart; for each, when its WAL became durable
    let sampler = stream.sample_durable();
    let mut commits: Vec<(Lsn, Instant)> = Vec::new();
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
        commits.push((at, Instant::now()));
        // the commit rate under test (20 a second), not a wait for anything
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (last, _) = *commits.last().unwrap();
    wait_until(BOUND, "the last commit to become durable", || {
        sampler.durable_at(last).is_some()
    });
    let mut delays: Vec<Duration> = commits
        .iter()
        .map(|(lsn, t)| {
            let durable = sampler.durable_at(*lsn).expect("durable before the last");
            durable.saturating_duration_since(*t)
        })
        .collect();
    drop(sampler);
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
        delays[delays.len() - 1] < BOUND,
        "a commit took more than {BOUND:?} to become durable"
    );

    // what the status file calls durable is in the repository: fetch the
    // open segment back and compare it with the server's
    let d = stream.durable().unwrap();
    let name = c.walfile_name(d);
    let dest = work.path().join("fetched");
    wv.args(["wal-fetch", &name]).arg(&dest).ok();
    let fetched = std::fs::read(&dest).unwrap();
    assert_eq!(fetched.len(), 64 << 20);
    let ours_upto = (d.get() % (64 << 20)) as usize;
    let server = std::fs::read(c.datadir.join("pg_wal").join(&name)).unwrap();
    assert!(
        fetched[..ours_upto] == server[..ours_upto],
        "the fetched segment differs"
    );
    // wal-push of a complete 64 MiB segment into another repository, and back
    let done = c.psql("SELECT pg_walfile_name(pg_switch_wal())");
    let copy = work.path().join(&done);
    std::fs::copy(c.datadir.join("pg_wal").join(&done), &copy).unwrap();
    let other = Walvault::new().repo(work.path().join("pushed"));
    other.args(["init"]).ok();
    other.args(["wal-push"]).arg(&copy).ok();
    let back = work.path().join("back");
    other.args(["wal-fetch", &done]).arg(&back).ok();
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&copy).unwrap());
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 64 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn synchronous_stream_holds_every_acknowledged_commit() {
    let c = PgCluster::start();
    c.psql("CREATE TABLE sync_t(i int)");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let conninfo = format!("{} application_name=walvault", c.conninfo());
    let mut stream = Streamer::start(&wv, &conninfo, &["--synchronous"]);
    c.psql("ALTER SYSTEM SET synchronous_standby_names = 'walvault'");
    c.reload_conf();
    let is_sync = || {
        c.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walvault' AND sync_state = 'sync'") == "1"
    };
    wait_until(
        Duration::from_secs(30),
        "walvault to become the synchronous standby",
        is_sync,
    );
    let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(&repo).unwrap());
    for i in 0..5 {
        // COMMIT returns only once walvault reported the commit flushed
        c.psql(&format!("INSERT INTO sync_t VALUES ({i})"));
        let acked =
            c.lsn("SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'walvault'");
        stream.kill9();
        // everything acknowledged is in the repository
        let repo_h = walvault::repo::Repository::open(storage.clone(), None)
            .await
            .unwrap();
        let paths = walvault::repo::StanzaPaths::new("main");
        let name = wal_name(&c.walfile_name(acked));
        let off = (acked.get() % (16 << 20)) as usize;
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
        wait_until(
            Duration::from_secs(30),
            "walvault to reconnect as the synchronous standby",
            is_sync,
        );
    }
    c.psql("ALTER SYSTEM RESET synchronous_standby_names");
    c.reload_conf();
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_started_after_a_backup_leaves_no_gap() {
    let c = PgCluster::start();
    let work = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(work.path().join("repo"));
    wv.args(["init"]).ok();
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
    // WAL written while nothing streams: the stream must fetch it from the
    // server, though its new slot does not hold it
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));
    let text = wv.args(["wal-verify"]).ok().stdout;
    assert!(text.contains("continuous"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_after_the_server_recycled_wal_logs_the_gap_and_goes_on() {
    let c = small_pg_wal();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
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
    write_until_recycled(&c, &gone);
    let stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    c.psql("CREATE TABLE after_gap AS SELECT g FROM generate_series(1, 1000) g");
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(60));
    let log = stream.log();
    assert!(log.contains("the server no longer has it"), "{log}");
    // and wal-verify names the gap
    let out = wv.args(["wal-verify", "--names-only"]).fails();
    assert!(out.stdout.contains("GAP "), "{}", out.stdout);
}

/// A server that keeps little WAL (32 MB), so a test can make it recycle
/// a segment.
fn small_pg_wal() -> PgCluster {
    PgCluster::start_with(PgOptions {
        conf: vec![
            "min_wal_size = '32MB'".into(),
            "max_wal_size = '32MB'".into(),
        ],
        ..Default::default()
    })
}

/// Write WAL and checkpoint until the server has recycled segment `name`
/// (nothing may keep it: no slot behind it).
fn write_until_recycled(c: &PgCluster, name: &str) {
    for round in 0.. {
        assert!(round < 10, "{name} was never recycled");
        if !c.datadir.join("pg_wal").join(name).exists() {
            break;
        }
        c.pgbench(&["-i", "-s", "1", "-q"]);
        c.psql("SELECT pg_switch_wal()");
        c.psql("CHECKPOINT");
    }
}

/// `wal-fetch` (what restore_command runs) of the open segment when a
/// piece in the middle is damaged or gone: the WAL up to that piece, zeros
/// after it, never a byte past the gap. For the pieces of an async stream
/// and for a record of a synchronous stream's journal.
#[tokio::test(flavor = "multi_thread")]
async fn wal_fetch_stops_at_a_missing_or_damaged_piece() {
    let c = PgCluster::start();
    c.psql("CREATE TABLE gap_t(i int)");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let name = c.walfile_name(c.insert_lsn());
    let tli_dir = repo.join("main/wal/00000001");
    let server = || std::fs::read(c.datadir.join("pg_wal").join(&name)).unwrap();
    // fetch the segment; assert it is the server's WAL up to `upto`, and
    // zeros from there when that is a gap
    let fetched_upto = |upto: usize, gap: bool, what: &str| {
        let dest = work.path().join("fetched");
        let _ = std::fs::remove_file(&dest);
        wv.args(["wal-fetch", &name]).arg(&dest).ok();
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(got.len(), 16 << 20, "{what}");
        assert!(
            got[..upto] == server()[..upto],
            "{what}: the WAL before the gap differs"
        );
        assert!(
            !gap || got[upto..].iter().all(|b| *b == 0),
            "{what}: bytes past the gap at {upto} were served"
        );
    };
    // several commits, each durable before the next: several pieces
    let commits = |stream: &Streamer, from: i32| {
        for i in from..from + 6 {
            c.psql(&format!("INSERT INTO gap_t VALUES ({i})"));
            stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));
        }
        assert_eq!(
            c.walfile_name(c.insert_lsn()),
            name,
            "the test needs one segment"
        );
    };

    // async: a piece object per interval
    let mut stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.1"]);
    commits(&stream, 0);
    let durable = (stream.durable().unwrap().get() % (16 << 20)) as usize;
    stream.kill9();
    let mut pieces: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(&tli_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let offset = file.strip_prefix(&format!("{name}."))?;
            Some((u32::from_str_radix(offset, 16).ok()?, e.path()))
        })
        .collect();
    pieces.sort();
    assert!(pieces.len() >= 4, "too few pieces: {pieces:?}");
    let (mid, mid_path) = pieces[pieces.len() / 2].clone();
    fetched_upto(durable, false, "every piece");
    let mut damaged = std::fs::read(&mid_path).unwrap();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x55;
    std::fs::write(&mid_path, &damaged).unwrap();
    fetched_upto(mid as usize, true, "a damaged piece");
    std::fs::remove_file(&mid_path).unwrap();
    fetched_upto(mid as usize, true, "a missing piece");
    for (_, p) in &pieces {
        let _ = std::fs::remove_file(p);
    }

    // synchronous: the pieces are records of the segment's journal
    let conninfo = format!("{} application_name=walvault", c.conninfo());
    let mut stream = Streamer::start(&wv, &conninfo, &["--synchronous"]);
    c.psql("ALTER SYSTEM SET synchronous_standby_names = 'walvault'");
    c.reload_conf();
    commits(&stream, 100);
    let durable = (stream.durable().unwrap().get() % (16 << 20)) as usize;
    stream.kill9();
    c.psql("ALTER SYSTEM RESET synchronous_standby_names");
    c.reload_conf();
    let journal = tli_dir.join(format!("{name}.journal"));
    let bytes = std::fs::read(&journal).unwrap();
    // records: "WVJ1", piece offset u32 LE, sealed length u32 LE, crc32c;
    // then the sealed piece
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 16 && &bytes[at..at + 4] == b"WVJ1" {
        let word = |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
        let (offset, len) = (word(4), word(8) as usize);
        records.push((offset, at + 16 + len));
        at += 16 + len;
    }
    assert!(records.len() >= 4, "too few journal records: {records:?}");
    fetched_upto(durable, false, "the whole journal");
    let (mid, mid_end) = records[records.len() / 2];
    let mut damaged = bytes.clone();
    damaged[mid_end - 1] ^= 0x55;
    std::fs::write(&journal, &damaged).unwrap();
    fetched_upto(mid as usize, true, "a damaged journal record");
}

/// A synchronous stream acknowledges a completed segment from its journal
/// and stores the segment object in the background. Killed in between, it
/// leaves a `.partial` whose pieces hold the whole segment, which the
/// server may recycle at once (the slot moved past it): the restarted
/// stream stores that segment from the pieces before it resumes, so no gap.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_stream_stores_a_segment_its_pieces_hold_whole() {
    let c = small_pg_wal();
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let wv = Walvault::new().repo(&repo_dir);
    wv.args(["init"]).ok();
    let mut stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    c.psql("CREATE TABLE whole_t AS SELECT g FROM generate_series(1, 1000) g");
    let name = c.walfile_name(c.insert_lsn());
    c.psql("SELECT pg_switch_wal()");
    c.psql("CREATE TABLE whole_t2 AS SELECT g FROM generate_series(1, 10) g");
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));
    stream.kill9();
    let server_copy = std::fs::read(c.datadir.join("pg_wal").join(&name)).unwrap();

    // the state of that kill: the segment only as a piece holding all of it
    let storage = std::sync::Arc::new(walvault::storage::LocalDir::open(&repo_dir).unwrap());
    let repo = walvault::repo::Repository::open(storage, None)
        .await
        .unwrap();
    let paths = walvault::repo::StanzaPaths::new("main");
    let WalFileName::Segment(f) = wal_name(&name) else {
        panic!("{name} is not a segment")
    };
    let stored = repo
        .load_wal(&paths, &wal_name(&name))
        .await
        .unwrap()
        .unwrap();
    assert!(stored[..] == server_copy[..]);
    repo.delete_wal(&paths, &wal_name(&name)).await.unwrap();
    repo.store_piece(&paths, &f, 0, stored).await.unwrap();
    assert!(repo
        .load_wal(&paths, &wal_name(&name))
        .await
        .unwrap()
        .is_none());

    // the server recycles it
    write_until_recycled(&c, &name);

    stream.spawn();
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(60));
    let log = stream.log();
    assert!(!log.contains("the server no longer has it"), "{log}");
    let back = repo.load_wal(&paths, &wal_name(&name)).await.unwrap();
    assert!(
        back.is_some_and(|b| b[..] == server_copy[..]),
        "{name} is not stored whole:\n{log}"
    );
    assert!(
        repo.list_pieces(&paths, &f).await.unwrap().is_empty(),
        "its pieces remain"
    );
    let v = wv.args(["wal-verify", "--json"]).ok().json();
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");
}
