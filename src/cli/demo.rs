//! `walvault demo`: the whole story on this machine, nothing to set up. A
//! throwaway PostgreSQL cluster (run as the unprivileged `postgres` user when
//! started as root), pgbench data, a local repository, two backups (the second
//! after changes, to show deduplication), a restore into a new directory, the
//! restored server started and its data proven; then the incident: WAL
//! streamed continuously, a table dropped by mistake, `wal-inspect` finding
//! the transaction, `restore-pitr` to just before it, data proven, the
//! recovery time printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use tokio::process::Command;

use super::output::outln;
use super::Settings;
use crate::backup::stream::BaseBackupOptions;
use crate::pg::ConnParams;
use crate::repo::{InitParams, KdfCost, Repository};
use crate::restore::RestoreOptions;
use crate::storage::LocalDir;

/// Options of `walvault demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// pgbench scale factor (each unit is about 15 MB).
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Keep the work directory (clusters stopped) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    user: Option<String>,
    running: bool,
}

impl Cluster {
    fn cmd(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .cmd(program)
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {program}"))?;
        ensure!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    async fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let (s, p) = (self.sock.display().to_string(), self.port.to_string());
        self.run(
            "psql",
            &[
                "-X", "-A", "-t", "-q", "-h", &s, "-p", &p, "-U", "postgres", "-d", "postgres",
                "-c", sql,
            ],
        )
        .await
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        let (d, log) = (
            self.data.display().to_string(),
            self.data.with_extension("log").display().to_string(),
        );
        self.run(
            "pg_ctl",
            &["-D", &d, "-l", &log, "-w", "-t", "120", "start"],
        )
        .await?;
        self.running = true;
        Ok(())
    }

    async fn stop(&mut self) {
        if self.running {
            let d = self.data.display().to_string();
            let _ = self
                .run("pg_ctl", &["-D", &d, "-m", "fast", "-w", "stop"])
                .await;
            self.running = false;
        }
    }

    async fn conf(&self, lines: &[String]) -> anyhow::Result<()> {
        let p = self.data.join("postgresql.auto.conf");
        let mut text = tokio::fs::read_to_string(&p).await.unwrap_or_default();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        tokio::fs::write(&p, text).await?;
        self.chown(&p).await
    }

    async fn chown(&self, p: &Path) -> anyhow::Result<()> {
        if let Some(u) = &self.user {
            let st = Command::new("chown")
                .args(["-R", &format!("{u}:{u}")])
                .arg(p)
                .status()
                .await?;
            ensure!(st.success(), "chown {} failed", p.display());
        }
        Ok(())
    }
}

fn find_bindir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("WALVAULT_PG_BINDIR") {
        return Ok(PathBuf::from(d));
    }
    for v in [18, 17, 16, 15, 14, 13] {
        let d = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if d.join("postgres").exists() && d.join("pgbench").exists() {
            return Ok(d);
        }
    }
    bail!("no PostgreSQL server binaries found: install them (apt-get install postgresql-15) or set WALVAULT_PG_BINDIR")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

pub(super) async fn run(_settings: &Settings, args: DemoArgs) -> anyhow::Result<()> {
    let bin = find_bindir()?;
    let user = if nix::unistd::geteuid().is_root() {
        ensure!(
            nix::unistd::User::from_name("postgres")?.is_some(),
            "PostgreSQL refuses to run as root and there is no 'postgres' user: apt-get install postgresql-15"
        );
        Some("postgres".to_owned())
    } else {
        None
    };
    let work = tempfile::Builder::new()
        .prefix("walvault-demo-")
        .tempdir()?;
    let root = work.path().to_path_buf();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&root)?.permissions(),
        0o755,
    );
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let result = story(&bin, &root, user, &args).await;
    if args.keep {
        let kept = work.keep();
        outln!("work directory kept: {}", kept.display())?;
    }
    result
}

