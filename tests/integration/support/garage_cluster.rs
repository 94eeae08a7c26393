//! A real multi-node S3-compatible store for tests: N Garage nodes on
//! 127.0.0.1 with free ports, one zone each, `replication_factor = 3` and
//! `consistency_mode = "consistent"` (reads and writes need a quorum of 2 of
//! 3 copies), one key with full rights on [`BUCKET`]. Nodes can be killed to
//! play a lost node; everything is stopped and deleted when dropped.
//!
//! Clients talk to node 1's S3 endpoint; the other nodes hold replicas.

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use walvault::storage::{S3Config, S3};

use super::s3::{garage_bin, garage_config, wait_for_bucket, BUCKET};
use super::{free_port, hex, tmp_base};

/// Copies Garage keeps of every block and metadata entry.
pub const REPLICATION_FACTOR: usize = 3;

/// One node: its directory (config, metadata, data, log) and ports.
#[derive(Debug)]
struct Node {
    dir: PathBuf,
    child: Option<Child>,
    s3_port: u16,
    rpc_port: u16,
    admin_port: u16,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .expect("garage log");
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(self.config())
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
    }

    /// `garage -c <this node's config> args...`: the CLI talks to this node
    /// over RPC.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(garage_bin())
            .arg("-c")
            .arg(self.config())
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run the garage CLI")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}\n{}\n--- node log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `<node id>@127.0.0.1:<rpc port>`, once the node listens for RPC
    /// (the CLI reads the id from the node's key file, which is written
    /// before the node listens).
    async fn wait_id(&mut self, deadline: Instant) -> String {
        loop {
            let out = self.cli(&["node", "id", "-q"]);
            if out.status.success() && TcpStream::connect(("127.0.0.1", self.rpc_port)).is_ok() {
                return String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("garage exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "garage node in {} did not start:\n{}",
                self.dir.display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn health_ok(&self) -> bool {
        super::s3::healthy(self.admin_port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running Garage cluster.
#[derive(Debug)]
pub struct GarageCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// Access key id with full rights on [`BUCKET`].
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
}

impl GarageCluster {
    /// Start `n` (at least [`REPLICATION_FACTOR`]) nodes, connect them, give
    /// each its own zone in a layout, create the key and the bucket, and wait
    /// until every node is healthy and the bucket answers.
    pub async fn start(n: usize) -> GarageCluster {
        assert!(n >= REPLICATION_FACTOR, "{n} nodes cannot hold 3 copies");
        let dir = tempfile::Builder::new()
            .prefix("walvault-garage-cluster-")
            .tempdir_in(tmp_base())
            .expect("temp dir")
            .keep();
        let rpc_secret = hex(32);
        let mut cluster = GarageCluster {
            nodes: Vec::with_capacity(n),
            access_key: format!("GK{}", hex(12)),
            secret_key: hex(32),
            dir,
        };
        for i in 1..=n {
            let node = Node {
                dir: cluster.dir.join(format!("n{i}")),
                child: None,
                s3_port: free_port(),
                rpc_port: free_port(),
                admin_port: free_port(),
            };
            fs::create_dir(&node.dir).expect("node dir");
            write_config(&node, &rpc_secret);
            cluster.nodes.push(node);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut ids = Vec::with_capacity(n);
        for node in &mut cluster.nodes {
            node.spawn();
        }
        for node in &mut cluster.nodes {
            ids.push(node.wait_id(deadline).await);
        }
        let first = &cluster.nodes[0];
        for id in &ids[1..] {
            first.cli_ok(&["node", "connect", id]);
        }
        // one zone per node: with 3 zones and 3 copies, each node holds a
        // copy of everything, and any 2 nodes make a quorum
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().expect("node id");
            let zone = format!("dc{}", i + 1);
            assign_when_known(first, &zone, short, deadline).await;
        }
        first.cli_ok(&["layout", "apply", "--version", "1"]);
        first.cli_ok(&[
            "key",
            "import",
            "--yes",
            "-n",
            "test-key",
            &cluster.access_key,
            &cluster.secret_key,
        ]);
        first.cli_ok(&["bucket", "create", BUCKET]);
        first.cli_ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            &cluster.access_key,
        ]);
        for (i, node) in cluster.nodes.iter().enumerate() {
            while !node.health_ok() {
                assert!(
                    Instant::now() < deadline,
                    "garage node {} did not become healthy:\n{}",
                    i + 1,
                    node.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let store = cluster.storage("").await;
        wait_for_bucket(&store, deadline, || cluster.nodes[0].log()).await;
        cluster
    }

    /// `http://127.0.0.1:PORT` of node `i` (1-based).
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i - 1].s3_port)
    }

    /// The connection settings of node 1 as walvault's `[s3]` table.
    pub fn config(&self) -> S3Config {
        garage_config(&self.endpoint(1), &self.access_key, &self.secret_key)
    }

    /// `s3://walvault-test/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        super::s3::bucket_url(prefix)
    }

    /// The S3 backend for `prefix` of the bucket through node 1 (no retry layer).
    pub async fn storage(&self, prefix: &str) -> S3 {
        super::s3::bucket_storage(&self.config(), prefix).await
    }

    /// SIGKILL node `i` (1-based), as a crash or a lost machine; its data stays.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i - 1].kill();
    }

    /// Files in node `i`'s data directory (1-based): the data blocks it
    /// holds (small objects live inline in the metadata instead).
    pub fn data_files(&self, i: usize) -> usize {
        fn count(dir: &std::path::Path) -> usize {
            fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| match e.file_type() {
                            Ok(t) if t.is_dir() => count(&e.path()),
                            Ok(_) => 1,
                            Err(_) => 0,
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        count(&self.nodes[i - 1].dir.join("data"))
    }

    /// Whether node `i` (1-based) is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i - 1]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, node) in self.nodes.iter().enumerate() {
                eprintln!("--- garage node {} log ---\n{}", i + 1, node.log());
            }
        }
        for node in &mut self.nodes {
            node.kill();
        }
        if std::env::var_os("WALVAULT_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn write_config(node: &Node, rpc_secret: &str) {
    let d = node.dir.display();
    let config = format!(
        r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = {REPLICATION_FACTOR}
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"
bootstrap_peers = []

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
        rpc = node.rpc_port,
        s3 = node.s3_port,
        admin = node.admin_port,
        token = hex(32),
    );
    let path = node.config();
    fs::write(&path, config).expect("write garage.toml");
    // garage refuses a config holding secrets that others can read
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// `layout assign` of node `id` to `zone`, retried until node 1 has heard of
/// the node (right after `node connect` its peer list may still lag).
async fn assign_when_known(first: &Node, zone: &str, id: &str, deadline: Instant) {
    loop {
        let out = first.cli(&["layout", "assign", "-z", zone, "-c", "1G", id]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "garage layout assign {zone} {id} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
