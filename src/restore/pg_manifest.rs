//! PostgreSQL's `backup_manifest` for a restored directory whose backup the
//! server sent as changes (PostgreSQL 17+ incremental, completed by
//! walvault while storing it): the server's manifest lists
//! `INCREMENTAL.<name>` files and an `INCREMENTAL FROM` backup_label,
//! neither of which the restored directory has. The manifest written
//! instead keeps every other entry and the WAL ranges as the server wrote
//! them, and computes size and CRC-32C of the completed files and of
//! `backup_label` from the restored files, in PostgreSQL's format
//! (`pg_verifybackup` reads it; its own checksum is recomputed).

use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::pg::INCREMENTAL_PREFIX as PREFIX;

/// The manifest for the restored directory; `locate` maps a path of the
/// manifest to the restored file. Errors are one line.
pub fn synthesize(
    server: &[u8],
    locate: &(dyn Fn(&str) -> PathBuf + Sync),
) -> Result<Vec<u8>, String> {
    let doc: Value = serde_json::from_slice(server).map_err(|e| format!("not JSON: {e}"))?;
    let version = doc
        .get("PostgreSQL-Backup-Manifest-Version")
        .and_then(Value::as_u64)
        .ok_or("no PostgreSQL-Backup-Manifest-Version")?;
    let files = doc
        .get("Files")
        .and_then(Value::as_array)
        .ok_or("no Files array")?;
    let ranges = doc
        .get("WAL-Ranges")
        .and_then(Value::as_array)
        .ok_or("no WAL-Ranges array")?;
    // each entry as kept, or the restored file it now describes
    let entries: Vec<Result<Value, String>> = files
        .par_iter()
        .map(|entry| {
            let Some(path) = entry.get("Path").and_then(Value::as_str) else {
                // (Encoded-Path: a name that is not UTF-8, never a relation file)
                return Ok(entry.clone());
            };
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (format!("{d}/"), n),
                None => (String::new(), path),
            };
            let restored = match name.strip_prefix(PREFIX) {
                Some(rel) => format!("{dir}{rel}"),
                None if path == "backup_label" => path.to_owned(),
                None => return Ok(entry.clone()),
            };
            let (size, crc) = crc32c_of(&locate(&restored))?;
            let mut e = entry.clone();
            let obj = e.as_object_mut().ok_or("a Files entry is not an object")?;
            obj.insert("Path".into(), Value::String(restored));
            obj.insert("Size".into(), Value::from(size));
            obj.insert("Checksum-Algorithm".into(), Value::String("CRC32C".into()));
            obj.insert(
                "Checksum".into(),
                Value::String(crate::codec::to_hex(&crc.to_le_bytes())),
            );
            Ok(e)
        })
        .collect();
    let mut out = format!("{{ \"PostgreSQL-Backup-Manifest-Version\": {version},\n");
    if let Some(id) = doc.get("System-Identifier") {
        out.push_str(&format!("\"System-Identifier\": {id},\n"));
    }
    out.push_str("\"Files\": [");
    for (i, e) in entries.into_iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(&e?.to_string());
    }
    out.push_str(" ],\n\"WAL-Ranges\": [");
    for (i, r) in ranges.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(&r.to_string());
    }
    out.push_str("\n],\n");
    // the checksum covers everything up to the line that holds it
    let sum = Sha256::digest(out.as_bytes());
    out.push_str(&format!(
        "\"Manifest-Checksum\": \"{}\"}}\n",
        crate::codec::to_hex(&sum)
    ));
    Ok(out.into_bytes())
}

/// Size and CRC-32C of a file, read in 1 MiB pieces.
fn crc32c_of(path: &Path) -> Result<(u64, u32), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest in PostgreSQL's layout, its checksum computed as
    /// PostgreSQL does (over everything before the last line).
    fn server_manifest(files: &[(&str, u64, &str)]) -> Vec<u8> {
        let mut s = String::from(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7412345678901234567,\n\"Files\": [\n",
        );
        let lines: Vec<String> = files
            .iter()
            .map(|(p, size, crc)| format!("{{ \"Path\": \"{p}\", \"Size\": {size}, \"Last-Modified\": \"2026-12-06 04:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{crc}\" }}"))
            .collect();
        s.push_str(&lines.join(",\n"));
        s.push_str(" ],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000120\" }\n],\n");
        let sum = crate::codec::to_hex(&Sha256::digest(s.as_bytes()));
        s.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
        s.into_bytes()
    }

    fn checksum_holds(m: &[u8]) -> bool {
        let text = std::str::from_utf8(m).unwrap();
        let body = text.trim_end_matches('\n');
        let cut = body.rfind('\n').unwrap() + 1;
        let want = crate::codec::to_hex(&Sha256::digest(&m[..cut]));
        body[cut..].contains(&want)
    }

    #[test]
    fn incremental_entries_become_the_restored_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        let rel = vec![7u8; 3 * 8192];
        std::fs::write(dir.path().join("base/5/16384"), &rel).unwrap();
        std::fs::write(dir.path().join("backup_label"), b"START TIMELINE: 1\n").unwrap();
        let server = server_manifest(&[
            ("backup_label", 300, "00000000"),
            ("base/5/INCREMENTAL.16384", 8204, "11111111"),
            ("global/pg_control", 8192, "deadbeef"),
        ]);
        assert!(checksum_holds(&server));
        let root = dir.path().to_owned();
        let out = synthesize(&server, &move |p| root.join(p)).unwrap();
        assert!(checksum_holds(&out), "{}", String::from_utf8_lossy(&out));
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["PostgreSQL-Backup-Manifest-Version"], 2);
        assert_eq!(doc["System-Identifier"], 7412345678901234567u64);
        let files = doc["Files"].as_array().unwrap();
        assert_eq!(files[1]["Path"], "base/5/16384");
        assert_eq!(files[1]["Size"], 3 * 8192);
        let crc = crc32c::crc32c(&rel).to_le_bytes();
        assert_eq!(files[1]["Checksum"], crate::codec::to_hex(&crc));
        assert_eq!(files[0]["Size"], 18);
        // untouched entries keep what the server computed
        assert_eq!(files[2]["Checksum"], "deadbeef");
        assert_eq!(doc["WAL-Ranges"][0]["End-LSN"], "0/4000120");
        // the file must exist in the restored directory
        let empty = tempfile::tempdir().unwrap();
        let root = empty.path().to_owned();
        let e = synthesize(&server, &move |p| root.join(p)).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }
}
