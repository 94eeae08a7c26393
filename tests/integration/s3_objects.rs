//! The S3 backend's calls for objects of a file source or target (a bucket of
//! user uploads that walvault backs up and restores), on a real Garage:
//! arbitrary keys, attributes that round-trip, reads pinned to one ETag,
//! multipart uploads that complete or leave nothing.

use std::collections::BTreeMap;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use bytes::Bytes;
use walvault::storage::{ListedObject, ObjectAttrs, Storage, StorageError, S3};

use crate::support::pseudo_random;
use crate::support::s3::{S3Server, BUCKET};

/// Every object under `prefix`, page after page.
async fn list_all_objects(s3: &S3, prefix: &str) -> Vec<ListedObject> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let (page, next) = s3.list_objects(prefix, token.as_deref()).await.unwrap();
        all.extend(page);
        match next {
            Some(t) => token = Some(t),
            None => return all,
        }
    }
}

/// A plain SDK client on `server`, to see what walvault's calls do not show
/// (multipart uploads in progress).
fn raw_client(server: &S3Server) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&server.endpoint)
        .region(Region::new("garage"))
        .credentials_provider(Credentials::new(
            &server.access_key,
            &server.secret_key,
            None,
            None,
            "test",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Multipart uploads in progress under `prefix` (full keys).
async fn uploads_in_progress(server: &S3Server, prefix: &str) -> Vec<String> {
    let out = raw_client(server)
        .list_multipart_uploads()
        .bucket(BUCKET)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    out.uploads()
        .iter()
        .filter_map(|u| u.key().map(str::to_owned))
        .collect()
}

fn attrs(content_type: &str, meta: &[(&str, &str)]) -> ObjectAttrs {
    ObjectAttrs {
        content_type: Some(content_type.to_owned()),
        content_disposition: Some("attachment; filename=\"report.pdf\"".into()),
        cache_control: Some("max-age=3600".into()),
        metadata: meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        ..ObjectAttrs::default()
    }
}

#[tokio::test]
async fn s3_objects_list_details_and_pinned_reads() {
    let server = S3Server::start().await;
    // keys relative to a prefix, as a file source configured as s3://bucket/uploads
    let s3 = server.storage("uploads").await;
    assert_eq!((s3.bucket(), s3.prefix()), (BUCKET, "uploads/"));
    // something outside the prefix, which no listing may show
    server
        .storage("")
        .await
        .put_object_with("outside", Bytes::from_static(b"o"), &ObjectAttrs::default())
        .await
        .unwrap();

    let photo = Bytes::from(pseudo_random(100_000, 1));
    let photo_attrs = attrs(
        "image/jpeg",
        &[("owner", "user-17"), ("album", "summer 2024")],
    );
    let objects: [(&str, Bytes, ObjectAttrs); 5] = [
        (
            "a.txt",
            Bytes::from_static(b"hello"),
            ObjectAttrs::default(),
        ),
        ("docs/", Bytes::new(), ObjectAttrs::default()),
        (
            "docs/Résumé final (v2) – été.pdf",
            Bytes::from_static(b"%PDF"),
            attrs("application/pdf", &[]),
        ),
        (
            "docs/sub dir/x y.bin",
            Bytes::from(pseudo_random(3000, 2)),
            ObjectAttrs::default(),
        ),
        ("photos/ü 1.jpg", photo.clone(), photo_attrs.clone()),
    ];
    for (key, data, a) in &objects {
        s3.put_object_with(key, data.clone(), a).await.unwrap();
    }

    // the listing: every key as written, in byte order, with sizes and ETags
    let listed = list_all_objects(&s3, "").await;
    let got: Vec<(&str, u64)> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    let mut want: Vec<(&str, u64)> = objects
        .iter()
        .map(|(k, d, _)| (*k, d.len() as u64))
        .collect();
    want.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    assert_eq!(got, want);
    for o in &listed {
        assert!(!o.etag.is_empty() && !o.etag.contains('"'), "{o:?}");
        assert!(o.last_modified.is_some(), "{o:?}");
    }
    let docs: Vec<String> = list_all_objects(&s3, "docs/")
        .await
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        docs,
        [
            "docs/",
            "docs/Résumé final (v2) – été.pdf",
            "docs/sub dir/x y.bin"
        ]
    );

    // HEAD: size, the listing's ETag, and the attributes written
    let photo_listed = listed.iter().find(|o| o.key == "photos/ü 1.jpg").unwrap();
    let details = s3.object_details("photos/ü 1.jpg").await.unwrap().unwrap();
    assert_eq!(details.size, photo.len() as u64);
    assert_eq!(details.etag, photo_listed.etag);
    assert!(details.last_modified.is_some());
    assert_eq!(details.attrs, photo_attrs);
    let marker = s3.object_details("docs/").await.unwrap().unwrap();
    assert_eq!((marker.size, marker.attrs.metadata.len()), (0, 0));
    assert!(s3.object_details("no such key").await.unwrap().is_none());

    // reads pinned to the ETag: the right bytes, in pieces and at the edges
    let etag = details.etag.clone();
    let key = "photos/ü 1.jpg";
    for (start, len) in [(0u64, 10u64), (99_990, 10), (50_000, 1), (99_995, 100)] {
        let got = s3.get_range_if_match(key, start, len, &etag).await.unwrap();
        let end = (start + len).min(photo.len() as u64) as usize;
        assert_eq!(&got[..], &photo[start as usize..end], "range {start}+{len}");
    }
    let quoted = format!("\"{etag}\"");
    let whole = s3
        .get_range_if_match(key, 0, u64::MAX, &quoted)
        .await
        .unwrap();
    assert_eq!(whole, photo);
    assert!(s3
        .get_range_if_match(key, 5, 0, &etag)
        .await
        .unwrap()
        .is_empty());
    assert!(s3
        .get_range_if_match(key, photo.len() as u64, 10, &etag)
        .await
        .unwrap()
        .is_empty());
    match s3
        .get_range_if_match(key, photo.len() as u64 + 1, 10, &etag)
        .await
    {
        Err(StorageError::InvalidRange { size, .. }) => assert_eq!(size, photo.len() as u64),
        other => panic!("range past the end: {other:?}"),
    }

    // overwritten since the ETag was taken: Changed, not the new bytes
    s3.put_object_with(key, Bytes::from(pseudo_random(100_000, 9)), &photo_attrs)
        .await
        .unwrap();
    let e = s3.get_range_if_match(key, 0, 10, &etag).await.unwrap_err();
    assert!(matches!(e, StorageError::Changed { .. }), "{e:?}");
    assert!(!e.is_transient(), "{e}");
    assert!(
        e.to_string().contains(key),
        "error does not name the key: {e}"
    );
    // deleted since: NotFound
    let a_etag = s3.object_details("a.txt").await.unwrap().unwrap().etag;
    s3.delete("a.txt").await.unwrap();
    let e = s3
        .get_range_if_match("a.txt", 0, 10, &a_etag)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}

#[tokio::test]
async fn s3_objects_multipart_and_missing_bucket() {
    let server = S3Server::start().await;
    let s3 = server.storage("restore").await;

    // two parts, 5 MiB + 1 byte, uploaded concurrently and out of order
    let data = Bytes::from(pseudo_random(5 * 1024 * 1024 + 1, 5));
    let a = attrs("video/mp4", &[("origin", "camera 2")]);
    let key = "media/clip ✓.mp4";
    let upload = s3.start_multipart(key, &a).await.unwrap();
    assert!(
        s3.object_details(key).await.unwrap().is_none(),
        "visible before completion"
    );
    let (p2, p1) = tokio::join!(
        upload.upload_part(2, data.slice(5 * 1024 * 1024..)),
        upload.upload_part(1, data.slice(..5 * 1024 * 1024)),
    );
    p1.unwrap();
    p2.unwrap();
    assert!(s3.object_details(key).await.unwrap().is_none());
    upload.complete().await.unwrap();
    let details = s3.object_details(key).await.unwrap().unwrap();
    assert_eq!(details.size, data.len() as u64);
    assert_eq!(details.attrs, a);
    let back = s3
        .get_range_if_match(key, 0, u64::MAX, &details.etag)
        .await
        .unwrap();
    assert!(back == data, "multipart object read back differs");
    let across = s3
        .get_range_if_match(key, 5 * 1024 * 1024 - 2, 10, &details.etag)
        .await
        .unwrap();
    assert_eq!(&across[..], &data[5 * 1024 * 1024 - 2..]);
    assert!(uploads_in_progress(&server, "restore/").await.is_empty());

    // aborted: no object, no upload left
    let upload = s3
        .start_multipart("media/aborted", &ObjectAttrs::default())
        .await
        .unwrap();
    upload
        .upload_part(1, data.slice(..5 * 1024 * 1024))
        .await
        .unwrap();
    assert_eq!(uploads_in_progress(&server, "restore/").await.len(), 1);
    upload.abort().await;
    assert!(s3.object_details("media/aborted").await.unwrap().is_none());
    assert!(uploads_in_progress(&server, "restore/").await.is_empty());
    let keys: Vec<String> = list_all_objects(&s3, "")
        .await
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, [key]);

    // dropped unfinished (a task that failed): aborted in the background
    let upload = s3
        .start_multipart("media/dropped", &ObjectAttrs::default())
        .await
        .unwrap();
    upload
        .upload_part(1, Bytes::from_static(b"x"))
        .await
        .unwrap();
    drop(upload);
    crate::support::wait_until_async(
        std::time::Duration::from_secs(30),
        "the dropped upload to be aborted",
        async || uploads_in_progress(&server, "restore/").await.is_empty(),
    )
    .await;

    // a bucket that does not exist: a clear, permanent error
    let missing = S3::connect("no-such-bucket-here", "", &server.config())
        .await
        .unwrap();
    let e = missing.list_objects("", None).await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(e.to_string().contains("no-such-bucket-here"), "{e}");
    assert!(!e.is_transient(), "{e}");
}
