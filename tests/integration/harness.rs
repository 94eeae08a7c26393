//! The harness itself: clusters start as an unprivileged user, SCRAM over TCP
//! works, pgbench runs, crashes and promotions behave, and teardown happens
//! also when a test panics.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use bytes::Bytes;
use walvault::storage::Storage;

use crate::support::pg::{
    alive, other_majors_or_skip, processes_in, PgCluster, PgOptions, StopMode, PASSWORD_USER,
};
use crate::support::s3::S3Server;
use crate::support::{wait_until, Walvault};

/// Start, prove SCRAM over TCP, run pgbench, check the data pgbench wrote.
async fn scram_and_pgbench(c: &PgCluster) {
    if nix::unistd::geteuid().is_root() {
        let owner = std::fs::metadata(&c.datadir).unwrap().uid();
        assert_ne!(
            owner, 0,
            "the data directory must belong to an unprivileged user"
        );
    }
    // the TCP rule for the password user is SCRAM, and the stored secret is SCRAM
    let rules = c.psql(&format!(
        "SELECT string_agg(DISTINCT auth_method, ',') FROM pg_hba_file_rules \
         WHERE type = 'host' AND '{PASSWORD_USER}' = ANY(user_name)"
    ));
    assert_eq!(rules, "scram-sha-256");
    let secret = c.psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{PASSWORD_USER}'"
    ));
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");

    let client = c.connect_tcp().await.expect("SCRAM login over TCP");
    let row = client
        .query_one("SELECT current_user::text, inet_server_port(), current_setting('server_version_num')::int / 10000", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), PASSWORD_USER);
    assert_eq!(
        row.get::<_, i32>(1),
        i32::from(c.port),
        "not connected over TCP"
    );
    assert_eq!(row.get::<_, i32>(2) as u32, c.major);

    let e = c.connect_tcp_with("wrong").await.unwrap_err();
    let db = e.as_db_error().expect("a server error");
    assert!(
        db.message().contains("password authentication failed"),
        "{}",
        db.message()
    );

    c.pgbench(&["-i", "-s", "1", "-q"]);
    let out = c.pgbench(&["-t", "50", "-c", "2", "-n"]);
    assert!(
        out.contains("number of transactions actually processed: 100/100"),
        "{out}"
    );
    let counts = client
        .query_one("SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_history)", &[])
        .await
        .unwrap();
    assert_eq!(counts.get::<_, i64>(0), 100_000);
    assert_eq!(counts.get::<_, i64>(1), 100);
}

