//! `walvault files`: snapshots of a directory tree and of a Garage bucket
//! into the repository, restored byte for byte with their metadata to a
//! directory and to another bucket; dedup of edited files; a second run
//! that reads nothing; `--as-of`; objects that change while read; sources
//! that are not there; expire and verify; and `restore-pitr --with-files`
//! against a real PostgreSQL.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use walvault::storage::{ObjectAttrs, S3};

use crate::support::s3::{bucket_storage, S3Server, BUCKET};
use crate::support::Walvault;

/// Deterministic bytes that do not compress or dedup by accident.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    crate::support::pseudo_random(n, seed)
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
}

/// Names of many shapes: unicode, spaces, deep, empty.
const SHAPES: &[&str] = &[
    "empty",
    "résumé — 日本語 ✓.txt",
    "with space/and 'quotes' \"double\".txt",
    "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/deep.txt",
    "config/postgresql.conf",
    "certs/server.key",
];

/// A tree of many shapes under `root`: the shapes, 10 000 small files in
/// 100 directories, a 200 MiB file, a 20 MiB file, an empty directory, a
/// link, a private file with an old mtime.
fn make_tree(root: &Path) {
    for (i, rel) in SHAPES.iter().enumerate() {
        let data = if *rel == "empty" {
            Vec::new()
        } else {
            noise(100 + i * 37, i as u64)
        };
        write(root, rel, &data);
    }
    for i in 0..10_000u64 {
        let data = format!("small file {i}\n{}", "x".repeat((i % 300) as usize));
        write(
            root,
            &format!("small/{:02}/{i:05}.txt", i % 100),
            data.as_bytes(),
        );
    }
    write(root, "big/200MiB.bin", &noise(200 << 20, 200));
    write(root, "big/20MiB.bin", &noise(20 << 20, 20));
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::os::unix::fs::symlink("config/postgresql.conf", root.join("link-to-conf")).unwrap();
    std::fs::set_permissions(
        root.join("certs/server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(root.join("config/postgresql.conf"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

/// Every entry under `root`: kind, size, mode, mtime (ns), content hash or
/// link target. Directories' mtimes are compared too.
fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mtime = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            let what = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o} {mtime}", m.mode() & 0o7777)
            } else {
                let hash = hex(&Sha256::digest(std::fs::read(&p).unwrap()));
                format!("file {} {:o} {mtime} {hash}", m.len(), m.mode() & 0o7777)
            };
            out.insert(rel, what);
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `files backup … --json` → the snapshot head.
fn backup(wv: &Walvault, set: &str, source: &str) -> serde_json::Value {
    wv.args([
        "files", "backup", "--set", set, "--source", source, "--json",
    ])
    .ok()
    .json()
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// A walvault config: the repository `repo` and `[s3]` for Garage.
fn config(dir: &Path, repo: &Path, server: &S3Server, extra: &str) -> PathBuf {
    let file = dir.join("walvault.toml");
    std::fs::write(
        &file,
        format!(
            "repo = \"{}\"\n{extra}\n[s3]\n{}",
            repo.display(),
            crate::support::s3::s3_keys(&server.config())
        ),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    file
}

#[test]
fn a_directory_tree_round_trips_with_its_metadata_dedups_edits_and_expires() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src);
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let src_s = src.to_str().unwrap();

    let first = backup(&wv, "etc", src_s);
    let want = describe_tree(&src);
    assert_eq!(num(&first, "entries") as usize, want.len(), "{first}");
    assert_eq!(num(&first, "skipped_count"), 0);
    let content: u64 = 200 * (1 << 20) + 20 * (1 << 20);
    assert!(num(&first, "read_bytes") > content, "{first}");

    // byte-identical with modes, mtimes, links, empty files and directories
    let out = work.path().join("out");
    let r = wv
        .args([
            "files",
            "restore",
            "--set",
            "etc",
            "--to",
            out.to_str().unwrap(),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        num(&r, "files") as usize,
        want.values().filter(|v| v.starts_with("file")).count()
    );
    assert_same_tree(&describe_tree(&out), &want);

    // nothing changed: no content read, nothing stored
    let second = backup(&wv, "etc", src_s);
    assert_eq!(num(&second, "read_bytes"), 0, "{second}");
    assert_eq!(num(&second, "new_bytes"), 0, "{second}");
    assert_eq!(num(&second, "entries"), num(&first, "entries"));

    // 1 MiB changed in the middle of the 200 MiB file, 100 bytes inserted
    // at the start of the 20 MiB one: only the chunks around the edits
    let big = src.join("big/200MiB.bin");
    let mut data = std::fs::read(&big).unwrap();
    let mid = data.len() / 2;
    data[mid..mid + (1 << 20)].copy_from_slice(&noise(1 << 20, 999));
    std::fs::write(&big, &data).unwrap();
    let other = src.join("big/20MiB.bin");
    let mut shifted = noise(100, 5);
    shifted.extend(std::fs::read(&other).unwrap());
    std::fs::write(&other, &shifted).unwrap();
    let third = backup(&wv, "etc", src_s);
    let new = num(&third, "new_bytes");
    eprintln!(
        "dedup: after a 1 MiB edit and a 100-byte insertion: read {} bytes, stored {} new bytes ({} after compression)",
        num(&third, "read_bytes"),
        new,
        num(&third, "stored_bytes")
    );
    assert_eq!(
        num(&third, "read_bytes"),
        data.len() as u64 + shifted.len() as u64
    );
    // a 1 MiB edit touches 1-3 chunks, an insertion 1-2: at most 5 chunks
    // of at most 4 MiB, about 1 MiB each
    assert!((1 << 20..=12 << 20).contains(&new), "new bytes {new}");

    // a drill on a sample: every sampled file restores and equals the
    // source; then one file's content is changed behind its metadata (same
    // size, inode and mtime) and another touched: a drill over every file
    // names the first and counts the second as changed since
    let d = wv
        .args(["files", "drill", "--set", "etc", "--sample", "40", "--json"])
        .ok()
        .json();
    assert_eq!((num(&d, "sampled"), num(&d, "matched")), (40, 40), "{d}");
    let victim = src.join("small/07/00007.txt");
    let original = std::fs::read(&victim).unwrap();
    let mut tampered = original.clone();
    tampered[0] ^= 0x20;
    let victim_mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
    rewrite_in_place(&victim, &tampered, victim_mtime);
    let touched = src.join("small/08/00008.txt");
    let was = std::fs::read(&touched).unwrap();
    let was_mtime = std::fs::metadata(&touched).unwrap().modified().unwrap();
    std::fs::write(&touched, "touched").unwrap();
    let d = wv
        .args([
            "files", "drill", "--set", "etc", "--sample", "100000", "--json",
        ])
        .fails()
        .json();
    assert_eq!(d["mismatches"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["mismatches"][0]["path"], "small/07/00007.txt");
    assert_eq!(num(&d, "changed_since"), 1, "{d}");
    assert_eq!(num(&d, "restored"), num(&d, "sampled"));
    rewrite_in_place(&victim, &original, victim_mtime);
    rewrite_in_place(&touched, &was, was_mtime);

    // restore the newest into a non-empty target: refused, then --overwrite
    let refused = wv
        .args([
            "files",
            "restore",
            "--set",
            "etc",
            "--to",
            out.to_str().unwrap(),
        ])
        .fails_with_one_line(&["not empty", "--overwrite"]);
    assert!(refused.contains(out.to_str().unwrap()), "{refused}");
    wv.args([
        "files",
        "restore",
        "--set",
        "etc",
        "--overwrite",
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&describe_tree(&out), &describe_tree(&src));

    // --path restores part of a snapshot; --snapshot an older one
    let part = work.path().join("part");
    wv.args([
        "files",
        "restore",
        "--set",
        "etc",
        "--path",
        "big/",
        "--snapshot",
    ])
    .arg(first["id"].as_str().unwrap())
    .args(["--to", part.to_str().unwrap()])
    .ok();
    let got = describe_tree(&part);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["big", "big/200MiB.bin", "big/20MiB.bin"],
        "{got:?}"
    );
    assert_eq!(got["big/200MiB.bin"], want["big/200MiB.bin"]);

    // list shows the three snapshots
    let list = wv.args(["files", "list", "--json"]).ok().json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [&first["id"], &second["id"], &third["id"]].map(|v| v.as_str().unwrap())
    );

    // expire keeps the newest (and no DB backup exists) and a held one:
    // the held snapshot stays until released, the others go, their packs
    // are marked then deleted, the newest still verifies deep and restores
    let first_id = first["id"].as_str().unwrap();
    wv.args(["hold", first_id, "--reason", "audit"]).ok();
    let e = wv
        .args(["expire", "--keep-last", "1", "--pack-grace", "0s", "--json"])
        .ok()
        .json();
    let kept: Vec<&str> = e["file_snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["keep"] == true)
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, [first_id, third["id"].as_str().unwrap()], "{e}");
    wv.args(["release", first_id]).ok();
    wv.args(["expire", "--keep-last", "1", "--pack-grace", "0s"])
        .ok();
    let list = wv.args(["files", "list", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let v = wv.args(["files", "verify", "--deep", "--json"]).ok().json();
    assert_eq!(v["passed"], true, "{v}");
    assert!(num(&v, "bytes_read") >= content, "{v}");
    let again = work.path().join("again");
    wv.args([
        "files",
        "restore",
        "--set",
        "etc",
        "--to",
        again.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&describe_tree(&again), &describe_tree(&src));

    // a damaged repository is found: one pack removed
    let packs: Vec<PathBuf> = walk_files(&repo.join("main/packs"));
    std::fs::remove_file(&packs[0]).unwrap();
    let v = wv
        .args(["files", "verify", "--deep", "--json"])
        .fails()
        .json();
    assert_eq!(v["passed"], false, "{v}");
}

/// Write `data` over `path` in place (same inode) and set its mtime back.
fn rewrite_in_place(path: &Path, data: &[u8], mtime: std::time::SystemTime) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(0).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.set_modified(mtime).unwrap();
}

/// The two trees are equal; a failure names only the paths that differ.
fn assert_same_tree(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>) {
    let diff: Vec<String> = want
        .keys()
        .chain(got.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .take(20)
        .map(|k| format!("{k}: got {:?}, want {:?}", got.get(k), want.get(k)))
        .collect();
    assert!(diff.is_empty(), "trees differ:\n{}", diff.join("\n"));
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn as_of_picks_the_newest_snapshot_started_at_or_before_the_moment() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    let mut heads = Vec::new();
    for v in 1..=3 {
        write(&src, "version.txt", format!("version {v}").as_bytes());
        heads.push(backup(&wv, "app", src.to_str().unwrap()));
        std::thread::sleep(Duration::from_millis(1100));
    }
    let started = |h: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(h["started"].as_str().unwrap()).unwrap()
    };
    for (i, h) in heads.iter().enumerate() {
        // just after each snapshot started, before the next: that one
        let t = started(h) + chrono::Duration::milliseconds(500);
        let out = work.path().join(format!("out{i}"));
        let r = wv
            .args([
                "files",
                "restore",
                "--set",
                "app",
                "--as-of",
                &t.to_rfc3339(),
            ])
            .args(["--to", out.to_str().unwrap(), "--json"])
            .ok()
            .json();
        assert_eq!(r["snapshot"]["id"], h["id"]);
        assert_eq!(
            std::fs::read_to_string(out.join("version.txt")).unwrap(),
            format!("version {}", i + 1)
        );
    }
    let before = started(&heads[0]) - chrono::Duration::seconds(5);
    let line = wv
        .args([
            "files",
            "restore",
            "--set",
            "app",
            "--as-of",
            &before.to_rfc3339(),
        ])
        .args(["--to", work.path().join("none").to_str().unwrap()])
        .fails_with_one_line(&["no snapshot started at or before"]);
    assert!(line.contains("the oldest started at"), "{line}");
    // each snapshot's one new chunk is in its own pack: expire (mark, then
    // delete) frees the two older ones, and the newest still restores
    let packs = || walk_files(&repo.join("main/packs")).len();
    assert_eq!(packs(), 3);
    wv.args(["expire", "--keep-last", "1", "--pack-grace", "0s"])
        .ok();
    wv.args(["expire", "--keep-last", "1", "--pack-grace", "0s"])
        .ok();
    assert_eq!(packs(), 1);
    let last = work.path().join("last");
    wv.args([
        "files",
        "restore",
        "--set",
        "app",
        "--to",
        last.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(
        std::fs::read_to_string(last.join("version.txt")).unwrap(),
        "version 3"
    );
    wv.args(["files", "restore", "--set", "nope", "--to", "/tmp/x"])
        .fails_with_one_line(&["has no snapshot", "files list"]);
}

/// Objects for the bucket round trip: key → (bytes, attrs).
fn bucket_tree() -> Vec<(String, Vec<u8>, ObjectAttrs)> {
    let mut v = Vec::new();
    let attrs = |ct: &str, meta: &[(&str, &str)]| ObjectAttrs {
        content_type: Some(ct.to_owned()),
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..ObjectAttrs::default()
    };
    v.push((
        "zero-bytes".into(),
        Vec::new(),
        attrs("application/octet-stream", &[]),
    ));
    v.push((
        "folder/".into(),
        Vec::new(),
        attrs("application/x-directory", &[]),
    ));
    v.push((
        "avatars/user 1/ünïcødé 日本.png".into(),
        noise(5000, 1),
        attrs("image/png", &[("owner", "user-1"), ("uploaded-by", "app")]),
    ));
    v.push((
        "deep/a/b/c/d/e/f/g/h/i/j/obj.json".into(),
        b"{\"k\": 1}".to_vec(),
        ObjectAttrs {
            cache_control: Some("max-age=60".into()),
            content_disposition: Some("attachment; filename=\"obj.json\"".into()),
            ..attrs("application/json", &[("x", "y")])
        },
    ));
    v.push((
        "videos/200MiB.mp4".into(),
        noise(200 << 20, 7),
        attrs("video/mp4", &[("len", "200MiB")]),
    ));
    for i in 0..10_000u64 {
        v.push((
            format!("small/{:02}/{i:05}.txt", i % 100),
            format!("object {i} {}", "y".repeat((i % 200) as usize)).into_bytes(),
            attrs("text/plain", &[]),
        ));
    }
    v
}

async fn upload(s3: &S3, objects: &[(String, Vec<u8>, ObjectAttrs)]) {
    use futures::StreamExt;
    futures::stream::iter(objects.iter().map(|(k, d, a)| async move {
        if d.len() >= 16 << 20 {
            let up = s3.start_multipart(k, a).await.unwrap();
            for (i, part) in d.chunks(16 << 20).enumerate() {
                up.upload_part(i as i32 + 1, Bytes::copy_from_slice(part))
                    .await
                    .unwrap();
            }
            up.complete().await.unwrap();
        } else {
            s3.put_object_with(k, Bytes::from(d.clone()), a)
                .await
                .unwrap();
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
}

/// Every object under the store's prefix: key → (sha256, size, attrs).
async fn describe_bucket(s3: &S3) -> BTreeMap<String, (String, u64, ObjectAttrs)> {
    use futures::StreamExt;
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let (page, next) = s3.list_objects("", token.as_deref()).await.unwrap();
        keys.extend(page.into_iter().map(|o| o.key));
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    futures::stream::iter(keys.into_iter().map(|key| async move {
        let d = s3.object_details(&key).await.unwrap().unwrap();
        let body = s3
            .get_range_if_match(&key, 0, d.size, &d.etag)
            .await
            .unwrap();
        let mut attrs = d.attrs;
        // S3 stores a default type for objects written without one
        attrs.content_type = attrs.content_type.filter(|t| t != "binary/octet-stream");
        (key, (hex(&Sha256::digest(&body)), d.size, attrs))
    }))
    .buffer_unordered(32)
    .collect()
    .await
}

#[test]
fn a_bucket_round_trips_to_another_bucket_and_a_directory_and_bad_sources_commit_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start());
    server.create_bucket("restored");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let conf = config(work.path(), &repo, &server, "");
    let wv = Walvault::new().config(&conf);
    wv.args(["init"]).ok();
    let objects = bucket_tree();
    let source = rt.block_on(bucket_storage(&server.config(), "uploads/"));
    rt.block_on(upload(&source, &objects));
    let src_url = format!("s3://{BUCKET}/uploads/");

    let first = backup(&wv, "uploads", &src_url);
    assert_eq!(num(&first, "entries") as usize, objects.len(), "{first}");
    assert_eq!(num(&first, "skipped_count"), 0);
    let want = rt.block_on(describe_bucket(&source));
    assert_eq!(want.len(), objects.len());

    // a second run over the unchanged bucket reads no content
    let second = backup(&wv, "uploads", &src_url);
    assert_eq!(num(&second, "read_bytes"), 0, "{second}");
    assert_eq!(num(&second, "new_bytes"), 0, "{second}");

    // a drill: a sample restored and equal to the objects, none changed
    let d = wv
        .args([
            "files", "drill", "--set", "uploads", "--sample", "30", "--json",
        ])
        .ok()
        .json();
    assert_eq!(
        (
            num(&d, "sampled"),
            num(&d, "matched"),
            num(&d, "changed_since")
        ),
        (30, 30, 0),
        "{d}"
    );

    // to another bucket: same keys, bytes, content types and metadata
    let r = wv
        .args([
            "files",
            "restore",
            "--set",
            "uploads",
            "--to",
            "s3://restored/copy/",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(num(&r, "files") as usize, objects.len(), "{r}");
    let target = rt
        .block_on(S3::connect("restored", "copy/", &server.config()))
        .unwrap();
    assert_eq!(rt.block_on(describe_bucket(&target)), want);
    // a non-empty bucket target is refused
    wv.args([
        "files",
        "restore",
        "--set",
        "uploads",
        "--to",
        "s3://restored/copy/",
    ])
    .fails_with_one_line(&["not empty", "--overwrite"]);

    // to a directory: same bytes under the same paths; "folder/" is a directory
    let out = work.path().join("out");
    wv.args([
        "files",
        "restore",
        "--set",
        "uploads",
        "--to",
        out.to_str().unwrap(),
    ])
    .ok();
    for (key, data, _) in &objects {
        let p = out.join(key.trim_end_matches('/'));
        if key.ends_with('/') {
            assert!(p.is_dir(), "{key}");
        } else {
            assert_eq!(&std::fs::read(&p).unwrap(), data, "{key}");
        }
    }

    // a directory snapshot into a bucket: files become objects with the
    // same bytes; the link cannot, and is named
    let tree = work.path().join("tree");
    for (rel, data) in [
        ("a/one.txt", &b"one"[..]),
        ("b/c/two.bin", &noise(3 << 20, 2)[..]),
        ("empty", &b""[..]),
    ] {
        write(&tree, rel, data);
    }
    std::os::unix::fs::symlink("a/one.txt", tree.join("link")).unwrap();
    backup(&wv, "tree", tree.to_str().unwrap());
    let r = wv
        .args([
            "files",
            "restore",
            "--set",
            "tree",
            "--to",
            "s3://restored/fromdir/",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(r["skipped"][0]["path"], "link", "{r}");
    let fromdir = rt
        .block_on(S3::connect("restored", "fromdir/", &server.config()))
        .unwrap();
    let got = rt.block_on(describe_bucket(&fromdir));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["a/one.txt", "b/c/two.bin", "empty"]
    );
    for (key, (hash, size, _)) in &got {
        let want = std::fs::read(tree.join(key)).unwrap();
        assert_eq!(
            (hash, *size),
            (&hex(&Sha256::digest(&want)), want.len() as u64),
            "{key}"
        );
    }

    // sources that are not there: one line each, no snapshot stored
    let before = wv.args(["files", "list", "--json"]).ok().json();
    wv.args([
        "files",
        "backup",
        "--set",
        "x",
        "--source",
        "s3://no-such-bucket/x",
    ])
    .fails_with_one_line(&["no-such-bucket", "does not exist"]);
    let denied = config(&work.path().join("denied").tap_mkdir(), &repo, &server, "");
    let text = std::fs::read_to_string(&denied)
        .unwrap()
        .replace(&server.secret_key, &"0".repeat(64));
    std::fs::write(&denied, text).unwrap();
    Walvault::new()
        .config(&denied)
        .args(["files", "backup", "--set", "x", "--source", &src_url])
        .fails_with_one_line(&["access denied"]);
    let closed = crate::support::free_port();
    let unreachable = work.path().join("unreachable.toml");
    std::fs::write(
        &unreachable,
        std::fs::read_to_string(&conf)
            .unwrap()
            .replace(&server.endpoint, &format!("http://127.0.0.1:{closed}")),
    )
    .unwrap();
    Walvault::new()
        .config(&unreachable)
        .repo(&repo)
        .args(["files", "backup", "--set", "x", "--source", &src_url])
        .fails_with_one_line(&["cannot reach"]);
    wv.args(["files", "backup", "--set", "x", "--source", "/no/such/dir"])
        .fails_with_one_line(&["/no/such/dir"]);
    assert_eq!(wv.args(["files", "list", "--json"]).ok().json(), before);
    assert!(!walk_files(&repo.join("main"))
        .iter()
        .any(|p| p.to_string_lossy().contains("file-entries/x")));
}

trait MkDir {
    fn tap_mkdir(self) -> PathBuf;
}
impl MkDir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// An object overwritten again and again while it is backed up is either
/// read whole in one version or left out and reported; never mixed.
#[test]
fn an_object_replaced_while_it_is_read_is_retried_or_reported_never_mixed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3Server::start());
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let conf = config(work.path(), &repo, &server, "");
    let wv = Walvault::new().config(&conf);
    wv.args(["init"]).ok();
    let s3 = rt.block_on(bucket_storage(&server.config(), "hot/"));
    let size = 48usize << 20;
    rt.block_on(put_version(&s3, 1, size));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, s3) = (stop.clone(), s3.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let mut k = 2u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rt.block_on(put_version(&s3, k, size));
                k = k.wrapping_add(1).max(1);
            }
        })
    };
    let out = wv
        .args([
            "files",
            "backup",
            "--set",
            "hot",
            "--source",
            &format!("s3://{BUCKET}/hot/"),
            "--json",
        ])
        .output();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let head = out.json();
    if num(&head, "skipped_count") == 1 {
        assert_eq!(out.code(), Some(2), "left out: exit 2");
        assert!(
            head["skipped"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("replaced while it was read"),
            "{head}"
        );
        eprintln!("the busy object was left out and reported");
        return;
    }
    assert_eq!(out.code(), Some(0));
    let dir = work.path().join("out");
    wv.args([
        "files",
        "restore",
        "--set",
        "hot",
        "--to",
        dir.to_str().unwrap(),
    ])
    .ok();
    let got = std::fs::read(dir.join("busy.bin")).unwrap();
    assert_eq!(got.len(), size);
    assert!(
        got.iter().all(|b| *b == got[0]),
        "a mixture of versions was stored"
    );
    eprintln!("the busy object was stored whole, version {}", got[0]);
}

/// Version `k` of busy.bin: `size` bytes of value `k` (any mixture of two
/// versions shows as two different bytes).
async fn put_version(s3: &S3, k: u8, size: usize) {
    let up = s3
        .start_multipart("busy.bin", &ObjectAttrs::default())
        .await
        .unwrap();
    for (i, part) in vec![k; size].chunks(16 << 20).enumerate() {
        up.upload_part(i as i32 + 1, Bytes::copy_from_slice(part))
            .await
            .unwrap();
    }
    up.complete().await.unwrap();
}

/// `restore-pitr --target-time T --with-files SET --files-to DIR`: the
/// database at T and the newest file snapshot started at or before T; the
/// file names the restored rows point to are exactly the files restored.
#[test]
fn restore_pitr_with_files_brings_back_the_database_and_the_matching_snapshot() {
    let mut a = crate::pitr::Archived::new(&[]);
    a.c.psql("CREATE TABLE uploads (name text PRIMARY KEY)");
    a.ok(&["backup", "--pg", &a.c.conninfo(), "--fast", "--no-expire"]);
    let files = a.work.path().join("uploads");
    let mut heads = Vec::new();
    let mut target = String::new();
    for v in 1..=3 {
        let name = format!("u{v}.txt");
        write(&files, &name, format!("upload {v}").as_bytes());
        a.c.psql(&format!("INSERT INTO uploads VALUES ('{name}')"));
        heads.push(backup(&a.wv, "uploads", files.to_str().unwrap()));
        std::thread::sleep(Duration::from_millis(1100));
        if v == 2 {
            // after the second snapshot and its row, before the third
            target = a.c.psql(
                "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            );
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    a.c.psql("SELECT pg_switch_wal()");
    a.finish_stream();
    let dst = crate::support::pg::PgCluster::for_restore(&a.c.bindir);
    let files_to = a.work.path().join("restored-files");
    std::fs::create_dir_all(&files_to).unwrap();
    crate::support::give_to_postgres(&files_to);
    let out =
        a.wv.as_server_user(&a.c)
            .args(["restore-pitr", "--pgdata"])
            .arg(&dst.datadir)
            .args([
                "--target-time",
                &target,
                "--start",
                "--json",
                "--port",
                &dst.port.to_string(),
            ])
            .arg("--pg-bin")
            .arg(&a.c.bindir)
            .args([
                "--with-files",
                "uploads",
                "--files-to",
                files_to.to_str().unwrap(),
            ])
            .ok();
    let lines = out.json_lines();
    let files_report = lines
        .iter()
        .find(|l| l.get("files").is_some())
        .expect("files report");
    assert_eq!(
        files_report["files"]["snapshot"]["id"], heads[1]["id"],
        "{files_report}"
    );
    let gap = files_report["files_older_by_seconds"].as_f64().unwrap();
    assert!((1.0..30.0).contains(&gap), "gap {gap}");
    let rec = crate::pitr::Recovered {
        port: dst.port,
        sockdir: a.c.sockdir.clone(),
        dst,
    };
    let rows = rec.psql("SELECT string_agg(name, ',' ORDER BY name) FROM uploads");
    let mut names: Vec<String> = std::fs::read_dir(&files_to)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(rows, "u1.txt,u2.txt");
    assert_eq!(names.join(","), rows);
    assert_eq!(
        std::fs::read_to_string(files_to.join("u2.txt")).unwrap(),
        "upload 2"
    );
    rec.stop_and_check();

    // the backup's own moment (--immediate) is before every snapshot:
    // refused before anything is restored
    let stderr = a.pitr_refused(&[
        "--immediate",
        "--with-files",
        "uploads",
        "--files-to",
        "/tmp/never",
    ]);
    assert!(
        stderr.contains("no snapshot started at or before"),
        "{stderr}"
    );
}
