//! `walvault extract` against real servers: one table brought back as of
//! the moment before rows were deleted (also after a `VACUUM FULL`), one
//! database, the table restored into the live server under a new name, a
//! sparse recovery that downloads a small part of the cluster, and bad
//! input refused before anything is downloaded.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::pitr::Archived;
use crate::support::pg::{other_majors_or_skip, PgCluster, PgOptions};
use crate::support::walvault::Walvault;

/// A hash of every row of `table` in `db`, in key order.
fn rows_hash(c: &PgCluster, db: &str, table: &str) -> String {
    c.psql_db(
        db,
        &format!(
            "SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY id)) FROM {table} t"
        ),
    )
}

/// Load the SQL script `file` into database `db` of `c` (made new).
fn load(c: &PgCluster, db: &str, file: &Path) {
    c.psql(&format!("CREATE DATABASE {db}"));
    let out = c
        .command(&c.client_bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&c.sockdir)
        .args(["-p", &c.port.to_string(), "-U", "postgres", "-d", db, "-f"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loading {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `app.orders` (with TOASTed notes, an index, a serial), `app.big` and
/// `analytics.events` (large, never extracted), `app.measurements`
/// (partitioned on two levels); pgbench's tables in a third database.
fn populate(c: &PgCluster) {
    c.psql("CREATE DATABASE app");
    c.psql("CREATE DATABASE analytics");
    c.psql_db(
        "app",
        "CREATE TABLE orders (id serial PRIMARY KEY, customer text, amount numeric, note text);
         CREATE INDEX orders_customer ON orders (customer);
         INSERT INTO orders (customer, amount, note)
           SELECT 'c' || (g % 97), g * 1.5,
                  CASE WHEN g % 10 = 0 THEN (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 120) i) END
           FROM generate_series(1, 20000) g;
         CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 16) AS pad FROM generate_series(1, 60000) g;
         CREATE TABLE doomed AS SELECT g AS id FROM generate_series(1, 1000) g;
         CREATE TABLE marker (id int);
         CREATE TABLE measurements (id int, city text, reading numeric, PRIMARY KEY (id, city))
           PARTITION BY LIST (city);
         CREATE TABLE measurements_north PARTITION OF measurements FOR VALUES IN ('north');
         CREATE TABLE measurements_south PARTITION OF measurements FOR VALUES IN ('south')
           PARTITION BY RANGE (id);
         CREATE TABLE measurements_south_low PARTITION OF measurements_south FOR VALUES FROM (0) TO (5000);
         CREATE TABLE measurements_south_high PARTITION OF measurements_south FOR VALUES FROM (5000) TO (MAXVALUE);
         INSERT INTO measurements
           SELECT g, CASE WHEN g % 2 = 0 THEN 'north' ELSE 'south' END, g * 0.5 FROM generate_series(1, 10000) g",
    );
    c.psql_db(
        "analytics",
        "CREATE TABLE events AS SELECT g AS id, md5(g::text) AS kind, repeat('e', 300) AS body FROM generate_series(1, 80000) g",
    );
    c.pgbench(&["-i", "-s", "6", "-q"]);
    c.psql("CHECKPOINT");
}

/// `walvault -q extract --scratch SCRATCH --pg-bin <c's>` as root (the
/// scratch server runs as the tests' PostgreSQL user), to add arguments to.
fn extract_in(a: &Archived, c: &PgCluster, scratch: &Path) -> Walvault {
    a.wv.args(["-q", "extract", "--scratch"])
        .arg(scratch)
        .arg("--pg-bin")
        .arg(&c.bindir)
}

/// `extract ARGS --json`; the report.
fn extract(a: &Archived, c: &PgCluster, scratch: &Path, args: &[&str]) -> serde_json::Value {
    extract_in(a, c, scratch)
        .arg("--json")
        .args(args)
        .ok()
        .json()
}

/// The data directory's path of `table`'s main fork in `db`.
fn relpath(c: &PgCluster, db: &str, table: &str) -> String {
    c.psql_db(db, &format!("SELECT pg_relation_filepath('{table}')"))
}

/// Bytes allocated on disk (not the length) of a file.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .blocks()
        * 512
}

/// The one scratch directory `--keep` left in `scratch`.
fn kept(scratch: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].join("data")
}

/// The pack files of repository `repo`: the backups' blocks.
fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![repo.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.components().any(|c| c.as_os_str() == "packs") {
                out.push(p);
            }
        }
    }
    out
}

