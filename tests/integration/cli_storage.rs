//! `walvault storage-check` end to end, and the errors an operator gets for a
//! wrong repository location: one clear line naming what to fix, never a panic.

use std::process::{Command, Output};

use walvault::storage::{list_all, LocalDir};

use crate::support::s3::{S3Server, BUCKET};
use crate::support::{free_port, walvault_bin};

fn walvault(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(walvault_bin());
    c.args(args)
        .env_remove("WALVAULT_REPO")
        .env_remove("WALVAULT_CONFIG");
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ] {
        c.env_remove(k);
    }
    c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    c.output().expect("run walvault")
}

/// The command failed with exit code 1 and exactly one line on stderr that
/// contains every one of `needles`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {}", lines[0]);
    }
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
    let out = walvault(
        &["storage-check", "--repo", repo.to_str().unwrap(), "-q"],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = walvault(
        &["storage-check", "--repo", &server.url("envprefix")],
        &server.env(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("s3://{BUCKET}/envprefix/")));

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
    let out = walvault(&["storage-check", "--config", &cfg], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = server.storage("").await;
    assert!(
        list_all(&store, "").await.unwrap().is_empty(),
        "probe objects left behind"
    );
}

#[test]
fn s3_url_without_bucket() {
    let out = walvault(&["storage-check", "--repo", "s3:///backups"], &[]);
    assert_one_line_error(&out, &["no bucket name", "s3://BUCKET"]);
}

#[test]
fn no_repository_given() {
    let out = walvault(&["storage-check"], &[]);
    assert_one_line_error(&out, &["no repository given", "--repo", "WALVAULT_REPO"]);
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
    let out = walvault(
        &[
            "storage-check",
            "--repo",
            "s3://some-bucket/x",
            "--config",
            &cfg,
            "-qq",
        ],
        &env,
    );
    assert_one_line_error(
        &out,
        &[
            &format!("cannot reach the S3 endpoint http://127.0.0.1:{port}: Connection refused"),
            "gave up after 2 attempts",
        ],
    );
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
    let out = walvault(&["storage-check", "--repo", &server.url("x")], &env);
    assert_one_line_error(&out, &["access denied", BUCKET, "AWS_SECRET_ACCESS_KEY"]);
    // permanent: not retried through the whole back-off schedule
    assert!(started.elapsed() < std::time::Duration::from_secs(30));

    let out = walvault(
        &["storage-check", "--repo", "s3://no-such-bucket/x"],
        &server.env(),
    );
    assert_one_line_error(&out, &["no-such-bucket"]);
}

#[test]
fn local_path_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = walvault(&["storage-check", "--repo", file.to_str().unwrap()], &[]);
    assert_one_line_error(&out, &["not-a-dir", "is a file, not a directory"]);
}

#[test]
fn read_only_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("ro");
    std::fs::create_dir(&repo).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = if nix::unistd::geteuid().is_root() {
        // root writes anywhere: run as an unprivileged user, as a DBA would,
        // from a copy of the binary that user can reach
        let bin = dir.path().join("walvault");
        std::fs::copy(walvault_bin(), &bin).unwrap();
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&bin)
            .args(["storage-check", "--repo", repo.to_str().unwrap()])
            .env_remove("WALVAULT_REPO")
            .output()
            .unwrap()
    } else {
        walvault(&["storage-check", "--repo", repo.to_str().unwrap()], &[])
    };
    assert_one_line_error(&out, &["ro", "ermission denied", "must be writable"]);
}

#[test]
fn help_lists_only_working_commands() {
    let out = walvault(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
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
    let out = walvault(&["--version"], &[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("walvault {}", env!("CARGO_PKG_VERSION"))
    );
}