fn assert_torn_down(root: &std::path::Path, pid: i32) {
    assert!(!alive(pid), "postmaster {pid} still running after teardown");
    assert!(!root.exists(), "{} left behind", root.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_scram_pgbench_teardown() {
    let c = PgCluster::start();
    assert_eq!(c.major, 15);
    scram_and_pgbench(&c).await;
    let (root, pid) = (c.root.clone(), c.postmaster_pid().unwrap());
    drop(c);
    assert_torn_down(&root, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_majors_scram_pgbench() {
    let Some(majors) = other_majors_or_skip(&[15]) else {
        return;
    };
    for major in majors {
        let c = PgCluster::start_major(major);
        assert_eq!(c.major, major);
        scram_and_pgbench(&c).await;
    }
}

#[test]
fn teardown_after_a_panicking_test() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let c = PgCluster::start();
        tx.send((c.root.clone(), c.postmaster_pid().unwrap()))
            .unwrap();
        panic!("deliberate failure inside a test that owns a cluster");
    })
    .join();
    assert!(result.is_err());
    let (root, pid) = rx.recv().unwrap();
    assert_torn_down(&root, pid);
}

/// Regression (a fresh-clone suite run failed): a child killed before the
/// postmaster made it start a crash restart and fork new children, which
/// outlived the kill and held the shared memory, so the next start failed with
/// "pre-existing shared memory block … is still in use".
#[test]
fn kill9_during_a_crash_restart_leaves_nothing_behind() {
    let mut c = PgCluster::start();
    let dir = std::fs::canonicalize(&c.datadir).unwrap();
    for round in 0..5 {
        let checkpointer: i32 = c
            .psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
            .parse()
            .unwrap();
        // (counted before the kill: the postmaster may log its restart
        // before this thread reads the log again)
        let seen = c.server_log().matches("reinitializing").count();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(checkpointer),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // kill -9 once the postmaster has begun its crash restart (forked
        // the startup process anew): the moment the flake hit
        wait_until(Duration::from_secs(30), "the crash restart", || {
            c.server_log().matches("reinitializing").count() > seen
        });
        c.kill9();
        let left = processes_in(&dir);
        assert!(
            left.is_empty(),
            "round {round}: processes left in the data directory: {left:?}"
        );
        c.start_again();
        assert_eq!(c.psql("SELECT 1"), "1", "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_restart_and_promote() {
    let mut primary = PgCluster::start();
    primary.psql("CREATE TABLE t(i int); INSERT INTO t SELECT generate_series(1, 1000)");
    primary.kill9();
    primary.start_again();
    assert_eq!(
        primary.psql("SELECT count(*) FROM t"),
        "1000",
        "committed rows lost in crash recovery"
    );
    primary.stop(StopMode::Immediate);
    primary.start_again();
    primary.restart();
    // the superuser's unix-socket conninfo works for tokio-postgres too
    let (client, conn) = tokio_postgres::connect(&primary.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);

    let standby = PgCluster::standby_of(&primary);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    standby.promote();
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "f");
    let tli = standby.psql("SELECT timeline_id FROM pg_control_checkpoint()");
    // the checkpoint record may still be the one from before promotion; the
    // history file proves the switch
    assert!(
        standby.datadir.join("pg_wal/00000002.history").exists(),
        "no timeline 2 (checkpoint tli {tli})"
    );
    standby.psql("INSERT INTO t VALUES (0)");
    assert_eq!(standby.psql("SELECT count(*) FROM t"), "1001");
}

#[test]
fn non_default_wal_segment_size() {
    let c = PgCluster::start_with(PgOptions {
        wal_segsize_mb: Some(64),
        ..PgOptions::default()
    });
    assert_eq!(c.psql("SHOW wal_segment_size"), "64MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_restart_keeps_data() {
    let mut server = S3Server::start().await;
    let store = server.storage("p").await;
    store.put("k", Bytes::from_static(b"kept")).await.unwrap();
    server.stop();
    let e = store.get("k").await.unwrap_err();
    assert!(
        e.is_transient(),
        "a stopped server must look transient: {e}"
    );
    server.start_again().await;
    assert_eq!(&store.get("k").await.unwrap()[..], b"kept");
}

/// The command builder runs a private copy of the binary that every user
/// can run, gives the child none of the test's `WALVAULT_*` and `AWS_*`
/// variables (only its own), and a failure names the command and shows
/// its output.
#[test]
fn walvault_builder_copies_the_binary_clears_the_environment_and_reports_failures() {
    use std::os::unix::fs::PermissionsExt;

    let built = std::path::Path::new(env!("CARGO_BIN_EXE_walvault"));
    let bin = Walvault::bin();
    assert_ne!(bin, built);
    let meta = std::fs::metadata(bin).unwrap();
    assert_eq!(meta.len(), std::fs::metadata(built).unwrap().len());
    assert_eq!(
        meta.permissions().mode() & 0o755,
        0o755,
        "{}",
        bin.display()
    );

    let wv = Walvault::new()
        .args(["storage-check"])
        .env("WALVAULT_STANZA", "given");
    let envs: Vec<(String, Option<String>)> = wv
        .command()
        .get_envs()
        .map(|(k, v)| {
            let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
            (text(k), v.map(text))
        })
        .collect();
    for (k, _) in std::env::vars() {
        if (k.starts_with("WALVAULT_") || k.starts_with("AWS_")) && k != "WALVAULT_STANZA" {
            assert!(
                envs.contains(&(k.clone(), None)),
                "{k} not cleared: {envs:?}"
            );
        }
    }
    assert!(envs.contains(&("WALVAULT_STANZA".into(), Some("given".into()))));

    let line = wv.fails_with_one_line(&["no repository given"]);
    let failure = std::panic::catch_unwind(|| wv.ok()).unwrap_err();
    let message = failure.downcast_ref::<String>().unwrap();
    for part in [
        "walvault storage-check [with WALVAULT_STANZA] ended with exit status: 1, expected success",
        "--- stdout ---",
        "--- stderr ---",
        &line,
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

/// Garage does not exit when a port is taken between `free_port()` and its
/// bind (it logs "Address already in use" and serves the other ports): the
/// harness starts it over on new ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_starts_over_when_a_port_was_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut first = true;
    let server = S3Server::start_on(|| {
        if std::mem::take(&mut first) {
            port
        } else {
            crate::support::free_port()
        }
    })
    .await;
    assert_ne!(server.endpoint, format!("http://127.0.0.1:{port}"));
    assert!(
        server.log().contains("Address already in use"),
        "{}",
        server.log()
    );
    let store = server.storage("p").await;
    store.put("k", Bytes::from_static(b"served")).await.unwrap();
    assert_eq!(&store.get("k").await.unwrap()[..], b"served");
}
