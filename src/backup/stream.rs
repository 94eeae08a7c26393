//! Driving BASE_BACKUP on a replication connection and turning its reply into
//! archive events, for both wire formats:
//! - PostgreSQL 15+: one CopyOut stream whose CopyData messages start with a
//!   type byte: 'n' new archive (name, tablespace location), 'd' archive data,
//!   'p' progress (bytes so far), 'm' manifest follows;
//! - PostgreSQL 13-14: one CopyOut stream of raw tar per tablespace, in the
//!   order of the tablespace result set (the main data directory last).
//!
//! Before the archives the server sends the start position and the tablespace
//! list; after them, the end position.

use bytes::{Buf, Bytes};

use super::tar::{TarEvent, TarParser};
use crate::pg::wire::Backend;
use crate::pg::{Lsn, PgConnection, PgError, TimelineId};

/// Options of BASE_BACKUP.
#[derive(Debug, Clone, Default)]
pub struct BaseBackupOptions {
    /// Label stored in backup_label.
    pub label: String,
    /// Request an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// Server-side rate limit, bytes per second (PostgreSQL takes 32 kB/s to 1 GB/s).
    pub max_rate: Option<u64>,
    /// Compression of the blocks this backup stores (default: the repository's).
    pub compression: Option<crate::codec::Compression>,
    /// Keep a backup in which the server found pages with bad checksums
    /// (they are listed in its manifest) instead of failing it.
    pub allow_checksum_failures: bool,
    /// On a standby: refuse when its replay lags its primary by more than
    /// this many bytes of WAL, or when it follows no primary (`None`: take
    /// the backup whatever the lag).
    pub standby_max_lag: Option<u64>,
    /// Read every file even when PostgreSQL 17+ could send only the
    /// blocks changed since the previous backup.
    pub no_incremental: bool,
    /// The previous backup to take an incremental backup against
    /// ([`crate::backup::run_backup`] chooses it; without it every file is read).
    pub incremental_base: Option<std::sync::Arc<super::incremental::IncrementalBase>>,
    /// Counts the bytes received (total: the server's size estimate).
    pub progress: Option<std::sync::Arc<crate::progress::Progress>>,
    /// Told the backup's start LSN as soon as the server reports it (the
    /// backup's WAL stream starts there).
    pub on_start: Option<std::sync::Arc<tokio::sync::watch::Sender<Option<Lsn>>>>,
}

/// A tablespace as the server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// OID; `None` for the main data directory.
    pub oid: Option<u32>,
    /// Location on the server; `None` for the main data directory.
    pub location: Option<String>,
    /// Size estimate in bytes, when the server computed one.
    pub size: Option<u64>,
}

/// What the server reported when the backup started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStart {
    /// The checkpoint's redo point: WAL from here is needed to restore.
    pub start_lsn: Lsn,
    /// Timeline of `start_lsn`.
    pub timeline: TimelineId,
    /// Tablespaces, main data directory included.
    pub tablespaces: Vec<TablespaceInfo>,
}

/// One event of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveEvent {
    /// A new archive begins: the main data directory (`None`) or a tablespace.
    Archive(Option<u32>),
    /// A tar event of the current archive.
    Tar(TarEvent),
    /// Bytes sent so far (PostgreSQL 15+).
    Progress(u64),
}

/// A BASE_BACKUP in progress.
#[derive(Debug)]
pub struct BaseBackupStream<'c> {
    conn: &'c mut PgConnection,
    multiplexed: bool,
    tablespaces: Vec<TablespaceInfo>,
    next_old_archive: usize,
    parser: Option<TarParser>,
    in_manifest: bool,
    /// The server's `backup_manifest`, as it arrives.
    manifest: Vec<u8>,
    end: Option<(Lsn, TimelineId)>,
    done: bool,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn protocol(conn: &PgConnection, reason: String) -> PgError {
    PgError::Protocol {
        target: conn.target().to_owned(),
        reason,
    }
}

