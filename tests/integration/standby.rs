//! walvault in a replicated cluster: a standby seeded from the repository
//! on purpose (`restore --as-standby`), which catches up from the archive
//! and then streams from the primary.

use std::time::Duration;

use crate::pitr::Archived;
use crate::restore_matrix::equals_reference_where_recovery_ended;
use crate::support::pg::{
    other_majors_or_skip, table_hashes, PgCluster, PgOptions, StopMode, PASSWORD_USER,
};
use crate::support::{wait_until, Walvault};

#[test]
fn restore_as_standby_replays_the_repository_then_streams_from_the_primary() {
    let mut a = Archived::new(&[]);
    a.c.pgbench(&["-i", "-s", "2", "-q"]);
    a.c.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g");
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--no-expire"]);
    let info = a.ok(&["info", "latest", "--json"]).json();
    assert_eq!(info["source"], "primary", "{info}");
    // after the backup, and switched out of the segment: archived WAL the
    // new standby must replay from the repository
    a.c.psql("INSERT INTO t SELECT g FROM generate_series(1001, 2000) g");
    a.c.psql("SELECT pg_switch_wal()");
    a.c.psql("INSERT INTO t SELECT g FROM generate_series(2001, 2100) g");
    a.finish_stream();

    let mut s = PgCluster::for_restore(&a.c.bindir);
    let primary = format!(
        "host={} port={} user=postgres application_name=rebuilt",
        a.c.sockdir.display(),
        a.c.port
    );
    a.c.psql("SELECT pg_create_physical_replication_slot('rebuilt')");
    let out =
        a.wv.args([
            "restore",
            "--as-standby",
            "--primary-conninfo",
            &primary,
            "--slot",
            "rebuilt",
            "--pgdata",
        ])
        .arg(&s.datadir)
        .ok();
    assert!(
        out.stdout.contains("then streams from its primary"),
        "{}",
        out.stdout
    );
    assert!(s.datadir.join("standby.signal").exists());
    assert!(!s.datadir.join("recovery.signal").exists());
    let auto = std::fs::read_to_string(s.datadir.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("primary_conninfo = 'host="), "{auto}");
    assert!(auto.contains("primary_slot_name = 'rebuilt'"), "{auto}");
    assert!(auto.contains("restore_command = '"), "{auto}");

    // pgbench on the primary while the new standby catches up
    let mut bench = a.c.pgbench_load(6).spawn().unwrap();
    s.start_restored_as_is();
    wait_until(
        Duration::from_secs(60),
        "the primary streams to the rebuilt standby",
        || {
            a.c.psql("SELECT state FROM pg_stat_replication WHERE application_name = 'rebuilt'")
                == "streaming"
        },
    );
    assert_eq!(s.psql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        a.c.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'rebuilt'"),
        "t"
    );
    // it replayed the archive first: segments came from walvault
    let log = s.server_log();
    assert!(log.contains("restored log file"), "{log}");
    // and follows the primary now: rows written after the stream stopped
    // reach it by streaming only
    a.c.psql("INSERT INTO t SELECT g FROM generate_series(2101, 2500) g");
    wait_until(
        Duration::from_secs(60),
        "the standby has the new rows",
        || s.psql("SELECT count(*) FROM t") == "2500",
    );
    assert_eq!(
        s.psql("SELECT sum(id) FROM t"),
        a.c.psql("SELECT sum(id) FROM t")
    );
    // every pgbench transaction reached it
    assert!(bench.wait().unwrap().success());
    let at = a.c.insert_lsn();
    wait_until(
        Duration::from_secs(60),
        "the standby to replay the load",
        || s.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{at}'")) == "t",
    );
    assert_eq!(
        table_hashes(&s, PASSWORD_USER),
        table_hashes(&a.c, PASSWORD_USER)
    );
}

/// `host=PRIMARY,STANDBY … target_session_attrs=prefer-standby`: the
/// primary listed first, the standby chosen.
fn both_hosts_prefer_standby(primary: &PgCluster, standby: &PgCluster) -> String {
    format!(
        "host={},{} port={},{} user=postgres target_session_attrs=prefer-standby",
        primary.sockdir.display(),
        standby.sockdir.display(),
        primary.port,
        standby.port
    )
}

/// A streaming standby of `primary`: made by pg_basebackup -R where
/// Debian's client programs match the server (15), else seeded by
/// `walvault restore --as-standby` from a backup in `seed` (no
/// pg_basebackup of that major is installed).
fn standby(primary: &PgCluster, seed: &Walvault) -> PgCluster {
    if primary.major == 15 {
        return PgCluster::standby_of(primary);
    }
    let mut s = PgCluster::for_restore(&primary.bindir);
    seed.args([
        "restore",
        "--as-standby",
        "--primary-conninfo",
        &format!(
            "host={} port={} user=postgres",
            primary.sockdir.display(),
            primary.port
        ),
        "--pgdata",
    ])
    .arg(&s.datadir)
    .ok();
    s.start_restored_as_is();
    wait_until(
        Duration::from_secs(60),
        "the seeded standby to stream from its primary",
        || s.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") == "1",
    );
    s
}

