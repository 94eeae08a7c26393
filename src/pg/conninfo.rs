//! Connection parameters as libpq takes them: a conninfo string
//! (`host=… port=… user=… dbname=… password=… sslmode=…`, values optionally in
//! single quotes with `\'` and `\\` escapes) or a URL
//! (`postgres://user:password@host:port/dbname?sslmode=require`), completed
//! from `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGAPPNAME` and the password file (`PGPASSFILE` or
//! `~/.pgpass`).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or address, over TCP.
    Tcp(String),
    /// A unix-domain socket directory.
    Unix(PathBuf),
}

/// `sslmode`, as libpq defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it (libpq's default over TCP).
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS, certificate signed by `sslrootcert`.
    VerifyCa,
    /// TLS, certificate signed by `sslrootcert` and naming the host.
    VerifyFull,
}

/// `target_session_attrs`, as libpq defines it: which of several hosts
/// a connection accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAttrs {
    /// The first host that answers.
    #[default]
    Any,
    /// A server that accepts writes (not a standby, not read-only by default).
    ReadWrite,
    /// A server in read-only mode (a standby, or read-only by default).
    ReadOnly,
    /// A server not in recovery.
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
    /// A standby if any host is one, else any server.
    PreferStandby,
}

impl SessionAttrs {
    /// libpq's name.
    pub fn name(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    fn parse(s: &str) -> Result<SessionAttrs, ConnInfoError> {
        Ok(match s {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            other => {
                return Err(ConnInfoError(format!(
                    "unknown target_session_attrs {other:?} (any, read-write, read-only, primary, standby, prefer-standby)"
                )))
            }
        })
    }
}

/// One more host of a multi-host conninfo (`host=a,b port=5432,5433`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherHost {
    /// Its address.
    pub host: Host,
    /// Its port.
    pub port: u16,
    /// Its password: the conninfo's or the environment's, else its line of
    /// the password file.
    pub password: Option<String>,
}

/// Everything needed to open a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnParams {
    /// Server address (the first, when the conninfo lists several).
    pub host: Host,
    /// Port (also names the unix socket file).
    pub port: u16,
    /// The hosts after the first, tried in order.
    pub other_hosts: Vec<OtherHost>,
    /// Which server a connection accepts among the hosts.
    pub target_session_attrs: SessionAttrs,
    /// Role to log in as.
    pub user: String,
    /// Database (replication connections need none).
    pub dbname: Option<String>,
    /// Password, from the string, `PGPASSWORD`, or the password file.
    pub password: Option<String>,
    /// TLS policy.
    pub sslmode: SslMode,
    /// CA certificate file for verify-ca / verify-full.
    pub sslrootcert: Option<PathBuf>,
    /// `application_name` (shows in pg_stat_replication).
    pub application_name: String,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
}

/// A conninfo that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection string: {0}")]
pub struct ConnInfoError(pub String);