impl<'c> BaseBackupStream<'c> {
    /// Send BASE_BACKUP in the server's syntax and read up to the archives;
    /// `incremental`: against the manifest sent with `UPLOAD_MANIFEST` on
    /// this connection (PostgreSQL 17+).
    pub async fn start(
        conn: &'c mut PgConnection,
        opts: &BaseBackupOptions,
        incremental: bool,
    ) -> Result<(Self, BackupStart), PgError> {
        let version = conn
            .server_version_num()
            .ok_or_else(|| protocol(conn, "the server did not report its version".into()))?;
        if version < 130000 {
            return Err(protocol(
                conn,
                format!("PostgreSQL {version} is too old: walvault needs 13 or newer"),
            ));
        }
        let multiplexed = version >= 150000;
        let rate_kb = opts.max_rate.map(|r| (r / 1024).clamp(32, 1_048_576));
        let sql = if multiplexed {
            let mut o = vec![
                format!("LABEL {}", quote(&opts.label)),
                "PROGRESS".into(),
                "WAIT false".into(),
                "MANIFEST 'yes'".into(),
                "MANIFEST_CHECKSUMS 'CRC32C'".into(),
                "TABLESPACE_MAP".into(),
            ];
            if opts.fast_checkpoint {
                o.push("CHECKPOINT 'fast'".into());
            }
            if incremental {
                o.push("INCREMENTAL".into());
            }
            if let Some(r) = rate_kb {
                o.push(format!("MAX_RATE {r}"));
            }
            format!("BASE_BACKUP ({})", o.join(", "))
        } else {
            let mut s = format!(
                "BASE_BACKUP LABEL {} PROGRESS NOWAIT TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'",
                quote(&opts.label)
            );
            if opts.fast_checkpoint {
                s.push_str(" FAST");
            }
            if let Some(r) = rate_kb {
                s.push_str(&format!(" MAX_RATE {r}"));
            }
            s
        };
        conn.send_query(&sql).await?;
        let start = read_result_set(conn).await?;
        let (start_lsn, timeline) = position(conn, &start)?;
        let ts_rows = read_result_set(conn).await?;
        let tablespaces = ts_rows
            .iter()
            .map(|r| TablespaceInfo {
                oid: r.first().cloned().flatten().and_then(|s| s.parse().ok()),
                location: r.get(1).cloned().flatten(),
                // spcsize is in kilobytes (1024 bytes)
                size: r
                    .get(2)
                    .cloned()
                    .flatten()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|kb| kb.saturating_mul(1024)),
            })
            .collect::<Vec<_>>();
        Ok((
            BaseBackupStream {
                conn,
                multiplexed,
                tablespaces: tablespaces.clone(),
                next_old_archive: 0,
                parser: None,
                in_manifest: false,
                manifest: Vec::new(),
                end: None,
                done: false,
            },
            BackupStart {
                start_lsn,
                timeline,
                tablespaces,
            },
        ))
    }

    /// Read the next message of the reply and append its events to `out`.
    /// Returns false once the reply is complete.
    pub async fn next(&mut self, out: &mut Vec<ArchiveEvent>) -> Result<bool, PgError> {
        if self.done {
            return Ok(false);
        }
        match self.conn.recv().await? {
            Backend::CopyOutResponse => {
                if !self.multiplexed {
                    self.finish_archive()?;
                    let ts = self.tablespaces.get(self.next_old_archive).cloned();
                    self.next_old_archive += 1;
                    match ts {
                        Some(t) => {
                            self.parser = Some(TarParser::new());
                            out.push(ArchiveEvent::Archive(t.oid));
                        }
                        // a stream past the tablespaces is the manifest: skip it
                        None => self.in_manifest = true,
                    }
                }
            }
            Backend::CopyData(mut d) => {
                if self.multiplexed {
                    if d.is_empty() {
                        return Err(self.err("empty CopyData in a BASE_BACKUP stream"));
                    }
                    let kind = d.get_u8();
                    match kind {
                        b'n' => {
                            self.finish_archive()?;
                            let name =
                                cstring(&mut d).ok_or_else(|| self.err("bad 'n' message"))?;
                            let oid = name
                                .strip_suffix(".tar")
                                .and_then(|n| n.parse::<u32>().ok());
                            if name != "base.tar" && oid.is_none() {
                                return Err(self.err(&format!("unexpected archive {name:?}")));
                            }
                            self.parser = Some(TarParser::new());
                            out.push(ArchiveEvent::Archive(oid));
                        }
                        b'd' if self.in_manifest => self.manifest.extend_from_slice(&d),
                        b'd' => self.feed(d, out)?,
                        b'p' => {
                            if d.len() >= 8 {
                                out.push(ArchiveEvent::Progress(d.get_i64().max(0) as u64));
                            }
                        }
                        b'm' => {
                            self.finish_archive()?;
                            self.in_manifest = true;
                        }
                        other => {
                            return Err(self.err(&format!(
                                "unknown BASE_BACKUP message type {:?}",
                                other as char
                            )))
                        }
                    }
                } else if !self.in_manifest {
                    self.feed(d, out)?;
                } else {
                    self.manifest.extend_from_slice(&d);
                }
            }
            Backend::CopyDone => {
                self.finish_archive()?;
            }
            Backend::RowDescription(_) => {
                let rows = collect_rows(self.conn).await?;
                self.end = Some(position(self.conn, &rows)?);
            }
            Backend::CommandComplete(_) => {}
            Backend::ReadyForQuery(_) => {
                self.done = true;
                return Ok(false);
            }
            Backend::Error(message) => {
                return Err(PgError::Server {
                    target: self.conn.target().to_owned(),
                    message: Box::new(message),
                })
            }
            other => {
                return Err(self.err(&format!("unexpected {other:?} in the BASE_BACKUP reply")))
            }
        }
        Ok(true)
    }

    fn feed(&mut self, d: Bytes, out: &mut Vec<ArchiveEvent>) -> Result<(), PgError> {
        let parser = self.parser.as_mut().ok_or_else(|| PgError::Protocol {
            target: String::new(),
            reason: "archive data before any archive began".into(),
        })?;
        let mut events = Vec::new();
        let r = parser.feed(d, &mut events);
        out.extend(events.into_iter().map(ArchiveEvent::Tar));
        r.map_err(|e| self.err(&e.to_string()))
    }

    fn finish_archive(&mut self) -> Result<(), PgError> {
        if let Some(p) = self.parser.take() {
            p.finish().map_err(|e| self.err(&e.to_string()))?;
        }
        Ok(())
    }

    fn err(&self, reason: &str) -> PgError {
        protocol(self.conn, reason.to_owned())
    }

    /// The end position once the server sent it, even if the reply then
    /// ended in an error (as it does after checksum failures: everything,
    /// the end included, was sent before that error).
    pub fn end_sent(&self) -> Option<(Lsn, TimelineId)> {
        self.end
    }

    /// The server's `backup_manifest` (PostgreSQL's JSON, verbatim), once
    /// the reply is complete.
    pub fn take_manifest(&mut self) -> Option<Bytes> {
        (self.done && !self.manifest.is_empty())
            .then(|| Bytes::from(std::mem::take(&mut self.manifest)))
    }

    /// The end position, once the reply is complete.
    pub fn end(&self) -> Option<(Lsn, TimelineId)> {
        if self.done {
            self.end
        } else {
            None
        }
    }
}

