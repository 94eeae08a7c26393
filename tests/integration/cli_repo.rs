//! `walvault init` and `walvault key` end to end, through the binary.

use walvault::storage::{list_all, LocalDir, Storage};

use crate::support::s3::S3Server;
use crate::support::Walvault;

/// `walvault ARGS` with the environment variables `env`.
fn walvault(args: &[&str], env: &[(&str, &str)]) -> Walvault {
    Walvault::new().args(args).envs(env.iter().copied())
}

async fn keys(store: &dyn Storage) -> usize {
    list_all(store, "keys/").await.unwrap().len()
}

#[tokio::test]
async fn init_and_keys_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let pass = [("WALVAULT_PASSPHRASE", "first passphrase")];

    walvault(&["init", "--repo", r, "--encrypt"], &[])
        .fails_with_one_line(&["--encrypt needs a passphrase"]);
    walvault(&["init", "--repo", r], &pass).fails_with_one_line(&["--encrypt was not"]);
    let out = walvault(&["init", "--repo", r, "--encrypt"], &pass)
        .ok()
        .stdout;
    assert!(
        out.contains("encryption aes-256-gcm, block size 8192"),
        "{out}"
    );
    walvault(&["init", "--repo", r, "--encrypt"], &pass).fails_with_one_line(&["already there"]);

    let store = LocalDir::open(&repo).unwrap();
    assert_eq!(keys(&store).await, 1);
    let listing = walvault(&["key", "list", "--repo", r], &pass).ok().stdout;
    assert_eq!(listing.lines().count(), 2, "{listing}");

    // a second passphrase, and a key file
    let added = walvault(
        &["key", "add", "--repo", r, "--label", "dba on call"],
        &[pass[0], ("WALVAULT_NEW_PASSPHRASE", "second passphrase")],
    )
    .ok()
    .stdout;
    let second_id = added.split_whitespace().nth(3).unwrap().to_owned();
    let key_file = dir.path().join("walvault.key");
    std::fs::write(&key_file, format!("{}\n", "k".repeat(44))).unwrap();
    walvault(
        &[
            "key",
            "add",
            "--repo",
            r,
            "--new-key-file",
            key_file.to_str().unwrap(),
        ],
        &[("WALVAULT_PASSPHRASE", "second passphrase")],
    )
    .ok();
    assert_eq!(keys(&store).await, 3);
    let by_file = walvault(
        &[
            "key",
            "list",
            "--repo",
            r,
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        &[],
    )
    .ok()
    .stdout;
    assert!(
        by_file.contains("dba on call") && by_file.contains("keyfile"),
        "{by_file}"
    );

    // a wrong passphrase: one clear line, non-zero, nothing written
    let before = list_all(&store, "").await.unwrap();
    let wrong = [("WALVAULT_PASSPHRASE", "not it at all")];
    walvault(&["key", "list", "--repo", r], &wrong)
        .fails_with_one_line(&["wrong passphrase or key file"]);
    walvault(
        &["key", "add", "--repo", r],
        &[
            wrong[0],
            ("WALVAULT_NEW_PASSPHRASE", "attacker's passphrase"),
        ],
    )
    .fails_with_one_line(&["wrong passphrase or key file"]);
    walvault(&["key", "list", "--repo", r], &[])
        .fails_with_one_line(&["the repository is encrypted"]);
    assert_eq!(list_all(&store, "").await.unwrap(), before);

    // remove the second passphrase: it no longer opens, the others still do
    walvault(&["key", "remove", &second_id, "--repo", r], &pass).ok();
    walvault(
        &["key", "list", "--repo", r],
        &[("WALVAULT_PASSPHRASE", "second passphrase")],
    )
    .fails_with_one_line(&["wrong passphrase or key file"]);
    walvault(&["key", "list", "--repo", r], &pass).ok();
    assert_eq!(keys(&store).await, 2);
}

#[tokio::test]
async fn init_refuses_a_non_empty_location_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("something-else"), "x").unwrap();
    let r = repo.to_str().unwrap();
    walvault(&["init", "--repo", r], &[]).fails_with_one_line(&["not empty"]);
    let empty = dir.path().join("empty");
    let e = empty.to_str().unwrap();
    walvault(&["init", "--repo", e, "--block-size", "12KiB"], &[])
        .fails_with_one_line(&["multiple of 8192"]);
    // a bad option value is a usage error
    walvault(&["init", "--repo", e, "--compression", "gzip"], &[]).fails_with(2);
    walvault(
        &[
            "init",
            "--repo",
            e,
            "--block-size",
            "32KiB",
            "--compression",
            "zstd:6",
        ],
        &[],
    )
    .ok();
    walvault(&["key", "list", "--repo", e], &[]).fails_with_one_line(&["not encrypted"]);
    walvault(
        &[
            "key",
            "list",
            "--repo",
            dir.path().join("nothing").to_str().unwrap(),
        ],
        &[],
    )
    .fails_with_one_line(&["run `walvault init` first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_encrypted_on_s3() {
    let server = S3Server::start().await;
    let mut env: Vec<(&str, String)> = server.env();
    env.push(("WALVAULT_PASSPHRASE", "s3 passphrase".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = server.url("prod/walvault");
    let out = walvault(&["init", "--repo", &url, "--encrypt"], &env)
        .ok()
        .stdout;
    assert!(out.contains("s3://walvault-test/prod/walvault/"), "{out}");
    let store = server.storage("prod/walvault").await;
    assert!(store.head("config").await.unwrap().is_some());
    assert_eq!(keys(&store).await, 1);
    walvault(&["init", "--repo", &url, "--encrypt"], &env).fails_with_one_line(&["already there"]);
}

#[test]
fn demo_runs_the_whole_story() {
    // the demo finds the server binaries the tests use
    let bindir = crate::support::pg::bindir(None);
    let stdout = Walvault::new()
        .args(["demo", "--scale", "1"])
        .env("WALVAULT_PG_BINDIR", &bindir)
        .ok()
        .stdout;
    for step in [
        "backup",
        "only",
        "restored",
        "matches the source",
        "pg_checksums --check: all pages verified",
        "DROPPED postgres.public.orders",
        "orders is back with 1000 rows",
        "RTO measured",
        "demo complete",
    ] {
        assert!(stdout.contains(step), "{step:?} missing:\n{stdout}");
    }
}

/// A monitor reads `list --json` as one document: an empty stanza is `[]`,
/// not nothing (it printed nothing at all before).
#[test]
fn list_json_of_an_empty_stanza_is_an_empty_array() {
    let dir = tempfile::tempdir().unwrap();
    let wv = Walvault::new().repo(dir.path().join("repo"));
    wv.args(["init"]).ok();
    assert_eq!(
        wv.args(["list", "--json"]).ok().json(),
        serde_json::json!([])
    );
    assert_eq!(
        wv.args(["list", "--json", "--stanza", "other"]).ok().json(),
        serde_json::json!([])
    );
}
