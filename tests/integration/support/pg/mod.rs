//! Real PostgreSQL clusters for tests.
//!
//! A cluster lives in its own temp dir, listens on a free port on 127.0.0.1 and on
//! a private unix socket directory, and has data checksums, `wal_level=replica`,
//! replication slots and senders, and `track_commit_timestamp=on`. Local
//! connections are trusted; TCP connections need a password checked with
//! SCRAM-SHA-256, for the user [`PASSWORD_USER`]. PostgreSQL refuses to run as
//! root, so when the tests run as root every server program runs as the OS user
//! `postgres` (created by the Debian package) through `runuser`.
//!
//! Binaries: `WALVAULT_PG_BINDIR`, else Debian's PostgreSQL 15. Other majors come
//! from `scripts/install-pg-versions.sh` (`<cache>/pg/<major>/bin`), or
//! `WALVAULT_PG<major>_BINDIR`. Client programs missing from a bindir (the npm
//! builds ship only initdb, pg_ctl and postgres) come from Debian's 15.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::unistd::User;
use walvault::pg::Lsn;

use super::{free_port, tmp_base, wait_for, wait_until};

mod crash;
mod majors;

pub use crash::{alive, crash, processes_in};
use majors::DEBIAN_BINDIR;
pub use majors::{bindir, other_majors_or_skip, server_major};

/// Login role authenticated by password (SCRAM-SHA-256) over TCP.
pub const PASSWORD_USER: &str = "walvault_test";
/// Its password.
pub const PASSWORD: &str = "pw-0f-the-test-user";

/// How to shut a server down (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, stop.
    Fast,
    /// Stop at once; the next start runs crash recovery.
    Immediate,
}

/// What cluster to create.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Major version; `None` for `WALVAULT_PG_BINDIR` or Debian's 15.
    pub major: Option<u32>,
    /// `initdb --wal-segsize`, in MiB.
    pub wal_segsize_mb: Option<u32>,
    /// Lines appended to postgresql.conf.
    pub conf: Vec<String>,
}

/// The OS user server programs run as, when the tests run as root.
#[derive(Debug, Clone)]
struct OsUser {
    name: String,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

fn os_user() -> Option<OsUser> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let u = User::from_name("postgres")
        .ok()
        .flatten()
        .expect("running as root needs the OS user 'postgres' (apt-get install postgresql-15)");
    Some(OsUser {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
    })
}

/// A running (or stopped) test cluster; dropped = stopped and deleted.
#[derive(Debug)]
pub struct PgCluster {
    /// Temp dir holding everything of this cluster.
    pub root: PathBuf,
    /// The data directory.
    pub datadir: PathBuf,
    /// The unix socket directory.
    pub sockdir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Server binaries.
    pub bindir: PathBuf,
    /// Major version, from `postgres --version`.
    pub major: u32,
    log: PathBuf,
    user: Option<OsUser>,
    running: bool,
}

impl PgCluster {
    /// initdb + start a cluster with the default options.
    pub fn start() -> PgCluster {
        PgCluster::start_with(PgOptions::default())
    }

    /// initdb + start a cluster of PostgreSQL `major`.
    pub fn start_major(major: u32) -> PgCluster {
        PgCluster::start_with(PgOptions {
            major: Some(major),
            ..PgOptions::default()
        })
    }

