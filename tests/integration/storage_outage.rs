//! Continuous archiving while the S3 store fails, against real servers:
//! a single Garage server stopped for 30 s under pgbench, and a node of a
//! 3-node Garage cluster (3 copies) killed while `walvault stream` and
//! `walvault backup` write to it. Nothing may stop and nothing may be lost.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use walvault::pg::Lsn;
use walvault::storage::Storage;

use crate::support::garage_cluster::GarageCluster;
use crate::support::pg::{table_hashes, PgCluster, PgOptions, StopMode, PASSWORD_USER};
use crate::support::s3::S3Server;
use crate::support::stream::Streamer;
use crate::support::{hold, wait_for, wait_until, wait_until_async, Walvault};

/// `wal-verify --json` through `wv`: no gap and no damaged segment.
/// Returns the report.
fn assert_wal_continuous(wv: &Walvault) -> serde_json::Value {
    let v = wv.args(["wal-verify", "--json"]).ok().json();
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");
    assert_eq!(v["damaged"], serde_json::json!([]), "{v}");
    v
}

/// The name of the 16 MiB segment on timeline 1 that holds the byte at
/// `at` (`pg_walfile_name` names the one before at a segment boundary).
fn segment_at(at: Lsn) -> String {
    let n = at.get() >> 24;
    format!("00000001{:08X}{:08X}", n / 0x100, n % 0x100)
}

/// Segment number of a 16 MiB segment's file name (timeline ignored).
fn seg_no(name: &str) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    log * 0x100 + seg
}

/// The 16 MiB segment names from `from` through `through`, on `from`'s timeline.
fn segments(from: &str, through: &str) -> Vec<String> {
    (seg_no(from)..=seg_no(through))
        .map(|n| format!("{}{:08X}{:08X}", &from[..8], n / 0x100, n % 0x100))
        .collect()
}

/// Each of `names`, fetched from the repository with `wal-fetch`, equals
/// the server's file in pg_wal byte for byte.
fn assert_fetched_equal_server(wv: &Walvault, c: &PgCluster, names: &[String], dir: &Path) {
    let dest = dir.join("fetched");
    for n in names {
        let server = std::fs::read(c.datadir.join("pg_wal").join(n))
            .unwrap_or_else(|e| panic!("the server no longer has {n}: {e}"));
        wv.args(["wal-fetch", "--prefetch", "0", n]).arg(&dest).ok();
        let ours = std::fs::read(&dest).unwrap();
        assert!(
            ours == server,
            "archived {n} differs from the server's ({} and {} bytes)",
            ours.len(),
            server.len()
        );
    }
}

