//! What the commands print, when the reader of their output goes away.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::support::pg::PgCluster;
use crate::support::Walvault;

/// Regression: `walvault wal-inspect … | head -1` panicked ("failed
/// printing to stdout: Broken pipe") once `head` had its line and closed
/// the pipe. Now the command stops quietly and exits with success, as
/// ripgrep does.
#[test]
fn wal_inspect_into_a_pipe_closed_after_one_line_exits_cleanly() {
    let c = PgCluster::start();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    wv.args(["backup", "--fast", "--pg", &c.conninfo()]).ok();
    // 3000 commits: a listing far longer than a pipe's 64 KiB buffer, so
    // that writing it must fail once the reader is gone
    c.psql("CREATE TABLE t(i int)");
    // one statement per psql call: COMMIT in DO needs no enclosing transaction
    c.psql("DO $$ BEGIN FOR i IN 1..3000 LOOP INSERT INTO t VALUES (i); COMMIT; END LOOP; END $$");
    let last = c.psql("SELECT pg_walfile_name(pg_switch_wal())");
    let wal_dir = c.datadir.join("pg_wal");
    let mut segments: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() <= last.as_str())
        .collect();
    segments.sort();
    for s in &segments {
        wv.args(["wal-push"]).arg(wal_dir.join(s)).ok();
    }
    let listing = [
        "wal-inspect",
        "--from",
        "2000-01-01T00:00:00Z",
        "--to",
        "2100-01-01T00:00:00Z",
    ];

    // the whole listing, read to the end
    let text = wv.args(listing).ok().stdout;
    let commits = text.lines().filter(|l| l.contains(" COMMIT ")).count();
    assert!(commits >= 3000, "{commits} commits listed");
    assert!(text.len() > 4 * 65_536, "{} bytes listed", text.len());

    // `| head -1`: one line read, then the pipe closed
    let mut child = wv
        .args(listing)
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // the reader (and with it the pipe's only read end) is dropped here
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(Some(first.trim_end()), text.lines().next());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success(),
        "{:?} after the pipe closed: {stderr}",
        out.status
    );
    assert!(!stderr.contains("error"), "{stderr}");
}
