//! walvault in a replicated cluster: a standby seeded from the repository
//! on purpose (`restore --as-standby`), which catches up from the archive
//! and then streams from the primary.

use std::time::Duration;

use crate::pitr::Archived;
use crate::support::pg::PgCluster;
use crate::support::wait_until;

#[test]
fn restore_as_standby_replays_the_repository_then_streams_from_the_primary() {
    let mut a = Archived::new(&[]);
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
}