/// Drop `files` from the page cache (walvault wrote them durably: clean
/// pages go).
fn evict(files: &[PathBuf]) {
    for f in files {
        let fd = std::fs::File::open(f).unwrap();
        nix::fcntl::posix_fadvise(
            &fd,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }
}

/// Bytes of `files` in the page cache (`fincore`): what was read since
/// they were evicted.
fn cached(files: &[PathBuf]) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<u64>().unwrap())
        .sum()
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn extract_brings_back_deleted_rows_sparsely_also_after_vacuum_full() {
    let mut a = Archived::new(&[]);
    let c_ = &a.c;
    populate(c_);
    let big_path = relpath(c_, "app", "big");
    let events_path = relpath(c_, "analytics", "events");
    let backup = a.ok(&["backup", "--pg", &c_.conninfo(), "--fast", "--no-expire"]);
    assert!(backup.stdout.starts_with("backup "), "{}", backup.stdout);

    // pgbench and a marker workload run while rows are deleted
    let mut bench = a.c.pgbench_load(8).spawn().unwrap();
    for i in 0..20 {
        a.c.psql_db("app", &format!("INSERT INTO marker VALUES ({i})"));
    }
    let before_delete = rows_hash(&a.c, "app", "orders");
    let xid1 = a.c.psql_db(
        "app",
        "DELETE FROM orders WHERE id % 7 = 0; SELECT txid_current()",
    );
    let measurements_before = rows_hash(&a.c, "app", "measurements");
    let xid_m = a.c.psql_db(
        "app",
        "DELETE FROM measurements WHERE id % 3 = 0; SELECT txid_current()",
    );
    for i in 20..40 {
        a.c.psql_db("app", &format!("INSERT INTO marker VALUES ({i})"));
    }
    // the table is rewritten (a new file, built from WAL alone on recovery),
    // then more rows go
    a.c.psql_db("app", "VACUUM FULL orders");
    assert_ne!(relpath(&a.c, "app", "orders"), "", "orders has a file");
    let before_second = rows_hash(&a.c, "app", "orders");
    let xid2 = a.c.psql_db(
        "app",
        "DELETE FROM orders WHERE customer = 'c5'; SELECT txid_current()",
    );
    let after_all = rows_hash(&a.c, "app", "orders");
    let doomed = rows_hash(&a.c, "app", "doomed");
    let xid_drop =
        a.c.psql_db("app", "DROP TABLE doomed; SELECT txid_current()");
    assert!(bench.wait().unwrap().success());
    let t_events = a.c.psql("SELECT now()");
    let events_at_t = rows_hash(&a.c, "analytics", "events");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    a.c.psql_db("analytics", "DELETE FROM events WHERE id <= 1000");
    // then full_page_writes goes off
    a.c.psql("ALTER SYSTEM SET full_page_writes = off");
    a.c.reload_conf();
    a.c.psql("CHECKPOINT");
    let xid_fpw = a.c.psql_db(
        "app",
        "INSERT INTO marker VALUES (100); SELECT txid_current()",
    );
    a.c.psql("SELECT pg_switch_wal()");
    a.wait_stream_durable();
    a.finish_stream();
    let c = &a.c;

    // 1. the rows just before the delete, to a file; a sparse recovery
    let packs = packs(&a.repo);
    evict(&packs);
    assert_eq!(cached(&packs), 0, "the packs are still in the page cache");
    let scratch = a.work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let out1 = a.work.path().join("orders.sql");
    let r = extract(
        &a,
        c,
        &scratch,
        &[
            "--database",
            "app",
            "--table",
            "public.orders",
            "--target-xid",
            &xid1,
            "--exclusive",
            "--output",
            out1.to_str().unwrap(),
            "--keep",
        ],
    );
    load(c, "check1", &out1);
    assert_eq!(rows_hash(c, "check1", "orders"), before_delete, "{r}");
    assert_eq!(
        r["rows"].as_i64().unwrap().to_string(),
        before_delete.split(':').next().unwrap(),
        "{r}"
    );
    // downloaded: a small part of the cluster, by the command's own
    // account of its reads
    let plan = &r["plan"];
    let cluster = plan["fetch_bytes"].as_u64().unwrap() + plan["sparse_bytes"].as_u64().unwrap();
    let fetched = r["recovery"]["restore_fetched_bytes"].as_u64().unwrap();
    assert!(cluster > 150 << 20, "{r}");
    assert!(
        fetched * 10 < cluster,
        "{fetched} of {cluster} bytes read: {r}"
    );
    assert!(plan["fetch_bytes"].as_u64().unwrap() * 10 < cluster, "{r}");
    // and by the repository's files: what of its packs the page cache
    // holds now, read by the extract (at least what it says it read)
    let read = cached(&packs);
    assert!(
        read * 10 < cluster && read >= fetched / 2,
        "{read} bytes of the packs read, {fetched} reported, cluster {cluster}"
    );
    assert!(plan["sparse_files"].as_u64().unwrap() > 100, "{r}");
    // and by the file system: the big tables of the same and another
    // database were never written (holes), the table was
    let data = kept(&scratch);
    for hole in [&big_path, &events_path] {
        let p = data.join(hole);
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len > 1 << 20, "{}: {len}", p.display());
        assert!(
            allocated(&p) < len / 50,
            "{} is not a hole: {} of {len} bytes allocated",
            p.display(),
            allocated(&p)
        );
    }
    std::fs::remove_dir_all(data.parent().unwrap()).unwrap();
    assert!(r["amcheck"].as_str().unwrap().contains("consistent"), "{r}");

    // 2. after VACUUM FULL (a new file, not in the backup), into the live
    // server under a new name; the original untouched
    let r = extract(
        &a,
        c,
        &scratch,
        &[
            "--database",
            "app",
            "--table",
            "orders",
            "--target-xid",
            &xid2,
            "--exclusive",
            "--into",
            &format!("{} dbname=app", c.conninfo()),
        ],
    );
    let name = format!("orders_restored_x{xid2}");
    assert_eq!(r["output"], format!("public.{name}"), "{r}");
    assert_eq!(rows_hash(c, "app", &name), before_second);
    assert_eq!(rows_hash(c, "app", "orders"), after_all);
    assert!(empty(&scratch), "the scratch directory was left behind");
    // a small part of the cluster again
    assert!(
        r["recovery"]["restore_fetched_bytes"].as_u64().unwrap() * 10 < cluster,
        "{r}"
    );
    // the plan saw the rewrite in the WAL summaries: the old file was
    // dropped before the target, and not downloaded
    assert!(r["plan"]["table_file_dropped"]["xid"].is_u64(), "{r}");
    assert!(
        r["plan"]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("dropped before the target")),
        "{r}"
    );
    // its indexes came along under new names
    let idx = c.psql_db(
        "app",
        &format!("SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = '{name}'"),
    );
    assert_eq!(
        idx,
        format!("orders_customer_restored_x{xid2},orders_pkey_restored_x{xid2}")
    );
    // the same name again is refused before anything is downloaded
    let e = extract_in(&a, c, &scratch)
        .args([
            "--database",
            "app",
            "--table",
            "orders",
            "--target-xid",
            &xid2,
            "--into",
        ])
        .arg(format!("{} dbname=app", c.conninfo()))
        .fails_with_one_line(&["already exists", &name]);
    assert!(e.contains("--as"), "{e}");

    // a partitioned table: every partition, on two levels, comes back
    // beside the original under new names
    let measurements_now = rows_hash(c, "app", "measurements");
    let r = extract(
        &a,
        c,
        &scratch,
        &[
            "--database",
            "app",
            "--table",
            "measurements",
            "--target-xid",
            &xid_m,
            "--exclusive",
            "--into",
            &format!("{} dbname=app", c.conninfo()),
        ],
    );
    let name = format!("measurements_restored_x{xid_m}");
    assert_eq!(rows_hash(c, "app", &name), measurements_before, "{r}");
    assert_eq!(rows_hash(c, "app", "measurements"), measurements_now);
    assert_eq!(
        c.psql_db(
            "app",
            &format!("SELECT string_agg(relid::text, ',' ORDER BY level, relid::text) FROM pg_partition_tree('{name}')")
        ),
        format!(
            "{name},measurements_north_restored_x{xid_m},measurements_south_restored_x{xid_m},\
             measurements_south_high_restored_x{xid_m},measurements_south_low_restored_x{xid_m}"
        )
    );
    assert!(
        r["amcheck"].as_str().unwrap().contains("(3 partitions)"),
        "{r}"
    );
    assert!(
        r["recovery"]["restore_fetched_bytes"].as_u64().unwrap() * 10 < cluster,
        "{r}"
    );

    // 3. a whole database at a time
    let out3 = a.work.path().join("analytics.sql");
    let r = extract(
        &a,
        c,
        &scratch,
        &[
            "--database",
            "analytics",
            "--target-time",
            &t_events,
            "--output",
            out3.to_str().unwrap(),
        ],
    );
    load(c, "check3", &out3);
    assert_eq!(rows_hash(c, "check3", "events"), events_at_t, "{r}");
    assert_ne!(rows_hash(c, "analytics", "events"), events_at_t);

    // 4. bad input: one line, nothing downloaded, nothing left behind
    let refused = |args: &[&str], needles: &[&str]| {
        extract_in(&a, c, &scratch)
            .args(args)
            .fails_with_one_line(needles);
        assert!(
            empty(&scratch),
            "{args:?} left something in the scratch directory"
        );
    };
    let out4 = a.work.path().join("never.sql");
    let o4 = out4.to_str().unwrap();
    refused(
        &[
            "--database",
            "app",
            "--table",
            "ordres",
            "--target-xid",
            &xid1,
            "--output",
            o4,
        ],
        &["no table public.ordres", "app", "similar names"],
    );
    refused(
        &[
            "--database",
            "nope",
            "--table",
            "orders",
            "--target-xid",
            &xid1,
            "--output",
            o4,
        ],
        &["no database \"nope\"", "app", "analytics"],
    );
    refused(
        &[
            "--database",
            "app",
            "--table",
            "orders",
            "--target-time",
            "2001-01-01T00:00:00Z",
            "--output",
            o4,
        ],
        &[],
    );
    let port = crate::support::free_port();
    refused(
        &[
            "--database",
            "app",
            "--table",
            "orders",
            "--target-xid",
            &xid1,
            "--into",
            &format!("host=127.0.0.1 port={port} user=postgres dbname=app"),
        ],
        &["cannot connect to the --into server"],
    );
    // full_page_writes off in the WAL before the target, seen in the
    // summaries
    refused(
        &[
            "--database",
            "app",
            "--table",
            "orders",
            "--target-xid",
            &xid_fpw,
            "--output",
            o4,
        ],
        &["full_page_writes was off", "restore-pitr"],
    );
    // a table dropped before the target: the plan names the drop, the
    // recovered catalogs confirm it, and the line says where to stop
    let r = extract(
        &a,
        c,
        &scratch,
        &[
            "--database",
            "app",
            "--table",
            "doomed",
            "--target-xid",
            &xid_drop,
            "--dry-run",
            "--output",
            o4,
        ],
    );
    assert_eq!(
        r["plan"]["table_file_dropped"]["xid"].to_string(),
        xid_drop,
        "{r}"
    );
    let stop_before = format!("--target-xid {xid_drop} --exclusive");
    assert!(r["plan"]["notes"].to_string().contains(&stop_before), "{r}");
    extract_in(&a, c, &scratch)
        .args([
            "--database",
            "app",
            "--table",
            "doomed",
            "--target-xid",
            &xid_drop,
            "--output",
            o4,
        ])
        .fails_with_one_line(&["no table public.doomed", "dropped it", &stop_before]);
    assert!(empty(&scratch));
    // and stopping there brings the dropped table back
    let out_d = a.work.path().join("doomed.sql");
    let r = extract(
        &a,
        c,
        &scratch,
        &[
            "--database",
            "app",
            "--table",
            "doomed",
            "--target-xid",
            &xid_drop,
            "--exclusive",
            "--output",
            out_d.to_str().unwrap(),
        ],
    );
    load(c, "check_doomed", &out_d);
    assert_eq!(rows_hash(c, "check_doomed", "doomed"), doomed, "{r}");
    assert!(!out4.exists());
    // the plan alone
    let plan = extract_in(&a, c, &scratch)
        .args([
            "--database",
            "app",
            "--table",
            "orders",
            "--target-xid",
            &xid1,
            "--dry-run",
            "--output",
            o4,
        ])
        .ok();
    assert!(
        plan.stdout.contains("download") && plan.stdout.contains("nothing was downloaded"),
        "{}",
        plan.stdout
    );
    assert!(empty(&scratch) && !out4.exists());

    // 5. Ctrl-C while it works: the scratch server is stopped and the
    // directory removed before it exits
    let child = extract_in(&a, c, &scratch)
        .args([
            "--database",
            "app",
            "--table",
            "orders",
            "--target-xid",
            &xid1,
            "--output",
            o4,
        ])
        .command()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while empty(&scratch) {
        assert!(std::time::Instant::now() < deadline, "no scratch directory");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(empty(&scratch), "the scratch directory was left behind");
    assert!(!out4.exists());
    assert!(
        !crate::support::process_runs_in(&scratch),
        "a process still runs in the scratch directory"
    );
}

