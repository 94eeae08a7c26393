//! A PostgreSQL connection for walvault's own use: ordinary or replication
//! mode, over TCP (with TLS per `sslmode`, see [`super::tls`]) or a unix
//! socket, authenticating with trust, clear-text password, MD5,
//! SCRAM-SHA-256 or, over TLS, SCRAM-SHA-256-PLUS with `tls-server-end-point`
//! channel binding; simple queries and COPY streams (CopyOut for BASE_BACKUP,
//! CopyBoth for START_REPLICATION).
//!
//! Frontend messages are encoded with `postgres_protocol`; backend messages
//! are parsed by the sans-IO [`super::wire`] module.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conninfo::{ConnParams, Host, SessionAttrs, SslMode};
use super::tls::{self, Negotiated, TlsInfo};
use super::wire::{self, Auth, Backend, ServerMessage, WireError};

/// Why talking to PostgreSQL failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No connection could be opened.
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        /// Address tried.
        target: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connecting took longer than `connect_timeout`.
    #[error("connecting to PostgreSQL at {target} timed out after {secs} s")]
    Timeout {
        /// Address tried.
        target: String,
        /// Seconds waited.
        secs: u64,
    },
    /// The connection broke.
    #[error("lost the connection to PostgreSQL at {target}: {source}")]
    Io {
        /// Server address.
        target: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server reported an error.
    #[error("PostgreSQL at {target}: {message}")]
    Server {
        /// Server address.
        target: String,
        /// Its fields (boxed: errors stay small on the happy path).
        message: Box<ServerMessage>,
    },
    /// The server sent something that breaks the protocol.
    #[error("PostgreSQL at {target}: {source}")]
    Wire {
        /// Server address.
        target: String,
        /// What was wrong.
        source: WireError,
    },
    /// TLS could not be set up as `sslmode` demands.
    #[error("PostgreSQL at {target}: {reason} (sslmode={sslmode})")]
    Tls {
        /// Server address.
        target: String,
        /// libpq's name of the mode in force.
        sslmode: &'static str,
        /// What failed and what to do.
        reason: String,
    },
    /// None of several hosts gave a connection of the kind asked for.
    #[error("no usable server among {target} ({attrs}): {reasons}")]
    NoHost {
        /// Every host.
        target: String,
        /// `target_session_attrs`.
        attrs: String,
        /// Why each host was passed over.
        reasons: String,
    },
    /// A value PostgreSQL would refuse (a slot name), refused before sending.
    #[error(transparent)]
    BadInput(super::ParseError),
    /// The exchange did not go as the protocol says, or a feature is missing.
    #[error("PostgreSQL at {target}: {reason}")]
    Protocol {
        /// Server address.
        target: String,
        /// What happened.
        reason: String,
    },
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Server { message, .. } => Some(&message.code),
            _ => None,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Rows of a simple query, as text.
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Values (None for NULL), raw bytes as the server sent them.
    pub rows: Vec<Vec<Option<Bytes>>>,
}

impl QueryResult {
    /// Value of `column` in row `row` as text.
    pub fn text(&self, row: usize, column: &str) -> Option<String> {
        let i = self.columns.iter().position(|c| c == column)?;
        let v = self.rows.get(row)?.get(i)?.as_ref()?;
        Some(String::from_utf8_lossy(v).into_owned())
    }
}

/// An open connection.
pub struct PgConnection {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    target: String,
    notices: Vec<ServerMessage>,
    tls: Option<TlsInfo>,
    auth_mechanism: Option<&'static str>,
    /// The parameters of the one host this connection went to.
    server: ConnParams,
}

/// A server's role, as `target_session_attrs` sees it.
struct Role {
    in_recovery: bool,
    read_only: bool,
}

/// Notices kept for [`PgConnection::take_notices`]; more are only logged.
const MAX_NOTICES: usize = 1000;

