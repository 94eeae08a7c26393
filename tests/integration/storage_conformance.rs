//! One conformance suite for every storage backend: each check below runs
//! against the local-directory backend and against a real Garage server, through
//! the same retry layer the command line uses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use walvault::storage::{
    list_all, Fault, FaultInjecting, LocalDir, RetryPolicy, Retrying, Storage, StorageError,
};

use crate::support::backend::Backend;
use crate::support::pseudo_random;

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

async fn missing_key(b: &Backend) {
    let s = &b.store;
    let e = s.get("no/such/key").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        e.to_string().contains("no/such/key"),
        "error does not name the key: {e}"
    );
    assert!(s
        .get_range("no/such/key", 0, 10)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(s.head("no/such/key").await.unwrap().is_none());
    s.delete("no/such/key").await.unwrap();
    // a "directory" is not an object
    s.put("dir/inner", Bytes::from_static(b"x")).await.unwrap();
    assert!(s.get("dir").await.unwrap_err().is_not_found());
    assert!(s.head("dir").await.unwrap().is_none());
}

async fn empty_object(b: &Backend) {
    let s = &b.store;
    s.put("empty", Bytes::new()).await.unwrap();
    assert_eq!(s.get("empty").await.unwrap().len(), 0);
    assert_eq!(s.head("empty").await.unwrap().unwrap().size, 0);
    assert_eq!(s.get_range("empty", 0, 10).await.unwrap().len(), 0);
    let listed = list_all(s.as_ref(), "empty").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].key.as_str(), listed[0].size), ("empty", 0));
}

async fn large_object(b: &Backend) {
    // above the S3 multipart threshold (32 MiB), and not a multiple of the part size
    let data = Bytes::from(pseudo_random(64 * 1024 * 1024 + 12345, 7));
    let s = &b.store;
    s.put("big/object", data.clone()).await.unwrap();
    assert_eq!(
        s.head("big/object").await.unwrap().unwrap().size,
        data.len() as u64
    );
    let back = s.get("big/object").await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(sha(&back), sha(&data), "64 MiB object read back differs");
    // ranges across the 16 MiB part boundaries and at the very end
    for (start, len) in [
        (16 * 1024 * 1024 - 5, 10u64),
        (32 * 1024 * 1024 - 1, 2),
        (data.len() as u64 - 7, 100),
    ] {
        let got = s.get_range("big/object", start, len).await.unwrap();
        let end = (start + len).min(data.len() as u64) as usize;
        assert_eq!(&got[..], &data[start as usize..end], "range {start}+{len}");
    }
}

async fn ranged_reads_at_edges(b: &Backend) {
    let data = Bytes::from(pseudo_random(1000, 3));
    let s = &b.store;
    s.put("r", data.clone()).await.unwrap();
    let cases: [(u64, u64, std::ops::Range<usize>); 8] = [
        (0, 0, 0..0),
        (0, 1, 0..1),
        (999, 1, 999..1000),
        (999, 10, 999..1000),
        (1000, 5, 1000..1000),
        (0, u64::MAX, 0..1000),
        (500, 500, 500..1000),
        (123, 77, 123..200),
    ];
    for (start, len, want) in cases {
        let got = s.get_range("r", start, len).await.unwrap();
        assert_eq!(&got[..], &data[want.clone()], "range {start}+{len}");
    }
    for start in [1001, 5000] {
        match s.get_range("r", start, 1).await {
            Err(StorageError::InvalidRange { size: 1000, .. }) => {}
            other => panic!("range from {start} past the end: {other:?}"),
        }
    }
}

