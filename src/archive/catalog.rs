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
    pub full: BTreeMap<u32, BTreeSet<u64>>,
    /// `.partial` segments per timeline.
    pub partial: BTreeMap<u32, BTreeSet<u64>>,
    /// History file text per timeline.
    pub histories: BTreeMap<u32, String>,
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
        for dir in repo.wal_timelines(paths).await? {
            let Ok(tli) = u32::from_str_radix(&dir, 16) else {
                continue;
            };
            for name in repo.list_wal(paths, &dir).await? {
                if name.ends_with(".history") {
                    if let Some(h) = repo.load_wal(paths, &name).await? {
                        c.histories
                            .insert(tli, String::from_utf8_lossy(&h).into_owned());
                    }
                    continue;
                }
                let (stem, is_partial) = match name.strip_suffix(".partial") {
                    Some(s) => (s, true),
                    None => (name.as_str(), false),
                };
                if let Ok(WalFileName::Segment(f)) = WalFileName::parse(stem, seg) {
                    let set = if is_partial {
                        &mut c.partial
                    } else {
                        &mut c.full
                    };
                    set.entry(tli).or_default().insert(f.segno.0);
                }
            }
        }
        Ok(c)
    }

    /// The newest timeline with any WAL or history.
    pub fn newest_timeline(&self) -> u32 {
        self.full
            .keys()
            .chain(self.partial.keys())
            .chain(self.histories.keys())
            .copied()
            .max()
            .unwrap_or(1)
    }

    /// The path of timelines leading to `tli`.
    pub fn path_to(&self, tli: u32) -> Result<TimelinePath, ArchiveError> {
        let history = match self.histories.get(&tli) {
            Some(h) => parse_history(h)
                .map_err(|e| ArchiveError::BadWal(format!("{tli:08X}.history: {e}")))?,
            None if tli > 1 => {
                return Err(ArchiveError::BadWal(format!(
                    "timeline {tli} has no {tli:08X}.history in the repository: its ancestry is unknown"
                )))
            }
            None => Vec::new(),
        };
        Ok(TimelinePath::new(
            TimelineId::new(tli).unwrap_or(TimelineId::FIRST),
            &history,
            self.seg,
        ))
    }

    /// The newest segment on `tli`, complete or partial.
    pub fn newest_segment(&self, tli: u32) -> Option<u64> {
        self.full
            .get(&tli)
            .and_then(|s| s.last())
            .max(self.partial.get(&tli).and_then(|s| s.last()))
            .copied()
    }

    /// How segment `s` of timeline `tli` is stored: the complete file, or a
    /// `.partial` past the timeline's last complete segment (its open end).
    pub fn stored_name(&self, s: u64, tli: u32) -> Option<String> {
        let name = self.name(s, tli);
        if self.full.get(&tli).is_some_and(|f| f.contains(&s)) {
            return Some(name);
        }
        let last_full = self.full.get(&tli).and_then(|f| f.last()).copied();
        (self.partial.get(&tli).is_some_and(|p| p.contains(&s)) && last_full.is_none_or(|l| s > l))
            .then(|| format!("{name}.partial"))
    }

    /// The file name of segment `s` on `tli`.
    pub fn name(&self, s: u64, tli: u32) -> String {
        SegmentFile {
            timeline: TimelineId::new(tli).unwrap_or(TimelineId::FIRST),
            segno: SegmentNo(s),
            seg_size: self.seg,
        }
        .to_string()
    }
}