fn cstring(b: &mut Bytes) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Some(s)
}

type Rows = Vec<Vec<Option<String>>>;

async fn read_result_set(conn: &mut PgConnection) -> Result<Rows, PgError> {
    match conn.recv().await? {
        Backend::RowDescription(_) => collect_rows(conn).await,
        Backend::Error(message) => {
            // drain to ReadyForQuery so the connection stays usable
            loop {
                if let Backend::ReadyForQuery(_) = conn.recv().await? {
                    break;
                }
            }
            Err(PgError::Server {
                target: conn.target().to_owned(),
                message: Box::new(message),
            })
        }
        other => Err(protocol(
            conn,
            format!("expected a result set from BASE_BACKUP, got {other:?}"),
        )),
    }
}

async fn collect_rows(conn: &mut PgConnection) -> Result<Rows, PgError> {
    let mut rows = Vec::new();
    loop {
        match conn.recv().await? {
            Backend::DataRow(vals) => rows.push(
                vals.into_iter()
                    .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect(),
            ),
            Backend::CommandComplete(_) => return Ok(rows),
            other => {
                return Err(protocol(
                    conn,
                    format!("unexpected {other:?} in a result set"),
                ))
            }
        }
    }
}

fn position(conn: &PgConnection, rows: &Rows) -> Result<(Lsn, TimelineId), PgError> {
    let row = rows
        .first()
        .ok_or_else(|| protocol(conn, "empty position result".into()))?;
    let lsn = row.first().cloned().flatten().and_then(|s| s.parse().ok());
    let tli = row.get(1).cloned().flatten().and_then(|s| s.parse().ok());
    match (lsn, tli) {
        (Some(l), Some(t)) => Ok((l, t)),
        _ => Err(protocol(conn, format!("bad position row {row:?}"))),
    }
}