async fn story(
    bin: &Path,
    root: &Path,
    user: Option<String>,
    args: &DemoArgs,
) -> anyhow::Result<()> {
    let sock = root.join("sock");
    std::fs::create_dir(&sock)?;
    let mut src = Cluster {
        bin: bin.to_owned(),
        data: root.join("source"),
        sock: sock.clone(),
        port: free_port()?,
        user: user.clone(),
        running: false,
    };
    src.chown(&sock).await?;
    src.chown(root).await?;
    let result = async {
        outln!("1. a throwaway PostgreSQL cluster from {} (data checksums on)", bin.display())?;
        let d = src.data.display().to_string();
        src.run("initdb", &["-D", &d, "-U", "postgres", "-A", "trust", "-k", "--no-sync"]).await?;
        src.conf(&[
            format!("port = {}", src.port),
            format!("unix_socket_directories = '{}'", sock.display()),
            "listen_addresses = ''".into(),
            "wal_level = replica".into(),
        ])
        .await?;
        src.start().await?;
        let (s, p) = (sock.display().to_string(), src.port.to_string());
        src.run("pgbench", &["-h", &s, "-p", &p, "-U", "postgres", "-i", "-q", "-s", &args.scale.to_string(), "postgres"]).await?;
        src.sql("CREATE TABLE orders AS SELECT g AS id, 'order ' || g AS item FROM generate_series(1, 1000) g").await?;
        let db_size: u64 = src.sql("SELECT pg_database_size('postgres')").await?.parse()?;
        outln!("   pgbench scale {}: {:.0} MB", args.scale, mb(db_size))?;

        outln!("2. a local repository")?;
        let repo_dir = root.join("repo");
        let storage = Arc::new(LocalDir::open(&repo_dir)?);
        let repo = Arc::new(Repository::init(storage, &InitParams::default(), None, KdfCost::default()).await?);
        let params = ConnParams::parse(&format!("host={s} port={p} user=postgres"))?;
        let opts = BaseBackupOptions { label: "demo".into(), fast_checkpoint: true, ..Default::default() };
        outln!("   continuous archiving on: walvault stream, through a replication slot")?;
        let status = root.join("stream-status.json");
        let sopts = crate::archive::stream::StreamOptions {
            partial_interval: Duration::from_millis(500),
            status_file: Some(status.clone()),
            ..Default::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stream = {
            let (repo, params) = (repo.clone(), params.clone());
            tokio::spawn(async move { crate::archive::stream::run_stream(repo, "main", &params, &sopts, stop_rx).await })
        };

        let t = Instant::now();
        let b1 = crate::backup::run_backup(repo.clone(), "main", &params, &opts).await?;
        let t1 = t.elapsed();
        outln!("3. backup {}: {:.0} MB in {:.1} s ({:.0} MB/s), {:.0} MB stored", b1.id, mb(b1.totals.logical_bytes), t1.as_secs_f64(), mb(b1.totals.logical_bytes) / t1.as_secs_f64(), mb(b1.totals.new_stored_bytes))?;

        src.run("pgbench", &["-h", &s, "-p", &p, "-U", "postgres", "-n", "-t", "1000", "-c", "2", "postgres"]).await?;
        let t = Instant::now();
        let b2 = crate::backup::run_backup(repo.clone(), "main", &params, &opts).await?;
        let t2 = t.elapsed();
        outln!(
            "4. 2000 pgbench transactions later, backup {}: {:.0} MB, only {:.1} MB new ({:.0}x dedup) in {:.1} s",
            b2.id,
            mb(b2.totals.logical_bytes),
            mb(b2.totals.new_stored_bytes),
            b2.totals.logical_bytes as f64 / b2.totals.new_stored_bytes.max(1) as f64,
            t2.as_secs_f64()
        )?;
        let want = src.sql("SELECT count(*) || ' ' || sum(abalance) FROM pgbench_accounts").await?;

        outln!("5. restore the second backup into a new directory and start it")?;
        let exe = root.join("walvault");
        std::fs::copy(super::own_program()?, &exe)?;
        let mut dst = Cluster {
            bin: bin.to_owned(),
            data: root.join("restored"),
            sock: sock.clone(),
            port: free_port()?,
            user: user.clone(),
            running: false,
        };
        let ropts = RestoreOptions {
            backup: Some(b2.id.clone()),
            tablespace_map: Default::default(),
            restore_command: Some(format!("\"{}\" wal-fetch --repo \"{}\" --stanza main %f %p", exe.display(), repo_dir.display())),
            // the demo starts the server on it at once
            page_cache: true,
        standby: None,
            ..Default::default()
        };
        let t = Instant::now();
        let r = crate::restore::restore(repo.clone(), "main", &dst.data, &ropts).await?;
        let tr = t.elapsed();
        dst.conf(&[format!("port = {}", dst.port)]).await?;
        dst.chown(&dst.data).await?;
        dst.start().await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while dst.sql("SELECT pg_is_in_recovery()").await? == "t" {
            ensure!(Instant::now() < deadline, "the restored server did not finish recovery");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let got = dst.sql("SELECT count(*) || ' ' || sum(abalance) FROM pgbench_accounts").await?;
        ensure!(got == want, "restored data differs: {got} rows/balance, the source has {want}");
        outln!("   restored {:.0} MB in {:.1} s ({:.0} MB/s); recovered, promoted; pgbench_accounts matches the source ({want})", mb(r.bytes), tr.as_secs_f64(), mb(r.bytes) / tr.as_secs_f64())?;
        dst.stop().await;
        let dd = dst.data.display().to_string();
        dst.run("pg_checksums", &["--check", "-D", &dd]).await?;
        outln!("   pg_checksums --check: all pages verified")?;

        // the incident: continuous archiving, a mistake, and recovery to
        // just before it
        outln!("6. a marker row is committed")?;
        src.sql("CREATE TABLE marker(t text); INSERT INTO marker VALUES ('committed before the mistake')").await?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mistake_at = chrono::Utc::now();
        src.sql("DROP TABLE orders").await?;
        outln!("7. the mistake, at {}: DROP TABLE orders", mistake_at.format("%H:%M:%S%.3f"))?;
        let end: crate::pg::Lsn = src.sql("SELECT pg_current_wal_insert_lsn()").await?.parse()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let durable = std::fs::read_to_string(&status)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["durable_lsn"].as_str().and_then(|s| s.parse::<crate::pg::Lsn>().ok()));
            if durable.is_some_and(|d| d >= end) {
                break;
            }
            ensure!(Instant::now() < deadline, "the stream did not archive the WAL of the mistake");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop_tx.send(true);
        stream.await??;

        let around = mistake_at.to_rfc3339();
        outln!("8. walvault wal-inspect --around {around} --window 3s")?;
        let window = chrono::Duration::seconds(3);
        let query = crate::archive::inspect::Query {
            from: Some(mistake_at - window),
            to: Some(mistake_at + window),
            ..Default::default()
        };
        let found = crate::archive::inspect::inspect(&repo, "main", &query).await?;
        for e in &found.events {
            outln!("   {}", super::inspect::event_line(e))?;
        }
        let xid = found
            .events
            .iter()
            .find_map(|e| match e {
                crate::archive::inspect::Event::Xact { xid, dropped, .. }
                    if dropped.iter().any(|d| d.contains("orders")) =>
                {
                    Some(*xid)
                }
                _ => None,
            })
            .context("wal-inspect did not show the DROP TABLE orders")?;
        outln!("   found it: transaction {xid} dropped orders")?;

        outln!("9. walvault restore-pitr --target-xid {xid} --exclusive --start")?;
        let t0 = Instant::now();
        let pitr_dir = root.join("pitr");
        let pitr_port = free_port()?;
        let target = crate::restore::pitr::Target::Xid(xid);
        let rp = crate::restore::plan_recovery(&repo, "main", &target, true, Default::default(), None).await?;
        let ropts = crate::restore::RecoverOptions {
            pgdata: pitr_dir.clone(),
            restore_command: format!("\"{}\" wal-fetch --repo \"{}\" --stanza main %f %p", exe.display(), repo_dir.display()),
            server: Some(crate::restore::server::ServerOptions {
                port: Some(pitr_port),
                pg_bin: Some(bin.to_owned()),
                run_as: user.clone(),
                settings: Vec::new(),
            }),
            ..Default::default()
        };
        let report = crate::restore::recover(repo.clone(), "main", &rp, &ropts, t0).await?;
        let mut pitr = Cluster {
            bin: bin.to_owned(),
            data: pitr_dir.clone(),
            sock: sock.clone(),
            port: pitr_port,
            user: user.clone(),
            running: true,
        };
        let orders = pitr.sql("SELECT count(*) FROM orders").await?;
        let marker = pitr.sql("SELECT string_agg(t, ',') FROM marker").await?;
        pitr.stop().await;
        ensure!(orders == "1000", "orders has {orders} rows after the recovery, expected 1000");
        ensure!(marker == "committed before the mistake", "marker is {marker:?}");
        outln!(
            "   recovered from backup {} to just before transaction {xid}: orders is back with {orders} rows, the marker row is there",
            report.backup
        )?;
        outln!(
            "   RTO measured: {:.1} s (files {:.1} s, WAL fetch {:.1} s, replay {:.1} s)",
            report.total_seconds,
            report.phases.restore_seconds,
            report.phases.wal_fetch_seconds,
            report.phases.replay_seconds.unwrap_or(0.0)
        )?;
        outln!("demo complete: two full backups stored as {:.0} MB + {:.1} MB; a dropped table recovered to the transaction before the mistake", mb(b1.totals.new_stored_bytes), mb(b2.totals.new_stored_bytes))?;
        Ok(())
    }
    .await;
    src.stop().await;
    result
}