/// The store is down for 30 s while pgbench writes; the slot keeps the WAL
/// on the server, the stream retries, and once the store is back every
/// byte reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn stream_rides_out_a_30s_storage_outage() {
    let mut s3 = S3Server::start().await;
    // small max_wal_size and no wal_keep_size: only the slot keeps WAL that
    // a checkpoint has passed
    let mut c = PgCluster::start_with(PgOptions {
        conf: vec![
            "min_wal_size = '32MB'".into(),
            "max_wal_size = '32MB'".into(),
        ],
        ..Default::default()
    });
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let work = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(s3.url("outage")).envs(s3.env());
    wv.args(["init"]).ok();
    let mut stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));

    let before = c.insert_lsn();
    let mut bench = c.pgbench_load(35).spawn().unwrap();
    // the store dies while the stream uploads pgbench's WAL
    let loaded = wait_for(Duration::from_secs(30), "pgbench to write WAL", || {
        let now = c.insert_lsn();
        if now > before {
            Ok(now)
        } else {
            Err(format!("WAL ends at {now}"))
        }
    });
    stream.wait_durable(loaded, Duration::from_secs(30));
    s3.stop();
    let outage = Instant::now();
    // uploads in flight when the store died fail; the stream says so, and
    // what is durable then stays
    wait_until(
        Duration::from_secs(30),
        "the stream to notice the outage",
        || stream.log().contains("stream interrupted"),
    );
    let held = stream.durable().expect("no durable position");
    // the store stays down for 30 s (the subject of the test): all along,
    // the stream runs and nothing more becomes durable
    hold(
        Duration::from_secs(30).saturating_sub(outage.elapsed()),
        "the stream running with nothing more durable while the store is down",
        || {
            if !stream.running() {
                return Err(format!("the stream exited:\n{}", stream.log()));
            }
            match stream.durable() {
                Some(d) if d <= held => Ok(()),
                d => Err(format!("durable at {d:?} after {held}")),
            }
        },
    );

    // the slot held the WAL: not released past what is durable, and a
    // checkpoint (which would recycle every segment before the current
    // one) leaves every segment since then in pg_wal
    c.psql("CHECKPOINT");
    let now = c.insert_lsn();
    let held_seg = segment_at(held);
    let now_seg = c.walfile_name(now);
    assert!(
        seg_no(&now_seg) >= seg_no(&held_seg) + 2,
        "too little WAL during the outage to prove anything: {held} .. {now}"
    );
    let slot = c.psql(
        "SELECT restart_lsn || ' ' || wal_status FROM pg_replication_slots WHERE slot_name = 'walvault'",
    );
    let (restart, wal_status) = slot.split_once(' ').expect("no slot 'walvault'");
    let restart: Lsn = restart.parse().unwrap();
    assert!(
        restart <= held,
        "the slot let go of WAL that is not durable: restart {restart}, durable {held}"
    );
    assert!(
        wal_status == "reserved" || wal_status == "extended",
        "slot: {slot}"
    );
    for n in segments(&held_seg, &now_seg) {
        assert!(
            c.datadir.join("pg_wal").join(&n).exists(),
            "{n} (between the durable {held} and {now}) is gone from pg_wal"
        );
    }
    // from here on keep WAL for the byte comparison below (the slot lets go
    // of it once it is durable); the checkpoint after the reload is the
    // first one that runs with the new setting, so none recycles it
    c.psql("ALTER SYSTEM SET wal_keep_size = '4GB'");
    c.reload_conf();
    c.psql("CHECKPOINT");

    s3.start_again().await;
    let back = Instant::now();
    assert!(bench.wait().unwrap().success(), "pgbench failed");
    let end = c.lsn("SELECT pg_switch_wal()");
    let last_seg = c.walfile_name(end);
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(90));
    eprintln!(
        "outage of {:?}: durable stayed at {held} while the server wrote up to {now} \
         ({} segments held by the slot); caught up through {last_seg} {:?} after the store came back",
        back.duration_since(outage),
        seg_no(&now_seg) - seg_no(&held_seg) + 1,
        back.elapsed()
    );
    stream.assert_running("after the store came back");
    let log = stream.log();
    assert!(
        log.contains("stream interrupted"),
        "the stream never noticed the outage:\n{log}"
    );

    let v = assert_wal_continuous(&wv);
    let newest = v["newest"].as_str().unwrap_or_default();
    assert!(newest >= last_seg.as_str(), "{v}");
    assert_fetched_equal_server(&wv, &c, &segments(&held_seg, &last_seg), work.path());
    stream.stop();
    c.stop(StopMode::Fast);
}

