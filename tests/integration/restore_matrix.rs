//! Backup → restore across PostgreSQL majors and storage backends, proving
//! the restored content equals the source's at the exact point recovery
//! ended: a delayed streaming standby of the source (made from an earlier
//! walvault backup) replays to that LSN and serves as the reference.
//! Also `restore --delta` over a changed copy.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::pg::{table_hashes, PgCluster, PgOptions, StopMode, PASSWORD_USER};
use crate::support::s3::S3Server;
use crate::support::Walvault;

/// Where the timeline of a promoted restore branched off: the end of the
/// last record recovery replayed.
fn switch_point(datadir: &Path) -> String {
    let history = std::fs::read_to_string(datadir.join("pg_wal/00000002.history"))
        .expect("the restored server promoted to timeline 2");
    history
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("1")).then(|| f.next().map(str::to_owned))?
        })
        .unwrap_or_else(|| panic!("no timeline 1 in {history}"))
}

/// `pg_verifybackup --no-parse-wal` of a restored, not yet started data
/// directory: whether it passed, and what it said. `None` where no tool
/// reads the server's manifest format (Debian's 15 reads version 1, which
/// PostgreSQL 13–16 write; scripts/install-pg-versions.sh installs the
/// client programs of 14, 16, 17 and 18, none exists for 13).
pub(crate) fn verifybackup(dst: &PgCluster) -> Option<(bool, String)> {
    let own = dst.bin("pg_verifybackup");
    let tool = if own.exists() {
        own
    } else if dst.major <= 16 {
        dst.client_bin("pg_verifybackup")
    } else {
        crate::support::skip(&format!(
            "pg_verifybackup of PostgreSQL {} is not installed",
            dst.major
        ));
        return None;
    };
    assert!(
        dst.datadir.join("backup_manifest").exists(),
        "the restore wrote no backup_manifest"
    );
    let out = std::process::Command::new(&tool)
        .arg("--no-parse-wal")
        .arg(&dst.datadir)
        .output()
        .unwrap();
    Some((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

pub(crate) fn assert_checksums_clean(dst: &PgCluster) {
    let check = walvault::pg::checksum::check_data_directory(&dst.datadir).unwrap();
    assert!(check.pages > 100, "too few pages checked: {check:?}");
    assert!(check.bad.is_empty(), "bad pages: {:?}", check.bad);
    // the server's own tool too, where the matching one is installed
    dst.pg_checksums_clean();
}

/// A restored, promoted `dst` holds the source's content at the point its
/// recovery ended: `reference` (a delayed standby of the source, with WAL
/// past that point) replays exactly to it and the pgbench database's table
/// hashes agree. Returns the point.
pub(crate) fn equals_reference_where_recovery_ended(
    dst: &PgCluster,
    reference: &mut PgCluster,
) -> String {
    let end = switch_point(&dst.datadir);
    reference.replay_to(&end, false);
    let want = table_hashes(reference, PASSWORD_USER);
    assert!(want.contains_key("public.pgbench_accounts"), "{want:?}");
    assert_eq!(
        table_hashes(dst, PASSWORD_USER),
        want,
        "restored content differs from the source at {end}"
    );
    end
}

/// "12.5 MiB" → bytes.
fn human_bytes(s: &str) -> u64 {
    let (n, unit) = s
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("not a size: {s}"));
    let n: f64 = n.parse().unwrap();
    let m = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unknown unit {other}"),
    };
    (n * m) as u64
}

/// Bytes written and found in place, from a `restore --delta` summary:
/// "... (X written, Y already in place, N stale entries removed) ...".
pub(crate) fn delta_summary(text: &str) -> (u64, u64) {
    let summary = text
        .split(" (")
        .last()
        .unwrap_or_else(|| panic!("no delta summary in {text}"));
    let parts: Vec<&str> = summary.split(", ").collect();
    assert!(parts.len() >= 3, "no delta summary in {text}");
    (
        human_bytes(parts[0].trim_end_matches(" written")),
        human_bytes(parts[1].trim_end_matches(" already in place")),
    )
}

struct Setup {
    src: PgCluster,
    /// `walvault … --repo DIR` or `… --config FILE` (an S3 repository).
    wv: Walvault,
    _work: tempfile::TempDir,
    _s3: Option<S3Server>,
}

async fn setup(major: Option<u32>, s3: bool) -> Setup {
    let src = PgCluster::start_with(PgOptions {
        major,
        ..Default::default()
    });
    src.pgbench(&["-i", "-s", "2", "-q"]);
    let work = tempfile::tempdir().unwrap();
    // the restored servers' restore_command (as their OS user) reaches the
    // repository or the config file inside
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (wv, server) = if s3 {
        let server = S3Server::start().await;
        // a config file, readable by the restored servers' restore_command
        let (_, wv) =
            crate::support::s3::config_repo(work.path(), &server.url("matrix"), &server.config());
        (wv, Some(server))
    } else {
        (Walvault::new().repo(work.path().join("repo")), None)
    };
    wv.args(["init"]).ok();
    Setup {
        src,
        wv,
        _work: work,
        _s3: server,
    }
}

fn restore(s: &Setup, dst: &PgCluster, extra: &[&str]) -> String {
    let mut args = vec![
        "restore",
        "--backup",
        "latest",
        "--pgdata",
        dst.datadir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    s.wv.args(args).ok().stdout
}

/// Backup under load, restore, recover; the content equals the source's at
/// the point recovery ended; checksums clean. Returns the pieces for more.
async fn backup_restore_exact(major: Option<u32>, s3: bool) -> (Setup, PgCluster, PgCluster) {
    let s = setup(major, s3).await;
    // the reference: an earlier backup, restored as a delayed standby
    s.wv.args([
        "backup",
        "--pg",
        &s.src.conninfo(),
        "--fast",
        "--label",
        "reference",
    ])
    .ok();
    let mut reference = PgCluster::for_restore(&s.src.bindir);
    restore(&s, &reference, &[]);
    reference.start_delayed_standby(&s.src);

    s.src.psql_db(
        PASSWORD_USER,
        "CREATE TABLE marker(t text); INSERT INTO marker VALUES ('before')",
    );
    // a file of zero pages around data: restore leaves zero blocks to the
    // file's creation at its length, and must not lose the others
    let mut zeros = vec![0u8; 3 * 8192];
    zeros.extend(std::iter::repeat_n(7u8, 8192));
    zeros.extend(std::iter::repeat_n(0u8, 2 * 8192 + 100));
    std::fs::write(s.src.datadir.join("zero-pages.bin"), &zeros).unwrap();
    let mut bench = s.src.pgbench_load(5).spawn().unwrap();
    let out =
        s.wv.args(["backup", "--pg", &s.src.conninfo(), "--fast"])
            .ok();
    assert!(out.stdout.contains("complete"), "{}", out.stdout);
    assert!(bench.wait().unwrap().success());
    // WAL after the backup, so the reference can see past its end
    s.src
        .psql_db(PASSWORD_USER, "INSERT INTO marker VALUES ('after')");
    s.src.psql("SELECT pg_switch_wal()");

    let mut dst = PgCluster::for_restore(&s.src.bindir);
    let text = restore(&s, &dst, &[]);
    assert!(text.contains("restored backup"), "{text}");
    assert!(
        std::fs::read(dst.datadir.join("zero-pages.bin")).unwrap() == zeros,
        "zero-pages.bin differs"
    );
    // PostgreSQL's own check of the directory, through the server's
    // manifest that walvault kept with the backup
    if let Some((ok, said)) = verifybackup(&dst) {
        assert!(ok, "pg_verifybackup: {said}");
        // and it is the server's real manifest: a changed file fails it
        let f = dst.datadir.join("PG_VERSION");
        let original = std::fs::read(&f).unwrap();
        std::fs::write(&f, b"99\n").unwrap();
        let bad = verifybackup(&dst).unwrap();
        assert!(!bad.0 && bad.1.contains("PG_VERSION"), "{}", bad.1);
        std::fs::write(&f, original).unwrap();
        let good = verifybackup(&dst).unwrap();
        assert!(good.0, "pg_verifybackup: {}", good.1);
    }
    recovers_to_the_reference(&mut dst, &mut reference);
    (s, dst, reference)
}

/// Start a restored `dst`: its content equals `reference`'s where its
/// recovery ended, which is before the source's `marker` row 'after';
/// stopped, its pages' checksums are clean.
pub(crate) fn recovers_to_the_reference(dst: &mut PgCluster, reference: &mut PgCluster) {
    dst.start_restored();
    equals_reference_where_recovery_ended(dst, reference);
    assert_eq!(
        dst.psql_db(PASSWORD_USER, "SELECT string_agg(t, ',') FROM marker"),
        "before"
    );
    dst.stop(StopMode::Fast);
    assert_checksums_clean(dst);
}

#[tokio::test(flavor = "multi_thread")]
async fn pg15_on_s3_exact_content_then_delta_restore() {
    let (s, mut dst, reference) = backup_restore_exact(None, true).await;
    let want = table_hashes(&reference, PASSWORD_USER);

    // change the restored copy: rows, a new table (new files), a stray file
    dst.start_again();
    dst.psql_db(
        PASSWORD_USER,
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 50 = 0; \
         CREATE TABLE stray AS SELECT g FROM generate_series(1, 10000) g; CHECKPOINT",
    );
    dst.stop(StopMode::Fast);
    let planted = dst.datadir.join("base/stray-file");
    std::fs::write(&planted, b"not from the backup").unwrap();

    // a running server is refused
    dst.start_again();
    let err =
        s.wv.args(["restore", "--delta", "--pgdata"])
            .arg(&dst.datadir)
            .fails()
            .stderr;
    assert!(err.contains("postmaster.pid"), "{err}");
    // nothing was written, so nothing is called incomplete
    assert!(!err.contains("incomplete"), "{err}");
    dst.stop(StopMode::Fast);

    // recovery rewrote many pages since the backup; the delta writes only
    // the blocks that differ
    let (written, reused) = delta_summary(&restore(&s, &dst, &["--delta"]));
    assert!(reused > 0 && written > 0, "{written} {reused}");
    assert!(
        !planted.exists(),
        "a file the backup does not have survived --delta"
    );
    // once more over the untouched result: nothing but the recovery
    // settings the restore itself appended differs
    let (written, reused) = delta_summary(&restore(&s, &dst, &["--delta"]));
    assert!(
        written < 4096,
        "an unchanged directory got {written} bytes rewritten"
    );
    assert!(reused > 50 << 20, "{reused}");
    dst.start_restored();
    assert_eq!(
        table_hashes(&dst, PASSWORD_USER),
        want,
        "delta restore differs from the backup"
    );
    dst.stop(StopMode::Fast);
    assert_checksums_clean(&dst);
}

#[tokio::test(flavor = "multi_thread")]
async fn other_majors_exact_content() {
    let Some(majors) = crate::support::pg::other_majors_or_skip(&[]) else {
        return;
    };
    for major in majors {
        let (_s, dst, _reference) = backup_restore_exact(Some(major), false).await;
        assert_eq!(dst.major, major);
    }
}
