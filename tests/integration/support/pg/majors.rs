//! Which PostgreSQL majors the tests run, and where their binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::super::{cache_root, skip};

/// Debian's PostgreSQL 15: the default server, and the client programs
/// other bindirs lack.
pub const DEBIAN_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// The binary directory for a major version.
pub fn bindir(major: Option<u32>) -> PathBuf {
    match major {
        None => std::env::var_os("WALVAULT_PG_BINDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEBIAN_BINDIR)),
        Some(m) => {
            if let Some(p) = std::env::var_os(format!("WALVAULT_PG{m}_BINDIR")) {
                return PathBuf::from(p);
            }
            let cached = cache_root().join(format!("pg/{m}/bin"));
            if cached.join("postgres").exists() {
                return cached;
            }
            PathBuf::from(format!("/usr/lib/postgresql/{m}/bin"))
        }
    }
}

/// The majors `WALVAULT_PG_VERSIONS` asks for ("13 17" or "13,17").
fn requested_majors() -> Vec<u32> {
    std::env::var("WALVAULT_PG_VERSIONS")
        .unwrap_or_default()
        .split([' ', ','])
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// The majors `WALVAULT_PG_VERSIONS` asks for, but those in `tested`
/// (covered by other tests); when that leaves none, says the running test
/// is skipped and returns `None`. A major asked for but not installed is
/// an error, not a skip.
pub fn other_majors_or_skip(tested: &[u32]) -> Option<Vec<u32>> {
    let majors: Vec<u32> = requested_majors()
        .into_iter()
        .filter(|m| !tested.contains(m))
        .collect();
    if majors.is_empty() {
        let others = match tested {
            [] => String::new(),
            _ => {
                let list: Vec<String> = tested.iter().map(u32::to_string).collect();
                format!(" other than {}", list.join(", "))
            }
        };
        skip(&format!(
            "WALVAULT_PG_VERSIONS asks for no major{others} (e.g. WALVAULT_PG_VERSIONS='13 17')"
        ));
        return None;
    }
    for m in &majors {
        assert!(
            bindir(Some(*m)).join("postgres").exists(),
            "PostgreSQL {m} was requested but is not installed (scripts/install-pg-versions.sh)"
        );
    }
    Some(majors)
}

/// Major version of the server binaries in `bindir`.
pub fn server_major(bindir: &Path) -> u32 {
    let out = Command::new(bindir.join("postgres"))
        .arg("--version")
        .output()
        .expect("postgres --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version from {text:?}"))
}
