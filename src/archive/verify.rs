//! `walvault wal-verify`: proves the archive is continuous — every segment
//! from each backup's start to the newest WAL, across timeline switches —
//! and that each segment's content is WAL (page headers, records), naming
//! gaps as ranges and damage by LSN.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::Serialize;

use super::catalog::WalCatalog;
use super::ArchiveError;
use crate::pg::{SegmentNo, TimelineId, WalFileName};
use crate::repo::{Manifest, Repository, StanzaPaths};

/// Missing segments, first to last inclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// First missing file.
    pub from: WalFileName,
    /// Last missing file.
    pub to: WalFileName,
    /// How many.
    pub segments: u64,
    /// Backups whose recovery path crosses it.
    pub backups: Vec<String>,
}

/// A segment whose content failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damaged {
    /// The file.
    pub name: WalFileName,
    /// What is wrong, with the LSN.
    pub error: String,
}

/// What `wal-verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Backups checked.
    pub backups: usize,
    /// Segments the backups' paths need (counted once).
    pub segments_needed: u64,
    /// Segments whose content was read and checked.
    pub segments_read: u64,
    /// The newest WAL file of the newest timeline.
    pub newest: Option<WalFileName>,
    /// Missing ranges.
    pub gaps: Vec<Gap>,
    /// Damaged segments.
    pub damaged: Vec<Damaged>,
    /// The files whose content was read and found whole.
    #[serde(skip)]
    pub read_ok: Vec<WalFileName>,
    /// Bytes read.
    pub bytes_read: u64,
}

impl VerifyReport {
    /// No gap, no damage.
    pub fn ok(&self) -> bool {
        self.gaps.is_empty() && self.damaged.is_empty()
    }
}

/// How to check the WAL.
#[derive(Debug, Clone, Default)]
pub struct WalVerifyOptions {
    /// Download and check every needed segment's content.
    pub read_content: bool,
    /// Segments checked at once.
    pub parallel: usize,
    /// Backups retention keeps as restore points, without the WAL after
    /// them: they need only their own consistency range. Every other
    /// backup needs all WAL from its start to the newest segment of its
    /// timeline path.
    pub points: BTreeSet<String>,
    /// WAL files whose content was checked before (a verify ledger): not
    /// read again.
    pub already_read: std::collections::HashSet<WalFileName>,
}

/// One segment read: its name, bytes, and damage found.
type SegmentRead = (WalFileName, u64, Option<Damaged>);

/// Check the stanza's WAL (see [`WalVerifyOptions`]).
pub async fn wal_verify(
    repo: &Repository,
    stanza: &str,
    opts: &WalVerifyOptions,
) -> Result<VerifyReport, ArchiveError> {
    let (read_content, parallel, points) = (opts.read_content, opts.parallel, &opts.points);
    let paths = StanzaPaths::new(stanza);
    let backups = Manifest::load_all_headers(repo, &paths).await?;
    let mut report = VerifyReport {
        backups: backups.len(),
        ..VerifyReport::default()
    };
    let Some(seg) = backups.iter().map(|b| b.wal_segment_size).max() else {
        return Ok(report);
    };

    let cat = WalCatalog::load(repo, &paths, seg).await?;
    let newest_path = cat.path_to(cat.newest_timeline())?;

    // segment → (timeline, backups needing it); missing → backups
    let mut needed: BTreeMap<(SegmentNo, TimelineId), Vec<String>> = BTreeMap::new();
    for b in &backups {
        let path = if newest_path.contains(b.timeline, b.start_lsn) {
            newest_path.clone()
        } else {
            cat.path_to(b.timeline)?
        };
        let newest_seg = cat.newest_segment(path.last()).unwrap_or(SegmentNo(0));
        let first = b.start_lsn.segment(seg).0;
        let own_end = b.stop_lsn.segment(seg).0;
        let last = if points.contains(&b.id) {
            own_end
        } else {
            newest_seg.0.max(own_end)
        };
        for s in first..=last {
            let s = SegmentNo(s);
            needed
                .entry((s, path.timeline_of(s)))
                .or_default()
                .push(b.id.clone());
        }
    }
    report.segments_needed = needed.len() as u64;
    let mut present = Vec::new();
    let mut open_gap: Option<Gap> = None;
    for ((s, t), ids) in &needed {
        // a .partial counts only as the open end of its timeline
        if let Some(stored) = cat.stored_name(*s, *t) {
            if let Some(g) = open_gap.take() {
                report.gaps.push(g);
            }
            present.push((stored, *s));
            report.newest = Some(WalFileName::Segment(cat.segment(*s, *t)));
            continue;
        }
        let file = cat.segment(*s, *t);
        match &mut open_gap {
            Some(g) if g.to.segment_file().map(|f| f.next()) == Some(file) => {
                g.to = WalFileName::Segment(file);
                g.segments += 1;
                for id in ids {
                    if !g.backups.contains(id) {
                        g.backups.push(id.clone());
                    }
                }
            }
            _ => {
                if let Some(g) = open_gap.take() {
                    report.gaps.push(g);
                }
                open_gap = Some(Gap {
                    from: WalFileName::Segment(file),
                    to: WalFileName::Segment(file),
                    segments: 1,
                    backups: ids.clone(),
                });
            }
        }
    }
    if let Some(g) = open_gap.take() {
        report.gaps.push(g);
    }

    if read_content {
        let to_read: Vec<(WalFileName, SegmentNo)> = present
            .into_iter()
            .filter(|(n, _)| !opts.already_read.contains(n))
            .collect();
        let checked: Vec<Result<SegmentRead, ArchiveError>> = futures::stream::iter(to_read)
            .map(|(name, segno)| {
                let paths = &paths;
                async move {
                    let data = match repo.load_wal(paths, &name).await {
                        Ok(Some(d)) => d,
                        Ok(None) => {
                            return Ok((
                                name,
                                0,
                                Some(Damaged {
                                    name,
                                    error: "vanished while being verified".into(),
                                }),
                            ))
                        }
                        // a damaged object (authentication, checksum) is damage, not an error of the run
                        Err(crate::repo::RepoError::Corrupt { reason, .. }) => {
                            return Ok((
                                name,
                                0,
                                Some(Damaged {
                                    name,
                                    error: reason,
                                }),
                            ))
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let len = data.len() as u64;
                    let r = tokio::task::spawn_blocking(move || {
                        crate::wal::verify::verify_segment(&data, segno, seg)
                    })
                    .await
                    .map_err(ArchiveError::task("verify"))?;
                    Ok((
                        name,
                        len,
                        r.err().map(|e| Damaged {
                            name,
                            error: e.to_string(),
                        }),
                    ))
                }
            })
            .buffered(parallel.max(1))
            .collect()
            .await;
        for c in checked {
            report.segments_read += 1;
            let (name, len, damage) = c?;
            report.bytes_read += len;
            match damage {
                Some(d) => report.damaged.push(d),
                None => report.read_ok.push(name),
            }
        }
    }
    Ok(report)
}