impl std::fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnection")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PgConnection {
    /// Connect and authenticate; `replication` opens a physical replication
    /// connection (`replication=true`). With several hosts, they are tried
    /// in order and the first whose role `target_session_attrs` accepts is
    /// kept (`prefer-standby`: a standby, else the first server that
    /// answered).
    pub async fn connect(p: &ConnParams, replication: bool) -> Result<PgConnection, PgError> {
        if p.other_hosts.is_empty() && p.target_session_attrs == SessionAttrs::Any {
            return Self::connect_one(p, replication).await;
        }
        let want = p.target_session_attrs;
        let mut failures: Vec<PgError> = Vec::new();
        let mut passed_over = Vec::new();
        let mut fallback = None;
        for one in p.each_host() {
            let mut c = match Self::connect_one(&one, replication).await {
                Ok(c) => c,
                Err(e) => {
                    passed_over.push(e.to_string());
                    failures.push(e);
                    continue;
                }
            };
            let role = match c.role(replication).await {
                Ok(r) => r,
                Err(e) => {
                    passed_over.push(e.to_string());
                    failures.push(e);
                    continue;
                }
            };
            let fits = match want {
                SessionAttrs::Any => true,
                SessionAttrs::Primary => !role.in_recovery,
                SessionAttrs::Standby | SessionAttrs::PreferStandby => role.in_recovery,
                SessionAttrs::ReadWrite => !role.read_only,
                SessionAttrs::ReadOnly => role.read_only,
            };
            if fits {
                if let Some(f) = fallback.take() {
                    PgConnection::close(f).await;
                }
                return Ok(c);
            }
            passed_over.push(format!(
                "{} is {}",
                c.target,
                if role.in_recovery {
                    "a standby"
                } else if role.read_only {
                    "read-only"
                } else {
                    "a primary"
                }
            ));
            if want == SessionAttrs::PreferStandby && fallback.is_none() {
                fallback = Some(c);
            } else {
                c.close().await;
            }
        }
        if let Some(c) = fallback {
            return Ok(c);
        }
        // one host that failed, or every host failing the same way (bad
        // credentials, hot_standby off): the server's own error is what to
        // report (callers read its SQLSTATE; a retry cannot fix credentials)
        let first_state = failures.first().and_then(|e| e.sqlstate());
        if !failures.is_empty()
            && passed_over.len() == failures.len()
            && (failures.len() == 1
                || (first_state.is_some() && failures.iter().all(|e| e.sqlstate() == first_state)))
        {
            return Err(failures.swap_remove(0));
        }
        Err(PgError::NoHost {
            target: p.describe(),
            attrs: format!("target_session_attrs={}", want.name()),
            reasons: passed_over.join("; "),
        })
    }

    /// Whether the server is in recovery, and read-only: from the
    /// parameters PostgreSQL 14+ reports, else by asking.
    async fn role(&mut self, replication: bool) -> Result<Role, PgError> {
        let in_recovery = match self.parameter("in_hot_standby") {
            Some(v) => v == "on",
            // a physical replication connection runs no SELECT
            None if replication => self.show("transaction_read_only").await? == "on",
            None => {
                let r = self
                    .simple_query("SELECT pg_catalog.pg_is_in_recovery()::text AS r")
                    .await?;
                r.text(0, "r").as_deref() == Some("true")
            }
        };
        let read_only = in_recovery
            || match self.parameter("default_transaction_read_only") {
                Some(v) => v == "on",
                None => self.show("transaction_read_only").await? == "on",
            };
        Ok(Role {
            in_recovery,
            read_only,
        })
    }

    /// The parameters of the one host this connection went to (the others
    /// of a multi-host conninfo left out): a second connection to the same
    /// server.
    pub fn server_params(&self) -> &ConnParams {
        &self.server
    }

    async fn connect_one(p: &ConnParams, replication: bool) -> Result<PgConnection, PgError> {
        let target = p.describe();
        let secs = p.connect_timeout.as_secs();
        match tokio::time::timeout(
            p.connect_timeout.max(Duration::from_millis(1)),
            Self::open(p, replication),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout { target, secs }),
        }
    }

    async fn open(p: &ConnParams, replication: bool) -> Result<PgConnection, PgError> {
        let target = p.describe();
        let connect_err = |source| PgError::Connect {
            target: target.clone(),
            source,
        };
        let (stream, tls): (Box<dyn Stream>, Option<TlsInfo>) = match &p.host {
            Host::Tcp(h) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), p.port))
                    .await
                    .map_err(connect_err)?;
                let _ = s.set_nodelay(true);
                if p.sslmode == SslMode::Disable {
                    (Box::new(s), None)
                } else {
                    match tls::negotiate(s, p, h, &target).await? {
                        Negotiated::Plain(s) => (Box::new(s), None),
                        Negotiated::Tls(s, info) => (s, Some(info)),
                    }
                }
            }
            // as in libpq, sslmode does not apply to unix sockets
            Host::Unix(dir) => (
                Box::new(
                    tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{}", p.port)))
                        .await
                        .map_err(connect_err)?,
                ),
                None,
            ),
        };
        let mut c = PgConnection {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            params: HashMap::new(),
            target,
            notices: Vec::new(),
            tls,
            auth_mechanism: None,
            server: ConnParams {
                other_hosts: Vec::new(),
                target_session_attrs: SessionAttrs::Any,
                ..p.clone()
            },
        };
        let mut startup: Vec<(&str, &str)> =
            vec![("user", &p.user), ("application_name", &p.application_name)];
        if let Some(db) = &p.dbname {
            startup.push(("database", db));
        }
        if replication {
            startup.push(("replication", "true"));
        }
        frontend::startup_message(startup, &mut c.wbuf).map_err(|e| c.proto(e.to_string()))?;
        c.flush().await?;
        c.authenticate(p).await?;
        Ok(c)
    }

    fn proto(&self, reason: String) -> PgError {
        PgError::Protocol {
            target: self.target.clone(),
            reason,
        }
    }

    async fn authenticate(&mut self, p: &ConnParams) -> Result<(), PgError> {
        let password = |c: &Self| {
            p.password.clone().ok_or_else(|| {
                c.proto(format!(
                    "the server asks for a password for user {:?}: give it in the connection string, PGPASSWORD or ~/.pgpass",
                    p.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.recv().await? {
                Backend::Authentication(Auth::Ok) => {}
                Backend::Authentication(Auth::Cleartext) => {
                    let pw = password(self)?;
                    frontend::password_message(pw.as_bytes(), &mut self.wbuf).map_err(|e| self.proto(e.to_string()))?;
                    self.flush().await?;
                    self.auth_mechanism = Some("password");
                }
                Backend::Authentication(Auth::Md5(salt)) => {
                    let pw = password(self)?;
                    let hash = postgres_protocol::authentication::md5_hash(p.user.as_bytes(), pw.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf).map_err(|e| self.proto(e.to_string()))?;
                    self.flush().await?;
                    self.auth_mechanism = Some("md5");
                }
                Backend::Authentication(Auth::Sasl(mechs)) => {
                    let (mechanism, binding) = self.choose_sasl(&mechs)?;
                    let pw = password(self)?;
                    let s = ScramSha256::new(pw.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)
                        .map_err(|e| self.proto(e.to_string()))?;
                    self.flush().await?;
                    self.auth_mechanism = Some(mechanism);
                    scram = Some(s);
                }
                Backend::Authentication(Auth::SaslContinue(data)) => {
                    let s = scram.as_mut().ok_or_else(|| self.proto("SASL continue before SASL start".into()))?;
                    s.update(&data).map_err(|e| PgError::Protocol {
                        target: self.target.clone(),
                        reason: format!("SCRAM: {e}"),
                    })?;
                    frontend::sasl_response(s.message(), &mut self.wbuf).map_err(|e| self.proto(e.to_string()))?;
                    self.flush().await?;
                }
                Backend::Authentication(Auth::SaslFinal(data)) => {
                    let s = scram.as_mut().ok_or_else(|| self.proto("SASL final before SASL start".into()))?;
                    s.finish(&data).map_err(|e| PgError::Protocol {
                        target: self.target.clone(),
                        reason: format!("SCRAM: the server's signature does not verify ({e}): not the server it claims to be"),
                    })?;
                }
                Backend::Authentication(Auth::Unsupported(code)) => {
                    return Err(self.proto(format!(
                        "the server asks for an authentication method walvault does not support (code {code}: Kerberos/GSS/SSPI); use scram-sha-256 in pg_hba.conf"
                    )))
                }
                Backend::BackendKeyData => {}
                Backend::ReadyForQuery(_) => return Ok(()),
                Backend::Error(message) => {
                    return Err(PgError::Server {
                        target: self.target.clone(),
                        message: Box::new(message),
                    })
                }
                other => return Err(self.proto(format!("unexpected {other:?} during authentication"))),
            }
        }
    }

    /// The SASL mechanism and channel binding to use, as libpq's default
    /// `channel_binding=prefer` picks them.
    fn choose_sasl(&self, mechs: &[String]) -> Result<(&'static str, ChannelBinding), PgError> {
        let offers = |name: &str| mechs.iter().any(|m| m == name);
        match &self.tls {
            Some(TlsInfo {
                end_point: Some(hash),
            }) if offers(SCRAM_SHA_256_PLUS) => Ok((
                SCRAM_SHA_256_PLUS,
                ChannelBinding::tls_server_end_point(hash.clone()),
            )),
            Some(TlsInfo { end_point: None }) if offers(SCRAM_SHA_256) => {
                // 'n': we cannot bind to this certificate's signature algorithm
                // (Ed25519/Ed448), so we do not claim to support binding at all
                tracing::warn!(
                    "{}: the server certificate's signature algorithm defines no channel-binding hash; logging in without channel binding",
                    self.target
                );
                Ok((SCRAM_SHA_256, ChannelBinding::unsupported()))
            }
            // 'y': we could bind, the server did not offer it
            Some(_) if offers(SCRAM_SHA_256) => Ok((SCRAM_SHA_256, ChannelBinding::unrequested())),
            // without TLS there is no channel to bind to
            None if offers(SCRAM_SHA_256) => Ok((SCRAM_SHA_256, ChannelBinding::unsupported())),
            _ => Err(self.proto(format!(
                "the server offers only SASL mechanisms {mechs:?}, none walvault can use here"
            ))),
        }
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        let data = self.wbuf.split();
        self.stream
            .write_all(&data)
            .await
            .map_err(|source| PgError::Io {
                target: self.target.clone(),
                source,
            })?;
        self.stream.flush().await.map_err(|source| PgError::Io {
            target: self.target.clone(),
            source,
        })
    }

    /// The next message, with ParameterStatus recorded and notices logged.
    pub async fn recv(&mut self) -> Result<Backend, PgError> {
        loop {
            match wire::parse(&mut self.rbuf) {
                Ok(Some(Backend::ParameterStatus { name, value })) => {
                    self.params.insert(name, value);
                }
                Ok(Some(Backend::Notice(n))) => {
                    tracing::info!("PostgreSQL: {n}");
                    if self.notices.len() < MAX_NOTICES {
                        self.notices.push(n);
                    }
                }
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {
                    if self.rbuf.capacity() - self.rbuf.len() < 8192 {
                        self.rbuf.reserve(64 * 1024);
                    }
                    let n = self
                        .stream
                        .read_buf(&mut self.rbuf)
                        .await
                        .map_err(|source| PgError::Io {
                            target: self.target.clone(),
                            source,
                        })?;
                    if n == 0 {
                        return Err(PgError::Io {
                            target: self.target.clone(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "server closed the connection",
                            ),
                        });
                    }
                }
                Err(source) => {
                    return Err(PgError::Wire {
                        target: self.target.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Send a query without waiting for its results.
    pub async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| self.proto(e.to_string()))?;
        self.flush().await
    }

    /// Run one statement and collect its rows (the last result set when the
    /// server sends several).
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        self.send_query(sql).await?;
        self.finish_query(sql).await
    }

    /// Read the rest of a query's reply up to ReadyForQuery, collecting its
    /// rows (after a COPY ended, e.g. the result set that follows the end
    /// of a timeline in START_REPLICATION). `sql` names it in errors.
    pub async fn finish_query(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            match self.recv().await? {
                Backend::RowDescription(cols) => {
                    result = QueryResult {
                        columns: cols,
                        rows: Vec::new(),
                    }
                }
                Backend::DataRow(vals) => result.rows.push(vals),
                Backend::CommandComplete(_) | Backend::EmptyQueryResponse => {}
                Backend::Error(m) => error = Some(m),
                Backend::ReadyForQuery(_) => {
                    return match error {
                        Some(message) => Err(PgError::Server {
                            target: self.target.clone(),
                            message: Box::new(message),
                        }),
                        None => Ok(result),
                    }
                }
                Backend::CopyOutResponse | Backend::CopyBothResponse | Backend::CopyInResponse => {
                    return Err(self.proto(format!("{sql:?} started a COPY; use the streaming API")))
                }
                other => return Err(self.proto(format!("unexpected {other:?} after a query"))),
            }
        }
    }

    /// The next CopyData of a COPY stream; `None` at CopyDone.
    pub async fn copy_data(&mut self) -> Result<Option<Bytes>, PgError> {
        match self.recv().await? {
            Backend::CopyData(d) => Ok(Some(d)),
            Backend::CopyDone => Ok(None),
            Backend::Error(message) => Err(PgError::Server {
                target: self.target.clone(),
                message: Box::new(message),
            }),
            other => Err(self.proto(format!("unexpected {other:?} in a COPY stream"))),
        }
    }

    /// Send one CopyData (standby status updates in CopyBoth).
    pub async fn send_copy_data(&mut self, data: &[u8]) -> Result<(), PgError> {
        frontend::CopyData::new(data)
            .map_err(|e| self.proto(e.to_string()))?
            .write(&mut self.wbuf);
        self.flush().await
    }

    /// End our side of a COPY stream.
    pub async fn send_copy_done(&mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await
    }

    /// Notices and warnings received since the last call (at most 1000 are
    /// kept; all are logged).
    pub fn take_notices(&mut self) -> Vec<ServerMessage> {
        std::mem::take(&mut self.notices)
    }

    /// A run-time parameter the server reported (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// `server_version_num`, from the `server_version` the server reported
    /// (`15.18 (Debian ...)` → 150018; `9.6.3` → 90603).
    pub fn server_version_num(&self) -> Option<u32> {
        let v = self.parameter("server_version")?;
        let nums: Vec<u32> = v
            .split(|c: char| !c.is_ascii_digit())
            .take_while(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        match nums.as_slice() {
            [major, minor, ..] if *major >= 10 => Some(major * 10000 + minor),
            [major] if *major >= 10 => Some(major * 10000),
            [a, b, c, ..] => Some(a * 10000 + b * 100 + c),
            _ => None,
        }
    }

    /// True when the connection is encrypted with TLS.
    pub fn tls_in_use(&self) -> bool {
        self.tls.is_some()
    }

    /// How the server authenticated us: `"SCRAM-SHA-256-PLUS"` (with channel
    /// binding), `"SCRAM-SHA-256"`, `"md5"` or `"password"`; `None` when it
    /// asked for nothing (trust, peer).
    pub fn auth_mechanism(&self) -> Option<&'static str> {
        self.auth_mechanism
    }

    /// The server address, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Send Terminate and close.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }
}
