//! The one way tests run the walvault binary: [`Walvault`], a command
//! builder whose runs assert their exit status and print the command, its
//! stdout and its stderr when they fail.
//!
//! Invariants:
//! - every run uses a copy of the binary the tests were built with
//!   ([`Walvault::bin`]), made once per build, so a rebuild during a test run
//!   cannot swap the program under a running test; the copy is executable
//!   by every user, so a server's OS user can run it as archive_command or
//!   restore_command;
//! - the child sees no `WALVAULT_*` or `AWS_*` variable of the test's
//!   environment: only what the test gives it with [`Walvault::env`].

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use super::pg::PgCluster;
use super::tmp_base;

/// Copies of other builds unused for this long are deleted.
const STALE_COPY: Duration = Duration::from_secs(2 * 3600);

/// A walvault command line: program arguments, global options (appended
/// after the arguments), environment, working directory and OS user; its
/// standard input is empty (walvault reads nothing from it). Every method
/// takes `&self` and returns a changed copy, so one value can serve as a
/// template (`let wv = Walvault::new().repo(&repo);` then
/// `wv.args(["init"]).ok()`).
#[derive(Debug, Clone, Default)]
pub struct Walvault {
    args: Vec<OsString>,
    global: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    user: Option<String>,
}

/// What a finished run printed, and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl Outcome {
    /// The exit code (`None` when a signal ended the process).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Standard output as one JSON value.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// Standard output as one JSON value per line.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("a line is not JSON ({e}): {l}\n{}", self.stdout))
            })
            .collect()
    }
}

impl Walvault {
    /// `walvault` with no arguments.
    pub fn new() -> Walvault {
        Walvault::default()
    }

    /// The copy of the binary every run uses (see the module's invariants).
    pub fn bin() -> &'static Path {
        static BIN: OnceLock<PathBuf> = OnceLock::new();
        BIN.get_or_init(copy_of_the_binary)
    }

    /// The finding `check` of `walvault check --json --pg CONNINFO` (its
    /// `level` and `detail`), whatever the exit code.
    pub fn check_finding(&self, conninfo: &str, check: &str) -> serde_json::Value {
        let r = self
            .args(["check", "--json", "--pg", conninfo])
            .output()
            .json();
        r["findings"]
            .as_array()
            .unwrap_or_else(|| panic!("no findings: {r}"))
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("no {check} finding: {r}"))
            .clone()
    }

    /// One more argument.
    pub fn arg(&self, arg: impl AsRef<OsStr>) -> Walvault {
        let mut w = self.clone();
        w.args.push(arg.as_ref().to_owned());
        w
    }

    /// More arguments.
    pub fn args<I, S>(&self, args: I) -> Walvault
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut w = self.clone();
        w.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        w
    }

    /// Global options, placed after every argument (`--repo X`, `--config F`).
    fn global<I, S>(&self, opts: I) -> Walvault
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut w = self.clone();
        w.global
            .extend(opts.into_iter().map(|a| a.as_ref().to_owned()));
        w
    }

    /// `--repo REPO` (a directory or a URL), after the arguments.
    pub fn repo(&self, repo: impl AsRef<OsStr>) -> Walvault {
        self.global([OsStr::new("--repo"), repo.as_ref()])
    }

    /// `--config FILE`, after the arguments.
    pub fn config(&self, file: impl AsRef<OsStr>) -> Walvault {
        self.global([OsStr::new("--config"), file.as_ref()])
    }

    /// An environment variable for the child.
    pub fn env(&self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Walvault {
        let mut w = self.clone();
        w.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        w
    }

    /// Environment variables for the child.
    pub fn envs<I, K, V>(&self, vars: I) -> Walvault
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        vars.into_iter().fold(self.clone(), |w, (k, v)| w.env(k, v))
    }

    /// Run in directory `dir`.
    pub fn current_dir(&self, dir: impl AsRef<Path>) -> Walvault {
        let mut w = self.clone();
        w.cwd = Some(dir.as_ref().to_owned());
        w
    }

    /// Run as OS user `user` (through `runuser`) when the tests run as root;
    /// as the test's own user otherwise.
    pub fn as_user(&self, user: &str) -> Walvault {
        let mut w = self.clone();
        if nix::unistd::geteuid().is_root() {
            w.user = Some(user.to_owned());
        }
        w
    }

    /// Run as the OS user of `c`'s server, as its archive_command and
    /// restore_command run.
    pub fn as_server_user(&self, c: &PgCluster) -> Walvault {
        match c.os_user() {
            Some(u) => self.as_user(u),
            None => self.clone(),
        }
    }

    /// The command as a [`Command`], to spawn with standard streams of the
    /// test's choosing (standard input null).
    pub fn command(&self) -> Command {
        let mut c = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(Walvault::bin());
                c
            }
            None => Command::new(Walvault::bin()),
        };
        c.args(&self.args).args(&self.global);
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("WALVAULT_") || name.starts_with("AWS_") {
                c.env_remove(&k);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c.stdin(Stdio::null());
        c
    }

    /// Run to the end, whatever the exit status.
    pub fn output(&self) -> Outcome {
        let out = self
            .command()
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.describe()));
        Outcome {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run; it must exit 0.
    pub fn ok(&self) -> Outcome {
        let out = self.output();
        if !out.status.success() {
            self.failed(&out, "success");
        }
        out
    }

    /// Run; it must exit with `code`.
    pub fn fails_with(&self, code: i32) -> Outcome {
        let out = self.output();
        if out.code() != Some(code) {
            self.failed(&out, &format!("exit code {code}"));
        }
        out
    }

    /// Run; it must fail with an error of its own: an exit code other than
    /// 0, not a signal and not a panic (101).
    pub fn fails(&self) -> Outcome {
        let out = self.output();
        if out.code().is_none_or(|c| c == 0 || c == 101) {
            self.failed(&out, "a failure (an exit code other than 0 and 101)");
        }
        out
    }

    /// Run; it must exit 1 with exactly one line on standard error that
    /// contains every one of `needles`: the error an operator gets. Returns
    /// that line.
    pub fn fails_with_one_line(&self, needles: &[&str]) -> String {
        let out = self.fails_with(1);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected one error line, got:\n{}",
            self.describe(),
            out.stderr
        );
        for n in needles {
            assert!(lines[0].contains(n), "{n:?} missing from: {}", lines[0]);
        }
        lines[0].to_owned()
    }

    /// The command line, for messages: `walvault ARGS… [as USER] [in DIR] [with VARS]`.
    pub fn describe(&self) -> String {
        let mut s = String::from("walvault");
        for a in self.args.iter().chain(&self.global) {
            s.push(' ');
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(&a);
            }
        }
        if let Some(u) = &self.user {
            s.push_str(&format!(" [as {u}]"));
        }
        if let Some(d) = &self.cwd {
            s.push_str(&format!(" [in {}]", d.display()));
        }
        if !self.env.is_empty() {
            let names: Vec<_> = self.env.iter().map(|(k, _)| k.to_string_lossy()).collect();
            s.push_str(&format!(" [with {}]", names.join(" ")));
        }
        s
    }

    fn failed(&self, out: &Outcome, expected: &str) -> ! {
        panic!(
            "{} ended with {}, expected {expected}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.describe(),
            out.status,
            out.stdout,
            out.stderr
        )
    }
}

