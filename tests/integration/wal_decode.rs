//! The WAL decoder against `pg_waldump` on real WAL: the same records at the
//! same LSNs, the same transaction ends with the same xids and times, the
//! restore point, the dropped relation, prepared transactions; chunking
//! never changes the result; a flipped byte is reported with its LSN.

use std::collections::BTreeMap;
use std::path::Path;

use walvault::pg::{Lsn, SegmentNo, WalSegSize};
use walvault::wal::decode::{Next, WalReader};
use walvault::wal::records::{interpret, pg_time, RecordKind, XactKind};

use crate::support::pg::{PgCluster, PgOptions};

/// WAL made of everything the decoder must understand; returns the
/// segment names from the first to the last.
fn make_wal(c: &PgCluster) -> Vec<String> {
    let first = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("CREATE TABLE d1(i int, t text); INSERT INTO d1 SELECT g, repeat('x', 50) FROM generate_series(1, 5000) g");
    c.psql("BEGIN; INSERT INTO d1 VALUES (-1, 'rolled back'); ROLLBACK;");
    c.psql("SELECT pg_create_restore_point('walvault-test')");
    c.psql("CREATE TABLE dropme(i int); INSERT INTO dropme VALUES (1)");
    c.psql("DROP TABLE dropme");
    c.psql("BEGIN; INSERT INTO d1 VALUES (-2, 'prepared'); PREPARE TRANSACTION 'p1';");
    c.psql("COMMIT PREPARED 'p1'");
    c.psql("BEGIN; INSERT INTO d1 VALUES (-3, 'prepared'); PREPARE TRANSACTION 'p2';");
    c.psql("ROLLBACK PREPARED 'p2'");
    // subtransactions, and a commit with many of them
    c.psql("BEGIN; INSERT INTO d1 VALUES (1); SAVEPOINT a; INSERT INTO d1 VALUES (2); SAVEPOINT b; INSERT INTO d1 VALUES (3); COMMIT;");
    c.pgbench(&["-i", "-s", "1", "-q"]);
    c.pgbench(&["-T", "3", "-c", "2", "-n"]);
    // full_page_writes off for a while: an FPW_CHANGE record each way and
    // a checkpoint that says it is off
    for v in ["off", "on"] {
        c.psql(&format!("ALTER SYSTEM SET full_page_writes = {v}"));
        c.reload_conf();
        c.psql("CHECKPOINT");
        c.psql("INSERT INTO d1 VALUES (4)");
    }
    c.psql("CHECKPOINT");
    let last = c.psql("SELECT pg_walfile_name(pg_switch_wal())");
    let seg = u64::from_str_radix(&first[16..], 16).unwrap();
    let end = u64::from_str_radix(&last[16..], 16).unwrap();
    (seg..=end)
        .map(|n| format!("{}{:08X}", &first[..16], n))
        .collect()
}

/// (lsn, rmgr, xid, desc) of every record pg_waldump prints.
fn waldump(
    c: &PgCluster,
    dir: &Path,
    first: &str,
    last: &str,
) -> Vec<(String, String, u32, String)> {
    let out = c
        .command(&c.client_bin("pg_waldump"))
        .env("TZ", "UTC")
        .env("PGTZ", "UTC")
        .args(["-p", dir.to_str().unwrap(), first, last])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rmgr = l
                .strip_prefix("rmgr: ")?
                .split_whitespace()
                .next()?
                .to_owned();
            let tx = l
                .split("tx:")
                .nth(1)?
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()?;
            let lsn = l
                .split("lsn: ")
                .nth(1)?
                .split(',')
                .next()?
                .trim()
                .to_owned();
            let desc = l.split("desc: ").nth(1).unwrap_or("").to_owned();
            Some((lsn, rmgr, tx, desc))
        })
        .collect()
}

