//! Replication commands on a replication connection (`replication=true`):
//! IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY, slots, UPLOAD_MANIFEST. The COPY machinery they
//! lead into (BASE_BACKUP, START_REPLICATION) is in [`super::conn`].

use bytes::Bytes;

use super::conn::{PgConnection, PgError};
use super::wire::Backend;
use super::{Lsn, SystemId, TimelineId, WalSegSize};

/// What IDENTIFY_SYSTEM reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's system identifier.
    pub system_id: SystemId,
    /// Current timeline.
    pub timeline: TimelineId,
    /// Current WAL flush location.
    pub xlogpos: Lsn,
}

/// A replication slot as READ_REPLICATION_SLOT reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Oldest WAL the slot retains.
    pub restart_lsn: Option<Lsn>,
    /// Timeline of `restart_lsn`.
    pub restart_tli: Option<TimelineId>,
}

/// Check a slot name as PostgreSQL does (`ReplicationSlotValidateName`).
pub fn validate_slot_name(name: &str) -> Result<(), super::ParseError> {
    let bad = |why: &str| super::ParseError::new("replication slot name", name, why);
    if name.is_empty() || name.len() > 63 {
        return Err(bad("must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(bad("may contain only a-z, 0-9 and '_'"));
    }
    Ok(())
}

impl PgConnection {
    fn field<T>(
        &self,
        what: &str,
        v: Option<String>,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, PgError> {
        v.as_deref()
            .and_then(parse)
            .ok_or_else(|| PgError::Protocol {
                target: self.target().to_owned(),
                reason: format!("unexpected {what} {v:?}"),
            })
    }

    /// IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        let r = self.simple_query("IDENTIFY_SYSTEM").await?;
        Ok(SystemInfo {
            system_id: self.field("systemid", r.text(0, "systemid"), |s| s.parse().ok())?,
            timeline: self.field("timeline", r.text(0, "timeline"), |s| s.parse().ok())?,
            xlogpos: self.field("xlogpos", r.text(0, "xlogpos"), |s| s.parse().ok())?,
        })
    }

    /// UPLOAD_MANIFEST (PostgreSQL 17+): send the `backup_manifest` of the
    /// backup the next `BASE_BACKUP (INCREMENTAL)` on this connection is
    /// taken against.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<(), PgError> {
        self.send_query("UPLOAD_MANIFEST").await?;
        match self.recv().await? {
            Backend::CopyInResponse => {}
            Backend::Error(message) => {
                self.finish_query("UPLOAD_MANIFEST").await.ok();
                return Err(PgError::Server {
                    target: self.target().to_owned(),
                    message: Box::new(message),
                });
            }
            other => {
                return Err(PgError::Protocol {
                    target: self.target().to_owned(),
                    reason: format!("UPLOAD_MANIFEST answered {other:?}"),
                })
            }
        }
        for chunk in manifest.chunks(64 * 1024) {
            self.send_copy_data(chunk).await?;
        }
        self.send_copy_done().await?;
        self.finish_query("UPLOAD_MANIFEST").await.map(|_| ())
    }

    /// SHOW `name` (works on replication connections too).
    pub async fn show(&mut self, name: &str) -> Result<String, PgError> {
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(PgError::Protocol {
                target: self.target().to_owned(),
                reason: format!("invalid setting name {name:?}"),
            });
        }
        let r = self.simple_query(&format!("SHOW {name}")).await?;
        let v = r
            .rows
            .first()
            .and_then(|row| row.first().cloned().flatten());
        self.field(
            name,
            v.map(|b| String::from_utf8_lossy(&b).into_owned()),
            |s| Some(s.to_owned()),
        )
    }

    /// The WAL segment size, from the server.
    pub async fn wal_segment_size(&mut self) -> Result<WalSegSize, PgError> {
        let v = self.show("wal_segment_size").await?;
        self.field("wal_segment_size", Some(v), |s| s.parse().ok())
    }

    /// TIMELINE_HISTORY: the history file of timeline `tli` (name, contents).
    pub async fn timeline_history(&mut self, tli: TimelineId) -> Result<(String, Bytes), PgError> {
        let r = self
            .simple_query(&format!("TIMELINE_HISTORY {}", tli.get()))
            .await?;
        let name = self.field("filename", r.text(0, "filename"), |s| Some(s.to_owned()))?;
        let content = r
            .rows
            .first()
            .and_then(|row| row.get(1).cloned().flatten())
            .unwrap_or_default();
        Ok((name, content))
    }

    /// CREATE_REPLICATION_SLOT … PHYSICAL [RESERVE_WAL]; returns the slot's
    /// consistent point when the server reports one.
    pub async fn create_physical_slot(
        &mut self,
        name: &str,
        reserve_wal: bool,
    ) -> Result<Option<Lsn>, PgError> {
        validate_slot_name(name).map_err(PgError::BadInput)?;
        let sql = format!(
            "CREATE_REPLICATION_SLOT {name} PHYSICAL{}",
            if reserve_wal { " RESERVE_WAL" } else { "" }
        );
        let r = self.simple_query(&sql).await?;
        Ok(r.text(0, "consistent_point").and_then(|s| s.parse().ok()))
    }

    /// CREATE_REPLICATION_SLOT … TEMPORARY PHYSICAL RESERVE_WAL: a slot that
    /// holds WAL for this connection only and vanishes with it (what a base
    /// backup's WAL stream uses, so no WAL it needs is recycled meanwhile).
    pub async fn create_temporary_physical_slot(&mut self, name: &str) -> Result<(), PgError> {
        validate_slot_name(name).map_err(PgError::BadInput)?;
        self.simple_query(&format!(
            "CREATE_REPLICATION_SLOT {name} TEMPORARY PHYSICAL RESERVE_WAL"
        ))
        .await
        .map(|_| ())
    }

    /// DROP_REPLICATION_SLOT.
    pub async fn drop_slot(&mut self, name: &str) -> Result<(), PgError> {
        validate_slot_name(name).map_err(PgError::BadInput)?;
        self.simple_query(&format!("DROP_REPLICATION_SLOT {name}"))
            .await
            .map(|_| ())
    }

    /// READ_REPLICATION_SLOT (PostgreSQL 15+): `None` when the slot does not exist.
    pub async fn read_replication_slot(&mut self, name: &str) -> Result<Option<SlotInfo>, PgError> {
        validate_slot_name(name).map_err(PgError::BadInput)?;
        let r = self
            .simple_query(&format!("READ_REPLICATION_SLOT {name}"))
            .await?;
        if r.text(0, "slot_type").is_none() {
            return Ok(None);
        }
        Ok(Some(SlotInfo {
            restart_lsn: r.text(0, "restart_lsn").and_then(|s| s.parse().ok()),
            restart_tli: r.text(0, "restart_tli").and_then(|s| s.parse().ok()),
        }))
    }
}