/// A repository holding a backup of `primary` that its OS user can read
/// (to seed standbys from).
fn seed_repository(primary: &PgCluster, work: &std::path::Path) -> Walvault {
    let repo = work.join("seed");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    wv.args([
        "backup",
        "--fast",
        "--no-expire",
        "--pg",
        &primary.conninfo(),
    ])
    .ok();
    crate::support::give_to_postgres(&repo);
    wv
}

/// A streaming standby of `primary` that receives everything but applies
/// no commit until told to ([`PgCluster::replay_to`]): the primary's
/// content as of any later point, for comparison.
fn reference_of(primary: &PgCluster, seed: &Walvault) -> PgCluster {
    let mut r = standby(primary, seed);
    r.append_conf(&["recovery_min_apply_delay = '1h'".to_owned()]);
    r.restart();
    r
}

/// The current time of `c`'s clock, as `--target-time` takes it.
fn clock(c: &PgCluster) -> String {
    c.psql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')",
    )
}

/// The whole story of a backup taken on a standby, pgbench on the primary
/// throughout: `--pg` names both servers and walvault picks the standby;
/// `restore` gives a server that recovers from the repository, promotes,
/// equals the primary at the point its recovery ended, and never connects
/// to the primary; `restore-pitr --target-time` from that backup is exact.
fn backup_on_a_standby_under_load(major: Option<u32>) {
    let mut a = Archived::with(PgOptions {
        major,
        ..Default::default()
    });
    a.c.pgbench(&["-i", "-s", "2", "-q"]);
    a.c.psql("CREATE TABLE marker(id int PRIMARY KEY)");
    let seed = seed_repository(&a.c, a.work.path());
    let standby = standby(&a.c, &seed);
    let mut reference = reference_of(&a.c, &seed);
    let major = a.c.major;

    let mut bench = a.c.pgbench_load(12).spawn().unwrap();
    let marker = |i: u32| {
        a.c.psql(&format!("INSERT INTO marker VALUES ({i})"));
        let t = clock(&a.c);
        std::thread::sleep(Duration::from_millis(20));
        t
    };
    for i in 1..=5 {
        marker(i);
    }
    let out = a.ok(&[
        "backup",
        "--pg",
        &both_hosts_prefer_standby(&a.c, &standby),
        "--fast",
        "--no-expire",
    ]);
    assert!(out.stdout.contains("complete"), "{}", out.stdout);
    let info = a.ok(&["info", "latest", "--json"]).json();
    if major >= 14 {
        let source = info["source"].as_str().unwrap();
        assert!(
            source.starts_with("standby of system "),
            "walvault did not pick the standby: {info}"
        );
    }
    // after the backup: markers with the time after each commit
    let times: Vec<String> = (6..=25).map(marker).collect();
    assert!(bench.wait().unwrap().success());
    a.c.psql("INSERT INTO marker VALUES (26)");
    a.c.psql("SELECT pg_switch_wal()");
    a.finish_stream();

    // the primary's replication connections: the standby and the reference
    let replication = "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_replication";
    wait_until(
        Duration::from_secs(30),
        "the stream's connection to go",
        || a.c.psql("SELECT count(*) FROM pg_stat_replication") == "2",
    );
    let senders = a.c.psql(replication);

    // restore, start: recovers from the repository and promotes
    let mut dst = PgCluster::for_restore(&a.c.bindir);
    a.wv.args(["restore", "--pgdata"]).arg(&dst.datadir).ok();
    assert!(!dst.datadir.join("standby.signal").exists());
    dst.start_restored();
    assert_eq!(dst.psql("SELECT pg_is_in_recovery()"), "f");
    // no replication connection to the primary: the same ones as before
    assert_eq!(a.c.psql(replication), senders);
    // a record past the end, for the reference to stop before
    a.c.psql("CREATE TABLE past_the_end()");
    equals_reference_where_recovery_ended(&dst, &mut reference);
    assert_eq!(
        table_hashes(&dst, "postgres"),
        table_hashes(&reference, "postgres")
    );
    // and the copy never streamed
    let log = dst.server_log();
    assert!(!log.contains("started streaming WAL"), "{log}");
    // page checksums clean (the server's own pg_checksums, where installed)
    dst.stop(StopMode::Fast);
    assert!(dst.pg_checksums_clean() || major != 15);
    drop(dst);

    // restore-pitr to a time after the backup: exactly the markers committed by then
    for k in [8usize, 19] {
        let t = &times[k - 6];
        // (the copy listens where its source, the standby, did)
        let (r, report) = crate::pitr::pitr_started(&standby, &a.wv, &["--target-time", t]);
        assert_eq!(
            r.psql("SELECT count(*) || ':' || max(id) FROM marker"),
            format!("{k}:{k}"),
            "target time {t}: {report}"
        );
        assert_eq!(report["backup"], info["id"], "{report}");
    }
}