/// Copy the binary Cargo built for these tests to
/// `<tmp>/walvault-bin-<identity>/walvault`, where the identity (device,
/// inode, size, modification time) changes with every build: test
/// processes of one build share one copy, and a later build gets a copy of
/// its own instead of replacing the one running tests use. Copies of other
/// builds that no test process started with for [`STALE_COPY`] are deleted.
fn copy_of_the_binary() -> PathBuf {
    let src = Path::new(env!("CARGO_BIN_EXE_walvault"));
    let identity = |m: &fs::Metadata| {
        format!(
            "{:x}-{:x}-{:x}-{:x}.{:09}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        )
    };
    for _ in 0..5 {
        let meta = fs::metadata(src)
            .unwrap_or_else(|e| panic!("the walvault binary {}: {e}", src.display()));
        let key = identity(&meta);
        let dir = tmp_base().join(format!("walvault-bin-{key}"));
        let dest = dir.join("walvault");
        fs::create_dir_all(&dir).expect("directory for the binary's copy");
        // every user passes through, as a server's OS user runs the copy
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        // when this build's copy was last chosen by a test process
        let _ = fs::write(dir.join("last-used"), b"");
        if fs::metadata(&dest).is_ok_and(|m| m.len() == meta.size()) {
            return dest;
        }
        // copied under a name of its own and linked into place, so another
        // process sees either no copy or a whole one; never replaced, as a
        // running walvault starts its helpers from its own path
        // (current_exe), which must go on naming the same file
        let partial = dir.join(format!("walvault.{}.partial", std::process::id()));
        fs::copy(src, &partial).expect("copy the walvault binary");
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755)).expect("chmod");
        // a build that replaced the binary during the copy: start again
        let unchanged = fs::metadata(src).is_ok_and(|m| identity(&m) == key);
        if unchanged {
            // (another process that linked its copy first: that one serves)
            if let Err(e) = fs::hard_link(&partial, &dest) {
                assert!(
                    e.kind() == std::io::ErrorKind::AlreadyExists,
                    "link the binary's copy to {}: {e}",
                    dest.display()
                );
            }
        }
        let _ = fs::remove_file(&partial);
        if unchanged {
            remove_stale_copies(&dir);
            return dest;
        }
    }
    panic!(
        "{} kept changing while it was copied (a build running?)",
        src.display()
    );
}

/// Delete the other `walvault-bin-*` directories nobody used for [`STALE_COPY`].
fn remove_stale_copies(keep: &Path) {
    let Ok(entries) = fs::read_dir(tmp_base()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let ours = e.file_name().to_string_lossy().starts_with("walvault-bin-");
        let stale = fs::metadata(path.join("last-used"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age > STALE_COPY)
            });
        if ours && stale && path != keep {
            let _ = fs::remove_dir_all(&path);
        }
    }
}