async fn list_pagination_and_prefixes(b: &Backend) {
    let s = &b.store;
    let keys: Vec<String> = (0..1100).map(|i| format!("many/k{i:04}")).collect();
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let s = s.clone();
            async move { s.put(&k, Bytes::from(k.clone().into_bytes())).await }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    for k in [
        "manyx/other",
        "many-sibling",
        "other/a",
        "a/b/c",
        "a/b.d",
        "a/bc",
    ] {
        s.put(k, Bytes::from_static(b"1")).await.unwrap();
    }

    let first = s.list_page("many/", None).await.unwrap();
    assert!(
        first.next.is_some(),
        "1100 keys fit in one page: no pagination exercised"
    );
    assert!(first.objects.len() < 1100);
    let all = list_all(s.as_ref(), "many/").await.unwrap();
    let got: Vec<&str> = all.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(got, keys.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(all.iter().all(|o| o.size == o.key.len() as u64));

    assert_eq!(list_all(s.as_ref(), "many").await.unwrap().len(), 1102);
    assert_eq!(list_all(s.as_ref(), "nothing/").await.unwrap().len(), 0);
    assert_eq!(list_all(s.as_ref(), "").await.unwrap().len(), 1106);
    // byte order, whatever the backend's layout: '.' < '/' < 'c'
    let nested: Vec<String> = list_all(s.as_ref(), "a/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(nested, ["a/b.d", "a/b/c", "a/bc"]);
    let partial: Vec<String> = list_all(s.as_ref(), "a/b")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(partial, ["a/b.d", "a/b/c", "a/bc"]);
    let inner: Vec<String> = list_all(s.as_ref(), "a/b/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(inner, ["a/b/c"]);
}

async fn overwrite(b: &Backend) {
    let s = &b.store;
    s.put("k", Bytes::from_static(b"first version, longer"))
        .await
        .unwrap();
    s.put("k", Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(&s.get("k").await.unwrap()[..], b"second");
    assert_eq!(s.head("k").await.unwrap().unwrap().size, 6);
    assert_eq!(list_all(s.as_ref(), "k").await.unwrap().len(), 1);
}

async fn delete(b: &Backend) {
    let s = &b.store;
    s.put("d/x", Bytes::from_static(b"x")).await.unwrap();
    s.put("d/y", Bytes::from_static(b"y")).await.unwrap();
    s.delete("d/x").await.unwrap();
    assert!(s.head("d/x").await.unwrap().is_none());
    assert!(s.get("d/x").await.unwrap_err().is_not_found());
    let left: Vec<String> = list_all(s.as_ref(), "d/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, ["d/y"]);
    s.delete("d/x").await.unwrap();
}

/// A version of the object written by one writer: header (writer, round) then a
/// fill that depends on the header, so a torn or mixed read is detected.
fn version(writer: u8, round: u8) -> Bytes {
    let mut v = vec![writer, round];
    v.extend(pseudo_random(
        2 * 1024 * 1024,
        u64::from(writer) << 8 | u64::from(round),
    ));
    Bytes::from(v)
}

async fn concurrent_writers_same_key(b: &Backend) {
    let s = &b.store;
    s.put("shared", version(0, 0)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 1..=4u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..4u8 {
                s.put("shared", version(w, r)).await.unwrap();
            }
        }));
    }
    let mut reads = 0;
    for _ in 0..2 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..12 {
                let got = s.get("shared").await.unwrap();
                assert!(got.len() >= 2, "short read: {} bytes", got.len());
                assert_eq!(
                    got,
                    version(got[0], got[1]),
                    "torn read: not one whole version"
                );
            }
        }));
        reads += 12;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let last = s.get("shared").await.unwrap();
    assert_eq!(last, version(last[0], last[1]));
    assert!(
        last[0] >= 1 && last[1] == 3,
        "the last object is not a writer's final version"
    );
    assert!(reads > 0);
}

async fn transient_retried_permanent_surfaced(b: &Backend) {
    let faulty = Arc::new(FaultInjecting::new(b.raw.clone()));
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    let s = Retrying::new(faulty.clone(), policy);

    faulty.fail_next(2, Fault::Transient);
    s.put("retry/k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(faulty.calls(), 3, "two transient failures, then success");
    assert_eq!(&b.raw.get("retry/k").await.unwrap()[..], b"v");

    faulty.fail_next(1, Fault::Permanent);
    let e = s.get("retry/k").await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(faulty.calls(), 4, "a permanent error must not be retried");

    faulty.fail_next(3, Fault::Transient);
    let e = s.head("retry/k").await.unwrap_err();
    assert!(e.to_string().contains("gave up after 3 attempts"), "{e}");
    assert_eq!(faulty.calls(), 7);

    // a missing object is permanent, also through the retry layer
    let e = s.get("retry/missing").await.unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(faulty.calls(), 8);
}

async fn invalid_keys_refused(b: &Backend) {
    for k in ["../escape", "/abs", "a//b", ".tmp/x"] {
        match b.store.put(k, Bytes::from_static(b"x")).await {
            Err(StorageError::InvalidKey { .. }) => {}
            other => panic!("{k:?}: {other:?}"),
        }
    }
    assert!(list_all(b.store.as_ref(), "").await.unwrap().is_empty());
}

crate::on_every_backend!(
    missing_key,
    empty_object,
    large_object,
    ranged_reads_at_edges,
    list_pagination_and_prefixes,
    overwrite,
    delete,
    concurrent_writers_same_key,
    transient_retried_permanent_surfaced,
    invalid_keys_refused,
);

/// Local-only: a put that fails after its data is written (the target is a
/// directory, so the rename fails) reports the key, leaves the old objects
/// intact, and leaves no temp file behind.
#[tokio::test]
async fn local_failed_put_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDir::open(dir.path()).unwrap();
    store.put("a/b", Bytes::from_static(b"1")).await.unwrap();
    let e = store.put("a", Bytes::from_static(b"2")).await.unwrap_err();
    assert!(
        e.to_string().contains("\"a\""),
        "error does not name the key: {e}"
    );
    assert_eq!(&store.get("a/b").await.unwrap()[..], b"1");
    assert_eq!(
        std::fs::read_dir(dir.path().join(".tmp")).unwrap().count(),
        0
    );
    let keys: Vec<String> = list_all(&store, "")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["a/b"]);
}