impl ConnParams {
    /// Parse `s` and complete it from the environment and the password file.
    pub fn parse(s: &str) -> Result<ConnParams, ConnInfoError> {
        Self::parse_with_env(s, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`ConnParams::parse`] with an explicit environment (for tests).
    pub fn parse_with_env(
        s: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnParams, ConnInfoError> {
        let pairs = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            parse_url(s)?
        } else {
            parse_keywords(s)?
        };
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        for (k, _) in &pairs {
            let known = [
                "host",
                "hostaddr",
                "port",
                "user",
                "dbname",
                "password",
                "sslmode",
                "sslrootcert",
                "application_name",
                "connect_timeout",
                "replication",
                "passfile",
                "target_session_attrs",
            ];
            if !known.contains(&k.as_str()) {
                return Err(ConnInfoError(format!("unknown parameter {k:?}")));
            }
        }
        let host_s = get("host")
            .or_else(|| get("hostaddr"))
            .or_else(|| env("PGHOST"))
            .unwrap_or_default();
        // libpq: a comma-separated list of hosts, with one port for all or
        // one port per host
        let hosts: Vec<Host> = host_s
            .split(',')
            .map(|h| match h.trim() {
                "" => Host::Unix(PathBuf::from("/var/run/postgresql")),
                h if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
                h => Host::Tcp(h.to_owned()),
            })
            .collect();
        let port_s = get("port").or_else(|| env("PGPORT")).unwrap_or_default();
        let ports = port_s
            .split(',')
            .map(|p| match p.trim() {
                "" => Ok(5432),
                p => p
                    .parse()
                    .map_err(|_| ConnInfoError(format!("port {p:?} is not a number"))),
            })
            .collect::<Result<Vec<u16>, _>>()?;
        if ports.len() != 1 && ports.len() != hosts.len() {
            return Err(ConnInfoError(format!(
                "{} ports for {} hosts: give one port, or one per host",
                ports.len(),
                hosts.len()
            )));
        }
        let port_of = |i: usize| ports[if ports.len() == 1 { 0 } else { i }];
        let host = hosts[0].clone();
        let port = port_of(0);
        let target_session_attrs =
            match get("target_session_attrs").or_else(|| env("PGTARGETSESSIONATTRS")) {
                Some(a) => SessionAttrs::parse(&a)?,
                None => SessionAttrs::Any,
            };
        let user = get("user")
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        let dbname = get("dbname").or_else(|| env("PGDATABASE"));
        let sslmode = match get("sslmode").or_else(|| env("PGSSLMODE")).as_deref() {
            None => {
                if matches!(host, Host::Unix(_)) {
                    SslMode::Disable
                } else {
                    SslMode::Prefer
                }
            }
            Some("disable") => SslMode::Disable,
            Some("allow") | Some("prefer") => SslMode::Prefer,
            Some("require") => SslMode::Require,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("verify-full") => SslMode::VerifyFull,
            Some(other) => return Err(ConnInfoError(format!("unknown sslmode {other:?}"))),
        };
        let connect_timeout = match get("connect_timeout") {
            Some(t) => Duration::from_secs(
                t.parse()
                    .map_err(|_| ConnInfoError(format!("connect_timeout {t:?}")))?,
            ),
            None => Duration::from_secs(10),
        };
        let mut p = ConnParams {
            password: get("password").or_else(|| env("PGPASSWORD")),
            sslrootcert: get("sslrootcert")
                .or_else(|| env("PGSSLROOTCERT"))
                .map(PathBuf::from),
            application_name: get("application_name")
                .or_else(|| env("PGAPPNAME"))
                .unwrap_or_else(|| "walvault".into()),
            host,
            port,
            other_hosts: Vec::new(),
            target_session_attrs,
            user,
            dbname,
            sslmode,
            connect_timeout,
        };
        let passfile = get("passfile")
            .or_else(|| env("PGPASSFILE"))
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
        let explicit = p.password.is_some();
        for (i, h) in hosts.iter().enumerate().skip(1) {
            let mut other = ConnParams {
                host: h.clone(),
                port: port_of(i),
                ..p.clone()
            };
            if !explicit {
                other.password = passfile.as_deref().and_then(|f| pgpass_lookup(f, &other));
            }
            p.other_hosts.push(OtherHost {
                host: other.host,
                port: other.port,
                password: other.password,
            });
        }
        if !explicit {
            if let Some(f) = passfile {
                p.password = pgpass_lookup(&f, &p);
            }
        }
        Ok(p)
    }

    /// `host:port` or the socket path, for messages (every host, when the
    /// conninfo lists several).
    pub fn describe(&self) -> String {
        std::iter::once(describe_host(&self.host, self.port))
            .chain(
                self.other_hosts
                    .iter()
                    .map(|o| describe_host(&o.host, o.port)),
            )
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One connection target per host, in order, each with no other hosts.
    pub fn each_host(&self) -> Vec<ConnParams> {
        let one = |host: &Host, port: u16, password: Option<String>| ConnParams {
            host: host.clone(),
            port,
            password,
            other_hosts: Vec::new(),
            ..self.clone()
        };
        std::iter::once(one(&self.host, self.port, self.password.clone()))
            .chain(
                self.other_hosts
                    .iter()
                    .map(|o| one(&o.host, o.port, o.password.clone())),
            )
            .collect()
    }
}

fn describe_host(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(h) => format!("{h}:{port}"),
        Host::Unix(d) => format!("{}/.s.PGSQL.{port}", d.display()),
    }
}

fn parse_keywords(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError(format!("missing \"=\" after {key:?}")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => val.push(c),
                        None => return Err(ConnInfoError("trailing backslash".into())),
                    },
                    Some('\'') => break,
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        val.push(n);
                    }
                } else {
                    val.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(ConnInfoError("empty parameter name".into()));
        }
        out.push((key, val));
    }
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| ConnInfoError(format!("bad %-escape in {s:?}")))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| ConnInfoError(format!("bad %-escape in {s:?}")))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError(format!("{s:?} is not UTF-8 after decoding")))
}