    /// initdb + start a cluster.
    pub fn start_with(opts: PgOptions) -> PgCluster {
        let mut c = PgCluster::create(bindir(opts.major));
        let mut args = vec![
            "-D".to_owned(),
            c.datadir.display().to_string(),
            "-U".into(),
            "postgres".into(),
            "-A".into(),
            "trust".into(),
            "-k".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
            "--no-sync".into(),
        ];
        if let Some(mb) = opts.wal_segsize_mb {
            args.push(format!("--wal-segsize={mb}"));
        }
        c.run_ok(&c.bin("initdb"), &args);
        c.configure(&opts.conf);
        c.start_server();
        c.psql(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {PASSWORD_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}';
             GRANT pg_monitor TO {PASSWORD_USER};"
        ));
        // CREATE DATABASE refuses to run in the transaction psql -c makes of a list
        c.psql(&format!(
            "CREATE DATABASE {PASSWORD_USER} OWNER {PASSWORD_USER}"
        ));
        c
    }

    /// A streaming standby of `primary`, made with pg_basebackup -R and started.
    pub fn standby_of(primary: &PgCluster) -> PgCluster {
        let mut c = PgCluster::create(primary.bindir.clone());
        let args = [
            "-D",
            &c.datadir.display().to_string(),
            "-h",
            &primary.sockdir.display().to_string(),
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-c",
            "fast",
            "-X",
            "stream",
            "-R",
            "--no-sync",
        ]
        .map(str::to_owned);
        c.run_ok(&c.client_bin("pg_basebackup"), &args);
        // -R of a newer pg_basebackup (the client programs may be another
        // major's) writes options an older server's libpq refuses (sslsni):
        // the standby gets a plain primary_conninfo of its own
        let auto = c.datadir.join("postgresql.auto.conf");
        let text = fs::read_to_string(&auto).unwrap_or_default();
        let mut text: String = text
            .lines()
            .filter(|l| !l.starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!(
            "primary_conninfo = 'host={} port={} user=postgres'\n",
            primary.sockdir.display(),
            primary.port
        ));
        c.write_file("postgresql.auto.conf", &text);
        // the copy carries the primary's port and socket dir; give it its own
        c.append_conf(&[
            format!("port = {}", c.port),
            format!("unix_socket_directories = '{}'", c.sockdir.display()),
        ]);
        c.start_server();
        // pg_ctl returns before the WAL receiver has connected
        wait_until(
            Duration::from_secs(30),
            "the standby to stream from its primary",
            || {
                c.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")
                    == "1"
            },
        );
        c
    }

    /// A cluster object for a data directory that a test restores into
    /// `self.datadir` (not created yet); start it with [`PgCluster::start_restored`].
    pub fn for_restore(bindir: &Path) -> PgCluster {
        PgCluster::create(bindir.to_path_buf())
    }

    /// Hand a restored data directory to the server's OS user, give it this
    /// cluster's port and socket directory, and start it (pg_ctl waits until
    /// recovery has finished and the server accepts connections).
    pub fn start_restored(&mut self) {
        self.start_restored_server();
        // pg_ctl returns once read-only connections are accepted (consistent),
        // which may be before recovery has replayed everything and promoted
        // (the server log is printed if the wait panics)
        wait_until(Duration::from_secs(120), "the end of recovery", || {
            self.psql("SELECT pg_is_in_recovery()") == "f"
        });
    }

    /// Start a restored data directory as it is (a standby stays one: no
    /// wait for the end of recovery).
    pub fn start_restored_as_is(&mut self) {
        self.start_restored_server();
    }

    /// Start a data directory restored into `self.datadir` as a streaming
    /// standby of `primary` that holds replay back by an hour: it receives
    /// everything but applies nothing past the next commit, so a test can
    /// later make it replay to an exact LSN ([`PgCluster::replay_to`]) and
    /// read the primary's content as of that point.
    pub fn start_delayed_standby(&mut self, primary: &PgCluster) {
        self.write_file("standby.signal", "");
        let auto = self.datadir.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "\nprimary_conninfo = 'host={} port={} user=postgres'\nrecovery_min_apply_delay = '1h'\n",
            primary.sockdir.display(),
            primary.port
        ));
        fs::write(&auto, text).expect("write postgresql.auto.conf");
        self.start_restored_server();
    }

    /// Switch to a new WAL segment and wait (up to 60 s) until the archiver
    /// has archived the one switched from, with no failure on record.
    /// Returns that segment's name.
    pub fn switch_and_wait_archived(&self) -> String {
        let last = self.psql("SELECT pg_walfile_name(pg_switch_wal())");
        wait_for(
            Duration::from_secs(60),
            &format!("the archiver to archive {last}"),
            || {
                let archived =
                    self.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
                if archived >= last {
                    Ok(())
                } else {
                    Err(self.psql("SELECT * FROM pg_stat_archiver"))
                }
            },
        );
        assert_eq!(self.psql("SELECT failed_count FROM pg_stat_archiver"), "0");
        last
    }

    /// Restart a delayed standby so that it replays up to `lsn` and pauses
    /// there: through the record starting at `lsn` when `inclusive`, else
    /// every record before it (`lsn` being the end of a record, the state
    /// after that record) — `recovery_target_lsn` semantics.
    pub fn replay_to(&mut self, lsn: &str, inclusive: bool) {
        self.stop(StopMode::Fast);
        let auto = self.datadir.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "\nrecovery_min_apply_delay = 0\nrecovery_target_lsn = '{lsn}'\nrecovery_target_inclusive = {inclusive}\nrecovery_target_action = 'pause'\n"
        ));
        self.write_file("postgresql.auto.conf", &text);
        self.start_server();
        wait_until(
            Duration::from_secs(120),
            &format!("the standby to pause replay at {lsn}"),
            || self.psql("SELECT pg_is_wal_replay_paused()") == "t",
        );
    }

    /// Give a restored data directory to the server's OS user, this
    /// cluster's port and socket directory, and start it.
    fn start_restored_server(&mut self) {
        if let Some(u) = &self.user {
            let status = Command::new("chown")
                .args(["-R", &format!("{}:{}", u.uid, u.gid)])
                .arg(&self.datadir)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let auto = self.datadir.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.sockdir.display()
        ));
        self.write_file("postgresql.auto.conf", &text);
        self.start_server();
    }

    fn create(bindir: PathBuf) -> PgCluster {
        assert!(
            bindir.join("postgres").exists(),
            "PostgreSQL binaries not found in {} (run scripts/install-pg-versions.sh, or set WALVAULT_PG_BINDIR)",
            bindir.display()
        );
        let major = server_major(&bindir);
        let root = tempfile::Builder::new()
            .prefix("walvault-pg-")
            .tempdir_in(tmp_base())
            .expect("temp dir")
            .keep();
        let sockdir = root.join("sock");
        fs::create_dir(&sockdir).expect("socket dir");
        let user = os_user();
        if let Some(u) = &user {
            for d in [&root, &sockdir] {
                nix::unistd::chown(d.as_path(), Some(u.uid), Some(u.gid)).expect("chown test dir");
            }
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        PgCluster {
            datadir: root.join("data"),
            log: root.join("server.log"),
            sockdir,
            port: free_port(),
            bindir,
            major,
            root,
            user,
            running: false,
        }
    }

    fn configure(&self, extra: &[String]) {
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("port = {}", self.port),
            format!("unix_socket_directories = '{}'", self.sockdir.display()),
            "wal_level = replica".into(),
            "max_wal_senders = 10".into(),
            "max_replication_slots = 10".into(),
            "track_commit_timestamp = on".into(),
            "password_encryption = 'scram-sha-256'".into(),
            // the server's own durability is not under test; walvault's is
            "fsync = off".into(),
            "shared_buffers = 32MB".into(),
            "max_connections = 40".into(),
        ];
        conf.extend(extra.iter().cloned());
        self.append_conf(&conf);
        let hba = format!(
            "local all all trust\n\
             local replication all trust\n\
             host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n\
             host replication {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
        );
        self.write_file("pg_hba.conf", &hba);
    }

    /// Append lines to postgresql.conf (takes effect at the next start or reload).
    pub fn append_conf(&self, lines: &[String]) {
        let path = self.datadir.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).expect("read postgresql.conf");
        text.push('\n');
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        self.write_file("postgresql.conf", &text);
    }

    /// Replace a file in the data directory, keeping it owned by the server's user.
    pub fn write_file(&self, name: &str, content: &str) {
        let path = self.datadir.join(name);
        fs::write(&path, content).expect("write data dir file");
        if let Some(u) = &self.user {
            nix::unistd::chown(&path, Some(u.uid), Some(u.gid)).expect("chown");
        }
    }

    /// Turn TLS on: `server.crt` and `server.key` (PEM; the key mode 0600, as
    /// the server demands) into the data directory, `ssl = on`, restart.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) {
        self.write_file("server.crt", cert_pem);
        self.write_file("server.key", key_pem);
        fs::set_permissions(
            self.datadir.join("server.key"),
            fs::Permissions::from_mode(0o600),
        )
        .expect("chmod server.key");
        self.append_conf(&[
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
        ]);
        self.restart();
    }

    /// Path of a server program.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// Path of a client program: from the server's bindir, else Debian's 15.
    pub fn client_bin(&self, name: &str) -> PathBuf {
        let own = self.bindir.join(name);
        if own.exists() {
            own
        } else {
            Path::new(DEBIAN_BINDIR).join(name)
        }
    }

    /// The OS user the server runs as (`None`: the test's own user).
    pub fn os_user(&self) -> Option<&str> {
        self.user.as_ref().map(|u| u.name.as_str())
    }

    /// A command that runs `program` as the server's OS user.
    pub fn command(&self, program: &Path) -> Command {
        match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", &u.name, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn run_ok(&self, program: &Path, args: &[String]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {:?} failed: {}\n{}\n{}",
            program.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-D".to_owned(), self.datadir.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        self.command(&self.bin("pg_ctl"))
            .args(&all)
            .output()
            .expect("pg_ctl")
    }

    fn start_server(&mut self) {
        for attempt in 0..3 {
            let log = self.log.display().to_string();
            let out = self.pg_ctl(&["-l", &log, "-w", "-t", "60", "start"]);
            if out.status.success() {
                self.running = true;
                return;
            }
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if attempt < 2 && text.contains("could not bind") {
                // another test took the port between free_port() and now
                self.port = free_port();
                self.append_conf(&[format!("port = {}", self.port)]);
                // a restored directory names the old port in
                // postgresql.auto.conf, which wins over postgresql.conf
                let auto = self.datadir.join("postgresql.auto.conf");
                if let Ok(mut text) = fs::read_to_string(&auto) {
                    text.push_str(&format!("\nport = {}\n", self.port));
                    self.write_file("postgresql.auto.conf", &text);
                }
                continue;
            }
            panic!(
                "PostgreSQL did not start: {}\n{}\n--- server log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                text
            );
        }
    }

    /// Start the server again after a stop or a kill.
    pub fn start_again(&mut self) {
        self.start_server();
    }

    /// Stop the server.
    pub fn stop(&mut self, mode: StopMode) {
        let m = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let out = self.pg_ctl(&["-w", "-t", "60", "-m", m, "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// Stop (fast) and start again.
    pub fn restart(&mut self) {
        self.stop(StopMode::Fast);
        self.start_server();
    }

    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.datadir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// kill -9 the server, as a crash would: the postmaster first (so it cannot
    /// start a crash restart and fork new children), then every process still
    /// running in the data directory. Returns once none is left and no process
    /// is attached to the server's shared memory, so the next start cannot find
    /// "pre-existing shared memory block … still in use".
    pub fn kill9(&mut self) {
        crash(&self.datadir);
        // Every process is gone, so the lock files are stale; a zombie
        // postmaster that init has not reaped yet would otherwise pass for a
        // running server (kill(pid, 0) succeeds on zombies).
        let _ = fs::remove_file(self.datadir.join("postmaster.pid"));
        let _ = fs::remove_file(self.sockdir.join(format!(".s.PGSQL.{}.lock", self.port)));
        self.running = false;
    }

    /// Reload the configuration files (`pg_reload_conf()`) and return once
    /// the postmaster has reloaded them: a new session sees a later
    /// `pg_conf_load_time()`, so every connection made from now on is
    /// checked against the new pg_hba.conf and starts with the new settings.
    /// Background processes (the checkpointer, walsenders) apply them at
    /// their next loop; a `CHECKPOINT` after this one runs with them.
    pub fn reload_conf(&self) {
        let before = self.psql("SELECT pg_conf_load_time()");
        self.psql("SELECT pg_reload_conf()");
        // psql opens a new session (a new backend, forked by the postmaster
        // after it finished the reload once it shows the new time)
        wait_until(Duration::from_secs(30), "the configuration reload", || {
            self.psql(&format!(
                "SELECT pg_conf_load_time() > '{before}'::timestamptz"
            )) == "t"
        });
    }

    /// The LSN a query returns.
    pub fn lsn(&self, sql: &str) -> Lsn {
        let text = self.psql(sql);
        text.parse()
            .unwrap_or_else(|e| panic!("{sql} returned {text:?}, not an LSN: {e}"))
    }

    /// `pg_current_wal_insert_lsn()`: the end of the WAL written so far.
    pub fn insert_lsn(&self) -> Lsn {
        self.lsn("SELECT pg_current_wal_insert_lsn()")
    }

    /// `pg_walfile_name(at)`: the WAL file holding the byte before `at`.
    pub fn walfile_name(&self, at: Lsn) -> String {
        self.psql(&format!("SELECT pg_walfile_name('{at}')"))
    }

    /// Promote a standby and wait until it accepts writes.
    pub fn promote(&self) {
        let out = self.pg_ctl(&["-w", "-t", "60", "promote"]);
        assert!(
            out.status.success(),
            "pg_ctl promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// libpq conninfo of the superuser `postgres` over the unix socket (trust).
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sockdir.display(),
            self.port
        )
    }

    /// The superuser's unix-socket connection parameters, for walvault's client.
    pub fn params(&self) -> walvault::pg::ConnParams {
        walvault::pg::ConnParams::parse_with_env(&self.conninfo(), &|_| None)
            .expect("valid conninfo")
    }

    /// A replication connection of walvault's own client, as the superuser
    /// over the unix socket.
    pub async fn replication(&self) -> walvault::pg::PgConnection {
        walvault::pg::PgConnection::connect(&self.params(), true)
            .await
            .expect("replication connection")
    }

    /// libpq conninfo of [`PASSWORD_USER`] over TCP (SCRAM), without the password.
    pub fn tcp_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={PASSWORD_USER} dbname={PASSWORD_USER}",
            self.port
        )
    }

    /// Run SQL as superuser through psql and return its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Same as [`PgCluster::psql`] in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let args = [
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.sockdir.display().to_string(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ]
        .map(str::to_owned);
        let out = self.run_ok(&self.client_bin("psql"), &args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// pgbench (TPC-B, 2 clients, as the superuser over the socket, in
    /// [`PASSWORD_USER`]'s database) for `secs` seconds, output discarded:
    /// `.spawn()` it to write in the background, `.output()` to wait.
    pub fn pgbench_load(&self, secs: u32) -> Command {
        let mut c = self.command(&self.client_bin("pgbench"));
        c.args([
            "-h",
            self.sockdir.to_str().expect("socket dir is UTF-8"),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-T",
            &secs.to_string(),
            "-c",
            "2",
            "-n",
            PASSWORD_USER,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        c
    }

    /// Run pgbench over TCP as [`PASSWORD_USER`] (SCRAM) in its database; returns stdout.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let mut all: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            PASSWORD_USER,
        ]
        .map(str::to_owned)
        .to_vec();
        all.extend(args.iter().map(|s| s.to_string()));
        all.push(PASSWORD_USER.to_owned());
        let out = self
            .command(&self.client_bin("pgbench"))
            .env("PGPASSWORD", PASSWORD)
            .args(&all)
            .output()
            .expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench {:?} failed: {}\n{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A tokio-postgres connection as [`PASSWORD_USER`] over TCP with SCRAM.
    pub async fn connect_tcp(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.connect_tcp_with(PASSWORD).await
    }

    /// Same, with a chosen password (to see a wrong one refused).
    pub async fn connect_tcp_with(
        &self,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let conninfo = format!("{} password={password}", self.tcp_conninfo());
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// `pg_checksums --check` of the (stopped) data directory with the
    /// server's own major, when installed: every page checksum verifies.
    /// Returns whether the tool ran.
    pub fn pg_checksums_clean(&self) -> bool {
        let tool = self.bin("pg_checksums");
        if !tool.exists() {
            return false;
        }
        let out = self
            .command(&tool)
            .args(["--check", "-D"])
            .arg(&self.datadir)
            .output()
            .expect("pg_checksums");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("Bad checksums:  0"),
            "pg_checksums: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.server_log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if self.postmaster_pid().is_some_and(alive) {
            let out = self.pg_ctl(&["-w", "-t", "30", "-m", "immediate", "stop"]);
            if !out.status.success() && self.postmaster_pid().is_some_and(alive) {
                self.kill9();
            }
        }
        if std::env::var_os("WALVAULT_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Per user table of database `db`: row count and an md5 of all rows in a
/// canonical order — equal maps mean equal content.
pub fn table_hashes(c: &PgCluster, db: &str) -> std::collections::BTreeMap<String, String> {
    let tables = c.psql_db(
        db,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    );
    tables
        .lines()
        .filter(|t| !t.is_empty())
        .map(|t| {
            let h = c.psql_db(
                db,
                &format!(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(r::text, '|' ORDER BY r::text)), '-') FROM {t} r"
                ),
            );
            (t.to_owned(), h)
        })
        .collect()
}