#[test]
fn a_backup_on_a_standby_under_load_restores_exact_and_recovers_to_a_time() {
    backup_on_a_standby_under_load(None);
}

#[test]
fn a_backup_on_a_standby_of_other_majors() {
    let Some(majors) = other_majors_or_skip(&[15]) else {
        return;
    };
    for m in majors {
        backup_on_a_standby_under_load(Some(m));
    }
}

/// A standby whose replay is far behind its primary (replay paused, the
/// primary writing) is refused with how far behind it is, and nothing is
/// stored; `--standby-max-lag off` backs it up anyway. A standby that lost
/// its primary is refused too.
#[test]
fn a_lagging_or_orphaned_standby_is_refused_with_its_lag() {
    let mut primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary);
    let work = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(work.path().join("repo"));
    wv.args(["init"]).ok();

    standby.psql("SELECT pg_wal_replay_pause()");
    primary.psql(
        "CREATE TABLE big AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 200000) g",
    );
    wait_until(
        Duration::from_secs(60),
        "the standby to receive 16 MiB it does not replay",
        || {
            standby.psql(
                "SELECT pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn() > 16 * 1024 * 1024",
            ) == "t"
        },
    );
    let out = wv
        .args([
            "backup",
            "--fast",
            "--standby-max-lag",
            "8MiB",
            "--pg",
            &standby.conninfo(),
        ])
        .fails();
    assert!(
        out.stderr.contains("behind its primary")
            && out.stderr.contains("MiB")
            && out.stderr.contains("limit is 8.0 MiB"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert_eq!(
        wv.args(["list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    // the default limit (1 GiB) lets it through, and so does `off`
    wv.args([
        "backup",
        "--fast",
        "--no-expire",
        "--pg",
        &standby.conninfo(),
    ])
    .ok();
    wv.args([
        "backup",
        "--fast",
        "--no-expire",
        "--standby-max-lag",
        "off",
        "--pg",
        &standby.conninfo(),
    ])
    .ok();
    assert_eq!(
        wv.args(["list", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    standby.psql("SELECT pg_wal_replay_resume()");

    // the primary gone: the standby follows nothing
    primary.stop(StopMode::Fast);
    wait_until(
        Duration::from_secs(30),
        "the standby's WAL receiver to stop streaming",
        || {
            standby.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")
                == "0"
        },
    );
    let out = wv
        .args(["backup", "--fast", "--pg", &standby.conninfo()])
        .fails();
    assert!(
        out.stderr.contains("not streaming from a primary"),
        "{}",
        out.stderr
    );
}

/// A standby with hot_standby = off accepts no connection walvault can back
/// up through: one line says what to change.
#[test]
fn a_standby_without_hot_standby_is_refused_clearly() {
    let primary = PgCluster::start();
    let mut standby = PgCluster::standby_of(&primary);
    standby.append_conf(&["hot_standby = off".to_owned()]);
    standby.restart();
    let work = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(work.path().join("repo"));
    wv.args(["init"]).ok();
    let out = wv
        .args(["backup", "--fast", "--pg", &standby.conninfo()])
        .fails();
    assert!(out.stderr.contains("hot_standby"), "{}", out.stderr);
    // the same through a conninfo that asks for a standby among hosts
    let both = format!(
        "host={},{} port={},{} user=postgres target_session_attrs=standby",
        standby.sockdir.display(),
        standby.sockdir.display(),
        standby.port,
        standby.port
    );
    let out = wv.args(["backup", "--fast", "--pg", &both]).fails();
    assert!(
        out.stderr.contains("set hot_standby = on"),
        "{}",
        out.stderr
    );
    // a primary alone, asked for a standby: passed over, said why
    let out = wv
        .args([
            "backup",
            "--fast",
            "--pg",
            &format!("{} target_session_attrs=standby", primary.conninfo()),
        ])
        .fails();
    assert!(
        out.stderr.contains("no usable server") && out.stderr.contains("is a primary"),
        "{}",
        out.stderr
    );
    assert_eq!(
        wv.args(["list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    drop(primary);
}

/// After a failover the new primary has no slot for the stream: `check`
/// against it warns, names the promotion, and says how to fix it.
#[test]
fn check_warns_when_the_new_primary_lacks_the_streams_slot() {
    let mut a = Archived::new(&[]);
    let standby = PgCluster::standby_of(&a.c);
    a.c.psql("CREATE TABLE t AS SELECT 1 AS x");
    a.finish_stream();
    a.c.stop(StopMode::Fast);
    standby.promote();
    let slot = a.wv.check_finding(&standby.conninfo(), "slot");
    assert_eq!(slot["level"], "warning", "{slot}");
    let detail = slot["detail"].as_str().unwrap();
    assert!(
        detail.contains("walvault stream uses it")
            && detail.contains("timeline 2")
            && detail.contains("pg_create_physical_replication_slot"),
        "{detail}"
    );
}
