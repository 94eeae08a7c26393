//! moto's S3 server (PyPI `moto[server]`, installed by
//! `scripts/install-moto.sh`) on 127.0.0.1, with one bucket that has S3
//! Object Lock enabled: Garage ignores lock headers, moto enforces them.
//! In-memory, so every locked object goes with the server.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use walvault::storage::S3Config;

use super::{cache_root, free_port, wait_until};

/// The bucket, created with Object Lock enabled.
pub const LOCK_BUCKET: &str = "walvault-lock";

/// A running moto server; killed on drop.
pub struct MotoServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Where it logs.
    pub log: PathBuf,
}

/// Path of `moto_server`: `WALVAULT_MOTO_BIN`, else the cache's virtualenv.
pub fn moto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WALVAULT_MOTO_BIN") {
        return PathBuf::from(p);
    }
    let p = cache_root().join("moto/bin/moto_server");
    assert!(
        p.exists(),
        "moto is not installed at {}: run scripts/install-moto.sh (scripts/test does)",
        p.display()
    );
    p
}

impl MotoServer {
    /// Start moto and create [`LOCK_BUCKET`] with Object Lock enabled.
    pub async fn start() -> MotoServer {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("walvault-moto-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until(Duration::from_secs(60), "moto to answer", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let server = MotoServer {
            child,
            endpoint,
            log,
        };
        server
            .client()
            .create_bucket()
            .bucket(LOCK_BUCKET)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .expect("create the Object Lock bucket");
        server
    }

    /// An S3 client for checks the repository does not expose (versions).
    pub fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// walvault's `[s3]` settings for this server, locking every object for
    /// `days`.
    pub fn config(&self, days: u32) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            path_style: Some(true),
            object_lock_days: Some(days),
            ..S3Config::default()
        }
    }

    /// `s3://walvault-lock/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{LOCK_BUCKET}/{prefix}")
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