fn parse_url(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let rest = s.split_once("://").map(|x| x.1).unwrap_or("");
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, db) = main.split_once('/').unwrap_or((main, ""));
    let mut out = Vec::new();
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(u) = userinfo {
        let (user, pass) = u.split_once(':').unwrap_or((u, ""));
        if !user.is_empty() {
            out.push(("user".into(), percent_decode(user)?));
        }
        if u.contains(':') {
            out.push(("password".into(), percent_decode(pass)?));
        }
    }
    // host[:port], or several separated by commas
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for hp in hostport.split(',') {
        let (host, port) = if let Some(h) = hp.strip_prefix('[') {
            let (h, rest) = h
                .split_once(']')
                .ok_or_else(|| ConnInfoError("unterminated [ in host".into()))?;
            (h, rest.strip_prefix(':'))
        } else {
            match hp.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hp, None),
            }
        };
        hosts.push(percent_decode(host)?);
        ports.push(port.unwrap_or("").to_owned());
    }
    if hosts.iter().any(|h| !h.is_empty()) {
        out.push(("host".into(), hosts.join(",")));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        out.push(("port".into(), ports.join(",")));
    }
    if !db.is_empty() {
        out.push(("dbname".into(), percent_decode(db)?));
    }
    for kv in query.split('&').filter(|x| !x.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ConnInfoError(format!("bad URL parameter {kv:?}")))?;
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

