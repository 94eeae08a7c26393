//! `walvault stream`: continuous WAL archiving over the replication
//! protocol, through a physical slot.
//!
//! Invariants:
//! - the write/flush positions reported to the server never exceed what is
//!   durable in the repository, so the slot keeps every byte not yet safe;
//! - streaming (re)starts at the first segment the repository does not hold
//!   complete, so a restart (after kill -9, a server restart, a network
//!   error) re-sends at most one segment and never leaves a gap; complete
//!   segments are stored with [`Repository::store_wal_once`], so a re-sent
//!   segment with other content is refused, never overwritten;
//! - the open segment is made durable as append-only pieces
//!   (`<segment>.<offset>`, see `repo::wal`): each write carries only the
//!   WAL received since the last durable point, at most `partial_interval`
//!   after new WAL arrived; in synchronous mode as soon as the previous
//!   write is done (group commit: one write carries every commit that
//!   arrived while the previous one was in flight), and the flush position
//!   is reported right after each write, which bounds the RPO. On a local
//!   directory a synchronous stream appends its pieces to the segment's
//!   journal (`<segment>.journal`, zeros made durable ahead of need), so a
//!   durable write is one `fdatasync` with no metadata, as pg_receivewal's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::ArchiveError;
use crate::pg::wire::Backend;
use crate::pg::{ConnParams, Lsn, PgConnection, PgError, TimelineId, WalFileName, WalSegSize};
use crate::repo::{Repository, StanzaPaths};
use crate::wal::receive::{parse_message, status_update, SegmentAssembler, WalMessage};

/// Options of `walvault stream`.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Physical replication slot (created when missing).
    pub slot: String,
    /// Longest time new WAL waits before the open segment is uploaded.
    pub partial_interval: Duration,
    /// Upload and acknowledge every message at once (for
    /// `synchronous_standby_names`: RPO = 0).
    pub synchronous: bool,
    /// How often a status update goes to the server and a lag line to the log.
    pub status_interval: Duration,
    /// A JSON file rewritten with the current positions and lag.
    pub status_file: Option<PathBuf>,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Receives the status whenever the status file would be written, and
    /// when the connection comes and goes (the daemon's status model).
    pub publish: Option<Arc<watch::Sender<StreamStatus>>>,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            slot: "walvault".into(),
            partial_interval: Duration::from_secs(1),
            synchronous: false,
            status_interval: Duration::from_secs(10),
            status_file: None,
            max_backoff: Duration::from_secs(30),
            publish: None,
        }
    }
}

/// Where the stream stands (written to the status file).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    /// Timeline streamed (`None` before the first connection).
    pub timeline: Option<TimelineId>,
    /// Received up to (exclusive).
    pub received_lsn: Lsn,
    /// Durable in the repository up to (exclusive): the RPO point.
    pub durable_lsn: Lsn,
    /// The server's end of WAL, as last reported.
    pub server_lsn: Lsn,
    /// Bytes between the server's end and the durable point.
    pub lag_bytes: u64,
    /// Seconds the oldest received WAL that is not durable yet has waited
    /// (0 when everything received is durable).
    pub lag_seconds: f64,
    /// Complete segments stored since start.
    pub segments_stored: u64,
    /// Pieces of open segments written since start.
    pub partial_uploads: u64,
    /// Bytes of those pieces as stored.
    pub piece_bytes: u64,
    /// Seconds those writes took, summed (over `partial_uploads`: the mean
    /// latency of a durable write, what a synchronous commit waits for).
    #[serde(default)]
    pub piece_write_seconds: f64,
    /// When this was written.
    pub updated_at: String,
    /// Connected to the server and streaming.
    pub connected: bool,
}

/// Why one streaming session ended without an error.
enum SessionEnd {
    /// Asked to stop.
    Stopped,
    /// The server's timeline ended; continue on the next one.
    NextTimeline,
}

