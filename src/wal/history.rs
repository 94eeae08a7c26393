//! Timeline history files (`00000002.history`): one line per ancestor
//! timeline, `<parent tli>\t<switch LSN>\t<reason>`, oldest first; `#`
//! comments and blank lines are ignored. Timeline N's history lists every
//! timeline before it with the LSN where it ended.

use crate::pg::{Lsn, ParseError, SegmentNo, TimelineId, WalSegSize};

/// One ancestor: timeline `tli` ended at `end` (the next timeline begins
/// there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub tli: TimelineId,
    /// Where it ended: the first LSN of its successor.
    pub end: Lsn,
}

/// Parse a history file's text; an error names the line that is wrong.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, ParseError> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            ParseError::new(
                "timeline history line",
                line,
                format!("line {}: {why}", no + 1),
            )
        };
        let mut f = line.split_whitespace();
        let tli = f
            .next()
            .and_then(|t| t.parse::<TimelineId>().ok())
            .ok_or_else(|| bad("no timeline id"))?;
        let end = f
            .next()
            .and_then(|l| l.parse::<Lsn>().ok())
            .ok_or_else(|| bad("no switch LSN"))?;
        if out.last().is_some_and(|p| p.tli >= tli || p.end > end) {
            return Err(bad("timelines out of order"));
        }
        out.push(HistoryEntry { tli, end });
    }
    Ok(out)
}

/// The timelines leading to a timeline, with the segments each covers: the
/// timeline a segment is read from is the newest whose first segment is at
/// or before it (as recovery picks it: the segment holding a switch point
/// is read from the new timeline, whose copy continues past the switch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath {
    /// (timeline, first segment, end LSN or `None` for the newest), oldest first.
    pub steps: Vec<(TimelineId, SegmentNo, Option<Lsn>)>,
}

impl TimelinePath {
    /// The path to `tli` given its parsed history.
    pub fn new(tli: TimelineId, history: &[HistoryEntry], seg: WalSegSize) -> TimelinePath {
        let mut steps = Vec::new();
        let mut begin = SegmentNo(0);
        for h in history {
            steps.push((h.tli, begin, Some(h.end)));
            begin = h.end.segment(seg);
        }
        steps.push((tli, begin, None));
        TimelinePath { steps }
    }

    /// The timeline segment `s` is read from.
    pub fn timeline_of(&self, s: SegmentNo) -> TimelineId {
        self.steps
            .iter()
            .rev()
            .find(|(_, begin, _)| *begin <= s)
            .map(|(t, _, _)| *t)
            .unwrap_or(TimelineId::FIRST)
    }

    /// Whether the path passes through `tli` at `lsn` (the LSN lies on that
    /// timeline before it ended).
    pub fn contains(&self, tli: TimelineId, lsn: Lsn) -> bool {
        self.steps
            .iter()
            .any(|(t, _, end)| *t == tli && end.is_none_or(|e| lsn < e))
    }

    /// The newest timeline.
    pub fn last(&self) -> TimelineId {
        self.steps.last().map(|s| s.0).unwrap_or(TimelineId::FIRST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_and_paths() {
        let h = parse_history(
            "1\t0/3000158\tno recovery target specified\n\n# x\n2\t0/5000000\tbefore 2026-11-23\n",
        )
        .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].end, "0/5000000".parse().unwrap());
        let seg = WalSegSize::new(16 << 20).unwrap();
        let p = TimelinePath::new(TimelineId::new(3).unwrap(), &h, seg);
        assert_eq!(p.timeline_of(SegmentNo(2)).get(), 1);
        // the switch segment is read from the new timeline
        assert_eq!(p.timeline_of(SegmentNo(3)).get(), 2);
        assert_eq!(p.timeline_of(SegmentNo(5)).get(), 3);
        assert!(p.contains(TimelineId::FIRST, "0/3000000".parse().unwrap()));
        assert!(!p.contains(TimelineId::FIRST, "0/3000158".parse().unwrap()));
        assert!(parse_history("2\t0/1\n1\t0/2\n").is_err());
        assert!(parse_history("x").is_err());
    }
}
