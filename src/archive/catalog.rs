//! What WAL a stanza holds: complete segments and `.partial` files per
//! timeline, and the timeline histories — the listing that `wal-verify`
//! and `restore-pitr` plan from (names only; nothing is downloaded but the
//! small history files).

use std::collections::{BTreeMap, BTreeSet};

use super::ArchiveError;
use crate::pg::{SegmentFile, SegmentNo, TimelineId, WalFileName, WalSegSize};
use crate::repo::{Repository, StanzaPaths};
use crate::wal::history::{parse_history, TimelinePath};

/// The stanza's WAL, by timeline.
#[derive(Debug, Clone)]
pub struct WalCatalog {
    /// Segment size the names were read with.
    pub seg: WalSegSize,
    /// Complete segments per timeline.
    pub full: BTreeMap<TimelineId, BTreeSet<SegmentNo>>,
    /// `.partial` segments per timeline.
    pub partial: BTreeMap<TimelineId, BTreeSet<SegmentNo>>,
    /// History file text per timeline.
    pub histories: BTreeMap<TimelineId, String>,
}

impl WalCatalog {
    /// List the stanza's WAL (segments named for `seg`-byte segments).
    pub async fn load(
        repo: &Repository,
        paths: &StanzaPaths,
        seg: WalSegSize,
    ) -> Result<WalCatalog, ArchiveError> {
        let mut c = WalCatalog {
            seg,
            full: BTreeMap::new(),
            partial: BTreeMap::new(),
            histories: BTreeMap::new(),
        };
        for tli in repo.wal_timelines(paths).await? {
            for name in repo.list_wal(paths, tli, seg).await? {
                match name {
                    WalFileName::History(_) => {
                        if let Some(h) = repo.load_wal(paths, &name).await? {
                            c.histories
                                .insert(tli, String::from_utf8_lossy(&h).into_owned());
                        }
                    }
                    WalFileName::Segment(f) => {
                        c.full.entry(tli).or_default().insert(f.segno);
                    }
                    WalFileName::Partial(f) => {
                        c.partial.entry(tli).or_default().insert(f.segno);
                    }
                    WalFileName::Backup { .. } => {}
                }
            }
        }
        Ok(c)
    }

    /// The newest timeline with any WAL or history.
    pub fn newest_timeline(&self) -> TimelineId {
        self.full
            .keys()
            .chain(self.partial.keys())
            .chain(self.histories.keys())
            .copied()
            .max()
            .unwrap_or(TimelineId::FIRST)
    }

    /// The path of timelines leading to `tli`.
    pub fn path_to(&self, tli: TimelineId) -> Result<TimelinePath, ArchiveError> {
        let history = match self.histories.get(&tli) {
            Some(h) => parse_history(h).map_err(|e| ArchiveError::BadHistory {
                timeline: tli,
                reason: e.to_string(),
            })?,
            None if tli != TimelineId::FIRST => {
                return Err(ArchiveError::MissingHistory { timeline: tli })
            }
            None => Vec::new(),
        };
        Ok(TimelinePath::new(tli, &history, self.seg))
    }

    /// The newest segment on `tli`, complete or partial.
    pub fn newest_segment(&self, tli: TimelineId) -> Option<SegmentNo> {
        self.full
            .get(&tli)
            .and_then(|s| s.last())
            .max(self.partial.get(&tli).and_then(|s| s.last()))
            .copied()
    }

    /// How segment `s` of timeline `tli` is stored: the complete file, or a
    /// `.partial` that is the timeline's newest segment (its open end). A
    /// `.partial` with anything after it (a backup's last segment whose
    /// complete file is missing) is not the segment: the WAL after its end
    /// is lost, and recovery cannot pass it.
    pub fn stored_name(&self, s: SegmentNo, tli: TimelineId) -> Option<WalFileName> {
        let file = self.segment(s, tli);
        if self.full.get(&tli).is_some_and(|f| f.contains(&s)) {
            return Some(WalFileName::Segment(file));
        }
        (self.partial.get(&tli).is_some_and(|p| p.contains(&s))
            && self.newest_segment(tli) == Some(s))
        .then_some(WalFileName::Partial(file))
    }

    /// Segment `s` on `tli`.
    pub fn segment(&self, s: SegmentNo, tli: TimelineId) -> SegmentFile {
        SegmentFile {
            timeline: tli,
            segno: s,
            seg_size: self.seg,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Regression: a backup's zero-padded `.partial` of a segment whose
    /// complete file was lost, with newer WAL after it, counted as the
    /// segment, so wal-verify saw no gap and a plan crossed it.
    #[test]
    fn only_the_newest_partial_stands_for_its_segment() {
        let tli = TimelineId::FIRST;
        let mut c = WalCatalog {
            seg: WalSegSize::DEFAULT,
            full: BTreeMap::new(),
            partial: BTreeMap::new(),
            histories: BTreeMap::new(),
        };
        c.full.insert(tli, [1, 2, 3].map(SegmentNo).into());
        c.partial.insert(tli, [4, 5].map(SegmentNo).into());
        assert_eq!(c.stored_name(SegmentNo(4), tli), None);
        assert!(matches!(
            c.stored_name(SegmentNo(5), tli),
            Some(WalFileName::Partial(_))
        ));
        assert!(matches!(
            c.stored_name(SegmentNo(3), tli),
            Some(WalFileName::Segment(_))
        ));
    }
}
