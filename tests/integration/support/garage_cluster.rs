//! A real multi-node S3-compatible store for tests: N Garage nodes on
//! 127.0.0.1 with free ports, one zone each, `replication_factor = 3` and
//! `consistency_mode = "consistent"` (reads and writes need a quorum of 2 of
//! 3 copies), one key with full rights on [`BUCKET`]. Nodes can be killed to
//! play a lost node; everything is stopped and deleted when dropped.
//!
//! Clients talk to node 1's S3 endpoint; the other nodes hold replicas.
//! A node that finds a port taken between [`free_port`] and the bind starts
//! over on new ports, before the nodes are connected.

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Output};
use std::time::Duration;

use walvault::storage::{S3Config, S3};

use super::s3::{
    configure_node, file_len, garage, garage_config, port_taken, spawn_logged, wait_for_bucket,
    Ports, BUCKET, START_ATTEMPTS,
};
use super::{free_port, hex, tmp_base, wait_for_async, wait_until_async};

/// Copies Garage keeps of every block and metadata entry.
pub const REPLICATION_FACTOR: usize = 3;

/// One node: its directory (config, metadata, data, log) and ports.
#[derive(Debug)]
struct Node {
    dir: PathBuf,
    child: Option<Child>,
    ports: Ports,
    rpc_secret: String,
    /// Where the log of the latest start begins.
    log_from: u64,
}

impl Node {
    /// A node in `dir` (created), not configured yet.
    fn new(dir: PathBuf, rpc_secret: &str) -> Node {
        fs::create_dir(&dir).expect("node dir");
        Node {
            dir,
            child: None,
            ports: Ports::default(),
            rpc_secret: rpc_secret.to_owned(),
            log_from: 0,
        }
    }

    /// New free ports in a new config, on empty metadata and data
    /// directories (nothing of a start that failed stays).
    fn configure(&mut self) {
        let settings = format!(
            "replication_factor = {REPLICATION_FACTOR}\n\
             consistency_mode = \"consistent\"\n\
             bootstrap_peers = []"
        );
        self.ports = configure_node(&self.dir, &settings, &self.rpc_secret, &mut free_port);
    }

    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("garage.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        self.log_from = file_len(&self.log_path());
        let mut cmd = garage(&self.config());
        cmd.arg("server");
        self.child = Some(spawn_logged(cmd, &self.log_path()));
    }

    /// `garage -c <this node's config> args...`: the CLI talks to this node
    /// over RPC.
    fn cli(&self, args: &[&str]) -> Output {
        garage(&self.config())
            .args(args)
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
    /// before the node listens); a node that found a port taken is started
    /// again on new ports.
    async fn wait_started(&mut self) -> String {
        for attempt in 1..=START_ATTEMPTS {
            if let Some(id) = self.wait_id().await {
                return id;
            }
            self.kill();
            assert!(
                attempt < START_ATTEMPTS,
                "garage node in {} found a port taken {START_ATTEMPTS} times:\n{}",
                self.dir.display(),
                self.log()
            );
            self.configure();
            self.spawn();
        }
        unreachable!("every attempt returns or panics")
    }

    /// The node's id once it listens for RPC; `None` when it found a port taken.
    async fn wait_id(&mut self) -> Option<String> {
        let what = format!("garage node in {} to start", self.dir.display());
        wait_for_async(Duration::from_secs(120), &what, async || {
            if port_taken(&self.log_path(), self.log_from) {
                return Ok(None);
            }
            let out = self.cli(&["node", "id", "-q"]);
            if out.status.success() && TcpStream::connect(("127.0.0.1", self.ports.rpc)).is_ok() {
                return Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()));
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("garage exited ({status}):\n{}", self.log());
            }
            Err(String::new())
        })
        .await
    }

    fn health_ok(&self) -> bool {
        super::s3::healthy(self.ports.admin)
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
            let mut node = Node::new(cluster.dir.join(format!("n{i}")), &rpc_secret);
            node.configure();
            cluster.nodes.push(node);
        }
        let mut ids = Vec::with_capacity(n);
        // every node starts at once; each is waited for in turn
        for node in &mut cluster.nodes {
            node.spawn();
        }
        for node in &mut cluster.nodes {
            ids.push(node.wait_started().await);
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
            assign_when_known(first, &zone, short).await;
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
            let what = format!("garage node {} to become healthy", i + 1);
            wait_until_async(Duration::from_secs(120), &what, async || {
                // (the cluster's logs are printed if this panics)
                assert!(
                    !port_taken(&node.log_path(), node.log_from),
                    "garage node {} found a port taken after it started",
                    i + 1
                );
                node.health_ok()
            })
            .await;
        }
        wait_for_bucket(&cluster.storage("").await).await;
        cluster
    }

    /// `http://127.0.0.1:PORT` of node `i` (1-based).
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i - 1].ports.s3)
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

/// `layout assign` of node `id` to `zone`, retried until node 1 has heard of
/// the node (right after `node connect` its peer list may still lag).
async fn assign_when_known(first: &Node, zone: &str, id: &str) {
    let what = format!("garage layout assign {zone} {id} to succeed");
    wait_for_async(Duration::from_secs(60), &what, async || {
        let out = first.cli(&["layout", "assign", "-z", zone, "-c", "1G", id]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await
}
