//! The content-addressed repository on a local directory and on Garage:
//! round trips, dedup, integrity checks, keys, garbage collection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use walvault::codec::BlockId;
use walvault::repo::gc::{self, Lease};
use walvault::repo::{
    BackupFile, FileKind, Index, InitParams, Manifest, ManifestTotals, RepoError, Repository,
    Secret, Session, SessionOptions, SessionStats, StanzaPaths, BLOB_GROUP,
};
use walvault::storage::{list_all, Storage};

use crate::support::backend::{cheap_kdf, Backend};
use crate::support::{pseudo_random, SynthReader};

const PASS: &str = "correct horse battery staple";

async fn init(b: &Backend, encrypted: bool) -> Arc<Repository> {
    b.init_repo(encrypted.then(|| Secret::Passphrase(PASS.into())).as_ref())
        .await
}

fn shapes() -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("empty".to_owned(), Vec::new()),
        ("one-byte".into(), vec![42]),
        ("page-minus-one".into(), pseudo_random(8191, 1)),
        ("page".into(), pseudo_random(8192, 2)),
        ("page-plus-one".into(), pseudo_random(8193, 3)),
        ("zeros-1MiB".into(), vec![0; 1 << 20]),
        ("random-3MiB".into(), pseudo_random(3 << 20, 4)),
        ("text".into(), b"INSERT INTO t VALUES (1);\n".repeat(20_000)),
    ];
    // the same content twice under two names, and a file sharing blocks with another
    let mut shared = pseudo_random(5 * 8192, 4);
    shared.extend_from_slice(b"tail");
    v.push(("copy-of-random-prefix".into(), shared));
    v.push(("page-again".into(), pseudo_random(8192, 2)));
    v
}

/// Store files in one session; returns the manifest entries and the stats.
async fn store(
    repo: &Arc<Repository>,
    files: Vec<(String, Vec<u8>)>,
) -> (Vec<BackupFile>, SessionStats) {
    let session = Session::start(repo.clone(), "main", SessionOptions::default())
        .await
        .unwrap();
    let (session, entries) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (path, data) in files {
            let (blocks, size) = session.store_reader(&mut &data[..]).unwrap();
            assert_eq!(size, data.len() as u64);
            out.push(BackupFile {
                path,
                kind: FileKind::File,
                size,
                mode: 0o600,
                mtime: 0,
                blocks,
            });
        }
        (session, out)
    })
    .await
    .unwrap();
    let stats = session.finish().await.unwrap();
    (entries, stats)
}

fn manifest(files: Vec<BackupFile>, stats: &SessionStats) -> Manifest {
    Manifest {
        version: walvault::repo::MANIFEST_VERSION,
        id: Manifest::next_id(None, chrono::Utc::now()).unwrap(),
        label: "test".into(),
        system_id: walvault::pg::SystemId(1),
        pg_version: 150000,
        timeline: walvault::pg::TimelineId::FIRST,
        start_lsn: walvault::pg::Lsn::new(0),
        stop_lsn: walvault::pg::Lsn::new(0),
        start_time: 0,
        stop_time: 0,
        block_size: 8192,
        totals: ManifestTotals {
            logical_bytes: files.iter().map(|f| f.size).sum(),
            blocks: files.iter().map(|f| f.blocks.len() as u64).sum(),
            new_blocks: stats.new_blocks,
            new_raw_bytes: stats.new_raw_bytes,
            new_stored_bytes: stats.stored_bytes,
        },
        files,
        tablespaces: vec![],
        wal_segment_size: walvault::pg::WalSegSize::DEFAULT,
        corrupt_pages: vec![],
        relnames: vec![],
        from_standby: None,
        incremental_from: None,
        received_bytes: None,
        relations: None,
    }
}

async fn read_file(repo: &Arc<Repository>, index: &Index, blocks: &[BlockId]) -> Vec<u8> {
    let paths = StanzaPaths::new("main");
    let parts: Vec<Bytes> = repo
        .read_blocks(&paths, index, blocks, 16)
        .try_collect()
        .await
        .unwrap();
    parts.concat()
}