/// A Garage cluster keeping 3 copies loses one node (not the one walvault
/// talks to) while the stream and a backup write; both go on, and the
/// backup restores and recovers through the WAL archived after the loss.
#[tokio::test(flavor = "multi_thread")]
async fn stream_and_backup_survive_losing_a_garage_node() {
    let mut garage = GarageCluster::start(3).await;
    let c = PgCluster::start();
    c.pgbench(&["-i", "-s", "1", "-q"]);
    c.psql_db(
        PASSWORD_USER,
        "CREATE TABLE marker(t text); INSERT INTO marker VALUES ('before')",
    );
    // ~30 MB that compress poorly (pgbench's tables shrink to almost
    // nothing), so that the backup runs long enough to lose a node in it
    c.psql_db(
        PASSWORD_USER,
        "CREATE TABLE filler AS SELECT g, md5(random()::text) || md5(random()::text) AS t \
         FROM generate_series(1, 300000) g",
    );
    let work = tempfile::tempdir().unwrap();
    // a config file the restored server's restore_command (run as the
    // server's OS user) can read
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, wv) =
        crate::support::s3::config_repo(work.path(), &garage.url("cluster"), &garage.config());
    wv.args(["init"]).ok();
    let mut stream = Streamer::start(&wv, &c.conninfo(), &["--partial-interval", "0.2"]);
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(30));

    let mut bench = c.pgbench_load(15).spawn().unwrap();
    let mut backup = wv
        .args([
            "backup",
            "--pg",
            &c.conninfo(),
            "--fast",
            "--label",
            "node lost",
        ])
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // node 3 dies once the backup holds its lease on the repository (it
    // takes it before it reads the server's files and writes its packs)
    let store = garage.storage("cluster").await;
    wait_until_async(
        Duration::from_secs(60),
        "the backup to take its lease",
        async || {
            assert!(
                backup.try_wait().unwrap().is_none(),
                "the backup ended before node 3 could be killed during it"
            );
            store
                .list_page("main/locks/", None)
                .await
                .is_ok_and(|p| !p.objects.is_empty())
        },
    )
    .await;
    // node 3 holds copies (3 zones, 3 copies): losing it loses a replica
    assert!(garage.data_files(3) > 0, "node 3 holds no data blocks");
    garage.kill(3);
    let killed = Instant::now();
    assert!(
        std::net::TcpStream::connect(garage.endpoint(3).trim_start_matches("http://")).is_err(),
        "node 3 still answers"
    );
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup ended before node 3 was killed"
    );
    stream.assert_running("when node 3 was killed");

    let out = backup.wait_with_output().unwrap();
    eprintln!(
        "the backup ran {:?} after node 3 was killed",
        killed.elapsed()
    );
    assert!(
        out.status.success(),
        "the backup failed after node 3 was lost: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("complete"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(bench.wait().unwrap().success(), "pgbench failed");
    // a commit after the backup: recovery must replay the WAL archived
    // with one node gone to see it
    c.psql_db(PASSWORD_USER, "INSERT INTO marker VALUES ('after')");
    c.psql("SELECT pg_switch_wal()");
    stream.wait_durable(c.insert_lsn(), Duration::from_secs(60));
    stream.assert_running("after node 3 was lost");
    assert!(garage.is_running(1) && garage.is_running(2));
    let want = table_hashes(&c, PASSWORD_USER);

    assert_wal_continuous(&wv);
    let backups = wv.args(["list", "--json"]).ok().json();
    let backups = backups.as_array().unwrap();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(backups[0]["label"], "node lost");
    assert_eq!(backups[0]["status"], "complete");
    assert_eq!(
        backups[0]["system_id"],
        c.psql("SELECT system_identifier FROM pg_control_system()")
    );

    // restore with node 3 still gone, recover, compare with the source
    let mut dst = PgCluster::for_restore(&c.bindir);
    let out = wv
        .args(["restore", "--backup", "latest", "--pgdata"])
        .arg(&dst.datadir)
        .ok();
    assert!(out.stdout.contains("restored backup"), "{}", out.stdout);
    dst.start_restored();
    assert_eq!(
        dst.psql_db(PASSWORD_USER, "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    assert_eq!(
        dst.psql_db(
            PASSWORD_USER,
            "SELECT string_agg(t, ',' ORDER BY t) FROM marker"
        ),
        "after,before"
    );
    assert_eq!(
        table_hashes(&dst, PASSWORD_USER),
        want,
        "the restored content differs from the source's"
    );
    stream.stop();
    dst.stop(StopMode::Fast);
}
