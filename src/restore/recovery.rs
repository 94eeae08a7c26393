//! Recovery settings in `postgresql.auto.conf`: written as one marked block,
//! after commenting out any `recovery_target*` settings the restored copy
//! carried (two targets make PostgreSQL refuse to start), and removed again
//! once recovery is over — PostgreSQL deletes `recovery.signal` but leaves
//! the targets, which would apply again the next time the directory is
//! started in recovery.

use std::path::Path;

use super::pitr::Target;
use super::{io, RestoreError};

const BEGIN: &str = "# walvault restore-pitr: BEGIN";
const END: &str = "# walvault restore-pitr: END";
const DISABLED: &str = "# disabled by walvault restore-pitr: ";

/// `recovery_target_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TargetAction {
    /// End recovery and accept writes.
    #[default]
    Promote,
    /// Stay in recovery, paused at the target (inspect, then promote).
    Pause,
    /// Shut down at the target.
    Shutdown,
}

impl TargetAction {
    fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The settings lines for a target.
pub fn settings(
    target: &Target,
    exclusive: bool,
    timeline: &str,
    action: TargetAction,
) -> Vec<String> {
    let mut v = Vec::new();
    match target {
        Target::Time(t) => v.push(format!(
            "recovery_target_time = {}",
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        )),
        Target::Lsn(l) => v.push(format!("recovery_target_lsn = {}", quote(&l.to_string()))),
        Target::Xid(x) => v.push(format!("recovery_target_xid = {}", quote(&x.to_string()))),
        Target::Name(n) => v.push(format!("recovery_target_name = {}", quote(n))),
        Target::Immediate => v.push("recovery_target = 'immediate'".into()),
        Target::Latest => {}
    }
    if matches!(target, Target::Time(_) | Target::Lsn(_) | Target::Xid(_)) {
        v.push(format!(
            "recovery_target_inclusive = {}",
            if exclusive { "off" } else { "on" }
        ));
    }
    v.push(format!("recovery_target_timeline = {}", quote(timeline)));
    if !matches!(target, Target::Latest) {
        v.push(format!(
            "recovery_target_action = {}",
            quote(action.as_str())
        ));
    }
    v
}

fn is_target_setting(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with("recovery_target")
}

/// Write `lines` as walvault's block into `<pgdata>/postgresql.auto.conf`,
/// disabling other target settings there. Returns the target settings found
/// (still active) in postgresql.conf, which the caller should warn about.
pub fn write(pgdata: &Path, lines: &[String]) -> Result<Vec<String>, RestoreError> {
    let auto = pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).unwrap_or_default();
    let mut out = String::new();
    for l in strip_block(&text).lines() {
        if is_target_setting(l) {
            out.push_str(DISABLED);
        }
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push_str(" (removed once recovery is over)\n");
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(END);
    out.push('\n');
    let tmp = auto.with_extension("walvault-tmp");
    std::fs::write(&tmp, out).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &auto).map_err(io(&auto))?;
    let conf = std::fs::read_to_string(pgdata.join("postgresql.conf")).unwrap_or_default();
    Ok(conf
        .lines()
        .filter(|l| is_target_setting(l))
        .map(str::to_owned)
        .collect())
}

/// Settings that make a server connect to another one as its standby.
const REPLICATION_SETTINGS: [&str; 2] = ["primary_conninfo", "primary_slot_name"];

/// The note above a replication setting a restore disabled.
pub const REPLICATION_NOTE: &str = "# disabled by walvault restore: the backup's source was a standby; \
a restored copy must not connect to its primary (restore --as-standby is the way to make a standby)";