async fn pack_bytes(store: &dyn Storage) -> u64 {
    list_all(store, "main/packs/")
        .await
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

async fn round_trip_plain(b: &Backend) {
    round_trip_many_shapes(b, false).await;
}

async fn round_trip_encrypted(b: &Backend) {
    round_trip_many_shapes(b, true).await;
}

async fn round_trip_many_shapes(backend: &Backend, encrypted: bool) {
    {
        let repo = init(backend, encrypted).await;
        let (files, stats) = store(&repo, shapes()).await;
        let m = manifest(files, &stats);
        m.store(&repo, &StanzaPaths::new("main")).await.unwrap();

        let reopened = Arc::new(
            Repository::open(
                backend.store.clone(),
                encrypted.then(|| Secret::Passphrase(PASS.into())).as_ref(),
            )
            .await
            .unwrap(),
        );
        let paths = StanzaPaths::new("main");
        let back = Manifest::load(&reopened, &paths, &m.id).await.unwrap();
        assert_eq!(back, m);
        let (index, _) = Index::load(&reopened, &paths).await.unwrap();
        for ((name, data), f) in shapes().into_iter().zip(&back.files) {
            assert_eq!(f.path, name);
            assert_eq!(
                read_file(&reopened, &index, &f.blocks).await,
                data,
                "{name} differs (encrypted: {encrypted})"
            );
        }
        // all-zero and repeated blocks are stored once
        let zero = &back.files[5];
        assert_eq!(zero.blocks.len(), 128);
        assert!(zero.blocks.iter().all(|id| *id == zero.blocks[0]));
        assert_eq!(
            back.files[9].blocks, back.files[3].blocks,
            "same page, same id"
        );
        let distinct: std::collections::HashSet<_> =
            back.files.iter().flat_map(|f| f.blocks.iter()).collect();
        assert_eq!(stats.new_blocks, distinct.len() as u64);
        assert_eq!(index.len(), distinct.len());
        assert_eq!(pack_bytes(backend.store.as_ref()).await, stats.stored_bytes);
    }
}

async fn second_store_adds_no_pack_bytes(b: &Backend) {
    let repo = init(b, true).await;
    let (_, first) = store(&repo, shapes()).await;
    assert!(first.stored_bytes > 0);
    let packs_before = list_all(b.store.as_ref(), "main/packs/").await.unwrap();
    let (files, second) = store(&repo, shapes()).await;
    assert_eq!(second.new_blocks, 0);
    assert_eq!(second.stored_bytes, 0);
    assert_eq!(second.packs, 0);
    assert_eq!(
        list_all(b.store.as_ref(), "main/packs/").await.unwrap(),
        packs_before
    );
    assert_eq!(
        second.logical_bytes,
        files.iter().map(|f| f.size).sum::<u64>()
    );
}

async fn one_changed_page_in_1gib_file_adds_one_block(b: &Backend) {
    const GIB: u64 = 1 << 30;
    let repo = init(b, true).await;
    let run = |changed: Option<u64>| {
        let repo = repo.clone();
        async move {
            let session = Session::start(repo.clone(), "main", SessionOptions::default())
                .await
                .unwrap();
            let (session, ids) = tokio::task::spawn_blocking(move || {
                let mut r = SynthReader::new(GIB, 99);
                if let Some(p) = changed {
                    r = r.with_changed_page(p);
                }
                let (ids, size) = session.store_reader(&mut r).unwrap();
                assert_eq!(size, GIB);
                (session, ids)
            })
            .await
            .unwrap();
            (session.finish().await.unwrap(), ids)
        }
    };
    let (first, ids1) = run(None).await;
    assert_eq!(first.new_blocks, GIB / 8192);
    let (second, ids2) = run(Some(77_777)).await;
    assert_eq!(second.new_blocks, 1, "one changed page must cost one block");
    assert!(
        second.stored_bytes < 8192 + 4096,
        "stored {} bytes for one page",
        second.stored_bytes
    );
    let differing: Vec<usize> = (0..ids1.len()).filter(|&i| ids1[i] != ids2[i]).collect();
    assert_eq!(differing, [77_777]);
    // the changed page reads back as written
    let (index, _) = Index::load(&repo, &StanzaPaths::new("main")).await.unwrap();
    let page = read_file(&repo, &index, &ids2[77_777..77_778]).await;
    assert_eq!(
        page,
        SynthReader::new(GIB, 99)
            .with_changed_page(77_777)
            .page(77_777)
    );
}

/// In an unencrypted repository every blob carries a checksum of its id and
/// bytes: a changed byte in any blob fails the read, naming the pack.
async fn flipped_blob_bytes_are_detected_unencrypted(b: &Backend) {
    let repo = init(b, false).await;
    let paths = StanzaPaths::new("main");
    let (files, stats) = store(&repo, shapes()).await;
    let blocks: Vec<Vec<BlockId>> = files.iter().map(|f| f.blocks.clone()).collect();
    manifest(files, &stats).store(&repo, &paths).await.unwrap();
    let (index, _) = Index::load(&repo, &paths).await.unwrap();
    let s = b.store.as_ref();
    let mut checked = 0;
    for (pack, entries) in index.pack_entries() {
        let key = paths.pack(&pack);
        let orig = s.get(&key).await.unwrap();
        // the first, a middle and the last blob of each pack, at each end
        let picks = [0, entries.len() / 2, entries.len() - 1];
        for e in picks.iter().map(|&i| entries[i]) {
            for at in [e.offset, e.offset + e.len - 1] {
                let mut bad = orig.to_vec();
                bad[at as usize] ^= 0x01;
                s.put(&key, Bytes::from(bad)).await.unwrap();
                let err = repo.read_block(&paths, &index, &e.id).await.unwrap_err();
                assert_names(&err, &key);
                assert!(err.to_string().contains("checksum mismatch"), "{err}");
                checked += 1;
            }
        }
        s.put(&key, orig).await.unwrap();
    }
    assert!(checked >= 6, "too few blobs checked: {checked}");
    // and the untouched repository reads back whole
    for ((name, data), ids) in shapes().into_iter().zip(&blocks) {
        assert_eq!(read_file(&repo, &index, ids).await, data, "{name}");
    }
}

/// Flip one byte of `key` (in the middle), run `check`, put the original back.
async fn with_flipped_byte<F, Fut>(store: &dyn Storage, key: &str, check: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let orig = store.get(key).await.unwrap();
    let mut bad = orig.to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 0x10;
    store.put(key, Bytes::from(bad)).await.unwrap();
    check().await;
    store.put(key, orig).await.unwrap();
}

fn assert_names(e: &RepoError, key: &str) {
    let msg = e.to_string();
    assert!(msg.contains(key), "error does not name {key}: {msg}");
}

async fn flipped_bytes_are_detected(b: &Backend) {
    let repo = init(b, true).await;
    let paths = StanzaPaths::new("main");
    let (files, stats) = store(&repo, shapes()).await;
    let m = manifest(files, &stats);
    m.store(&repo, &paths).await.unwrap();
    let s = b.store.as_ref();
    let secret = Secret::Passphrase(PASS.into());

    let first = list_all(s, "main/packs/").await.unwrap()[0].clone();
    let (pack, s_len) = (first.key, first.size);
    let (index, _) = Index::load(&repo, &paths).await.unwrap();
    with_flipped_byte(s, &pack, || async {
        // the byte in the middle lands in some blob or in the header: either the
        // blob that holds it or the header check must fail, naming the pack
        // the flipped byte (in the middle of the pack) lies in one blob, whose
        // read must fail, or in the header, which the rebuild reads
        let at = (s_len / 2) as u32;
        let hit = index
            .pack_entries()
            .into_iter()
            .filter(|(p, _)| paths.pack(p) == pack)
            .flat_map(|(_, e)| e)
            .find(|e| e.offset <= at && at < e.offset + e.len);
        match hit {
            Some(e) => assert_names(
                &repo.read_block(&paths, &index, &e.id).await.unwrap_err(),
                &pack,
            ),
            None => assert_names(
                &Index::rebuild_from_packs(&repo, &paths).await.unwrap_err(),
                &pack,
            ),
        }
    })
    .await;

    let index_obj = list_all(s, "main/index/").await.unwrap()[0].key.clone();
    with_flipped_byte(s, &index_obj, || async {
        assert_names(&Index::load(&repo, &paths).await.unwrap_err(), &index_obj);
    })
    .await;

    let manifest_obj = format!("main/backups/{}", m.id);
    with_flipped_byte(s, &manifest_obj, || async {
        assert_names(
            &Manifest::load(&repo, &paths, &m.id).await.unwrap_err(),
            &manifest_obj,
        );
    })
    .await;

    let key_obj = list_all(s, "keys/").await.unwrap()[0].key.clone();
    with_flipped_byte(s, &key_obj, || async {
        assert_names(
            &Repository::open(b.store.clone(), Some(&secret))
                .await
                .unwrap_err(),
            &key_obj,
        );
    })
    .await;

    with_flipped_byte(s, "config", || async {
        assert_names(
            &Repository::open(b.store.clone(), Some(&secret))
                .await
                .unwrap_err(),
            "config",
        );
    })
    .await;

    // truncated manifest, and a manifest from a future walvault
    let orig = s.get(&manifest_obj).await.unwrap();
    s.put(&manifest_obj, orig.slice(..orig.len() - 5))
        .await
        .unwrap();
    assert_names(
        &Manifest::load(&repo, &paths, &m.id).await.unwrap_err(),
        &manifest_obj,
    );
    let mut newer = orig.to_vec();
    newer[4] = 2;
    s.put(&manifest_obj, Bytes::from(newer)).await.unwrap();
    let e = Manifest::load(&repo, &paths, &m.id).await.unwrap_err();
    assert!(
        matches!(e, RepoError::UnsupportedVersion { found: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("upgrade walvault"), "{e}");
    s.put(&manifest_obj, orig).await.unwrap();

    // everything intact again
    let (index, _) = Index::load(&repo, &paths).await.unwrap();
    let back = Manifest::load(&repo, &paths, &m.id).await.unwrap();
    for ((_, data), f) in shapes().into_iter().zip(&back.files) {
        assert_eq!(read_file(&repo, &index, &f.blocks).await, data);
    }
}

async fn wrong_passphrase_writes_nothing(b: &Backend) {
    let repo = init(b, true).await;
    drop(repo);
    let before = list_all(b.store.as_ref(), "").await.unwrap();
    let e = Repository::open(
        b.store.clone(),
        Some(&Secret::Passphrase("not the passphrase".into())),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("wrong passphrase or key file"),
        "{e}"
    );
    let e = Repository::open(b.store.clone(), None).await.unwrap_err();
    assert!(matches!(e, RepoError::KeyNeeded), "{e}");
    assert_eq!(list_all(b.store.as_ref(), "").await.unwrap(), before);
    // init refuses an existing repository and writes nothing either
    let e = Repository::init(b.store.clone(), &InitParams::default(), None, cheap_kdf())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already there"), "{e}");
    assert_eq!(list_all(b.store.as_ref(), "").await.unwrap(), before);
}

async fn keys_added_and_removed(b: &Backend) {
    let repo = init(b, true).await;
    let key_file = Secret::KeyFile(pseudo_random(48, 5));
    let slot = repo
        .add_key(&key_file, "automation", cheap_kdf())
        .await
        .unwrap();
    let by_file = Repository::open(b.store.clone(), Some(&key_file))
        .await
        .unwrap();
    assert_eq!(by_file.config(), repo.config());
    // the same data reads with either secret: block ids agree
    assert_eq!(by_file.hasher().id(b"x"), repo.hasher().id(b"x"));
    let first = repo
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id != slot.id)
        .unwrap();
    repo.remove_key(&first.id).await.unwrap();
    assert!(
        Repository::open(b.store.clone(), Some(&Secret::Passphrase(PASS.into())))
            .await
            .is_err()
    );
    let e = repo.remove_key(&slot.id).await.unwrap_err();
    assert!(e.to_string().contains("only key slot"), "{e}");
    assert!(Repository::open(b.store.clone(), Some(&key_file))
        .await
        .is_ok());
}

async fn index_rebuilt_from_packs_alone(b: &Backend) {
    let repo = init(b, true).await;
    let paths = StanzaPaths::new("main");
    store(&repo, shapes()).await;
    store(&repo, vec![("more".into(), pseudo_random(100_000, 8))]).await;
    let (loaded, _) = Index::load(&repo, &paths).await.unwrap();
    let rebuilt = Index::rebuild_from_packs(&repo, &paths).await.unwrap();
    assert_eq!(rebuilt.len(), loaded.len());
    for (pack, entries) in loaded.pack_entries() {
        for e in entries {
            assert_eq!(rebuilt.get(&e.id).unwrap().pack, pack);
            assert_eq!(rebuilt.get(&e.id).unwrap().entry, e);
        }
    }
}

async fn gc_deletes_only_unreferenced_after_grace(b: &Backend) {
    let repo = init(b, false).await;
    let paths = StanzaPaths::new("main");
    let keep = vec![("keep".to_owned(), pseudo_random(300_000, 10))];
    let drop_me = vec![("drop".to_owned(), pseudo_random(300_000, 12))];
    let (f1, s1) = store(&repo, keep.clone()).await;
    let m1 = manifest(f1, &s1);
    m1.store(&repo, &paths).await.unwrap();
    let (f2, s2) = store(&repo, drop_me).await;
    let m2 = manifest(f2, &s2);
    m2.store(&repo, &paths).await.unwrap();
    // an orphan pack, as a writer that crashed before its index would leave
    let orphan = format!("{}ff/{}", paths.packs(), "ff".repeat(16));
    b.store
        .put(&orphan, Bytes::from_static(b"partial pack"))
        .await
        .unwrap();
    let packs = || async {
        list_all(b.store.as_ref(), "main/packs/")
            .await
            .unwrap()
            .len()
    };
    assert_eq!(packs().await, 3);

    // nothing is unreferenced while both manifests live
    let r = gc::collect(&repo, &paths, Duration::ZERO).await.unwrap();
    assert_eq!(
        (r.marked, r.deleted),
        (1, 0),
        "only the orphan is unreferenced: {r:?}"
    );

    // a writer that is running when backup 2's pack gets marked
    let lease = Lease::acquire(repo.clone(), &paths, "backup")
        .await
        .unwrap();
    let (index, _) = Index::load(&repo, &paths).await.unwrap();
    let dropped_pack = paths.pack(&index.get(&m2.files[0].blocks[0]).unwrap().pack);

    // retention drops backup 2: its pack is marked first, deleted only on a later run
    b.store
        .delete(&format!("main/backups/{}", m2.id))
        .await
        .unwrap();
    let long = gc::collect(&repo, &paths, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        (long.marked, long.deleted, long.waiting),
        (1, 0, 1),
        "{long:?}"
    );

    // the writer started before the mark: it may have deduplicated against the
    // pack, so the pack stays while the writer's lease lives, grace or not
    let held = gc::collect(&repo, &paths, Duration::ZERO).await.unwrap();
    assert!(held.waiting >= 1, "{held:?}");
    assert!(
        b.store.head(&dropped_pack).await.unwrap().is_some(),
        "pack deleted under a live lease"
    );
    lease.release().await;

    let done = gc::collect(&repo, &paths, Duration::ZERO).await.unwrap();
    assert_eq!(held.deleted + done.deleted, 2, "{held:?} {done:?}");
    assert!(b.store.head(&dropped_pack).await.unwrap().is_none());
    assert_eq!(packs().await, 1);
    assert!(b.store.head(&orphan).await.unwrap().is_none());
    // backup 1 is whole
    let (index, _) = Index::load(&repo, &paths).await.unwrap();
    let back = Manifest::load(&repo, &paths, &m1.id).await.unwrap();
    assert_eq!(
        read_file(&repo, &index, &back.files[0].blocks).await,
        keep[0].1
    );
    assert!(gc::plan(&index, &[back], &Default::default())
        .missing
        .is_empty());
}

/// New blocks are stored in groups (config version 4, 128-bit ids) that
/// read back whole; `group_blocks = 1` keeps the format older builds read
/// (version 2, one blob per block, 256-bit ids) and stores the same files
/// in more bytes.
async fn groups_store_less_and_single_blocks_stay_version_2(b: &Backend) {
    let paths = StanzaPaths::new("main");
    // text rows: LZ4 finds more of their repeats across 16 blocks
    let rows = || {
        vec![(
            "rows".to_owned(),
            (0..60_000u32)
                .map(|i| format!("{i:08} | customer {} | 2026-12-0{} |\n", i % 977, i % 9))
                .collect::<String>()
                .into_bytes(),
        )]
    };
    let mut files = rows();
    files.extend(shapes());
    // LZ4 in both: it is the compression that needs the context most
    let with = |store: Arc<dyn Storage>, group_blocks| async move {
        Arc::new(
            Repository::init(
                store,
                &InitParams {
                    group_blocks,
                    compression: walvault::codec::Compression::Lz4,
                    ..InitParams::default()
                },
                Some(&Secret::Passphrase(PASS.into())),
                crate::support::backend::cheap_kdf(),
            )
            .await
            .unwrap(),
        )
    };
    let grouped = with(b.store.clone(), None).await;
    assert_eq!(
        (grouped.config().version, grouped.config().group_blocks()),
        (4, 16)
    );
    let (_, g_rows) = store(&grouped, rows()).await;
    let (stored, _) = store(&grouped, files.clone()).await;
    let (index, _) = Index::load(&grouped, &paths).await.unwrap();
    let mut per_blob: std::collections::HashMap<_, usize> = Default::default();
    for (pack, entries) in index.pack_entries() {
        for e in entries.iter().filter(|e| e.compression & BLOB_GROUP != 0) {
            *per_blob.entry((pack, e.offset, e.len)).or_default() += 1;
        }
    }
    assert!(
        per_blob.values().any(|&n| n == 16) && per_blob.values().all(|&n| (2..=16).contains(&n)),
        "groups of 2 to 16 blocks expected: {per_blob:?}"
    );
    for ((name, data), f) in files.iter().zip(&stored) {
        assert_eq!(
            &read_file(&grouped, &index, &f.blocks).await,
            data,
            "{name}"
        );
        assert!(
            f.blocks.iter().all(|id| id.significant().len() == 16),
            "{name}: 128-bit ids expected"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let single = with(
        Arc::new(walvault::storage::LocalDir::open(dir.path().join("repo")).unwrap()),
        Some(1),
    )
    .await;
    assert_eq!(
        (single.config().version, single.config().group_blocks),
        (2, None)
    );
    let (_, s_rows) = store(&single, rows()).await;
    let (stored1, _) = store(&single, files.clone()).await;
    let (index1, _) = Index::load(&single, &paths).await.unwrap();
    let all: Vec<_> = index1
        .pack_entries()
        .into_iter()
        .flat_map(|(p, e)| e.into_iter().map(move |e| (p, e)))
        .collect();
    assert!(all.iter().all(|(_, e)| e.compression & BLOB_GROUP == 0));
    let blobs: std::collections::HashSet<_> = all.iter().map(|(p, e)| (*p, e.offset)).collect();
    assert_eq!(blobs.len(), all.len(), "one blob per block");
    for ((name, data), f) in files.iter().zip(&stored1) {
        assert_eq!(
            &read_file(&single, &index1, &f.blocks).await,
            data,
            "{name}"
        );
        assert!(f.blocks.iter().all(|id| id.significant().len() == 32));
    }
    assert_eq!(g_rows.new_blocks, s_rows.new_blocks);
    assert!(
        g_rows.stored_bytes * 10 < s_rows.stored_bytes * 9,
        "rows in groups {} bytes, one block at a time {}",
        g_rows.stored_bytes,
        s_rows.stored_bytes
    );
}

/// A recovery planned with the open segment's `.partial` stages the
/// complete segment when the stream completed it (and removed the partial)
/// meanwhile: it holds everything the partial did.
async fn a_partial_completed_since_the_plan_is_staged_whole(b: &Backend) {
    use walvault::pg::{WalFileName, WalSegSize};
    use walvault::restore::fetch::SpoolWriter;
    let repo = init(b, false).await;
    let paths = StanzaPaths::new("main");
    let seg = WalSegSize::DEFAULT;
    let whole = WalFileName::parse("00000001000000000000000B", seg).unwrap();
    let partial = WalFileName::parse("00000001000000000000000B.partial", seg).unwrap();
    let data = pseudo_random(seg.bytes() as usize, 11);
    repo.store_wal(&paths, &whole, data.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = SpoolWriter::new(dir.path(), false, None).unwrap();
    let filled = spool.fill(&repo, &paths, &[partial], 2).await.unwrap();
    assert_eq!((filled.files, filled.missing), (1, None));
    assert_eq!(std::fs::read(spool.path_of(&partial)).unwrap(), data);
    // neither there: still missing
    let other = WalFileName::parse("00000001000000000000000C.partial", seg).unwrap();
    let filled = spool.fill(&repo, &paths, &[other], 2).await.unwrap();
    assert_eq!(filled.missing, Some(other));
}

/// A restore resolves every block of the backup through the index before
/// it writes anything: a manifest naming a block the index lacks fails
/// with the file's name and leaves the target untouched; the same backup
/// without it restores every file byte for byte (also the shapes whose
/// blocks repeat and the all-zero file, which is written as a hole).
async fn restore_resolves_every_block_before_writing(b: &Backend) {
    use walvault::restore::{restore, RestoreError, RestoreOptions};
    let repo = init(b, false).await;
    let paths = StanzaPaths::new("main");
    let (mut files, stats) = store(&repo, shapes()).await;
    let good = manifest(files.clone(), &stats);
    good.store(&repo, &paths).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("r");
    let opts = RestoreOptions {
        backup: Some(good.id.clone()),
        ..Default::default()
    };
    restore(repo.clone(), "main", &target, &opts).await.unwrap();
    for (path, data) in shapes() {
        assert_eq!(std::fs::read(target.join(&path)).unwrap(), data, "{path}");
    }

    files.push(BackupFile {
        path: "unknown-block".into(),
        kind: FileKind::File,
        size: 8192,
        mode: 0o600,
        mtime: 0,
        // an id of the repository's width (128 bits) that no pack holds
        blocks: vec![BlockId({
            let mut id = [7; 32];
            id[16..].fill(0);
            id
        })],
    });
    let mut bad = manifest(files, &stats);
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    bad.id = Manifest::next_id(Some(&good.id), later).unwrap();
    bad.store(&repo, &paths).await.unwrap();
    let target = dir.path().join("r2");
    let opts = RestoreOptions {
        backup: Some(bad.id.clone()),
        ..Default::default()
    };
    let err = restore(repo.clone(), "main", &target, &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RestoreError::MissingBlock { file, .. } if file == "unknown-block"),
        "{err}"
    );
    assert!(!target.exists(), "nothing written before the refusal");
}

/// `load_all_headers` loads several manifests at once: still oldest first,
/// each whole but for its block lists.
async fn headers_load_oldest_first_without_blocks(b: &Backend) {
    let repo = init(b, false).await;
    let paths = StanzaPaths::new("main");
    let (files, stats) = store(&repo, shapes()).await;
    let mut prev: Option<String> = None;
    let start = chrono::Utc::now();
    for n in 0..10i64 {
        // sizes differ: every other manifest lists the files twice
        let mut listed = files.clone();
        if n % 2 == 1 {
            listed.extend(files.iter().map(|f| BackupFile {
                path: format!("copy/{}", f.path),
                ..f.clone()
            }));
        }
        let mut m = manifest(listed, &stats);
        m.id = Manifest::next_id(prev.as_deref(), start + chrono::Duration::seconds(n)).unwrap();
        m.label = format!("n{n}");
        m.store(&repo, &paths).await.unwrap();
        prev = Some(m.id);
    }
    let whole = Manifest::load_all(&repo, &paths).await.unwrap();
    let headers = Manifest::load_all_headers(&repo, &paths).await.unwrap();
    let labels: Vec<&str> = headers.iter().map(|m| m.label.as_str()).collect();
    assert_eq!(labels, (0..10).map(|n| format!("n{n}")).collect::<Vec<_>>());
    for (mut w, h) in whole.into_iter().zip(&headers) {
        assert!(w.files.iter().any(|f| !f.blocks.is_empty()));
        assert!(h.files.iter().all(|f| f.blocks.is_empty()));
        for f in &mut w.files {
            f.blocks.clear();
        }
        assert_eq!(&w, h);
    }
}

crate::on_every_backend!(
    a_partial_completed_since_the_plan_is_staged_whole,
    restore_resolves_every_block_before_writing,
    headers_load_oldest_first_without_blocks,
    groups_store_less_and_single_blocks_stay_version_2,
    round_trip_plain,
    round_trip_encrypted,
    second_store_adds_no_pack_bytes,
    one_changed_page_in_1gib_file_adds_one_block,
    flipped_bytes_are_detected,
    flipped_blob_bytes_are_detected_unencrypted,
    wrong_passphrase_writes_nothing,
    keys_added_and_removed,
    index_rebuilt_from_packs_alone,
    gc_deletes_only_unreferenced_after_grace,
);
