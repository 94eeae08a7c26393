//! A real S3-compatible server for tests: a single-node Garage on 127.0.0.1 with
//! free ports, a temp dir, a fresh key and a fresh bucket. Stopped and deleted
//! when dropped.
//!
//! The binary: `WALVAULT_GARAGE_BIN`, else `<cache>/garage/bin/garage` (installed
//! by `scripts/install-garage.sh`), else `garage` on the PATH.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walvault::storage::{S3Config, Storage, S3};

use super::{cache_root, free_port, hex, tmp_base};

/// Bucket every test server creates.
pub const BUCKET: &str = "walvault-test";

/// A running Garage server.
#[derive(Debug)]
pub struct S3Server {
    dir: PathBuf,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id with full rights on [`BUCKET`].
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
    admin_port: u16,
}

/// Whether the Garage admin API on `admin_port` answers `/health` with 200.
pub fn healthy(admin_port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin_port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).contains(" 200")
}

/// Wait until listing the bucket through `store` works (a healthy node can
/// still refuse requests while the layout settles); panic with `log()`
/// after `deadline`.
pub async fn wait_for_bucket(store: &S3, deadline: Instant, log: impl Fn() -> String) {
    loop {
        match store.list_page("", None).await {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => panic!("bucket not ready: {e}\n{}", log()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `s3://walvault-test/<prefix>`: the test bucket, on any Garage.
pub fn bucket_url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

/// The S3 backend for `prefix` of the test bucket through `config` (no
/// retry layer).
pub async fn bucket_storage(config: &S3Config, prefix: &str) -> S3 {
    S3::connect(BUCKET, prefix, config)
        .await
        .expect("S3 client")
}

/// walvault's `[s3]` settings for a Garage endpoint and key.
pub fn garage_config(endpoint: &str, access_key: &str, secret_key: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.to_owned()),
        region: Some("garage".into()),
        access_key_id: Some(access_key.to_owned()),
        secret_access_key: Some(secret_key.to_owned()),
        path_style: Some(true),
        ..S3Config::default()
    }
}

/// A walvault config file at `path` for repository `repo_url` on the store
/// `s3`, readable by every user (a restored server's restore_command runs as
/// its OS user, without the test's environment).
pub fn write_config_file(path: &std::path::Path, repo_url: &str, s3: &S3Config) {
    let text = format!(
        "repo = \"{}\"\n[s3]\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\npath_style = true\n",
        repo_url,
        s3.endpoint.as_deref().unwrap_or_default(),
        s3.region.as_deref().unwrap_or_default(),
        s3.access_key_id.as_deref().unwrap_or_default(),
        s3.secret_access_key.as_deref().unwrap_or_default()
    );
    fs::write(path, text).expect("write config file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod config file");
}

/// Path of the Garage binary, or a panic that says how to install it.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WALVAULT_GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let cached = cache_root().join("garage/bin/garage");
    if cached.exists() {
        return cached;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .find(|g| g.exists())
        })
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        panic!("the Garage S3 server is not installed: run scripts/install-garage.sh (or set WALVAULT_GARAGE_BIN)")
    })
}

impl S3Server {
    /// Start a fresh single-node server and wait until its bucket answers.
    pub async fn start() -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("walvault-garage-")
            .tempdir_in(tmp_base())
            .expect("temp dir")
            .keep();
        let s3_port = free_port();
        let rpc_port = free_port();
        let admin_port = free_port();
        let config = format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "{token}"
"#,
            d = dir.display(),
            secret = hex(32),
            token = hex(32),
        );
        let cfg_path = dir.join("garage.toml");
        fs::write(&cfg_path, config).expect("write garage.toml");
        // garage refuses a config holding secrets that others can read
        fs::set_permissions(&cfg_path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut server = S3Server {
            dir,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            access_key: format!("GK{}", hex(12)),
            secret_key: hex(32),
            admin_port,
        };
        server.spawn();
        server.wait_ready().await;
        server
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .expect("garage log");
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(self.dir.join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.health_ok() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("garage exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "garage did not become healthy:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_for_bucket(&self.storage("").await, deadline, || self.log()).await;
    }

    fn health_ok(&self) -> bool {
        healthy(self.admin_port)
    }

    /// The connection settings of this server as walvault's `[s3]` table.
    pub fn config(&self) -> S3Config {
        garage_config(&self.endpoint, &self.access_key, &self.secret_key)
    }

    /// Environment variables that point the AWS chain (and walvault) at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "garage".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }

    /// `s3://walvault-test/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        bucket_url(prefix)
    }

    /// The S3 backend for `prefix` of the test bucket (no retry layer).
    pub async fn storage(&self, prefix: &str) -> S3 {
        bucket_storage(&self.config(), prefix).await
    }

    /// Stop the server the hard way (SIGKILL, as a crash or a lost node),
    /// keeping its data. A graceful SIGTERM would wait for clients' idle
    /// keep-alive connections, for 10 s and more.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start a stopped server again with the same data and keys.
    pub async fn start_again(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- garage log ---\n{}", self.log());
        }
        self.stop();
        if std::env::var_os("WALVAULT_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