/// Stream until `stop` turns true. Errors that a retry cannot fix (bad
/// credentials, a repository belonging to another cluster, a WAL conflict)
/// end it; everything else is retried with backoff.
pub async fn run_stream(
    repo: Arc<Repository>,
    stanza: &str,
    params: &ConnParams,
    opts: &StreamOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ArchiveError> {
    let paths = StanzaPaths::new(stanza);
    note_mode(&repo, &paths, params, opts).await;
    let mut backoff = Duration::from_secs(1);
    let mut stats = StreamStatus::default();
    // a start position whose WAL the server reported removed
    let mut lost: Option<Lsn> = None;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let ended = session(
            &repo, &paths, params, opts, &mut stop, &mut stats, &mut lost,
        )
        .await;
        if stats.connected {
            stats.connected = false;
            if let Some(p) = &opts.publish {
                p.send_replace(stats.clone());
            }
        }
        match ended {
            Ok(SessionEnd::Stopped) => return Ok(()),
            Ok(SessionEnd::NextTimeline) => {
                backoff = Duration::from_secs(1);
                continue;
            }
            Err(e) if e.is_permanent() => return Err(e),
            // go on at once from where the server still has WAL
            Err(_) if lost.is_some() && started.elapsed() < Duration::from_secs(5) => continue,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                tracing::warn!(
                    "stream interrupted: {e}; reconnecting in {} s",
                    backoff.as_secs()
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}

/// The record kind of the streams' modes (`check` reads the newest).
pub const STREAM_RECORD: &str = "stream";

/// How a stream runs: `check` compares it with the server's
/// `synchronous_standby_names`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StreamRecord {
    /// Its slot.
    pub slot: String,
    /// `--synchronous`.
    pub synchronous: bool,
    /// `--partial-interval`, seconds.
    pub partial_interval_seconds: f64,
    /// The `application_name` it connects with.
    pub application_name: String,
    /// The host it runs on.
    pub host: String,
    /// When it started.
    pub started_at: chrono::DateTime<chrono::Utc>,
}

/// Record how this stream runs (a record as `ops::records` writes them);
/// best effort: a repository that cannot take it now
/// fails the stream's own writes soon enough.
async fn note_mode(
    repo: &Repository,
    paths: &StanzaPaths,
    params: &ConnParams,
    opts: &StreamOptions,
) {
    let rec = StreamRecord {
        slot: opts.slot.clone(),
        synchronous: opts.synchronous,
        partial_interval_seconds: opts.partial_interval.as_secs_f64(),
        application_name: params.application_name.clone(),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        started_at: chrono::Utc::now(),
    };
    let key = paths.new_record(STREAM_RECORD);
    if let Err(e) = repo
        .put_json(crate::repo::object::ObjectKind::Record, &key, &rec)
        .await
    {
        tracing::warn!("cannot record the stream's mode: {e}");
    }
}

/// Whether `synchronous_standby_names` (`FIRST 1 (a, "b")`, `ANY 2 (…)`,
/// `a, b`, `*`) names `application_name`.
pub fn lists_standby(setting: &str, application_name: &str) -> bool {
    let mut rest = setting.trim();
    // the method and count before the parenthesized list
    if let Some(open) = rest.find('(') {
        rest = rest[open + 1..].trim_end().trim_end_matches(')');
    }
    rest.split(',').map(str::trim).any(|n| {
        n == "*"
            || n.strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .map_or_else(
                    || n.eq_ignore_ascii_case(application_name),
                    |q| q == application_name,
                )
    })
}

/// Where the repository's WAL of timeline `tli` ends: the start of the
/// first segment it does not hold complete (after its newest complete
/// segment, or the segment of a newer `.partial`), if it holds any. A
/// `.partial` whose pieces hold the whole segment (a synchronous stream
/// acknowledged it, then stopped before storing the segment object in the
/// background) is stored as the segment first: the server may have
/// recycled that WAL since.
async fn repository_end(
    repo: &Repository,
    paths: &StanzaPaths,
    tli: TimelineId,
    seg: WalSegSize,
) -> Result<Option<Lsn>, ArchiveError> {
    let names = repo.list_wal(paths, tli, seg).await?;
    // after the last complete segment; or at a newer .partial's segment
    // (a backup's last segment): that one is not complete yet
    let mut end: Option<crate::pg::SegmentNo> = None;
    for name in names {
        let at = match name {
            crate::pg::WalFileName::Segment(f) => f.segno.next(),
            crate::pg::WalFileName::Partial(f) => match repo.complete_from_pieces(paths, &f).await?
            {
                Some(data) => {
                    let whole = crate::pg::WalFileName::Segment(f);
                    repo.store_wal_once(paths, &whole, data.to_vec()).await?;
                    repo.delete_wal(paths, &name).await?;
                    tracing::info!("stored {whole} from the pieces that held all of it");
                    f.segno.next()
                }
                None => f.segno,
            },
            _ => continue,
        };
        end = Some(end.map_or(at, |e| e.max(at)));
    }
    Ok(end.and_then(|s| s.start_lsn(seg)))
}

async fn session(
    repo: &Arc<Repository>,
    paths: &StanzaPaths,
    params: &ConnParams,
    opts: &StreamOptions,
    stop: &mut watch::Receiver<bool>,
    stats: &mut StreamStatus,
    lost: &mut Option<Lsn>,
) -> Result<SessionEnd, ArchiveError> {
    let mut conn = PgConnection::connect(params, true).await?;
    let sys = conn.identify_system().await?;
    super::check_system(repo, paths, sys.system_id).await?;
    let seg = conn.wal_segment_size().await?;
    let tli = sys.timeline;
    let version = conn.server_version_num().unwrap_or(0);

    // the slot: created on first use; its restart point tells what the
    // server still has
    let mut slot_restart = None;
    if version >= 150000 {
        if let Some(info) = conn.read_replication_slot(&opts.slot).await? {
            slot_restart = info.restart_lsn;
        }
    }
    if slot_restart.is_none() {
        match conn.create_physical_slot(&opts.slot, true).await {
            Ok(p) => {
                tracing::info!(slot = %opts.slot, "created replication slot");
                // a physical slot reports no meaningful consistent point
                slot_restart = p.filter(|l| l.is_valid());
            }
            Err(e) if e.sqlstate() == Some("42710") => {} // exists (before 15: unknown restart)
            Err(e) => return Err(e.into()),
        }
    }
    // where this timeline began (its parent's WAL up to there is the
    // parent's to archive)
    let mut tli_begin = None;
    if tli.get() > 1 {
        let (name, content) = conn.timeline_history(tli).await?;
        tli_begin = crate::wal::history::parse_history(&String::from_utf8_lossy(&content))
            .ok()
            .and_then(|h| h.last().map(|e| e.end));
        let name = WalFileName::parse(&name, seg).map_err(|e| {
            ArchiveError::Protocol(format!("TIMELINE_HISTORY sent file name {name:?}: {e}"))
        })?;
        repo.store_wal_once(paths, &name, content.to_vec()).await?;
    }

    // continue where the repository ends (the server may still have that
    // WAL even when the slot does not hold it); on a timeline the
    // repository has nothing of yet, where the timeline began; else where
    // the slot is
    let have = match repository_end(repo, paths, tli, seg).await? {
        Some(h) => Some(h),
        None => tli_begin,
    };
    let fallback = slot_restart.unwrap_or(sys.xlogpos);
    let start = have.unwrap_or(fallback);
    let start = start.segment(seg).start_lsn(seg).unwrap_or(start);
    if start > sys.xlogpos {
        return Err(ArchiveError::AheadOfServer {
            have: start,
            timeline: tli,
            server_end: sys.xlogpos,
        });
    }
    let start = if *lost == Some(start) {
        // the server recycled that WAL: it is lost to the archive; go on
        // from the slot's restart point when past it, else from now
        let f = if fallback > start {
            fallback
        } else {
            sys.xlogpos
        };
        let f = f.segment(seg).start_lsn(seg).unwrap_or(f);
        tracing::error!(
            "WAL from {start} to {f} is not in the repository and the server no longer has it: \
             point-in-time recovery cannot cross this gap; take a new backup"
        );
        *lost = None;
        f
    } else {
        start
    };
    // before START_REPLICATION: after it the connection only streams
    if !opts.synchronous {
        if let Ok(names) = conn.show("synchronous_standby_names").await {
            if lists_standby(&names, &params.application_name) {
                tracing::warn!(
                    "the server lists this stream ({}) in synchronous_standby_names ({names}), but it runs without --synchronous: every commit waits up to --partial-interval ({} s) for it; restart it with --synchronous",
                    params.application_name,
                    opts.partial_interval.as_secs_f64()
                );
            }
        }
    }
    let removed = |e: &ArchiveError| e.to_string().contains("has already been removed");
    if let Err(e) = start_replication(&mut conn, &opts.slot, start, tli).await {
        if removed(&e) {
            *lost = Some(start);
        }
        return Err(e);
    }
    tracing::info!(%start, timeline = %tli, slot = %opts.slot, "streaming");

    let mut asm = SegmentAssembler::new(start, tli, seg)
        .map_err(|e| ArchiveError::Protocol(e.to_string()))?;
    let mut durable = start;
    let mut server_end = sys.xlogpos;
    let mut waiting = Waiting::default();
    let mut published = durable;
    let mut partial_due: Option<tokio::time::Instant> = None;
    let mut pieces = Pieces::new(opts.synchronous.then(|| Journal::new(repo, seg)).flatten());
    // journal mode: WAL received and not yet written; written once nothing
    // more is waiting on the socket (or enough piled up)
    let mut write_due = false;
    let mut stop_open = true;
    let mut status_tick = tokio::time::interval(opts.status_interval);
    status_tick.tick().await;
    stats.timeline = Some(tli);
    stats.connected = true;
    if let Some(p) = &opts.publish {
        p.send_replace(stats.clone());
    }

    loop {
        let partial_at =
            partial_due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        // biased: the rare events first, then the socket; the journal write
        // last, so it carries every message that had already arrived
        tokio::select! {
            biased;
            changed = stop.changed(), if stop_open => {
                if changed.is_err() {
                    // nobody can ask it to stop any more: stream on, and
                    // leave this branch out (it would be ready forever)
                    stop_open = false;
                    continue;
                }
                if *stop.borrow() {
                    pieces.flush(repo, paths, &asm, &mut durable, stats).await?;
                    let _ = send_status(&mut conn, durable, false).await;
                    report(opts, stats, &asm, durable, server_end, waiting.since(durable), true);
                    conn.close().await;
                    return Ok(SessionEnd::Stopped);
                }
            }
            _ = status_tick.tick() => {
                send_status(&mut conn, durable, false).await?;
                report(opts, stats, &asm, durable, server_end, waiting.since(durable), true);
            }
            _ = tokio::time::sleep_until(partial_at) => {
                partial_due = None;
                if pieces.is_idle() {
                    pieces.spawn(repo, paths, &asm, durable);
                }
            }
            Some(done) = pieces.rx.recv() => {
                // a piece is durable: report what is durable at once, and in
                // synchronous mode write everything that arrived meanwhile
                // (group commit)
                let before = durable;
                pieces.complete(done?, &mut durable, stats);
                if durable > before {
                    send_status(&mut conn, durable, false).await?;
                }
                if opts.synchronous {
                    pieces.spawn(repo, paths, &asm, durable);
                } else if asm.position() > durable && partial_due.is_none() {
                    partial_due = Some(tokio::time::Instant::now() + opts.partial_interval);
                }
                if durable != published && opts.reports() {
                    report(opts, stats, &asm, durable, server_end, waiting.since(durable), false);
                    published = durable;
                }
            }
            msg = conn.copy_data() => {
                // the server reports recycled WAL inside the stream
                let msg = match msg {
                    Err(e) => {
                        let e = ArchiveError::from(e);
                        if removed(&e) && asm.position() == start {
                            *lost = Some(start);
                        }
                        return Err(e);
                    }
                    Ok(m) => m,
                };
                let Some(data) = msg else {
                    // the server ended this timeline (a promotion)
                    pieces.flush(repo, paths, &asm, &mut durable, stats).await?;
                    conn.send_copy_done().await?;
                    let next = conn.finish_query("START_REPLICATION").await?;
                    tracing::info!(
                        "timeline {tli} ended at {}; following timeline {}",
                        next.text(0, "next_tli_startpos").unwrap_or_default(),
                        next.text(0, "next_tli").unwrap_or_default()
                    );
                    conn.close().await;
                    return Ok(SessionEnd::NextTimeline);
                };
                match parse_message(data).map_err(|e| ArchiveError::Protocol(e.to_string()))? {
                    WalMessage::XLogData { start, wal_end, data } => {
                        server_end = server_end.max(wal_end);
                        let completed = asm.push(start, &data).map_err(|e| ArchiveError::Protocol(e.to_string()))?;
                        waiting.received(asm.position());
                        let completed_any = !completed.is_empty();
                        if completed_any {
                            // pieces in flight belong to a segment now complete
                            pieces.wait_all(&mut durable, stats).await?;
                        }
                        for s in completed {
                            let name = s.name;
                            super::summaries::spawn_store(repo.clone(), paths.clone(), name, s.data.clone());
                            if pieces.journal.is_some() {
                                // its tail into the journal: then all of it is
                                // durable and acknowledged at once; the segment
                                // object is stored in the background
                                pieces.complete_segment(repo, paths, s, &mut durable, stats).await?;
                                continue;
                            }
                            repo.store_wal_once(paths, &name, s.data).await?;
                            // the complete segment supersedes its pieces and .partial
                            if let Some(f) = name.segment_file() {
                                let _ = repo.delete_wal(paths, &WalFileName::Partial(f)).await;
                            }
                            stats.segments_stored += 1;
                            durable = durable.max(asm.position().segment(seg).start_lsn(seg).unwrap_or(durable));
                        }
                        if pieces.journal.is_some() {
                            // journal: written in the write_due branch below
                            // once the socket is drained, or now when much
                            // piled up
                            write_due = asm.position() > durable;
                            if write_due && asm.position().checked_sub(durable).unwrap_or(0) >= JOURNAL_WRITE_AT_MOST {
                                write_due = false;
                                pieces.write_now(repo, paths, &asm, &mut durable, stats).await?;
                                send_status(&mut conn, durable, false).await?;
                            } else if !write_due && completed_any {
                                // a whole segment completed and nothing follows it
                                send_status(&mut conn, durable, false).await?;
                            }
                        } else if opts.synchronous {
                            pieces.spawn(repo, paths, &asm, durable);
                            if pieces.is_idle() {
                                // a whole segment completed and nothing follows it
                                send_status(&mut conn, durable, false).await?;
                            }
                        } else if asm.position() > durable && partial_due.is_none() {
                            partial_due = Some(tokio::time::Instant::now() + opts.partial_interval);
                        }
                    }
                    WalMessage::Keepalive { wal_end, reply_requested } => {
                        server_end = server_end.max(wal_end);
                        if reply_requested {
                            send_status(&mut conn, durable, false).await?;
                        }
                    }
                }
                if durable != published && opts.reports() {
                    report(opts, stats, &asm, durable, server_end, waiting.since(durable), false);
                    published = durable;
                }
            }
            _ = std::future::ready(()), if write_due => {
                // nothing more waiting on the socket: write what arrived
                write_due = false;
                pieces.write_now(repo, paths, &asm, &mut durable, stats).await?;
                send_status(&mut conn, durable, false).await?;
                if durable != published && opts.reports() {
                    report(opts, stats, &asm, durable, server_end, waiting.since(durable), false);
                    published = durable;
                }
            }
        }
    }
}

/// Result of a piece write: its end and the bytes stored.
type PieceDone = Result<(Lsn, u64, Duration), crate::repo::RepoError>;

/// Pieces written at once: a new one starts while earlier ones are still
/// being made durable (their fsyncs or PUTs overlap); the durable point
/// advances over the ones done in order.
const PIECES_IN_FLIGHT: usize = 4;

/// In journal mode, WAL received and not yet written that is written at
/// once, without waiting for the socket to drain (a fast sender cannot
/// postpone the write, and every commit in it, indefinitely).
const JOURNAL_WRITE_AT_MOST: u64 = 1 << 20;

/// The pieces of the open segment being written, in the order issued.
struct Pieces {
    /// Each piece's end and whether it is durable.
    inflight: std::collections::VecDeque<(Lsn, bool)>,
    tx: mpsc::Sender<PieceDone>,
    rx: mpsc::Receiver<PieceDone>,
    /// Where pieces go on a local directory in synchronous mode.
    journal: Option<Journal>,
    /// Journal mode: the completed segment being stored in the background
    /// (its WAL is durable in its journal already).
    storing: Option<tokio::task::JoinHandle<Result<(), crate::repo::RepoError>>>,
}

impl Pieces {
    fn new(journal: Option<Journal>) -> Pieces {
        let (tx, rx) = mpsc::channel(PIECES_IN_FLIGHT);
        Pieces {
            inflight: std::collections::VecDeque::new(),
            tx,
            rx,
            journal,
            storing: None,
        }
    }

    fn is_idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Start writing, in the background, the WAL of the open segment
    /// received after what was durable or already issued (nothing when
    /// there is none, or enough pieces are in flight). Not in journal mode,
    /// which writes on the session's task ([`Pieces::write_now`]).
    fn spawn(
        &mut self,
        repo: &Arc<Repository>,
        paths: &StanzaPaths,
        asm: &SegmentAssembler,
        durable: Lsn,
    ) {
        if self.inflight.len() >= PIECES_IN_FLIGHT {
            return;
        }
        let from = self
            .inflight
            .back()
            .map_or(durable, |(e, _)| (*e).max(durable));
        let Some((f, offset, data)) = asm.since(from) else {
            return;
        };
        let end = asm.position();
        self.inflight.push_back((end, false));
        let (repo, paths, tx) = (repo.clone(), paths.clone(), self.tx.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = repo
                .store_piece(&paths, &f, offset, bytes::Bytes::from(data))
                .await
                .map(|n| (end, n, t0.elapsed()));
            let _ = tx.send(r).await;
        });
    }

    /// Count a finished piece; the durable point moves over every piece
    /// done in issue order.
    fn complete(
        &mut self,
        (end, bytes, took): (Lsn, u64, Duration),
        durable: &mut Lsn,
        stats: &mut StreamStatus,
    ) {
        stats.partial_uploads += 1;
        stats.piece_bytes += bytes;
        stats.piece_write_seconds += took.as_secs_f64();
        if let Some(p) = self.inflight.iter_mut().find(|(e, _)| *e == end) {
            p.1 = true;
        }
        while let Some(&(e, true)) = self.inflight.front() {
            *durable = (*durable).max(e);
            self.inflight.pop_front();
        }
    }

    /// Wait until every piece in flight is durable.
    async fn wait_all(
        &mut self,
        durable: &mut Lsn,
        stats: &mut StreamStatus,
    ) -> Result<(), ArchiveError> {
        while !self.inflight.is_empty() {
            match self.rx.recv().await {
                Some(r) => self.complete(r?, durable, stats),
                None => break,
            }
        }
        Ok(())
    }

    /// Journal mode: write what the open segment received after `durable`
    /// into its journal here, and move `durable` to it.
    async fn write_now(
        &mut self,
        repo: &Arc<Repository>,
        paths: &StanzaPaths,
        asm: &SegmentAssembler,
        durable: &mut Lsn,
        stats: &mut StreamStatus,
    ) -> Result<(), ArchiveError> {
        let Some((f, offset, data)) = asm.since(*durable) else {
            return Ok(());
        };
        self.write_inline(repo, paths, f, offset, &data, stats)
            .await?;
        *durable = (*durable).max(asm.position());
        Ok(())
    }

    /// Journal mode: segment `s` completed. Write what of it is not
    /// durable yet into its journal, move `durable` to its end, and store
    /// the segment object in the background (after the previous one), then
    /// delete its journal.
    async fn complete_segment(
        &mut self,
        repo: &Arc<Repository>,
        paths: &StanzaPaths,
        s: crate::wal::receive::Segment,
        durable: &mut Lsn,
        stats: &mut StreamStatus,
    ) -> Result<(), ArchiveError> {
        let Some(f) = s.name.segment_file() else {
            return Ok(());
        };
        let (start, end) = match (
            f.segno.start_lsn(f.seg_size),
            f.segno.next().start_lsn(f.seg_size),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => return Ok(()),
        };
        let from = (*durable).max(start).checked_sub(start).unwrap_or(0) as usize;
        if from < s.data.len() {
            self.write_inline(repo, paths, f, from as u32, &s.data[from..], stats)
                .await?;
        }
        *durable = (*durable).max(end);
        self.wait_storing().await?;
        let (repo, paths, name) = (repo.clone(), paths.clone(), s.name);
        self.storing = Some(tokio::spawn(async move {
            repo.store_wal_once(&paths, &name, s.data).await?;
            // the complete segment supersedes its journal and .partial
            repo.delete_wal(&paths, &WalFileName::Partial(f)).await?;
            Ok(())
        }));
        stats.segments_stored += 1;
        Ok(())
    }

    /// Wait for the segment being stored in the background, if any.
    async fn wait_storing(&mut self) -> Result<(), ArchiveError> {
        if let Some(h) = self.storing.take() {
            h.await.map_err(crate::repo::RepoError::task(
                "store a completed WAL segment",
            ))??;
        }
        Ok(())
    }

    /// Make the piece of `f` at `offset` durable on this task: sealed here
    /// and appended to the journal without handing it to other threads (a
    /// synchronous commit waits for this: each hop between threads costs
    /// as much as the write); an object when the journal has no room.
    async fn write_inline(
        &mut self,
        repo: &Arc<Repository>,
        paths: &StanzaPaths,
        f: crate::pg::SegmentFile,
        offset: u32,
        data: &[u8],
        stats: &mut StreamStatus,
    ) -> Result<(), ArchiveError> {
        let t0 = Instant::now();
        let (key, sealed) = repo
            .seal_piece(paths, &f, offset, bytes::Bytes::copy_from_slice(data))
            .await?;
        let appended = match &mut self.journal {
            // one pwrite and one fdatasync into space made beforehand: this
            // worker blocks for it while the other runs the rest
            Some(j) => j.append(repo, paths, &f, offset, &sealed)?,
            None => false,
        };
        stats.piece_bytes += sealed.len() as u64;
        if !appended {
            repo.storage()
                .put(&key, sealed)
                .await
                .map_err(crate::repo::RepoError::from)?;
        }
        stats.partial_uploads += 1;
        stats.piece_write_seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Make everything received durable now: the pieces in flight, then
    /// the rest of the open segment.
    async fn flush(
        &mut self,
        repo: &Arc<Repository>,
        paths: &StanzaPaths,
        asm: &SegmentAssembler,
        durable: &mut Lsn,
        stats: &mut StreamStatus,
    ) -> Result<(), ArchiveError> {
        self.wait_all(durable, stats).await?;
        self.wait_storing().await?;
        if let Some((f, offset, data)) = asm.since(*durable) {
            if self.journal.is_some() {
                self.write_inline(repo, paths, f, offset, &data, stats)
                    .await?;
            } else {
                let t0 = Instant::now();
                stats.piece_bytes += repo
                    .store_piece(paths, &f, offset, bytes::Bytes::from(data))
                    .await?;
                stats.partial_uploads += 1;
                stats.piece_write_seconds += t0.elapsed().as_secs_f64();
            }
        }
        *durable = (*durable).max(asm.position());
        Ok(())
    }
}

/// The journal a synchronous stream on a local directory appends pieces
/// to, one per open segment, and the zero-filled file made ahead, in the
/// background, for the next one (so a segment switch costs a rename, not
/// writing and syncing 18 MiB of zeros while commits wait). While none is
/// ready, pieces are stored as objects.
struct Journal {
    dir: crate::storage::LocalDir,
    current: Option<crate::repo::WalJournal>,
    ready: Arc<std::sync::Mutex<Option<crate::storage::ZeroedFile>>>,
    preparing: Arc<std::sync::atomic::AtomicBool>,
}

impl Journal {
    /// `None` when the repository is not a local directory. Starts making
    /// the first zero-filled file at once.
    fn new(repo: &Repository, seg: crate::pg::WalSegSize) -> Option<Journal> {
        let journal = Journal {
            dir: repo.storage().local_dir()?.clone(),
            current: None,
            ready: Arc::default(),
            preparing: Arc::default(),
        };
        journal.prepare_next(crate::repo::journal_size(seg));
        Some(journal)
    }

    /// Make the next zero-filled file in the background, unless one is
    /// being made.
    fn prepare_next(&self, size: u64) {
        use std::sync::atomic::Ordering;
        if self.preparing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (dir, ready, preparing) =
            (self.dir.clone(), self.ready.clone(), self.preparing.clone());
        tokio::task::spawn_blocking(move || {
            match dir.prepare_zeroed(size) {
                Ok(z) => *ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(z),
                Err(e) => tracing::warn!("cannot prepare the next WAL journal: {e}"),
            }
            preparing.store(false, Ordering::SeqCst);
        });
    }

    /// Append a sealed piece to segment `f`'s journal, opening it (or
    /// making it from the ready zeroed file) first; `false` when there is
    /// no journal to write to or it has no room left (store an object
    /// then). Blocking: one write and one `fdatasync`.
    fn append(
        &mut self,
        repo: &Repository,
        paths: &StanzaPaths,
        f: &crate::pg::SegmentFile,
        offset: u32,
        sealed: &[u8],
    ) -> Result<bool, crate::repo::RepoError> {
        let usable = self
            .current
            .as_ref()
            .is_some_and(|j| j.segment() == *f && j.is_linked());
        if !usable {
            self.current = None;
            let size = crate::repo::journal_size(f.seg_size);
            let mut took = false;
            let ready = &self.ready;
            self.current = repo.open_journal(paths, f, || {
                let ready = ready.lock().unwrap_or_else(|e| e.into_inner()).take();
                Ok(match ready {
                    Some(z) if z.size() == size && z.is_present() => {
                        took = true;
                        Some(z)
                    }
                    _ => None,
                })
            })?;
            if took || self.current.is_none() {
                // the next segment's file, made while this one fills
                self.prepare_next(size);
            }
        }
        match self.current.as_mut() {
            Some(j) => j.append(offset, sealed),
            None => Ok(false),
        }
    }
}

async fn send_status(conn: &mut PgConnection, durable: Lsn, reply: bool) -> Result<(), PgError> {
    let now = chrono::Utc::now().timestamp_micros();
    // write = flush = durable: the server may recycle only what is safe;
    // nothing is applied here
    conn.send_copy_data(&status_update(durable, durable, Lsn::new(0), now, reply))
        .await
}

/// When received WAL arrived, to tell how long the oldest WAL not yet
/// durable has waited: (end position, arrival), one entry per 20 ms.
#[derive(Default)]
struct Waiting(std::collections::VecDeque<(Lsn, Instant)>);

impl Waiting {
    /// WAL up to `end` has arrived.
    fn received(&mut self, end: Lsn) {
        let full = self.0.len() >= 4096;
        match self.0.back_mut() {
            // at most 4096 entries: while nothing becomes durable, the
            // newest absorbs what arrives (the oldest arrival is what counts)
            Some(last) if full || last.1.elapsed() < Duration::from_millis(20) => {
                last.0 = last.0.max(end)
            }
            _ => self.0.push_back((end, Instant::now())),
        }
    }

    /// When the oldest WAL past `durable` arrived (`None`: everything
    /// received is durable).
    fn since(&mut self, durable: Lsn) -> Option<Instant> {
        while self.0.front().is_some_and(|f| f.0 <= durable) {
            self.0.pop_front();
        }
        self.0.front().map(|f| f.1)
    }
}

fn report(
    opts: &StreamOptions,
    stats: &mut StreamStatus,
    asm: &SegmentAssembler,
    durable: Lsn,
    server_end: Lsn,
    oldest_waiting: Option<Instant>,
    log: bool,
) {
    let lag_bytes = server_end.checked_sub(durable).unwrap_or(0);
    // how long the oldest received WAL has waited to become durable (a
    // stream under constant load is never "caught up", yet its lag is
    // this, not the time since it last was)
    let lag_seconds = oldest_waiting.map_or(0.0, |t| t.elapsed().as_secs_f64());
    stats.received_lsn = asm.position();
    stats.durable_lsn = durable;
    stats.server_lsn = server_end;
    stats.lag_bytes = lag_bytes;
    stats.lag_seconds = lag_seconds;
    stats.updated_at = chrono::Utc::now().to_rfc3339();
    if log {
        tracing::info!(
            durable = %durable,
            server = %server_end,
            lag_bytes,
            lag_seconds = format!("{lag_seconds:.1}"),
            "stream position"
        );
    }
    if let Some(path) = &opts.status_file {
        write_status(path, stats);
    }
    if let Some(p) = &opts.publish {
        p.send_replace(stats.clone());
    }
}

impl StreamOptions {
    /// Whether anything reads the status as it changes.
    fn reports(&self) -> bool {
        self.status_file.is_some() || self.publish.is_some()
    }
}

/// Replace the status file atomically (readers never see half of it).
pub(crate) fn write_status<T: serde::Serialize>(path: &std::path::Path, value: &T) {
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::warn!("cannot write status file {}: {e}", path.display());
    }
}

/// START_REPLICATION at `start`; Ok once the server answered CopyBoth. On a
/// server error the connection stays usable for another attempt.
async fn start_replication(
    conn: &mut PgConnection,
    slot: &str,
    start: Lsn,
    tli: TimelineId,
) -> Result<(), ArchiveError> {
    conn.send_query(&format!(
        "START_REPLICATION SLOT {slot} PHYSICAL {start} TIMELINE {}",
        tli.get()
    ))
    .await?;
    match conn.recv().await? {
        Backend::CopyBothResponse => Ok(()),
        Backend::Error(m) => {
            // the ReadyForQuery that follows an error
            loop {
                if let Backend::ReadyForQuery(_) = conn.recv().await? {
                    break;
                }
            }
            Err(PgError::Server {
                target: conn.target().to_owned(),
                message: Box::new(m),
            }
            .into())
        }
        other => Err(ArchiveError::Protocol(format!(
            "unexpected {other:?} after START_REPLICATION"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::lists_standby;

    #[test]
    fn synchronous_standby_names_in_each_form() {
        assert!(lists_standby("walvault", "walvault"));
        assert!(lists_standby("FIRST 1 (s1, walvault)", "walvault"));
        assert!(lists_standby("ANY 2 (s1, \"walvault\", s3)", "walvault"));
        assert!(lists_standby("2 (s1, WalVault)", "walvault"));
        assert!(lists_standby("*", "walvault"));
        assert!(!lists_standby("", "walvault"));
        assert!(!lists_standby("s1, s2", "walvault"));
        // a quoted name is case-sensitive
        assert!(!lists_standby("\"WalVault\"", "walvault"));
    }
}