fn decode_all(
    segs: &[Vec<u8>],
    start: Lsn,
    seg: WalSegSize,
    chunk: usize,
) -> Vec<walvault::wal::decode::RawRecord> {
    let mut r = WalReader::new(start, seg);
    let mut out = Vec::new();
    let all: Vec<u8> = segs.concat();
    let mut fed = 0;
    loop {
        match r.next_record().unwrap() {
            Next::Record(rec) => out.push(rec),
            Next::NeedMore if fed < all.len() => {
                let n = chunk.min(all.len() - fed);
                r.feed(&all[fed..fed + n]);
                fed += n;
            }
            _ => break,
        }
    }
    out
}

fn check_against_waldump(opts: PgOptions) {
    let mut conf = opts.conf.clone();
    conf.push("max_prepared_transactions = 4".into());
    conf.push("wal_keep_size = '2GB'".into());
    let mut c = PgCluster::start_with(PgOptions { conf, ..opts });
    let names = make_wal(&c);
    c.stop(crate::support::pg::StopMode::Fast);
    // a private copy: pg_waldump and the decoder read the same bytes
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("wal");
    std::fs::create_dir(&copy).unwrap();
    let mut segs = Vec::new();
    for n in &names {
        std::fs::copy(c.datadir.join("pg_wal").join(n), copy.join(n)).unwrap();
        segs.push(std::fs::read(copy.join(n)).unwrap());
    }
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status();
    let seg = WalSegSize::new(segs[0].len() as u64).unwrap();
    let first_segno = u64::from_str_radix(&names[0][8..16], 16).unwrap()
        * (0x1_0000_0000 / seg.bytes())
        + u64::from_str_radix(&names[0][16..], 16).unwrap();
    let start = SegmentNo(first_segno).start_lsn(seg).unwrap();

    let ours = decode_all(&segs, start, seg, 1 << 20);
    let theirs = waldump(&c, &copy, &names[0], names.last().unwrap());
    assert!(
        theirs.len() > 1000,
        "pg_waldump printed {} records",
        theirs.len()
    );
    // pg_waldump stops at the end of the last segment it was given; so do we
    let ours_lsns: Vec<String> = ours
        .iter()
        .map(|r| format!("{:X}/{:08X}", r.lsn.get() >> 32, r.lsn.get() as u32))
        .collect();
    let theirs_lsns: Vec<String> = theirs.iter().map(|t| t.0.clone()).collect();
    assert_eq!(ours_lsns.len(), theirs_lsns.len(), "record counts differ");
    assert_eq!(ours_lsns, theirs_lsns, "record LSNs differ");

    // transaction ends: kind, xid, time
    let major = c.major;
    let mut seen = BTreeMap::new();
    for (rec, t) in ours.iter().zip(&theirs) {
        assert_eq!(rec.xid, t.2, "xid at {}", t.0);
        match interpret(rec, major).unwrap_or_else(|e| panic!("{e}")) {
            RecordKind::Xact(x) => {
                let time = pg_time(x.time)
                    .unwrap()
                    .format("%Y-%m-%d %H:%M:%S%.6f UTC")
                    .to_string();
                let word = match x.kind {
                    XactKind::Commit => "COMMIT ",
                    XactKind::Abort => "ABORT ",
                    XactKind::CommitPrepared => "COMMIT_PREPARED ",
                    XactKind::AbortPrepared => "ABORT_PREPARED ",
                };
                assert!(t.3.starts_with(word), "{:?} at {} is {}", x.kind, t.0, t.3);
                assert!(
                    t.3.contains(&time),
                    "time at {}: ours {time}, pg_waldump {}",
                    t.0,
                    t.3
                );
                if matches!(x.kind, XactKind::CommitPrepared | XactKind::AbortPrepared) {
                    assert!(
                        t.3.starts_with(&format!("{word}{}:", x.xid)),
                        "prepared xid at {}: {} vs {}",
                        t.0,
                        x.xid,
                        t.3
                    );
                }
                for d in &x.dropped {
                    assert!(
                        t.3.contains(&format!("base/{}/{}", d.db, d.rel)),
                        "dropped {d:?} not in {}",
                        t.3
                    );
                }
                *seen.entry(format!("{:?}", x.kind)).or_insert(0) += 1;
                if !x.dropped.is_empty() {
                    *seen.entry("dropped".into()).or_insert(0) += 1;
                }
                if !x.subxacts.is_empty() {
                    *seen.entry("subxacts".into()).or_insert(0) += 1;
                }
            }
            RecordKind::RestorePoint { name, .. } => {
                assert_eq!(name, "walvault-test");
                assert!(t.3.contains("walvault-test"), "{}", t.3);
                *seen.entry("restore point".into()).or_insert(0) += 1;
            }
            RecordKind::Switch => {
                assert!(t.3.starts_with("SWITCH"), "{}", t.3);
                *seen.entry("switch".into()).or_insert(0) += 1;
            }
            RecordKind::Checkpoint {
                full_page_writes, ..
            } => {
                assert!(t.3.starts_with("CHECKPOINT"), "{}", t.3);
                assert!(t.3.contains(&format!("fpw {full_page_writes};")), "{}", t.3);
                if !full_page_writes {
                    *seen.entry("checkpoint without fpw".into()).or_insert(0) += 1;
                }
            }
            RecordKind::FpwChange(on) => {
                assert_eq!(t.3, format!("FPW_CHANGE {on}"));
                *seen.entry(format!("fpw {on}")).or_insert(0) += 1;
            }
            RecordKind::Prepare { .. } => *seen.entry("prepare".into()).or_insert(0) += 1,
            _ => {}
        }
    }
    for k in [
        "Commit",
        "Abort",
        "CommitPrepared",
        "AbortPrepared",
        "dropped",
        "subxacts",
        "restore point",
        "switch",
        "prepare",
        "fpw false",
        "fpw true",
        "checkpoint without fpw",
    ] {
        assert!(seen.contains_key(k), "no {k} decoded: {seen:?}");
    }

    // summaries, one per segment, joined across boundaries, hold every
    // transaction end and restore point exactly once
    let mut sums: Vec<_> = segs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            walvault::wal::summary::summarize(
                d,
                None,
                walvault::pg::TimelineId::FIRST,
                SegmentNo(first_segno + i as u64),
                seg,
            )
        })
        .collect();
    for i in 0..sums.len().saturating_sub(1) {
        let next = sums[i + 1].clone();
        sums[i].complete_with(&next);
    }
    let from_sums: Vec<Lsn> = sums
        .iter()
        .flat_map(|s| s.xacts.iter().map(|x| x.lsn))
        .collect();
    let from_stream: Vec<Lsn> = ours
        .iter()
        .filter(|r| matches!(interpret(r, major), Ok(RecordKind::Xact(_))))
        .map(|r| r.lsn)
        .collect();
    let mut sorted = from_sums.clone();
    sorted.sort();
    assert_eq!(
        sorted, from_stream,
        "summaries lost or repeated a transaction end"
    );
    assert_eq!(
        sums.iter().map(|s| s.records).sum::<u64>(),
        ours.len() as u64,
        "summaries count every record once"
    );
    assert!(sums.iter().all(|s| s.error.is_none()));
    // the records that say full_page_writes is off: the change and the
    // checkpoint after it
    let off: Vec<Lsn> = ours
        .iter()
        .filter(|r| {
            matches!(
                interpret(r, major),
                Ok(RecordKind::FpwChange(false)
                    | RecordKind::Checkpoint {
                        full_page_writes: false,
                        ..
                    })
            )
        })
        .map(|r| r.lsn)
        .collect();
    assert_eq!(off.len(), 2, "{off:?}");
    assert_eq!(
        sums.iter()
            .flat_map(|s| s.fpw_off.clone().unwrap())
            .collect::<Vec<_>>(),
        off
    );
    // stored and read back, also as an older summary (which does not know)
    for s in &sums {
        let back = walvault::wal::summary::SegmentSummary::decode(&s.encode().unwrap());
        assert_eq!(back.as_ref(), Some(s));
        let mut v3 = s.clone();
        v3.version = 3;
        let old =
            walvault::wal::summary::SegmentSummary::decode(&postcard::to_stdvec(&v3).unwrap())
                .unwrap();
        assert_eq!(old.fpw_off, None);
        assert_eq!(old.xacts, s.xacts);
    }
    assert_eq!(
        sums.iter()
            .flat_map(|s| &s.restore_points)
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["walvault-test"]
    );

    // summaries and page checks of segments arriving in pieces (as
    // wal-push reads them) equal those of whole segments
    for (i, d) in segs.iter().enumerate() {
        let segno = SegmentNo(first_segno + i as u64);
        let whole =
            walvault::wal::summary::summarize(d, None, walvault::pg::TimelineId::FIRST, segno, seg);
        for piece in [8192, 3 * 8192, 1 << 20, 3 << 20] {
            let mut s = walvault::wal::summary::Summarizer::new(
                d.len(),
                walvault::pg::TimelineId::FIRST,
                segno,
                seg,
            );
            let mut pages = walvault::wal::verify::PageChecker::new(segno, seg).unwrap();
            for p in d.chunks(piece) {
                s.push(p);
                pages.check(p).unwrap();
            }
            pages.finish().unwrap();
            assert_eq!(s.finish(None), whole, "segment {i} in pieces of {piece}");
        }
    }

    // any chunking decodes identically
    for chunk in [1000, 8191, 8192, 12345] {
        let again = decode_all(&segs, start, seg, chunk);
        assert_eq!(again.len(), ours.len(), "chunk {chunk}");
        assert!(
            again.iter().zip(&ours).all(|(a, b)| a == b),
            "chunk {chunk}"
        );
    }
    // every split point of the first three pages
    let head = &segs[0][..3 * 8192];
    let whole = {
        let mut r = WalReader::new(start, seg);
        r.feed(head);
        let mut v = Vec::new();
        while let Ok(Next::Record(rec)) = r.next_record() {
            v.push(rec);
        }
        v
    };
    for k in 0..head.len() {
        let mut r = WalReader::new(start, seg);
        r.feed(&head[..k]);
        let mut v = Vec::new();
        let mut rest_fed = false;
        loop {
            match r.next_record().unwrap() {
                Next::Record(rec) => v.push(rec),
                Next::NeedMore if !rest_fed => {
                    r.feed(&head[k..]);
                    rest_fed = true;
                }
                _ => break,
            }
        }
        assert_eq!(v, whole, "split at {k}");
    }

    // a flipped byte inside a record is reported with that record's LSN
    // (a record whose header lies on one page; byte 18 is header padding,
    // which the CRC covers but nothing else reads)
    let victim = ours[ours.len() / 2..]
        .iter()
        .find(|r| r.lsn.get() % 8192 + 24 <= 8192)
        .unwrap();
    let i = ((victim.lsn.get() - start.get()) / seg.bytes()) as usize;
    let off = (victim.lsn.get() % seg.bytes()) as usize + 18;
    let mut bad = segs[i].clone();
    bad[off] ^= 0x40;
    let segno = SegmentNo(first_segno + i as u64);
    let e = walvault::wal::summary::check_records(&bad, segno, seg).unwrap_err();
    assert!(
        e.to_string().contains(&victim.lsn.to_string()),
        "{e} does not name {}",
        victim.lsn
    );
}

#[test]
fn decoder_matches_pg_waldump() {
    check_against_waldump(PgOptions::default());
}

#[test]
fn decoder_matches_pg_waldump_on_64mib_segments() {
    check_against_waldump(PgOptions {
        wal_segsize_mb: Some(64),
        ..Default::default()
    });
}
