//! PostgreSQL 17+ incremental backups over the protocol (UPLOAD_MANIFEST +
//! BASE_BACKUP INCREMENTAL), stored chain-free: the server sends only the
//! blocks changed since the previous backup, walvault stores the complete
//! files, and a restore needs nothing but that one backup.

use crate::restore_matrix::{assert_checksums_clean, recovers_to_the_reference, verifybackup};
use crate::support::pg::{table_hashes, PgCluster, PgOptions, StopMode, PASSWORD_USER};
use crate::support::Walvault;

/// `walvault info --json` of a backup.
fn info(wv: &Walvault, id: &str) -> serde_json::Value {
    serde_json::from_str(&wv.args(["info", id, "--json"]).ok().stdout).unwrap()
}

fn backup(wv: &Walvault, src: &PgCluster) -> (serde_json::Value, String) {
    let out = wv.args(["backup", "--pg", &src.conninfo(), "--fast"]).ok();
    assert!(out.stdout.contains("complete"), "{}", out.stdout);
    (info(wv, "latest"), format!("{}{}", out.stdout, out.stderr))
}

fn restore_and_check(wv: &Walvault, src: &PgCluster, id: &str) -> PgCluster {
    let dst = PgCluster::for_restore(&src.bindir);
    let out = wv
        .args(["restore", "--backup", id, "--pgdata"])
        .arg(&dst.datadir)
        .ok();
    assert!(
        out.stderr
            .contains("backup_manifest was computed from the restored files"),
        "{}",
        out.stderr
    );
    // pg_verifybackup reads the manifest walvault computed, and it is
    // a real check: a changed relation file fails it
    let (ok, said) = verifybackup(&dst).expect("pg_verifybackup of 17+ is installed");
    assert!(ok, "pg_verifybackup: {said}");
    let rel = src.psql_db(
        PASSWORD_USER,
        "SELECT pg_relation_filepath('pgbench_accounts')",
    );
    let f = dst.datadir.join(&rel);
    let original = std::fs::read(&f).unwrap();
    let mut changed = original.clone();
    changed[8192 * 3 + 100] ^= 0xff;
    std::fs::write(&f, &changed).unwrap();
    let (ok, said) = verifybackup(&dst).unwrap();
    assert!(!ok && said.contains(&rel), "{said}");
    std::fs::write(&f, original).unwrap();
    dst
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_backups_store_complete_files_on_17_and_18() {
    let Some(majors) = crate::support::pg::other_majors_or_skip(&[]) else {
        return;
    };
    let majors: Vec<u32> = majors.into_iter().filter(|&m| m >= 17).collect();
    if majors.is_empty() {
        crate::support::skip("WALVAULT_PG_VERSIONS asks for no major of 17 or later");
        return;
    }
    for major in majors {
        let src = PgCluster::start_with(PgOptions {
            major: Some(major),
            // (autovacuum would touch pages of its own between the backups)
            conf: vec!["summarize_wal = on".into(), "autovacuum = off".into()],
            ..Default::default()
        });
        src.pgbench(&["-i", "-s", "3", "-q"]);
        let work = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            work.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let wv = Walvault::new().repo(work.path().join("repo"));
        wv.args(["init"]).ok();

        // the first backup reads everything
        let (first, _) = backup(&wv, &src);
        assert!(first["incremental_from"].is_null(), "{first}");
        let first_id = first["id"].as_str().unwrap().to_owned();
        let full_bytes = first["received_bytes"].as_u64().unwrap();
        assert!(full_bytes > 40 << 20, "{first}");
        // the reference for exactness: the first backup as a delayed standby
        let mut reference = PgCluster::for_restore(&src.bindir);
        wv.args(["restore", "--backup", &first_id, "--pgdata"])
            .arg(&reference.datadir)
            .ok();
        reference.start_delayed_standby(&src);

        // 1 % of the rows change (through the index: a scan of every
        // page would set hint bits, WAL-logged with checksums on, and
        // change every page); then the second backup under pgbench
        src.psql_db(
            PASSWORD_USER,
            "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid BETWEEN 1000 AND 3999; \
             CREATE TABLE marker(t text); INSERT INTO marker VALUES ('before')",
        );
        let mut bench = src.pgbench_load(5).spawn().unwrap();
        let (second, said) = backup(&wv, &src);
        assert!(bench.wait().unwrap().success());
        let second_id = second["id"].as_str().unwrap().to_owned();
        assert_eq!(second["incremental_from"], first_id.as_str(), "{second}");
        assert!(
            said.contains(&format!("of changes since {first_id}")),
            "{said}"
        );
        // the server sent only changed blocks: a fraction of the first (the
        // changed pages, plus ~4 MiB it always sends whole: free space
        // maps, pg_xact, changed catalogs; 6-8 % at this size)
        let received = second["received_bytes"].as_u64().unwrap();
        assert!(
            received * 5 < full_bytes,
            "incremental received {received} of a full {full_bytes}"
        );
        // and the backup is complete all the same
        assert!(
            second["logical_bytes"].as_u64().unwrap() >= first["logical_bytes"].as_u64().unwrap(),
            "{second}"
        );
        src.psql_db(PASSWORD_USER, "INSERT INTO marker VALUES ('after')");
        src.psql("SELECT pg_switch_wal()");

        // restore the incremental one alone: the content is the source's
        // where recovery ended
        let mut dst = restore_and_check(&wv, &src, &second_id);
        recovers_to_the_reference(&mut dst, &mut reference);
        drop(reference);

        // a third, against the second (whose server manifest lists
        // INCREMENTAL files): quiet source, so the restore equals it now
        src.psql_db(
            PASSWORD_USER,
            "UPDATE pgbench_branches SET bbalance = bbalance + 1; DELETE FROM pgbench_history WHERE tid % 2 = 0",
        );
        let (third, _) = backup(&wv, &src);
        assert_eq!(third["incremental_from"], second_id.as_str(), "{third}");
        let want = table_hashes(&src, PASSWORD_USER);
        let mut dst3 = restore_and_check(&wv, &src, third["id"].as_str().unwrap());
        dst3.start_restored();
        assert_eq!(table_hashes(&dst3, PASSWORD_USER), want);
        dst3.stop(StopMode::Fast);
        assert_checksums_clean(&dst3);

        // --no-incremental reads every file
        let out = wv
            .args([
                "backup",
                "--pg",
                &src.conninfo(),
                "--fast",
                "--no-incremental",
            ])
            .ok();
        assert!(!out.stdout.contains("of changes since"), "{}", out.stdout);
        let fourth = info(&wv, "latest");
        assert!(fourth["incremental_from"].is_null(), "{fourth}");
        assert!(fourth["received_bytes"].as_u64().unwrap() > full_bytes / 2);

        // summarize_wal off: walvault says why and reads everything
        src.psql("ALTER SYSTEM SET summarize_wal = off");
        src.psql("SELECT pg_reload_conf()");
        let (off, said) = backup(&wv, &src);
        assert!(off["incremental_from"].is_null(), "{off}");
        assert!(
            said.contains("reading every file: summarize_wal is off"),
            "{said}"
        );
        src.psql("ALTER SYSTEM SET summarize_wal = on");
        src.psql("SELECT pg_reload_conf()");
        src.psql_db(
            PASSWORD_USER,
            "UPDATE pgbench_tellers SET tbalance = tbalance + 1",
        );
        src.psql("SELECT pg_switch_wal()");
        // (the summarizer catches up on the WAL it missed, when it is
        // still there: the next backup may be incremental again)
        let (on, _) = backup(&wv, &src);

        // the newest backup's server manifest is gone: nothing to send
        let newest = on["id"].as_str().unwrap();
        let kept = walkdir(work.path(), newest);
        std::fs::remove_file(&kept).unwrap();
        let (gone, said) = backup(&wv, &src);
        assert!(gone["incremental_from"].is_null(), "{gone}");
        assert!(
            said.contains(&format!(
                "the previous backup {newest} was stored without PostgreSQL's backup_manifest"
            )),
            "{said}"
        );
        // and the one after that is incremental again
        let (again, _) = backup(&wv, &src);
        assert_eq!(again["incremental_from"], gone["id"], "{again}");

        // the server lost the summaries since then: it refuses the
        // incremental BASE_BACKUP, and the same connection reads everything
        src.psql_db(
            PASSWORD_USER,
            "UPDATE pgbench_tellers SET tbalance = tbalance + 1",
        );
        src.psql("SELECT pg_switch_wal()");
        src.psql("CHECKPOINT");
        // (once the summarizer wrote the summary up to that checkpoint: it
        // would write it again otherwise; summaries end at redo points)
        let lsn = src.psql("SELECT redo_lsn FROM pg_control_checkpoint()");
        crate::support::wait::wait_until(
            std::time::Duration::from_secs(60),
            "the WAL summarizer to catch up",
            || {
                src.psql(&format!(
                    "SELECT summarized_lsn >= '{lsn}'::pg_lsn FROM pg_get_wal_summarizer_state()"
                )) == "t"
            },
        );
        let summaries = src.datadir.join("pg_wal/summaries");
        for e in std::fs::read_dir(&summaries).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let (refused, said) = backup(&wv, &src);
        assert!(refused["incremental_from"].is_null(), "{refused}");
        assert!(
            said.contains("reading every file: the server refused an incremental backup")
                && said.contains("WAL summaries are required"),
            "{said}"
        );
        assert!(refused["received_bytes"].as_u64().unwrap() > full_bytes / 2);
        let want = table_hashes(&src, PASSWORD_USER);
        let mut dst = PgCluster::for_restore(&src.bindir);
        wv.args([
            "restore",
            "--backup",
            refused["id"].as_str().unwrap(),
            "--pgdata",
        ])
        .arg(&dst.datadir)
        .ok();
        dst.start_restored();
        assert_eq!(table_hashes(&dst, PASSWORD_USER), want);
        dst.stop(StopMode::Fast);
    }
}

/// The repository file `pg-manifest/<id>` under `root`.
fn walkdir(root: &std::path::Path, id: &str) -> std::path::PathBuf {
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().unwrap() == "pg-manifest" && p.join(id).exists() {
                return p.join(id);
            }
            let found = walkdir(&p, id);
            if found.exists() {
                return found;
            }
        }
    }
    std::path::PathBuf::new()
}

