//! BASE_BACKUP against real servers of every installed major: both wire
//! formats, tablespaces, backup_label and tablespace_map, file contents.

use std::collections::BTreeMap;

use walvault::backup::stream::{ArchiveEvent, BaseBackupOptions, BaseBackupStream};
use walvault::backup::tar::{EntryKind, TarEvent};
use walvault::pg::{ConnParams, PgConnection};

use crate::support::pg::{requested_majors, PgCluster, PgOptions};

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

    let params = ConnParams::parse_with_env(
        &format!("host={} port={} user=postgres", c.sockdir.display(), c.port),
        &|_| None,
    )
    .unwrap();
    let mut conn = PgConnection::connect(&params, true).await.unwrap();
    let opts = BaseBackupOptions {
        label: "walvault 'test'".into(),
        fast_checkpoint: true,
        max_rate: None,
    };
    let (mut stream, start) = BaseBackupStream::start(&mut conn, &opts).await.unwrap();
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
    let majors: Vec<u32> = requested_majors()
        .into_iter()
        .filter(|&m| m != 15)
        .collect();
    if majors.is_empty() {
        eprintln!("SKIPPED: WALVAULT_PG_VERSIONS asks for no major other than 15");
        return;
    }
    for major in majors {
        let c = PgCluster::start_with(PgOptions {
            major: Some(major),
            ..PgOptions::default()
        });
        base_backup_of(&c).await;
    }
}
