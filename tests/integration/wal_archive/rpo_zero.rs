//! RPO = 0 with `walvault stream --synchronous`, on a local directory (the
//! journal) and on Garage (one PUT per durable write): clients commit under
//! load while the primary is killed with -9 at random moments and
//! restarted; every commit a client saw acknowledged must come back from
//! `restore-pitr --latest`. Killing walvault itself makes commits wait
//! (PostgreSQL blocks in SyncRep) and loses none of them.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use crate::support::pg::PgCluster;
use crate::support::stream::Streamer;
use crate::support::{wait_until, Walvault};

/// Clients of the load.
const CLIENTS: i32 = 4;

/// Clients inserting rows `(client, n)`, one commit each, recording every
/// commit that returned success (acknowledged to the client).
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(i32, i32)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &PgCluster, clients: i32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|client| {
                let (stop, acked, conninfo) = (stop.clone(), acked.clone(), c.conninfo());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        // (re)connect: the server may be down or restarting
                        let Ok((db, conn)) =
                            tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
                        else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        tokio::spawn(conn);
                        while !stop.load(Ordering::SeqCst) {
                            n += 1;
                            let insert = db
                                .execute(
                                    "INSERT INTO acked(client, n) VALUES ($1, $2)",
                                    &[&client, &n],
                                )
                                .await;
                            match insert {
                                Ok(_) => acked.lock().unwrap().push((client, n)),
                                Err(_) => break,
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, acked, tasks }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stop the clients; every acknowledged commit.
    async fn finish(self) -> Vec<(i32, i32)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let mut acked = self.acked.lock().unwrap().clone();
        acked.sort_unstable();
        acked
    }
}

/// Load, kills and the check, against the repository `wv` names
/// (`local_repo`: its directory, handed to the server's OS user for
/// restore_command).
async fn rpo_zero(c: &mut PgCluster, wv: &Walvault, local_repo: Option<&std::path::Path>) {
    let mut rng = crate::support::seeded_rng();
    c.psql("CREATE TABLE acked(client int, n int, PRIMARY KEY (client, n))");
    wv.args(["backup", "--pg", &c.conninfo(), "--fast"]).ok();
    let conninfo = format!("{} application_name=walvault", c.conninfo());
    let mut stream = Streamer::start(wv, &conninfo, &["--synchronous"]);
    c.psql("ALTER SYSTEM SET synchronous_standby_names = 'walvault'");
    c.reload_conf();
    let is_sync = |c: &PgCluster| {
        c.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walvault' AND sync_state = 'sync'") == "1"
    };
    wait_until(
        Duration::from_secs(30),
        "walvault to become the synchronous standby",
        || is_sync(c),
    );
    let load = Load::start(c, CLIENTS);
    let grows = |load: &Load, what: &str| {
        let from = load.count();
        wait_until(Duration::from_secs(30), what, || load.count() > from + 20);
    };
    grows(&load, "commits under load");

    // walvault killed: commits wait for it (none acknowledged meanwhile)
    tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
    stream.kill9();
    // until every client's commit waits in SyncRep: a client records an
    // acknowledgement before it sends its next commit, so every commit
    // acknowledged before the kill is counted then
    wait_until(
        Duration::from_secs(30),
        "every client to wait in SyncRep",
        || {
            c.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
                == CLIENTS.to_string()
        },
    );
    let frozen = load.count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        load.count(),
        frozen,
        "commits acknowledged with walvault dead"
    );
    let waiting = c.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
    assert!(
        waiting.parse::<i32>().unwrap() >= 1,
        "no commit waits in SyncRep: {waiting}"
    );
    stream.spawn();
    wait_until(
        Duration::from_secs(30),
        "walvault to come back as the synchronous standby",
        || is_sync(c),
    );
    grows(&load, "commits once walvault is back");

    // the primary killed at random moments under load, then restarted
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        c.kill9();
        if round == 2 {
            break;
        }
        c.start_again();
        wait_until(
            Duration::from_secs(60),
            "walvault to follow the restarted primary",
            || is_sync(c),
        );
        grows(&load, "commits after the restart");
    }
    let acked = load.finish().await;
    stream.assert_running("after the primary crashes");
    stream.kill9();
    assert!(acked.len() > 60, "too little load: {} commits", acked.len());

    if let Some(repo) = local_repo {
        crate::support::give_to_postgres(repo);
    }
    let (r, report) = crate::pitr::pitr_started(c, wv, &["--latest"]);
    assert_eq!(report["state"], "promoted", "{report}");
    let restored: std::collections::BTreeSet<(i32, i32)> = r
        .psql("SELECT client || ' ' || n FROM acked")
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    let lost: Vec<_> = acked.iter().filter(|k| !restored.contains(k)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged commits are not in the recovery, first {:?}:\n{}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)],
        stream.log()
    );
    r.stop_and_check();
}

#[tokio::test(flavor = "multi_thread")]
async fn rpo_zero_on_a_local_repository_through_primary_and_walvault_kills() {
    let mut c = PgCluster::start();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = work.path().join("repo");
    let wv = Walvault::new().repo(&repo);
    wv.args(["init"]).ok();
    rpo_zero(&mut c, &wv, Some(&repo)).await;
    // the journal carried the synchronous writes
    let journals = walkdir(&repo).filter(|p| p.ends_with(".journal")).count();
    assert!(journals >= 1, "no WAL journal in the repository");
}

#[tokio::test(flavor = "multi_thread")]
async fn rpo_zero_on_garage_through_primary_and_walvault_kills() {
    let s3 = crate::support::s3::S3Server::start().await;
    let mut c = PgCluster::start();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_config, wv) = crate::support::s3::config_repo(work.path(), &s3.url("rpo"), &s3.config());
    wv.args(["init"]).ok();
    rpo_zero(&mut c, &wv, None).await;
}

/// Every file name under `dir`, recursively.
fn walkdir(dir: &std::path::Path) -> impl Iterator<Item = String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    out.into_iter()
}
