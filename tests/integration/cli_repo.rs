//! `walvault init` and `walvault key` end to end, through the binary.

use std::process::{Command, Output};

use walvault::storage::{list_all, LocalDir, Storage};

use crate::support::s3::S3Server;
use crate::support::walvault_bin;

fn walvault(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(walvault_bin());
    c.args(args);
    for k in [
        "WALVAULT_REPO",
        "WALVAULT_PASSPHRASE",
        "WALVAULT_KEY_FILE",
        "WALVAULT_PASSPHRASE_FILE",
        "WALVAULT_NEW_PASSPHRASE",
    ] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.output().expect("run walvault")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
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

    one_line_error(
        &walvault(&["init", "--repo", r, "--encrypt"], &[]),
        "--encrypt needs a passphrase",
    );
    one_line_error(
        &walvault(&["init", "--repo", r], &pass),
        "--encrypt was not",
    );
    let out = ok(&walvault(&["init", "--repo", r, "--encrypt"], &pass));
    assert!(
        out.contains("encryption aes-256-gcm, block size 8192"),
        "{out}"
    );
    one_line_error(
        &walvault(&["init", "--repo", r, "--encrypt"], &pass),
        "already there",
    );

    let store = LocalDir::open(&repo).unwrap();
    assert_eq!(keys(&store).await, 1);
    let listing = ok(&walvault(&["key", "list", "--repo", r], &pass));
    assert_eq!(listing.lines().count(), 2, "{listing}");

    // a second passphrase, and a key file
    let added = ok(&walvault(
        &["key", "add", "--repo", r, "--label", "dba on call"],
        &[pass[0], ("WALVAULT_NEW_PASSPHRASE", "second passphrase")],
    ));
    let second_id = added.split_whitespace().nth(3).unwrap().to_owned();
    let key_file = dir.path().join("walvault.key");
    std::fs::write(&key_file, format!("{}\n", "k".repeat(44))).unwrap();
    ok(&walvault(
        &[
            "key",
            "add",
            "--repo",
            r,
            "--new-key-file",
            key_file.to_str().unwrap(),
        ],
        &[("WALVAULT_PASSPHRASE", "second passphrase")],
    ));
    assert_eq!(keys(&store).await, 3);
    let by_file = ok(&walvault(
        &[
            "key",
            "list",
            "--repo",
            r,
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(
        by_file.contains("dba on call") && by_file.contains("keyfile"),
        "{by_file}"
    );

    // a wrong passphrase: one clear line, non-zero, nothing written
    let before = list_all(&store, "").await.unwrap();
    let wrong = [("WALVAULT_PASSPHRASE", "not it at all")];
    one_line_error(
        &walvault(&["key", "list", "--repo", r], &wrong),
        "wrong passphrase or key file",
    );
    one_line_error(
        &walvault(
            &["key", "add", "--repo", r],
            &[
                wrong[0],
                ("WALVAULT_NEW_PASSPHRASE", "attacker's passphrase"),
            ],
        ),
        "wrong passphrase or key file",
    );
    one_line_error(
        &walvault(&["key", "list", "--repo", r], &[]),
        "the repository is encrypted",
    );
    assert_eq!(list_all(&store, "").await.unwrap(), before);

    // remove the second passphrase: it no longer opens, the others still do
    ok(&walvault(
        &["key", "remove", &second_id, "--repo", r],
        &pass,
    ));
    one_line_error(
        &walvault(
            &["key", "list", "--repo", r],
            &[("WALVAULT_PASSPHRASE", "second passphrase")],
        ),
        "wrong passphrase or key file",
    );
    ok(&walvault(&["key", "list", "--repo", r], &pass));
    assert_eq!(keys(&store).await, 2);
}

#[tokio::test]
async fn init_refuses_a_non_empty_location_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("something-else"), "x").unwrap();
    let r = repo.to_str().unwrap();
    one_line_error(&walvault(&["init", "--repo", r], &[]), "not empty");
    let empty = dir.path().join("empty");
    let e = empty.to_str().unwrap();
    one_line_error(
        &walvault(&["init", "--repo", e, "--block-size", "12KiB"], &[]),
        "multiple of 8192",
    );
    let out = walvault(&["init", "--repo", e, "--compression", "gzip"], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad option value is a usage error"
    );
    ok(&walvault(
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
    ));
    let out = walvault(&["key", "list", "--repo", e], &[]);
    one_line_error(&out, "not encrypted");
    one_line_error(
        &walvault(
            &[
                "key",
                "list",
                "--repo",
                dir.path().join("nothing").to_str().unwrap(),
            ],
            &[],
        ),
        "run `walvault init` first",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_encrypted_on_s3() {
    let server = S3Server::start().await;
    let mut env: Vec<(&str, String)> = server.env();
    env.push(("WALVAULT_PASSPHRASE", "s3 passphrase".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = server.url("prod/walvault");
    let out = ok(&walvault(&["init", "--repo", &url, "--encrypt"], &env));
    assert!(out.contains("s3://walvault-test/prod/walvault/"), "{out}");
    let store = server.storage("prod/walvault").await;
    assert!(store.head("config").await.unwrap().is_some());
    assert_eq!(keys(&store).await, 1);
    one_line_error(
        &walvault(&["init", "--repo", &url, "--encrypt"], &env),
        "already there",
    );
}

#[test]
fn demo_runs_the_whole_story() {
    let out = walvault(&["demo", "--scale", "1"], &[]);
    let stdout = ok(&out);
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
