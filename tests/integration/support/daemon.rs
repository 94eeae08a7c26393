//! A `walvault daemon` child process under test, a small HTTP client for
//! its API, a webhook receiver and an SMTP sink (Python's `aiosmtpd`, a
//! real SMTP server) for its alerts. Processes are killed when dropped;
//! the daemon's log is printed when the test panics.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{free_port, tmp_base, wait_for, Walvault};

/// A `walvault daemon` process.
pub struct Daemon {
    cmd: Walvault,
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`; `None` when nothing
/// listens.
pub fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> Option<Answer> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        body: body.to_owned(),
    })
}

impl Daemon {
    /// `walvault daemon --listen 127.0.0.1:PORT EXTRA…` with `wv`'s
    /// configuration; standard error goes to the log.
    pub fn start(wv: &Walvault, extra: &[&str]) -> Daemon {
        let mut d = Daemon::new(wv, extra);
        d.spawn();
        d
    }

    /// [`Daemon::start`]'s command, not started yet.
    pub fn new(wv: &Walvault, extra: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("walvault-daemon-")
            .tempdir_in(tmp_base())
            .expect("temp dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("daemon.log");
        let cmd = wv.args(["daemon", "--listen", &addr]).args(extra);
        Daemon {
            cmd,
            child: None,
            addr,
            log,
            _dir: dir,
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is running").id()
    }

    /// Wait until the process exits by itself (within `within`); its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        // (left in place until it exited: a timeout's drop kills it)
        let status = wait_for(within, "the daemon exits", || {
            self.child
                .as_mut()
                .expect("the daemon was started")
                .try_wait()
                .expect("try_wait")
                .ok_or_else(|| "still running".to_owned())
        });
        self.child = None;
        status
    }

    /// Start the process (again after [`Daemon::kill9`]) and wait until it
    /// answers `/healthz`.
    pub fn spawn(&mut self) {
        self.spawn_with(|_| {});
        let addr = self.addr.clone();
        wait_for(
            Duration::from_secs(60),
            "the daemon answers /healthz",
            || {
                assert!(self.running(), "the daemon exited:\n{}", self.log());
                http(&addr, "GET", "/healthz", None)
                    .filter(|a| a.status == 200)
                    .ok_or_else(|| "no answer".to_owned())
            },
        );
    }

    /// Start the process with `adjust` applied to its command; no wait.
    pub fn spawn_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        assert!(self.child.is_none(), "the daemon is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut c = self.cmd.command();
        c.stdout(Stdio::null()).stderr(log);
        adjust(&mut c);
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.cmd.describe()));
        self.child = Some(child);
    }

    /// kill -9, and wait until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().expect("wait for the daemon");
        }
    }

    /// SIGTERM; it must exit 0 within `within`.
    pub fn stop(&mut self, within: Duration) {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM the daemon");
            let status = wait_for(within, "the daemon exits on SIGTERM", || {
                child
                    .try_wait()
                    .expect("try_wait")
                    .ok_or_else(|| "still running".to_owned())
            });
            assert!(
                status.success(),
                "daemon exited with {status}:\n{}",
                self.log()
            );
        }
    }

    /// Send `sig` to the running process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the daemon is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
            .expect("signal the daemon");
    }

    /// Started and not exited.
    pub fn running(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait().expect("try_wait")),
            Some(None)
        )
    }

    /// Its standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path`, which must answer 200.
    pub fn get(&self, path: &str) -> Answer {
        let a = http(&self.addr, "GET", path, None)
            .unwrap_or_else(|| panic!("GET {path}: no answer\n{}", self.log()));
        assert_eq!(a.status, 200, "GET {path}: {a:?}");
        a
    }

    /// `/api/status`.
    pub fn status(&self) -> serde_json::Value {
        self.get("/api/status").json()
    }

    /// Wait until a run of `kind` that `pick` accepts has ended (recent
    /// jobs); returns it.
    pub fn wait_run(
        &self,
        within: Duration,
        kind: &str,
        mut pick: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(within, &format!("a {kind} run"), || {
            let s = self.status();
            s["recent"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["kind"] == kind && pick(r))
                .cloned()
                .ok_or_else(|| format!("running {}, recent {}", s["running"], s["recent"]))
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
        self.kill9();
    }
}

/// An HTTP server that answers 200 to every request and keeps the JSON
/// bodies.
pub struct Webhook {
    pub url: String,
    pub received: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    pub fn start() -> Webhook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let keep = received.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let keep = keep.clone();
                std::thread::spawn(move || serve_one(s, &keep));
            }
        });
        Webhook { url, received }
    }

    /// Bodies received so far.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }

    /// Wait for a body `pick` accepts.
    pub fn wait(
        &self,
        within: Duration,
        what: &str,
        mut pick: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(within, what, || {
            let all = self.bodies();
            all.iter()
                .find(|b| pick(b))
                .cloned()
                .ok_or_else(|| format!("received {all:?}"))
        })
    }
}

fn serve_one(mut s: TcpStream, keep: &Mutex<Vec<serde_json::Value>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    // read the head, then Content-Length bytes of body
    loop {
        let Ok(n) = s.read(&mut chunk) else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                if let Ok(v) = serde_json::from_str(&body[..len]) {
                    keep.lock().unwrap().push(v);
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
                return;
            }
        }
    }
}

/// The Python of the tools' virtualenv (moto, aiosmtpd, selenium).
pub fn tools_python() -> PathBuf {
    super::moto::moto_bin()
        .parent()
        .expect("virtualenv bin")
        .join("python")
}

/// An SMTP server (aiosmtpd) that stores each message in a maildir.
pub struct Smtp {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Smtp {
    pub fn start() -> Smtp {
        Smtp::spawn(|port, mail| {
            vec![
                "-m".into(),
                "aiosmtpd".into(),
                "-n".into(),
                "-l".into(),
                format!("127.0.0.1:{port}").into(),
                "-c".into(),
                "aiosmtpd.handlers.Mailbox".into(),
                mail.into(),
            ]
        })
    }

    /// Python with the arguments `args(port, maildir)` gives, until it
    /// listens on the port.
    fn spawn(args: impl FnOnce(u16, PathBuf) -> Vec<std::ffi::OsString>) -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(tools_python())
            .args(args(port, dir.path().join("mail")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start aiosmtpd (scripts/install-moto.sh installs it)");
        wait_for(Duration::from_secs(30), "aiosmtpd listens", || {
            TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
        });
        Smtp { child, port, dir }
    }

    /// An SMTP server that requires STARTTLS, with `cert` and `key` (PEM
    /// files).
    pub fn start_starttls(cert: &std::path::Path, key: &std::path::Path) -> Smtp {
        const SERVER: &str = "import ssl, sys, time\n\
from aiosmtpd.controller import Controller\n\
from aiosmtpd.handlers import Mailbox\n\
port, cert, key, mail = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]\n\
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)\n\
ctx.load_cert_chain(cert, key)\n\
c = Controller(Mailbox(mail), hostname='127.0.0.1', port=port, tls_context=ctx, require_starttls=True)\n\
c.start()\n\
while True:\n    time.sleep(3600)\n";
        Smtp::spawn(|port, mail| {
            vec![
                "-c".into(),
                SERVER.into(),
                port.to_string().into(),
                cert.into(),
                key.into(),
                mail.into(),
            ]
        })
    }

    /// The messages received, each as its raw text.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let d = self.dir.path().join("mail").join(sub);
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