/// The completion of incremental files by the block assembler, on edge
/// cases a live server rarely produces: a header split over many messages,
/// a file grown past the previous one (zeros, as pg_combinebackup makes
/// them), a file truncated below it, a header with no block, and a file
/// whose blocks do not match its header.
mod assembler {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use bytes::Bytes;
    use walvault::backup::files::FileAssembler;
    use walvault::backup::incremental::{IncrementalBase, MAGIC, PAGE};
    use walvault::backup::stream::ArchiveEvent;
    use walvault::backup::tar::{EntryKind, TarEvent, TarHeader};
    use walvault::repo::{BackupFile, Session, SessionOptions};

    use crate::support::backend::Backend;

    fn page(tag: u8) -> Vec<u8> {
        let mut p = vec![tag; PAGE];
        p[0] = tag.wrapping_add(1);
        p
    }

    fn incremental_file(blocks: &[(u32, u8)], truncation: u32) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(MAGIC.to_ne_bytes());
        f.extend((blocks.len() as u32).to_ne_bytes());
        f.extend(truncation.to_ne_bytes());
        for (b, _) in blocks {
            f.extend(b.to_ne_bytes());
        }
        if !blocks.is_empty() {
            f.resize(f.len().div_ceil(PAGE) * PAGE, 0);
        }
        for (_, tag) in blocks {
            f.extend(page(*tag));
        }
        f
    }

    fn entry(path: &str, data: &[u8], piece: usize) -> Vec<ArchiveEvent> {
        let mut v = vec![ArchiveEvent::Tar(TarEvent::Entry(TarHeader {
            path: path.into(),
            kind: EntryKind::File,
            size: data.len() as u64,
            mode: 0o600,
            mtime: 1,
        }))];
        for c in data.chunks(piece) {
            v.push(ArchiveEvent::Tar(TarEvent::Data(Bytes::copy_from_slice(c))));
        }
        v.push(ArchiveEvent::Tar(TarEvent::EntryEnd));
        v
    }

    /// Store `events` against a previous backup whose `base/5/1` has
    /// pages tagged 10, 11, 12, 13; returns the files with their content.
    async fn assemble(
        events: Vec<ArchiveEvent>,
    ) -> Result<Vec<(BackupFile, Vec<u8>)>, walvault::repo::RepoError> {
        let backend = Backend::local();
        let repo = backend.init_repo(None).await;
        let session = Session::start(repo.clone(), "main", SessionOptions::default())
            .await
            .unwrap();
        let (session, prior) = tokio::task::spawn_blocking(move || {
            let ids: Vec<_> = (10..14)
                .map(|t| session.put_block(&page(t)).unwrap())
                .collect();
            (session, ids)
        })
        .await
        .unwrap();
        let base = Arc::new(IncrementalBase::new(
            "prev".into(),
            Vec::new(),
            [
                ("base/5/1".to_owned(), prior.clone()),
                ("base/5/2".to_owned(), prior),
            ],
        ));
        let (session, files) = tokio::task::spawn_blocking(move || {
            let mut asm =
                FileAssembler::new(&session).with_base(base, Arc::new(AtomicBool::new(true)));
            let mut r = Ok(());
            for e in events {
                r = asm.push(e);
                if r.is_err() {
                    break;
                }
            }
            let files = r.and_then(|()| asm.finish()).and_then(|a| a.into_files());
            (session, files)
        })
        .await
        .unwrap();
        session.finish().await.unwrap();
        let files = files?;
        let index = walvault::repo::Index::load(&repo, &walvault::repo::StanzaPaths::new("main"))
            .await
            .unwrap()
            .0;
        let mut out = Vec::new();
        for f in files {
            let mut content = Vec::new();
            for id in &f.blocks {
                use futures::TryStreamExt;
                let parts: Vec<Bytes> = repo
                    .read_blocks(&walvault::repo::StanzaPaths::new("main"), &index, &[*id], 1)
                    .try_collect()
                    .await
                    .unwrap();
                content.extend(parts.concat());
            }
            assert_eq!(content.len() as u64, f.size, "{}", f.path);
            out.push((f, content));
        }
        Ok(out)
    }

    /// The block ids of finished files move to a temporary file once more
    /// than the limit are held, and come back in order at the end: files
    /// of every length (empty, one byte, a block, blocks and a bit),
    /// directories between them, the same content twice, and the last file
    /// still open when a batch is stored.
    #[tokio::test(flavor = "multi_thread")]
    async fn spilled_ids_come_back_in_order() {
        let backend = Backend::local();
        let repo = backend.init_repo(None).await;
        let session = Session::start(repo.clone(), "main", SessionOptions::default())
            .await
            .unwrap();
        let mut want: Vec<(String, Vec<u8>)> = Vec::new();
        let mut events = Vec::new();
        for i in 0..60usize {
            if i % 7 == 0 {
                events.push(ArchiveEvent::Tar(TarEvent::Entry(TarHeader {
                    path: format!("dir{i}"),
                    kind: EntryKind::Directory,
                    size: 0,
                    mode: 0o700,
                    mtime: 1,
                })));
                events.push(ArchiveEvent::Tar(TarEvent::EntryEnd));
            }
            let len = match i % 5 {
                0 => 0,
                1 => 1,
                2 => PAGE,
                3 => 3 * PAGE + 17,
                _ => 40 * PAGE,
            };
            let data: Vec<u8> = (0..len)
                .map(|b| ((b / PAGE + i % 11) as u8).wrapping_mul(31))
                .collect();
            let path = format!("base/5/{i}");
            events.extend(entry(&path, &data, 5000));
            want.push((path, data));
        }
        let (session, files) = tokio::task::spawn_blocking(move || {
            let mut asm = FileAssembler::new(&session).with_held_ids(5);
            for e in events {
                asm.push(e).unwrap();
            }
            let files = asm.finish().and_then(|a| a.into_files());
            (session, files)
        })
        .await
        .unwrap();
        session.finish().await.unwrap();
        let files: Vec<BackupFile> = files
            .unwrap()
            .into_iter()
            .filter(|f| f.kind == walvault::repo::FileKind::File)
            .collect();
        let paths = walvault::repo::StanzaPaths::new("main");
        let index = walvault::repo::Index::load(&repo, &paths).await.unwrap().0;
        assert_eq!(files.len(), want.len());
        for (f, (path, data)) in files.iter().zip(&want) {
            use futures::TryStreamExt;
            assert_eq!(&f.path, path);
            assert_eq!(f.blocks.len(), data.len().div_ceil(PAGE), "{path}");
            let parts: Vec<Bytes> = repo
                .read_blocks(&paths, &index, &f.blocks, 4)
                .try_collect()
                .await
                .unwrap();
            assert_eq!(&parts.concat(), data, "{path}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn incremental_files_become_whole_files() {
        let mut events = Vec::new();
        // grown: blocks 1 and 5 changed, truncation 6 (the previous file
        // had 4 pages: page 4 is zeros, 5 is sent); the header arrives 5
        // bytes at a time
        events.extend(entry(
            "base/5/INCREMENTAL.1",
            &incremental_file(&[(1, 21), (5, 25)], 6),
            5,
        ));
        // truncated to 2 pages, nothing changed: a header alone
        events.extend(entry("base/5/INCREMENTAL.2", &incremental_file(&[], 2), 3));
        events.extend(entry(
            "backup_label",
            b"START WAL LOCATION: 0/4000028\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\nSTART TIMELINE: 1\n",
            7,
        ));
        // a file the server sent whole keeps its name
        events.extend(entry("base/5/3", &page(40), 1000));
        let files = assemble(events).await.unwrap();
        let by = |p: &str| files.iter().find(|(f, _)| f.path == p).unwrap().1.clone();
        let want: Vec<u8> = [
            page(10),
            page(21),
            page(12),
            page(13),
            vec![0; PAGE],
            page(25),
        ]
        .concat();
        assert_eq!(by("base/5/1"), want);
        assert_eq!(by("base/5/2"), [page(10), page(11)].concat());
        assert_eq!(
            by("backup_label"),
            b"START WAL LOCATION: 0/4000028\nSTART TIMELINE: 1\n"
        );
        assert_eq!(by("base/5/3"), page(40));
        assert!(files.iter().all(|(f, _)| !f.path.contains("INCREMENTAL")));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_incremental_file_that_does_not_match_its_header_fails_the_backup() {
        // two blocks listed, one sent
        let mut bad = incremental_file(&[(0, 1), (2, 3)], 4);
        bad.truncate(bad.len() - PAGE);
        let e = assemble(entry("base/5/INCREMENTAL.1", &bad, 4096))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("fewer blocks than its header lists"),
            "{e}"
        );
        // a file the previous backup does not have
        let e = assemble(entry("base/5/INCREMENTAL.9", &incremental_file(&[], 1), 64))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("base/5/9"), "{e}");
        // not an incremental file at all
        let e = assemble(entry("base/5/INCREMENTAL.1", &[7u8; 64], 64))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