/// Make a restored directory forget the replication role of the server the
/// backup was taken on: remove the `standby.signal` and `recovery.signal`
/// that came with the backup (a restore writes its own recovery
/// configuration), and comment out `primary_conninfo` and
/// `primary_slot_name` in `postgresql.auto.conf` under a note, so the DBA
/// sees what was there. Without this, a backup taken on a standby restores
/// into a server that streams from the live primary and never promotes.
/// Returns the settings disabled.
pub fn forget_replication(pgdata: &Path) -> Result<Vec<String>, RestoreError> {
    for signal in ["standby.signal", "recovery.signal"] {
        let p = pgdata.join(signal);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let text = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&auto)(e)),
    };
    let mut out = String::new();
    let mut disabled = Vec::new();
    for l in text.lines() {
        let name = l
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if REPLICATION_SETTINGS.contains(&name.as_str()) {
            out.push_str(REPLICATION_NOTE);
            out.push_str("\n#");
            disabled.push(l.to_owned());
        }
        out.push_str(l);
        out.push('\n');
    }
    if !disabled.is_empty() {
        let tmp = auto.with_extension("walvault-tmp");
        std::fs::write(&tmp, out).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &auto).map_err(io(&auto))?;
    }
    Ok(disabled)
}

/// Remove walvault's block (after recovery ended).
pub fn remove(pgdata: &Path) -> Result<(), RestoreError> {
    let auto = pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).map_err(io(&auto))?;
    let stripped = strip_block(&text);
    if stripped != text {
        let tmp = auto.with_extension("walvault-tmp");
        std::fs::write(&tmp, stripped).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &auto).map_err(io(&auto))?;
    }
    Ok(())
}

fn strip_block(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in text.lines() {
        if l.starts_with(BEGIN) {
            inside = true;
            continue;
        }
        if l.starts_with(END) {
            inside = false;
            continue;
        }
        if !inside {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_s_replication_settings_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("standby.signal"), "").unwrap();
        std::fs::write(d.join("recovery.signal"), "").unwrap();
        std::fs::write(
            d.join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nwork_mem = '8MB'\n\
             primary_conninfo = 'user=postgres host=db1 port=5432'\n\
             Primary_Slot_Name = 'standby1'\n",
        )
        .unwrap();
        let disabled = forget_replication(d).unwrap();
        assert_eq!(disabled.len(), 2, "{disabled:?}");
        assert!(!d.join("standby.signal").exists());
        assert!(!d.join("recovery.signal").exists());
        let auto = std::fs::read_to_string(d.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains("work_mem = '8MB'\n"), "{auto}");
        assert!(
            auto.contains("#primary_conninfo = 'user=postgres host=db1 port=5432'"),
            "{auto}"
        );
        assert!(auto.contains("#Primary_Slot_Name = 'standby1'"), "{auto}");
        assert_eq!(auto.matches(REPLICATION_NOTE).count(), 2, "{auto}");
        // nothing to do the second time, and a directory without the files is fine
        assert!(forget_replication(d).unwrap().is_empty());
        assert!(forget_replication(&d.join("missing")).unwrap().is_empty());
    }

    #[test]
    fn block_written_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let auto = dir.path().join("postgresql.auto.conf");
        std::fs::write(&auto, "work_mem = '8MB'\nrecovery_target_xid = '7'\n").unwrap();
        let lines = settings(
            &Target::Lsn("0/3000000".parse().unwrap()),
            true,
            "latest",
            TargetAction::Pause,
        );
        write(dir.path(), &lines).unwrap();
        let text = std::fs::read_to_string(&auto).unwrap();
        assert!(text.contains("recovery_target_lsn = '0/3000000'"), "{text}");
        assert!(text.contains("recovery_target_inclusive = off"));
        assert!(text.contains("# disabled by walvault restore-pitr: recovery_target_xid = '7'"));
        assert!(text.contains("work_mem = '8MB'"));
        // written twice: one block
        write(dir.path(), &lines).unwrap();
        let text = std::fs::read_to_string(&auto).unwrap();
        assert_eq!(text.matches(BEGIN).count(), 1, "{text}");
        remove(dir.path()).unwrap();
        let text = std::fs::read_to_string(&auto).unwrap();
        assert!(!text.contains("recovery_target_lsn"), "{text}");
        assert!(text.contains("work_mem"));
    }
}