/// `extract` of `app.TABLE` just before transaction `xid` to a file,
/// loaded into a new database: the report and the rows hash there.
fn extract_to_file(
    a: &Archived,
    scratch: &Path,
    table: &str,
    xid: &str,
) -> (serde_json::Value, String) {
    let out = a.work.path().join(format!("{table}.sql"));
    let r = extract(
        a,
        &a.c,
        scratch,
        &[
            "--database",
            "app",
            "--table",
            table,
            "--target-xid",
            xid,
            "--exclusive",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    let db = format!("verify_{table}");
    load(&a.c, &db, &out);
    (r, rows_hash(&a.c, &db, table))
}

/// A sparse recovery on every other major installed (13, 14, 16, 17, 18):
/// the table as it was before the delete, checked by amcheck.
#[test]
fn extract_on_other_majors() {
    let Some(majors) = other_majors_or_skip(&[15]) else {
        return;
    };
    // every supported major installed: 13 to 18
    for m in majors {
        let a = Archived::with(PgOptions {
            major: Some(m),
            ..Default::default()
        });
        let c = &a.c;
        populate(c);
        a.ok(&["backup", "--pg", &c.conninfo(), "--fast", "--no-expire"]);
        let before = rows_hash(c, "app", "orders");
        let measurements = rows_hash(c, "app", "measurements");
        let xid = c.psql_db(
            "app",
            "DELETE FROM orders WHERE id % 3 = 0; DELETE FROM measurements WHERE id % 3 = 0; SELECT txid_current()",
        );
        c.psql("SELECT pg_switch_wal()");
        a.wait_stream_durable();
        let scratch = a.work.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let (r, copy) = extract_to_file(&a, &scratch, "orders", &xid);
        assert_eq!(copy, before, "PostgreSQL {m}: {r}");
        let plan = &r["plan"];
        let cluster =
            plan["fetch_bytes"].as_u64().unwrap() + plan["sparse_bytes"].as_u64().unwrap();
        assert!(
            r["recovery"]["restore_fetched_bytes"].as_u64().unwrap() * 10 < cluster,
            "PostgreSQL {m}: {r}"
        );
        // pg_amcheck on 14+, amcheck's bt_index_check with every row
        // looked up before
        let amcheck = r["amcheck"].as_str().unwrap();
        assert!(amcheck.contains("consistent"), "PostgreSQL {m}: {r}");
        if m < 14 {
            assert!(amcheck.contains("bt_index_check"), "{r}");
        }
        assert!(empty(&scratch));
        // the partitioned table, all its partitions, to a file
        let (r, copy) = extract_to_file(&a, &scratch, "measurements", &xid);
        assert_eq!(copy, measurements, "PostgreSQL {m}: {r}");
        assert!(
            r["amcheck"].as_str().unwrap().contains("(3 partitions)"),
            "PostgreSQL {m}: {r}"
        );
        assert!(empty(&scratch));
        if m > 15 {
            // no client programs of this major or newer: refused before
            // anything is downloaded (Debian's 15 cannot dump it)
            let nobin = a.work.path().join("nobin");
            std::fs::create_dir(&nobin).unwrap();
            for b in ["postgres", "pg_ctl"] {
                std::os::unix::fs::symlink(c.bindir.join(b), nobin.join(b)).unwrap();
            }
            let out2 = a.work.path().join("never.sql");
            a.wv.args(["extract", "--scratch"])
                .arg(&scratch)
                .arg("--pg-bin")
                .arg(&nobin)
                .args([
                    "--database",
                    "app",
                    "--table",
                    "orders",
                    "--target-xid",
                    &xid,
                    "--output",
                ])
                .arg(&out2)
                .fails_with_one_line(&[
                    "pg_dump",
                    &format!("PostgreSQL {m}"),
                    "not found",
                    "--pg-bin",
                ]);
            assert!(empty(&scratch) && !out2.exists());
        }
    }
}