/// The password for `p` from a password file, as libpq finds it: lines
/// `host:port:database:username:password`, `*` matches anything, `\:` and
/// `\\` escape; the first match wins; a file readable by others is ignored.
pub fn pgpass_lookup(file: &Path, p: &ConnParams) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignoring it (chmod 0600)",
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = match &p.host {
        Host::Tcp(h) => h.clone(),
        Host::Unix(_) => "localhost".into(),
    };
    let port = p.port.to_string();
    // libpq matches physical replication connections against database "replication"
    let db = p.dbname.clone().unwrap_or_else(|| "replication".into());
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&fields[0], &host)
            && m(&fields[1], &port)
            && m(&fields[2], &db)
            && m(&fields[3], &p.user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str, env: &[(&str, &str)]) -> Result<ConnParams, ConnInfoError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConnParams::parse_with_env(s, &move |k| {
            env.iter().find(|(e, _)| e == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn keywords_and_quotes() {
        let p = parse(
            "host=db.example port=6432 user=bk password='it''s \\'x\\'' dbname=app",
            &[],
        );
        assert!(p.is_err(), "'' inside quotes is not libpq syntax");
        let p = parse(
            "host=db.example port=6432 user=bk password='a b\\'c' dbname=app sslmode=require",
            &[],
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("db.example".into()));
        assert_eq!(
            (p.port, p.user.as_str(), p.password.as_deref()),
            (6432, "bk", Some("a b'c"))
        );
        assert_eq!(p.sslmode, SslMode::Require);
        let p = parse(
            "host=/tmp/sock",
            &[("PGUSER", "u"), ("PGPORT", "5433"), ("PGPASSWORD", "pw")],
        )
        .unwrap();
        assert_eq!(p.host, Host::Unix("/tmp/sock".into()));
        assert_eq!(
            (p.port, p.user.as_str(), p.password.as_deref()),
            (5433, "u", Some("pw"))
        );
        assert_eq!(p.sslmode, SslMode::Disable);
        assert!(parse("host", &[]).is_err());
        assert!(parse("bogus=1", &[]).is_err());
        assert!(parse("port=x", &[]).is_err());
        assert!(parse("sslmode=sometimes", &[]).is_err());
    }

    #[test]
    fn urls() {
        let p = parse(
            "postgres://bk:p%40ss@10.0.0.5:5433/app?sslmode=verify-full&application_name=x",
            &[],
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("10.0.0.5".into()));
        assert_eq!(
            (p.port, p.user.as_str(), p.password.as_deref()),
            (5433, "bk", Some("p@ss"))
        );
        assert_eq!(
            (p.dbname.as_deref(), p.sslmode, p.application_name.as_str()),
            (Some("app"), SslMode::VerifyFull, "x")
        );
        let p = parse("postgresql://[::1]:5432", &[("PGUSER", "me")]).unwrap();
        assert_eq!((p.host, p.user.as_str()), (Host::Tcp("::1".into()), "me"));
        let p = parse("postgres:///db?host=/run/pg", &[]).unwrap();
        assert_eq!(p.host, Host::Unix("/run/pg".into()));
        assert!(parse("postgres://u@h/db?x", &[]).is_err());
    }

    fn hosts(p: &ConnParams) -> Vec<(Host, u16)> {
        p.each_host()
            .into_iter()
            .map(|h| (h.host, h.port))
            .collect()
    }

    #[test]
    fn several_hosts() {
        let p = parse(
            "host=db1,db2,/run/pg port=5432,5433,5434 user=bk target_session_attrs=prefer-standby",
            &[],
        )
        .unwrap();
        assert_eq!((p.host.clone(), p.port), (Host::Tcp("db1".into()), 5432));
        assert_eq!(p.target_session_attrs, SessionAttrs::PreferStandby);
        assert_eq!(
            hosts(&p),
            vec![
                (Host::Tcp("db1".into()), 5432),
                (Host::Tcp("db2".into()), 5433),
                (Host::Unix("/run/pg".into()), 5434)
            ]
        );
        assert!(p.each_host().iter().all(|h| h.other_hosts.is_empty()));
        assert_eq!(p.describe(), "db1:5432,db2:5433,/run/pg/.s.PGSQL.5434");
        // one port for every host
        let p = parse("host=a,b port=6432", &[]).unwrap();
        assert_eq!(p.each_host()[1].port, 6432);
        assert!(parse("host=a,b,c port=1,2", &[]).is_err());
        assert!(parse("host=a target_session_attrs=sometimes", &[]).is_err());
        // URLs: host:port pairs separated by commas
        let p = parse(
            "postgres://bk@db1:5432,db2/app?target_session_attrs=primary",
            &[],
        )
        .unwrap();
        assert_eq!(
            hosts(&p),
            vec![
                (Host::Tcp("db1".into()), 5432),
                (Host::Tcp("db2".into()), 5432)
            ]
        );
        assert_eq!(p.target_session_attrs, SessionAttrs::Primary);
    }

    #[test]
    fn pgpass() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "# comment\nother:*:*:*:no\ndb.example:5432:*:bk:se\\:cret\n*:*:*:*:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = [("PGPASSFILE", f.to_str().unwrap())];
        assert_eq!(
            parse("host=db.example user=bk", &env)
                .unwrap()
                .password
                .as_deref(),
            Some("se:cret")
        );
        assert_eq!(
            parse("host=elsewhere user=bk", &env)
                .unwrap()
                .password
                .as_deref(),
            Some("fallback")
        );
        // each host of a list gets its own line, never another host's
        let p = parse("host=db.example,other user=bk", &env).unwrap();
        let each = p.each_host();
        assert_eq!(each[0].password.as_deref(), Some("se:cret"));
        assert_eq!(each[1].password.as_deref(), Some("no"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            parse("host=db.example user=bk", &env).unwrap().password,
            None
        );
    }
}
