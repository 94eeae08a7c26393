//! `walvault storage-check` end to end, and the errors an operator gets for a
//! wrong repository location: one clear line naming what to fix, never a panic.

use walvault::storage::{list_all, LocalDir};

use crate::support::s3::{S3Server, BUCKET};
use crate::support::{free_port, Walvault};

/// `walvault storage-check ARGS`.
fn storage_check(args: &[&str]) -> Walvault {
    Walvault::new().arg("storage-check").args(args)
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("walvault.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn storage_check_local_dir_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let stdout = storage_check(&["-q"]).repo(&repo).ok().stdout;
    for step in ["put", "get", "list", "delete"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(step) && l.contains(" ok ")),
            "{step}: {stdout}"
        );
    }
    assert!(stdout.contains("works"), "{stdout}");
    let store = LocalDir::open(&repo).unwrap();
    assert!(
        list_all(&store, "").await.unwrap().is_empty(),
        "the probe object was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_check_s3_from_env_and_from_config() {
    let server = S3Server::start().await;
    let out = storage_check(&["--repo", &server.url("envprefix")])
        .envs(server.env())
        .ok();
    assert!(
        out.stdout.contains(&format!("s3://{BUCKET}/envprefix/")),
        "{}",
        out.stdout
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "repo = \"{}\"\nstanza = \"db1\"\n[s3]\nendpoint = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            server.url("cfgprefix"),
            server.endpoint,
            server.access_key,
            server.secret_key
        ),
    );
    storage_check(&["--config", &cfg]).ok();
    let store = server.storage("").await;
    assert!(
        list_all(&store, "").await.unwrap().is_empty(),
        "probe objects left behind"
    );
}

#[test]
fn s3_url_without_bucket() {
    storage_check(&["--repo", "s3:///backups"])
        .fails_with_one_line(&["no bucket name", "s3://BUCKET"]);
}

#[test]
fn no_repository_given() {
    storage_check(&[]).fails_with_one_line(&["no repository given", "--repo", "WALVAULT_REPO"]);
    // the recovery commands, which may also read [[repository]] copies, say
    // the same (and wal-fetch does not answer "not there")
    let dir = tempfile::tempdir().unwrap();
    let wv = crate::support::Walvault::new();
    wv.args(["restore", "--pgdata"])
        .arg(dir.path().join("a"))
        .fails_with_one_line(&["no repository given"]);
    wv.args(["restore-pitr", "--latest", "--pgdata"])
        .arg(dir.path().join("b"))
        .fails_with_one_line(&["no repository given"]);
    let out = wv
        .args(["wal-fetch", "000000010000000000000001"])
        .arg(dir.path().join("c"))
        .fails_with(255);
    assert!(out.stderr.contains("no repository given"), "{}", out.stderr);
}

#[test]
fn unreachable_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[retry]\nmax_attempts = 2\nbase_delay_ms = 10\n",
    );
    let port = free_port(); // nothing listens there
    let env = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "GK000000000000000000000000".into()),
        ("AWS_SECRET_ACCESS_KEY", "0".repeat(64)),
        ("AWS_REGION", "garage".into()),
    ];
    // -qq: only the error itself; the retries are logged as warnings
    storage_check(&["--repo", "s3://some-bucket/x", "--config", &cfg, "-qq"])
        .envs(env)
        .fails_with_one_line(&[
            &format!("cannot reach the S3 endpoint http://127.0.0.1:{port}: Connection refused"),
            "gave up after 2 attempts",
        ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials() {
    let server = S3Server::start().await;
    let mut env = server.env();
    for (k, v) in env.iter_mut() {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "f".repeat(64);
        }
    }
    let started = std::time::Instant::now();
    storage_check(&["--repo", &server.url("x")])
        .envs(env)
        .fails_with_one_line(&["access denied", BUCKET, "AWS_SECRET_ACCESS_KEY"]);
    // permanent: not retried through the whole back-off schedule (the
    // generous bound only tells one from the other)
    assert!(started.elapsed() < std::time::Duration::from_secs(30));

    storage_check(&["--repo", "s3://no-such-bucket/x"])
        .envs(server.env())
        .fails_with_one_line(&["no-such-bucket"]);
}

#[test]
fn local_path_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    storage_check(&[])
        .repo(&file)
        .fails_with_one_line(&["not-a-dir", "is a file, not a directory"]);
}

#[test]
fn read_only_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("ro");
    std::fs::create_dir(&repo).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // root writes anywhere: run as an unprivileged user, as a DBA would
    storage_check(&[])
        .repo(&repo)
        .as_user("postgres")
        .fails_with_one_line(&["ro", "ermission denied", "must be writable"]);
}

#[test]
fn help_lists_only_working_commands() {
    let help = Walvault::new().arg("--help").ok().stdout;
    for cmd in ["storage-check", "init", "key"] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
    for opt in [
        "--repo",
        "--stanza",
        "--config",
        "--log-format",
        "--verbose",
        "--quiet",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
    let out = Walvault::new().arg("--version").ok();
    assert_eq!(
        out.stdout.trim(),
        format!("walvault {}", env!("CARGO_PKG_VERSION"))
    );
}
