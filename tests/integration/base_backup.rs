//! BASE_BACKUP against real servers of every installed major: both wire
//! formats, tablespaces, backup_label and tablespace_map, file contents.

use std::collections::BTreeMap;

use walvault::backup::stream::{ArchiveEvent, BaseBackupOptions, BaseBackupStream};
use walvault::backup::tar::{EntryKind, TarEvent};

use crate::support::pg::{other_majors_or_skip, PgCluster};

type Archive = BTreeMap<String, (EntryKind, Vec<u8>)>;

async fn base_backup_of(c: &PgCluster) {
    let ts_dir = c.root.join("ts");
    std::fs::create_dir(&ts_dir).unwrap();
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        nix::unistd::chown(&ts_dir, Some(pg.uid), Some(pg.gid)).unwrap();
    }
    c.psql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'",
        ts_dir.display()
    ));
    c.psql("CREATE TABLE in_ts(i int, t text) TABLESPACE ts; INSERT INTO in_ts SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g; CHECKPOINT");
    let ts_oid: u32 = c
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")
        .parse()
        .unwrap();
    let rel_path = c.psql("SELECT pg_relation_filepath('in_ts')");

    let mut conn = c.replication().await;
    let opts = BaseBackupOptions {
        label: "walvault 'test'".into(),
        fast_checkpoint: true,
        ..Default::default()
    };
    let (mut stream, start) = BaseBackupStream::start(&mut conn, &opts, false)
        .await
        .unwrap();
    assert_eq!(start.timeline.get(), 1);
    assert_eq!(start.tablespaces.len(), 2, "{:?}", start.tablespaces);
    assert!(start
        .tablespaces
        .iter()
        .any(|t| t.oid == Some(ts_oid) && t.location.as_deref() == Some(ts_dir.to_str().unwrap())));

    let mut archives: BTreeMap<Option<u32>, Archive> = BTreeMap::new();
    let mut current = None;
    let mut file: Option<String> = None;
    let mut progress = 0;
    let mut events = Vec::new();
    while stream.next(&mut events).await.unwrap() {
        for e in events.drain(..) {
            match e {
                ArchiveEvent::Archive(oid) => {
                    current = Some(oid);
                    archives.entry(oid).or_default();
                }
                ArchiveEvent::Tar(TarEvent::Entry(h)) => {
                    let a = archives.get_mut(&current.unwrap()).unwrap();
                    a.insert(h.path.clone(), (h.kind, Vec::new()));
                    file = Some(h.path);
                }
                ArchiveEvent::Tar(TarEvent::Data(d)) => {
                    let a = archives.get_mut(&current.unwrap()).unwrap();
                    a.get_mut(file.as_ref().unwrap())
                        .unwrap()
                        .1
                        .extend_from_slice(&d);
                }
                ArchiveEvent::Tar(_) => {}
                ArchiveEvent::Progress(p) => progress = p,
            }
        }
    }
    let (end_lsn, end_tli) = stream.end().unwrap();
    assert!(end_lsn > start.start_lsn);
    assert_eq!(end_tli.get(), 1);
    if c.major >= 15 {
        assert!(progress > 0, "no progress messages");
    }
    assert_eq!(
        archives.keys().copied().collect::<Vec<_>>(),
        vec![None, Some(ts_oid)]
    );

    let main = &archives[&None];
    let label = String::from_utf8(main["backup_label"].1.clone()).unwrap();
    assert!(
        label.contains(&format!("START WAL LOCATION: {}", start.start_lsn)),
        "{label}"
    );
    assert!(label.contains("LABEL: walvault 'test'"), "{label}");
    let map = String::from_utf8(main["tablespace_map"].1.clone()).unwrap();
    assert_eq!(map.trim(), format!("{ts_oid} {}", ts_dir.display()));
    assert_eq!(
        main["PG_VERSION"].1,
        std::fs::read(c.datadir.join("PG_VERSION")).unwrap()
    );
    assert_eq!(main["global/pg_control"].1.len(), 8192);
    assert!(matches!(main["pg_wal"].0, EntryKind::Directory));
    assert!(
        !main.keys().any(|k| k.starts_with("pg_wal/0")),
        "WAL segments in a WAL-less backup"
    );
    // the tablespace's table, byte for byte (nothing writes to it after the checkpoint)
    let in_ts = rel_path
        .strip_prefix(&format!("pg_tblspc/{ts_oid}/"))
        .unwrap();
    let on_disk = std::fs::read(c.datadir.join(&rel_path)).unwrap();
    assert_eq!(archives[&Some(ts_oid)][in_ts].1, on_disk);
    // the connection is still usable
    assert!(conn.identify_system().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backup_pg15() {
    let c = PgCluster::start();
    base_backup_of(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backup_other_majors() {
    let Some(majors) = other_majors_or_skip(&[15]) else {
        return;
    };
    for major in majors {
        let c = PgCluster::start_major(major);
        base_backup_of(&c).await;
    }
}

mod into_repository {
    use std::collections::HashMap;

    use futures::TryStreamExt;
    use walvault::backup::store_base_backup;
    use walvault::backup::stream::{ArchiveEvent, BaseBackupOptions};
    use walvault::backup::tar::TarEvent;

    use walvault::repo::{FileKind, Index, Secret, StanzaPaths};

    use crate::support::backend::Backend;
    use crate::support::pg::{crash, PgCluster};

    fn opts() -> BaseBackupOptions {
        BaseBackupOptions {
            label: "t".into(),
            fast_checkpoint: true,
            ..Default::default()
        }
    }

    /// Record what the server sent: path → content.
    fn recorder(seen: &mut HashMap<String, Vec<u8>>) -> impl FnMut(&ArchiveEvent) + Send + '_ {
        let mut prefix = String::new();
        let mut cur = String::new();
        move |e| match e {
            ArchiveEvent::Archive(None) => prefix.clear(),
            ArchiveEvent::Archive(Some(oid)) => prefix = format!("pg_tblspc/{oid}/"),
            ArchiveEvent::Tar(TarEvent::Entry(h)) => {
                cur = format!("{prefix}{}", h.path);
                seen.insert(cur.clone(), Vec::new());
            }
            ArchiveEvent::Tar(TarEvent::Data(d)) => {
                seen.get_mut(&cur).unwrap().extend_from_slice(d)
            }
            _ => {}
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_read_back_exactly_as_sent_and_dedup() {
        let c = PgCluster::start();
        c.pgbench(&["-i", "-s", "2", "-q"]);
        let b = Backend::local();
        let secret = Secret::Passphrase("backup test passphrase".into());
        let repo = b.init_repo(Some(&secret)).await;
        let mut conn = c.replication().await;
        let mut seen = HashMap::new();
        let first = store_base_backup(
            repo.clone(),
            "main",
            &mut conn,
            &opts(),
            recorder(&mut seen),
        )
        .await
        .unwrap();
        assert!(first.end.0 > first.start.start_lsn);
        let (index, _) = Index::load(&repo, &StanzaPaths::new("main")).await.unwrap();
        let paths = StanzaPaths::new("main");
        let mut files = 0;
        for f in &first.files {
            if f.kind != FileKind::File {
                assert!(f.blocks.is_empty());
                continue;
            }
            let parts: Vec<bytes::Bytes> = repo
                .read_blocks(&paths, &index, &f.blocks, 32)
                .try_collect()
                .await
                .unwrap();
            assert_eq!(parts.concat(), seen[&f.path], "{} differs", f.path);
            assert_eq!(f.size, seen[&f.path].len() as u64);
            files += 1;
        }
        assert!(files > 900, "only {files} files");
        assert_eq!(
            first.stats.logical_bytes,
            seen.values().map(|v| v.len() as u64).sum::<u64>()
        );

        // ~1 % new rows in one table: the next backup stores a small fraction
        c.psql_db("walvault_test", "INSERT INTO pgbench_accounts SELECT aid + 200000, 1, 0, '' FROM generate_series(1, 2000) aid");
        let second = store_base_backup(repo.clone(), "main", &mut conn, &opts(), |_| {})
            .await
            .unwrap();
        let ratio = second.stats.new_raw_bytes as f64 / second.stats.logical_bytes as f64;
        assert!(
            ratio < 0.05,
            "second backup stored {:.1} % of the database",
            ratio * 100.0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_killed_mid_backup_then_the_next_backup_reuses_blocks() {
        let mut c = PgCluster::start();
        c.pgbench(&["-i", "-s", "3", "-q"]);
        let b = Backend::local();
        let repo = b.init_repo(None).await;
        let mut conn = c.replication().await;
        let datadir = c.datadir.clone();
        let mut sent = 0u64;
        let mut killed = false;
        let e = store_base_backup(repo.clone(), "main", &mut conn, &opts(), |e| {
            if let ArchiveEvent::Tar(TarEvent::Data(d)) = e {
                sent += d.len() as u64;
                if sent > 24 << 20 && !killed {
                    killed = true;
                    // the whole server at once: a walsender outlives a
                    // killed postmaster until it notices, and could finish
                    // the backup meanwhile
                    crash(&datadir);
                }
            }
        })
        .await
        .unwrap_err();
        assert!(killed);
        assert!(e.to_string().contains("PostgreSQL"), "{e}");
        // nothing was committed: no manifest
        assert!(
            walvault::storage::list_all(b.store.as_ref(), "main/backups/")
                .await
                .unwrap()
                .is_empty()
        );

        c.kill9();
        c.start_again();
        let mut conn = c.replication().await;
        let second = store_base_backup(repo.clone(), "main", &mut conn, &opts(), |_| {})
            .await
            .unwrap();
        let fresh = second.stats.new_raw_bytes;
        assert!(
            fresh + (16 << 20) < second.stats.logical_bytes,
            "the resumed backup stored {fresh} of {} bytes: the blocks sent before the crash were not reused",
            second.stats.logical_bytes
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_page_is_reported_with_file_and_block() {
    use walvault::backup::{store_base_backup, BackupError};

    use crate::support::backend::Backend;
    use crate::support::pg::StopMode;

    let mut c = PgCluster::start();
    c.psql("CREATE TABLE victim(i int, t text); INSERT INTO victim SELECT g, repeat('v', 200) FROM generate_series(1, 1000) g; CHECKPOINT");
    let rel = c.psql("SELECT pg_relation_filepath('victim')");
    c.stop(StopMode::Fast);
    let path = c.datadir.join(&rel);
    let mut data = std::fs::read(&path).unwrap();
    assert!(data.len() >= 3 * 8192);
    data[2 * 8192 + 4000] ^= 0xff; // inside block 2, away from the header
    std::fs::write(&path, data).unwrap();
    // walvault's own page checksum check agrees with the server: this page
    // and no other (every other page of the stopped cluster verifies)
    let check = walvault::pg::checksum::check_data_directory(&c.datadir).unwrap();
    assert!(check.pages > 100, "{check:?}");
    assert_eq!(check.bad.len(), 1, "{:?}", check.bad);
    assert_eq!(check.bad[0].file, path);
    assert_eq!(check.bad[0].block, 2);
    c.start_again();

    let b = Backend::local();
    let repo = b.init_repo(None).await;
    let mut conn = c.replication().await;
    let opts = BaseBackupOptions {
        label: "t".into(),
        fast_checkpoint: true,
        ..Default::default()
    };
    let e = store_base_backup(repo.clone(), "main", &mut conn, &opts, |_| {})
        .await
        .unwrap_err();
    match &e {
        BackupError::CorruptPages { pages } => {
            assert_eq!(pages.len(), 1, "{pages:?}");
            assert_eq!(pages[0].file, rel);
            assert_eq!(pages[0].block, 2);
        }
        other => panic!("expected corrupt pages, got {other}"),
    }
    assert!(e.to_string().contains(&format!("{rel} block 2")), "{e}");
    assert!(
        walvault::storage::list_all(b.store.as_ref(), "main/backups/")
            .await
            .unwrap()
            .is_empty()
    );

    // kept on request, with the page named
    let mut conn = c.replication().await;
    let opts = BaseBackupOptions {
        allow_checksum_failures: true,
        ..opts
    };
    let kept = store_base_backup(repo, "main", &mut conn, &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(kept.corrupt_pages.len(), 1, "{:?}", kept.corrupt_pages);
    assert_eq!(kept.corrupt_pages[0].file, rel);
    assert_eq!(kept.corrupt_pages[0].block, 2);
    assert!(kept.files.iter().any(|f| f.path == rel));
    kept.lease.release().await;
}
