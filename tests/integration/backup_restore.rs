//! The whole path through the command line: `walvault backup` of a server
//! under pgbench load, `walvault restore`, start the restored server, prove
//! the data and the checksums.

use std::os::unix::fs::PermissionsExt;

use crate::support::pg::{table_hashes, PgCluster, PASSWORD, PASSWORD_USER};
use crate::support::{give_to_postgres, wait_until, Walvault};

/// `walvault list --json`: one array, a backup per element, oldest first.
fn list(wv: &Walvault) -> Vec<serde_json::Value> {
    let doc = wv.args(["list", "--json"]).ok().json();
    doc.as_array()
        .unwrap_or_else(|| panic!("list --json is not an array: {doc}"))
        .clone()
}

/// TPC-B's invariant: every transaction adds the same delta to one account,
/// teller and branch and logs it, so in any consistent snapshot these agree.
fn pgbench_invariant(c: &PgCluster) -> String {
    c.psql_db(
        PASSWORD_USER,
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || (SELECT sum(bbalance) FROM pgbench_branches) \
         || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    )
}

#[test]
fn backup_under_load_restore_and_recover() {
    let src = PgCluster::start();
    src.pgbench(&["-i", "-s", "2", "-q"]);
    let work = tempfile::tempdir().unwrap();
    // the restored server's restore_command (as its OS user) reaches the repository
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);

    // a tablespace with a static table, and a marker committed before the backup
    let ts = src.root.join("ts");
    std::fs::create_dir(&ts).unwrap();
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        nix::unistd::chown(&ts, Some(pg.uid), Some(pg.gid)).unwrap();
    }
    src.psql(&format!("CREATE TABLESPACE ts LOCATION '{}'", ts.display()));
    src.psql_db(PASSWORD_USER, "CREATE TABLE in_ts TABLESPACE ts AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g");
    src.psql_db(
        PASSWORD_USER,
        "CREATE TABLE marker(t text); INSERT INTO marker VALUES ('before')",
    );
    let ts_hash = |c: &PgCluster| {
        c.psql_db(
            PASSWORD_USER,
            "SELECT md5(string_agg(md5, ',' ORDER BY g)) FROM in_ts",
        )
    };
    let ts_before = ts_hash(&src);

    wv.args(["init"]).ok();
    // pgbench writes during the whole backup
    let load = {
        let (sock, port) = (src.sockdir.clone(), src.port);
        let bench = src.client_bin("pgbench");
        let mut c = src.command(&bench);
        c.args([
            "-h",
            sock.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-T",
            "6",
            "-c",
            "2",
            "-n",
            PASSWORD_USER,
        ]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.spawn().unwrap()
    };
    let conn = format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} password={PASSWORD}",
        src.port
    );
    let text = wv
        .args([
            "backup",
            "--pg",
            &conn,
            "--fast",
            "--label",
            "under load",
            "--compress",
            "zstd:3",
        ])
        .ok()
        .stdout;
    assert!(text.contains("complete"), "{text}");
    // the backup's lease was held until the manifest was written, then released
    let locks = repo.join("main/locks");
    assert!(
        !locks.exists() || std::fs::read_dir(&locks).unwrap().next().is_none(),
        "a lease was left behind"
    );
    let mut load = load;
    assert!(load.wait().unwrap().success());
    src.psql_db(PASSWORD_USER, "INSERT INTO marker VALUES ('after')");

    let backups = list(&wv);
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0]["label"], "under load");
    assert_eq!(
        backups[0]["system_id"],
        src.psql("SELECT system_identifier FROM pg_control_system()")
    );

    // restore, with the tablespace moved
    let mut dst = PgCluster::for_restore(&src.bindir);
    let new_ts = dst.root.join("ts-restored");
    let oid = src.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'");
    let out = wv
        .args(["restore", "--pgdata"])
        .arg(&dst.datadir)
        .args(["--tablespace-map", &format!("{oid}={}", new_ts.display())])
        .ok();
    assert!(out.stdout.contains("restored backup"), "{}", out.stdout);
    assert!(dst.datadir.join("recovery.signal").exists());
    give_to_postgres(&new_ts);
    dst.start_restored();

    // consistent: the TPC-B invariant holds, the marker shows the backup's point
    let inv = pgbench_invariant(&dst);
    let parts: Vec<&str> = inv.split(' ').collect();
    assert!(
        parts.iter().all(|p| *p == parts[0]),
        "inconsistent restore: {inv}"
    );
    assert_eq!(
        dst.psql_db(PASSWORD_USER, "SELECT string_agg(t, ',') FROM marker"),
        "before"
    );
    assert_eq!(ts_hash(&dst), ts_before);
    assert_eq!(
        dst.psql("SELECT pg_is_in_recovery()"),
        "f",
        "not promoted after recovery"
    );
    let link = std::fs::read_link(dst.datadir.join("pg_tblspc").join(&oid)).unwrap();
    assert_eq!(link, new_ts);

    // the restored cluster's page checksums, after a clean shutdown
    dst.stop(crate::support::pg::StopMode::Fast);
    assert!(
        dst.pg_checksums_clean(),
        "no pg_checksums for {}",
        dst.major
    );
}

