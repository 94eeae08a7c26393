//! `walvault stream` across a timeline switch: a standby it streams from
//! is promoted while it runs, and while it is down.

use std::path::PathBuf;
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use crate::support::pg::{PgCluster, StopMode, PASSWORD_USER};
use crate::support::stream::Streamer;
use crate::support::{give_to_postgres, wait_until, Walvault};

/// A primary, a streaming standby of it, and `walvault stream` from the
/// standby into a fresh repository.
struct FromStandby {
    primary: PgCluster,
    standby: PgCluster,
    work: tempfile::TempDir,
    repo: PathBuf,
    /// `walvault … --repo REPO`.
    wv: Walvault,
    stream: Streamer,
}

fn stream_from_a_standby() -> FromStandby {
    let primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let stream = Streamer::start(&wv, &standby.conninfo(), &["--partial-interval", "0.2"]);
    FromStandby {
        primary,
        standby,
        work,
        repo,
        wv,
        stream,
    }
}

/// A cascading stream (from a standby) archives the very WAL the primary
/// wrote, pgbench on the primary meanwhile; when the standby is promoted
/// it follows timeline 2, `wal-verify` passes across the switch, and a
/// PITR onto timeline 2 recovers the promoted server's content.
#[tokio::test(flavor = "multi_thread")]
async fn stream_follows_a_promotion_to_the_next_timeline() {
    let s = stream_from_a_standby();
    s.primary.pgbench(&["-i", "-s", "2", "-q"]);
    // a backup taken from the standby, on timeline 1
    s.wv.args(["backup", "--pg", &s.standby.conninfo(), "--fast"])
        .ok();
    let mut bench = s.primary.pgbench_load(4).spawn().unwrap();
    s.primary
        .psql("CREATE TABLE t1 AS SELECT g FROM generate_series(1, 1000) g");
    assert!(bench.wait().unwrap().success());
    let first = s.primary.walfile_name(s.primary.insert_lsn());
    s.primary.psql("SELECT pg_switch_wal()");
    let at = s.primary.insert_lsn();
    wait_until(
        Duration::from_secs(60),
        "the standby to replay everything the primary wrote",
        || {
            s.standby
                .psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{at}'"))
                == "t"
        },
    );
    // the standby's stream stored the primary's segment byte for byte
    let stored1 = s.repo.join("main/wal/00000001").join(&first);
    wait_until(
        Duration::from_secs(30),
        &format!("{first} archived from the standby"),
        || stored1.exists(),
    );
    let dest = s.work.path().join("seg1");
    s.wv.args(["wal-fetch", &first]).arg(&dest).ok();
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(s.primary.datadir.join("pg_wal").join(&first)).unwrap(),
        "{first} from the cascading stream differs from the primary's"
    );

    s.standby.promote();
    s.standby
        .psql("CREATE TABLE t2 AS SELECT g FROM generate_series(1, 1000) g");
    let end = s.standby.lsn("SELECT pg_switch_wal()");
    let tli2_seg = s.standby.walfile_name(end);
    assert!(tli2_seg.starts_with("00000002"), "{tli2_seg}");
    let stored = s.repo.join("main/wal/00000002").join(&tli2_seg);
    wait_until(
        Duration::from_secs(30),
        &format!("timeline 2 to be followed ({tli2_seg} stored)"),
        || stored.exists(),
    );
    assert!(s.repo.join("main/wal/00000002/00000002.history").exists());
    assert!(
        s.stream.log().contains("following timeline 2"),
        "{}",
        s.stream.log()
    );
    // byte for byte the promoted server's segment
    let dest = s.work.path().join("seg");
    s.wv.args(["wal-fetch", &tli2_seg]).arg(&dest).ok();
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(s.standby.datadir.join("pg_wal").join(&tli2_seg)).unwrap()
    );
    // continuous from the backup on timeline 1 through the switch to 2
    let v = s.wv.args(["wal-verify", "--json"]).ok().json();
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");
    // (the promoted server's end-of-recovery checkpoint may land after the
    // switch: the stream then holds the next segment's beginning too)
    assert!(
        v["newest"].as_str().unwrap().starts_with("00000002")
            && v["newest"].as_str().unwrap() >= tli2_seg.as_str(),
        "{v}"
    );
    assert!(v["segments_read"].as_u64().unwrap() >= 2, "{v}");

    // PITR onto timeline 2: the promoted server's content
    give_to_postgres(&s.repo);
    let (r, report) = crate::pitr::pitr_started(&s.standby, &s.wv, &["--latest"]);
    assert_eq!(r.psql("SELECT count(*) FROM t2"), "1000", "{report}");
    assert_eq!(
        r.psql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "3",
        "the copy promotes past timeline 2: {report}"
    );
    // pgbench's tables as the primary wrote them, through timeline 1
    let pgbench = "SELECT (SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts) \
                   || '/' || (SELECT count(*) || ':' || sum(delta) FROM pgbench_history)";
    assert_eq!(
        r.psql_db(PASSWORD_USER, pgbench),
        s.standby.psql_db(PASSWORD_USER, pgbench)
    );
    assert_eq!(
        s.standby.psql_db(PASSWORD_USER, pgbench),
        s.primary.psql_db(PASSWORD_USER, pgbench)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_down_during_a_promotion_resumes_where_the_new_timeline_began() {
    let mut s = stream_from_a_standby();
    s.primary
        .psql("CREATE TABLE t1 AS SELECT g FROM generate_series(1, 1000) g");
    s.stream
        .wait_durable(s.primary.insert_lsn(), Duration::from_secs(30));
    s.stream.kill9();
    // promoted while nothing streams, and two segments written on timeline 2
    s.standby.promote();
    let first2 = s
        .standby
        .psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(first2.starts_with("00000002"), "{first2}");
    s.standby
        .psql("CREATE TABLE t2 AS SELECT g FROM generate_series(1, 1000) g");
    s.standby.psql("SELECT pg_switch_wal()");
    s.standby
        .psql("CREATE TABLE t3 AS SELECT g FROM generate_series(1, 1000) g");
    s.standby.psql("SELECT pg_switch_wal()");
    s.stream.spawn();
    let stored = s.repo.join("main/wal/00000002").join(&first2);
    wait_until(
        Duration::from_secs(30),
        &format!("the first segment of timeline 2 ({first2}) to be stored, not skipped"),
        || stored.exists(),
    );
    let dest = s.work.path().join("seg");
    s.wv.args(["wal-fetch", &first2]).arg(&dest).ok();
    assert!(
        std::fs::read(&dest).unwrap()
            == std::fs::read(s.standby.datadir.join("pg_wal").join(&first2)).unwrap()
    );
}

/// The sidecar's case: `stream --pg 'host=PRIMARY,STANDBY
/// target_session_attrs=read-write'` keeps archiving through a failover.
/// The primary stops, the standby is promoted; the stream reconnects to it,
/// creates its slot there and archives timeline 2; `check` through the same
/// conninfo finds the slot; the WAL verifies and a PITR has every row.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_given_both_hosts_follows_a_failover() {
    let mut primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary);
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let both = format!(
        "host={},{} port={},{} user=postgres target_session_attrs=read-write",
        primary.sockdir.display(),
        standby.sockdir.display(),
        primary.port,
        standby.port
    );
    let stream = Streamer::start(&wv, &both, &["--partial-interval", "0.2"]);
    primary.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    stream.wait_durable(primary.insert_lsn(), Duration::from_secs(30));
    wv.args(["backup", "--fast", "--no-expire", "--pg", &both])
        .ok();
    assert_eq!(
        wv.args(["info", "latest", "--json"]).ok().json()["source"],
        "primary"
    );
    // the stream holds a slot on the primary only
    assert_eq!(
        standby.psql("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );

    // failover: the primary goes (cleanly: the standby has all of it)
    primary.stop(StopMode::Fast);
    standby.promote();
    standby.psql("INSERT INTO t SELECT g FROM generate_series(1001, 2000) g");
    let end = standby.lsn("SELECT pg_switch_wal()");
    let seg = standby.walfile_name(end);
    let stored = repo.join("main/wal/00000002").join(&seg);
    wait_until(
        Duration::from_secs(60),
        &format!("the stream to reconnect to the new primary and store {seg}"),
        || stored.exists(),
    );
    assert_eq!(
        standby.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'walvault'"),
        "t",
        "{}",
        stream.log()
    );
    let slot = wv.check_finding(&both, "slot");
    assert_eq!(slot["level"], "ok", "{slot}");
    assert!(
        slot["detail"]
            .as_str()
            .unwrap()
            .contains("stream connected"),
        "{slot}"
    );
    let v = wv.args(["wal-verify", "--json"]).ok().json();
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");
    assert_eq!(v["newest"], seg.as_str(), "{v}");

    give_to_postgres(&repo);
    // (the copy of the primary's backup listens where the primary did)
    let (r, report) = crate::pitr::pitr_started(&primary, &wv, &["--latest"]);
    assert_eq!(
        r.psql("SELECT count(*) || ':' || sum(g) FROM t"),
        "2000:2001000",
        "{report}"
    );
}
