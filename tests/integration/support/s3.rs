//! A real S3-compatible server for tests: a single-node Garage on 127.0.0.1 with
//! free ports, a temp dir, a fresh key and a fresh bucket. Stopped and deleted
//! when dropped.
//!
//! Garage does not exit when one of its ports is taken (it logs "Address
//! already in use" and serves the others): a start that finds a port taken
//! between [`free_port`] and the bind starts over on new ports.
//!
//! The binary: `WALVAULT_GARAGE_BIN`, else `<cache>/garage/bin/garage` (installed
//! by `scripts/install-garage.sh`), else `garage` on the PATH.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use walvault::storage::{S3Config, Storage, S3};

use super::{cache_root, free_port, hex, tmp_base, wait_for_async, Walvault};

/// How often a start is tried on new ports when one was taken.
pub const START_ATTEMPTS: u32 = 3;

/// What Garage logs when a port it binds is taken.
const PORT_TAKEN: &str = "Address already in use";

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

/// Wait (up to a minute) until listing the bucket through `store` works (a
/// healthy node can still refuse requests while the layout settles).
pub async fn wait_for_bucket(store: &S3) {
    wait_for_async(
        Duration::from_secs(60),
        "the bucket to answer",
        async || {
            store
                .list_page("", None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await
}

/// Whether Garage's log, from byte `from` on, says a port was taken.
pub fn port_taken(log: &Path, from: u64) -> bool {
    fs::read(log).is_ok_and(|text| {
        text.get(from as usize..)
            .is_some_and(|new| String::from_utf8_lossy(new).contains(PORT_TAKEN))
    })
}

/// The length of file `path` (0 when missing): where its next lines start.
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
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
pub fn write_config_file(path: &Path, repo_url: &str, s3: &S3Config) {
    let text = format!("repo = \"{repo_url}\"\n[s3]\n{}", s3_keys(s3));
    fs::write(path, text).expect("write config file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod config file");
}

/// The keys of an `[s3]` table (or `[repository.s3]`) for `s3`.
pub fn s3_keys(s3: &S3Config) -> String {
    format!(
        "endpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\npath_style = true\n",
        s3.endpoint.as_deref().unwrap_or_default(),
        s3.region.as_deref().unwrap_or_default(),
        s3.access_key_id.as_deref().unwrap_or_default(),
        s3.secret_access_key.as_deref().unwrap_or_default()
    )
}

/// A config file `DIR/walvault.toml` written by [`write_config_file`] for
/// repository `repo_url` on the store `s3`, and `walvault … --config FILE`.
pub fn config_repo(dir: &Path, repo_url: &str, s3: &S3Config) -> (PathBuf, Walvault) {
    let file = dir.join("walvault.toml");
    write_config_file(&file, repo_url, s3);
    let wv = Walvault::new().config(&file);
    (file, wv)
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

/// The ports of one Garage node on 127.0.0.1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ports {
    pub s3: u16,
    pub rpc: u16,
    pub admin: u16,
}

/// Write `DIR/garage.toml` for a node on ports from `port` (the S3 port,
/// then RPC, then admin), with `settings` (lines of the top-level table:
/// replication), on empty metadata and data directories (nothing of a
/// start that failed stays).
pub fn configure_node(
    dir: &Path,
    settings: &str,
    rpc_secret: &str,
    port: &mut impl FnMut() -> u16,
) -> Ports {
    for d in ["meta", "data"] {
        let _ = fs::remove_dir_all(dir.join(d));
    }
    let ports = Ports {
        s3: port(),
        rpc: port(),
        admin: port(),
    };
    let config = format!(
        r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
{settings}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
        d = dir.display(),
        rpc = ports.rpc,
        s3 = ports.s3,
        admin = ports.admin,
        token = hex(32),
    );
    let path = dir.join("garage.toml");
    fs::write(&path, config).expect("write garage.toml");
    // garage refuses a config holding secrets that others can read
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    ports
}

/// `garage -c CONFIG`, logging warnings and errors only.
pub fn garage(config: &Path) -> Command {
    let mut c = Command::new(garage_bin());
    c.arg("-c").arg(config).env("RUST_LOG", "warn");
    c
}

/// Spawn a Garage server, its output appended to `log`.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("garage log");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start garage")
}

impl S3Server {
    /// Start a fresh single-node server and wait until its bucket answers;
    /// on new ports when one was taken meanwhile.
    pub async fn start() -> S3Server {
        S3Server::start_on(free_port).await
    }

    /// [`S3Server::start`] on ports from `port` (to test the retry with a
    /// port that is taken).
    pub async fn start_on(mut port: impl FnMut() -> u16) -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("walvault-garage-")
            .tempdir_in(tmp_base())
            .expect("temp dir")
            .keep();
        let mut server = S3Server {
            dir,
            child: None,
            endpoint: String::new(),
            access_key: format!("GK{}", hex(12)),
            secret_key: hex(32),
            admin_port: 0,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.configure(&mut port);
            let log_from = file_len(&server.log_path());
            server.spawn();
            if server.wait_healthy(log_from).await {
                wait_for_bucket(&server.storage("").await).await;
                return server;
            }
            server.stop();
            assert!(
                attempt < START_ATTEMPTS,
                "garage found a port taken or did not become healthy {START_ATTEMPTS} times:\n{}",
                server.log()
            );
        }
        unreachable!("every attempt returns or panics")
    }

    /// A config on new free ports (nothing of an attempt that failed stays).
    fn configure(&mut self, port: &mut impl FnMut() -> u16) {
        let ports = configure_node(&self.dir, "replication_factor = 1", &hex(32), port);
        self.endpoint = format!("http://127.0.0.1:{}", ports.s3);
        self.admin_port = ports.admin;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("garage.log")
    }

    fn spawn(&mut self) {
        let mut cmd = garage(&self.dir.join("garage.toml"));
        cmd.args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET);
        self.child = Some(spawn_logged(cmd, &self.log_path()));
    }

    /// Wait (up to 40 s) until the server answers `/health` and its S3
    /// port answers HTTP: true; false when its log (from byte `log_from`
    /// on) says a port was taken, or when it is still not healthy then (a
    /// port lost to another process that accepts connections but never
    /// answers, or a node that hangs at start: CI saw one with an empty
    /// log); the caller starts it again on new ports.
    async fn wait_healthy(&mut self, log_from: u64) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            if port_taken(&self.log_path(), log_from) {
                return false;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("garage exited ({status}):\n{}", self.log());
            }
            let (health, s3) = (self.health_ok(), self.s3_answers());
            if health && s3 {
                return true;
            }
            if std::time::Instant::now() >= until {
                eprintln!(
                    "garage is not healthy after 40 s (admin /health: {health}, S3 port answers: {s3}); starting it again on new ports\n{}",
                    self.log()
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn health_ok(&self) -> bool {
        healthy(self.admin_port)
    }

    /// The S3 endpoint answers an HTTP request (any status) within a second.
    fn s3_answers(&self) -> bool {
        use std::io::{Read, Write};
        let Some(addr) = self.endpoint.strip_prefix("http://") else {
            return false;
        };
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut b = [0u8; 16];
        matches!(s.read(&mut b), Ok(n) if n > 0)
    }

    /// Create bucket `name`, usable with this server's key.
    pub fn create_bucket(&self, name: &str) {
        let conf = self.dir.join("garage.toml");
        for args in [
            vec!["bucket", "create", name],
            vec![
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                name,
                "--key",
                &self.access_key,
            ],
        ] {
            let out = garage(&conf).args(&args).output().expect("garage");
            assert!(
                out.status.success(),
                "garage {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
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

    /// Start a stopped server again with the same data, keys and ports
    /// (clients know its endpoint: a port taken meanwhile is an error).
    pub async fn start_again(&mut self) {
        let log_from = file_len(&self.log_path());
        self.spawn();
        assert!(
            self.wait_healthy(log_from).await,
            "garage did not become healthy again (a port taken while it was stopped, or a start that hung):\n{}",
            self.log()
        );
        wait_for_bucket(&self.storage("").await).await;
    }

    /// Garage's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
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