#[test]
fn a_server_without_replication_gets_one_clear_line() {
    let c = PgCluster::start_with(crate::support::pg::PgOptions {
        conf: vec!["wal_level = minimal".into(), "max_wal_senders = 0".into()],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let err = wv
        .args([
            "backup",
            "--pg",
            &format!("host={} port={} user=postgres", c.sockdir.display(), c.port),
        ])
        .fails_with(1)
        .stderr;
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("max_wal_senders = 10") && err.contains("wal_level = replica"),
        "{err}"
    );
    let backups = repo.join("main/backups");
    assert!(
        !backups.exists() || std::fs::read_dir(&backups).unwrap().next().is_none(),
        "a manifest was written"
    );
}

/// Regression: a relative `--repo` went into `restore_command` as given, and
/// PostgreSQL runs restore_command in the data directory, where the path
/// names nothing: recovery failed at its first WAL file.
#[test]
fn a_relative_repo_path_reaches_the_restored_server() {
    let src = PgCluster::start();
    src.psql("CREATE TABLE marker(t text); INSERT INTO marker VALUES ('in the backup')");
    let work = tempfile::tempdir().unwrap();
    // the restored server's restore_command (as its OS user) reaches the repository
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let in_work = |args: &[&str]| Walvault::new().current_dir(work.path()).args(args).ok();
    in_work(&["init", "--repo", "repo"]);
    let conn = format!(
        "host={} port={} user=postgres",
        src.sockdir.display(),
        src.port
    );
    in_work(&["backup", "--repo", "repo", "--pg", &conn, "--fast"]);
    let mut dst = PgCluster::for_restore(&src.bindir);
    in_work(&[
        "restore",
        "--repo",
        "repo",
        "--backup",
        "latest",
        "--pgdata",
        dst.datadir.to_str().unwrap(),
    ]);
    let auto = std::fs::read_to_string(dst.datadir.join("postgresql.auto.conf")).unwrap();
    let absolute = work.path().join("repo");
    assert!(
        auto.contains(&format!("--repo \"{}\"", absolute.display())),
        "{auto}"
    );
    give_to_postgres(&absolute);
    // recovery fetches the backup's WAL through restore_command
    dst.start_restored();
    assert_eq!(dst.psql("SELECT t FROM marker"), "in the backup");
}

/// Regression: backup ids carry their second, and two backups finishing in
/// the same second were ordered by the ids' random digits, so `restore`
/// could take the older one as "the newest". Back-to-back backups of a
/// small cluster are listed in the order they were taken and the default
/// restore takes the last.
#[test]
fn back_to_back_backups_keep_their_order() {
    let c = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(dir.path().join("repo"));
    wv.args(["init"]).ok();
    let conn = format!("host={} port={} user=postgres", c.sockdir.display(), c.port);
    for label in ["first", "second", "third"] {
        wv.args(["backup", "--pg", &conn, "--fast", "--label", label])
            .ok();
    }
    let backups = list(&wv);
    let labels: Vec<&str> = backups
        .iter()
        .map(|b| b["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["first", "second", "third"]);
    let seconds: Vec<&str> = backups
        .iter()
        .map(|b| b["id"].as_str().unwrap().split('-').next().unwrap())
        .collect();
    assert!(
        seconds.windows(2).all(|w| w[0] < w[1]),
        "two backups share a second: {seconds:?}"
    );
    let dst = PgCluster::for_restore(&c.bindir);
    let text = wv
        .args(["restore", "--pgdata"])
        .arg(&dst.datadir)
        .ok()
        .stdout;
    let newest = backups[2]["id"].as_str().unwrap();
    assert!(
        text.contains(&format!("restored backup {newest} ")),
        "{text}"
    );
}

/// Regression (found by trying it as a new user): a backup taken on a
/// streaming standby carried `standby.signal` and the standby's
/// `primary_conninfo`, so the restored server streamed from the live
/// primary and never promoted. The restore now removes the signal files of
/// the source, comments the replication settings out under a note, and the
/// copy recovers from the repository, promotes, and never connects to the
/// primary.
#[test]
fn a_backup_taken_on_a_standby_restores_into_a_server_of_its_own() {
    let primary = PgCluster::start();
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    let standby = PgCluster::standby_of(&primary);
    wait_until(
        std::time::Duration::from_secs(60),
        "the standby to replay everything the primary wrote",
        || {
            let at = primary.psql("SELECT pg_current_wal_lsn()");
            standby.psql(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{at}'::pg_lsn"
            )) == "t"
        },
    );
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    wv.args(["backup", "--fast", "--pg", &standby.conninfo()])
        .ok();
    give_to_postgres(&repo);
    // info says where it was taken
    let info = wv.args(["info", "latest", "--json"]).ok().json();
    let source = info["source"].as_str().unwrap();
    assert!(source.starts_with("standby of system "), "{info}");
    assert!(
        source.contains(&primary.psql("SELECT system_identifier FROM pg_control_system()")),
        "{info}"
    );

    let mut dst = PgCluster::for_restore(&primary.bindir);
    let out = wv.args(["restore", "--pgdata"]).arg(&dst.datadir).ok();
    assert!(
        out.stderr.contains("primary_conninfo"),
        "the restore does not say what it disabled: {}",
        out.stderr
    );
    assert!(!dst.datadir.join("standby.signal").exists());
    assert!(dst.datadir.join("recovery.signal").exists());
    let auto = std::fs::read_to_string(dst.datadir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("# disabled by walvault restore") && auto.contains("#primary_conninfo"),
        "{auto}"
    );
    assert!(
        !auto
            .lines()
            .any(|l| l.trim_start().starts_with("primary_conninfo")),
        "an active primary_conninfo is left: {auto}"
    );

    // recovers from the repository and promotes (start_restored waits for it)
    dst.start_restored();
    assert_eq!(dst.psql("SELECT pg_is_in_recovery()"), "f");
    assert_eq!(
        table_hashes(&dst, "postgres"),
        table_hashes(&primary, "postgres"),
        "the restored content differs from the primary's (no writes since the backup)"
    );
    // never a replication connection to the primary: only the real standby
    assert_eq!(
        primary.psql("SELECT count(*) FROM pg_stat_replication"),
        "1"
    );
    let log = dst.server_log();
    assert!(
        !log.contains("started streaming WAL"),
        "the restored server streamed from a primary:\n{log}"
    );
}
