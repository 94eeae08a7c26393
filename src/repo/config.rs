//! The repository's `config` object: format, id, encryption and cutting
//! parameters. Never encrypted (it must be read before any key is known), but
//! checksummed like every object.

use serde::{Deserialize, Serialize};

use super::object::{self, ObjectKind};
use super::RepoError;
use crate::codec::{to_hex, Compression, Keys};

/// Name of the config object at the repository root.
pub const CONFIG_KEY: &str = "config";

/// The newest `config` version this build understands (2: block ids may be
/// BLAKE3, which builds that know version 1 only cannot compute; 3: packs
/// may hold groups of blocks compressed together; 4: 128-bit block ids,
/// entry lists by blob and manifests of version 7 — decision 040).
pub const CONFIG_VERSION: u32 = 4;

/// Largest group of blocks compressed together, bytes before compression.
pub const MAX_GROUP_BYTES: u32 = 1 << 20;

/// Blocks per group by default: 128 KiB of blocks (16 of 8 KiB) for LZ4,
/// whose 64 KiB window uses no more; 256 KiB (32) for Zstandard, whose
/// window reaches further and stores 4 % less of a database at the same
/// speed (docs/compression-groups-study.md, decision 040).
pub fn default_group_blocks(block_size: u32, compression: Compression) -> u32 {
    let bytes = match compression {
        Compression::Zstd(_) => 256 * 1024,
        _ => 128 * 1024,
    };
    (bytes / block_size.max(1)).max(1)
}

/// What `config` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    /// Always "walvault-repository".
    pub format: String,
    /// Version of this structure.
    pub version: u32,
    /// Random 128-bit id (hex); also the salt of key derivation.
    pub repo_id: String,
    /// When `init` ran (RFC 3339).
    pub created: String,
    /// "aes-256-gcm" or "none".
    pub encryption: String,
    /// The block id function: "blake3-keyed" (encrypted) or "blake3" since
    /// version 2; "hmac-sha256" (encrypted) or "sha256" in version 1.
    pub block_id: String,
    /// Bytes per block for files cut into blocks (a multiple of 8192).
    pub block_size: u32,
    /// Default compression of new blocks ("lz4", "zstd:3", "none").
    pub compression: String,
    /// Target size of a pack, bytes.
    pub pack_size: u32,
    /// Encrypted repositories: a value sealed with the derived key, to tell a
    /// key of another repository from this one's.
    #[serde(default)]
    pub key_check: Option<String>,
    /// New blocks compressed together in one group blob, at most (version 3;
    /// absent or 1: every block alone, as versions 1 and 2 store them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_blocks: Option<u32>,
}

/// Parameters chosen at `init`.
#[derive(Debug, Clone)]
pub struct InitParams {
    /// Block size, bytes (multiple of 8192, 8 KiB to 16 MiB).
    pub block_size: u32,
    /// Compression of new blocks.
    pub compression: Compression,
    /// Pack target size, bytes (1 MiB to 1 GiB).
    pub pack_size: u32,
    /// Blocks compressed together, at most (None: [`default_group_blocks`];
    /// 1: each alone, a version 2 repository older builds can read).
    pub group_blocks: Option<u32>,
}

impl Default for InitParams {
    fn default() -> Self {
        InitParams {
            block_size: super::DEFAULT_BLOCK_SIZE,
            // over groups, half of LZ4's bytes at the same backup time
            // (decision 034)
            compression: Compression::Zstd(1),
            pack_size: super::DEFAULT_PACK_SIZE,
            group_blocks: None,
        }
    }
}

impl RepoConfig {
    pub(crate) fn new(
        repo_id: [u8; 16],
        params: &InitParams,
        encrypted: bool,
    ) -> Result<RepoConfig, RepoError> {
        if params.block_size % 8192 != 0 || !(8192..=16 << 20).contains(&params.block_size) {
            return Err(RepoError::OutOfRange {
                what: "block size",
                value: u64::from(params.block_size),
                rule: "must be a multiple of 8192 from 8 KiB to 16 MiB",
            });
        }
        if !(1 << 20..=1 << 30).contains(&params.pack_size) {
            return Err(RepoError::OutOfRange {
                what: "pack size",
                value: u64::from(params.pack_size),
                rule: "must be from 1 MiB to 1 GiB",
            });
        }
        let group = params
            .group_blocks
            .unwrap_or_else(|| default_group_blocks(params.block_size, params.compression));
        if group == 0
            || group > 255
            || u64::from(group) * u64::from(params.block_size) > u64::from(MAX_GROUP_BYTES)
        {
            return Err(RepoError::OutOfRange {
                what: "blocks per group",
                value: u64::from(group),
                rule: "must be from 1 to 255, and at most 1 MiB of blocks",
            });
        }
        Ok(RepoConfig {
            format: "walvault-repository".into(),
            version: if group > 1 { CONFIG_VERSION } else { 2 },
            repo_id: to_hex(&repo_id),
            created: chrono::Utc::now().to_rfc3339(),
            encryption: if encrypted { "aes-256-gcm" } else { "none" }.into(),
            block_id: match (encrypted, group > 1) {
                (true, true) => "blake3-keyed-128",
                (true, false) => "blake3-keyed",
                (false, true) => "blake3-128",
                (false, false) => "blake3",
            }
            .into(),
            block_size: params.block_size,
            compression: params.compression.to_string(),
            pack_size: params.pack_size,
            key_check: None,
            group_blocks: (group > 1).then_some(group),
        })
    }

    /// True for an encrypted repository.
    pub fn encrypted(&self) -> bool {
        self.encryption != "none"
    }

    /// Compression of new blocks.
    pub fn compression(&self) -> Compression {
        self.compression.parse().unwrap_or_default()
    }

    /// Version 4's compact layout: 128-bit block ids, pack headers and
    /// index objects listing entries by blob, manifests of version 7.
    pub fn compact(&self) -> bool {
        self.version >= 4
    }

    /// New blocks compressed together, at most (1: each alone).
    pub fn group_blocks(&self) -> usize {
        self.group_blocks.unwrap_or(1).max(1) as usize
    }

    pub(crate) fn encode(&self) -> Result<bytes::Bytes, RepoError> {
        let body = serde_json::to_vec_pretty(self).map_err(RepoError::encode("the config"))?;
        Ok(object::seal(
            ObjectKind::Config,
            CONFIG_KEY,
            &body,
            Compression::None,
            None,
        ))
    }

    pub(crate) fn decode(data: &[u8]) -> Result<RepoConfig, RepoError> {
        let body = object::open(ObjectKind::Config, CONFIG_KEY, data, None, 1 << 20)?;
        let corrupt = |reason: String| RepoError::Corrupt {
            object: CONFIG_KEY.into(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| corrupt(e.to_string()))?;
        if v.get("format").and_then(|f| f.as_str()) != Some("walvault-repository") {
            return Err(corrupt("not a walvault repository config".into()));
        }
        let version = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0);
        if version > u64::from(CONFIG_VERSION) || version == 0 {
            return Err(RepoError::UnsupportedVersion {
                object: CONFIG_KEY.into(),
                found: version.try_into().unwrap_or(u32::MAX),
                supported: CONFIG_VERSION,
            });
        }
        let cfg: RepoConfig = serde_json::from_value(v).map_err(|e| corrupt(e.to_string()))?;
        if cfg.block_size % 8192 != 0 || cfg.block_size == 0 || cfg.pack_size == 0 {
            return Err(corrupt(format!(
                "invalid block size {} or pack size {}",
                cfg.block_size, cfg.pack_size
            )));
        }
        let block_ids: &[&str] = match cfg.version {
            1 => &["sha256", "hmac-sha256"],
            2 | 3 => &["sha256", "hmac-sha256", "blake3", "blake3-keyed"],
            _ => &["blake3-128", "blake3-keyed-128"],
        };
        let keyed = matches!(
            cfg.block_id.as_str(),
            "hmac-sha256" | "blake3-keyed" | "blake3-keyed-128"
        );
        if !block_ids.contains(&cfg.block_id.as_str()) || keyed != cfg.encrypted() {
            return Err(corrupt(format!(
                "block id function {:?} unknown for version {} of a{} repository",
                cfg.block_id,
                cfg.version,
                if cfg.encrypted() {
                    "n encrypted"
                } else {
                    "n unencrypted"
                }
            )));
        }
        if let Some(g) = cfg.group_blocks {
            if cfg.version < 3
                || g == 0
                || g > 255
                || u64::from(g) * u64::from(cfg.block_size) > u64::from(MAX_GROUP_BYTES)
            {
                return Err(corrupt(format!(
                    "{g} blocks per group is invalid for version {} with {}-byte blocks",
                    cfg.version, cfg.block_size
                )));
            }
        }
        if cfg.compression.parse::<Compression>().is_err() {
            return Err(corrupt(format!(
                "unknown compression {:?}",
                cfg.compression
            )));
        }
        Ok(cfg)
    }

    /// The associated data and plaintext of the key check.
    fn key_check_aad(&self) -> Vec<u8> {
        format!("walvault key check {}", self.repo_id).into_bytes()
    }

    pub(crate) fn make_key_check(&mut self, keys: &Keys) {
        let sealed = keys.seal(&self.key_check_aad(), self.repo_id.as_bytes());
        self.key_check = Some(to_hex(&sealed));
    }

    /// True when `keys` were derived from this repository's master key.
    pub(crate) fn key_matches(&self, keys: &Keys) -> bool {
        let Some(sealed) = self.key_check.as_deref().and_then(crate::codec::from_hex) else {
            return false;
        };
        keys.open(&self.key_check_aad(), &sealed).ok().as_deref() == Some(self.repo_id.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_newer_version() {
        let cfg = RepoConfig::new([7; 16], &InitParams::default(), false).unwrap();
        assert_eq!((cfg.version, cfg.block_id.as_str()), (4, "blake3-128"));
        assert!(cfg.compact());
        assert_eq!((cfg.group_blocks, cfg.group_blocks()), (Some(32), 32));
        let lz4 = InitParams {
            compression: Compression::Lz4,
            ..InitParams::default()
        };
        let lz4 = RepoConfig::new([7; 16], &lz4, false).unwrap();
        assert_eq!(lz4.group_blocks, Some(16));
        assert_eq!(RepoConfig::decode(&cfg.encode().unwrap()).unwrap(), cfg);
        // one block per group: a version 2 repository older builds read
        let single = InitParams {
            group_blocks: Some(1),
            ..InitParams::default()
        };
        let v2 = RepoConfig::new([7; 16], &single, false).unwrap();
        assert_eq!(
            (v2.version, v2.group_blocks, v2.group_blocks()),
            (2, None, 1)
        );
        assert_eq!(v2.block_id, "blake3");
        assert!(!v2.compact());
        assert!(!String::from_utf8_lossy(&v2.encode().unwrap()).contains("group"));
        assert_eq!(RepoConfig::decode(&v2.encode().unwrap()).unwrap(), v2);
        // groups need version 3, and fit in 1 MiB
        let bad = RepoConfig {
            group_blocks: Some(16),
            ..v2.clone()
        };
        let e = RepoConfig::decode(&bad.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("per group"), "{e}");
        for g in [0, 129, 256] {
            let p = InitParams {
                group_blocks: Some(g),
                ..InitParams::default()
            };
            assert!(RepoConfig::new([7; 16], &p, false).is_err(), "{g}");
        }
        let enc = RepoConfig::new([7; 16], &InitParams::default(), true).unwrap();
        assert_eq!(enc.block_id, "blake3-keyed-128");
        assert_eq!(RepoConfig::decode(&enc.encode().unwrap()).unwrap(), enc);
        // a version 3 repository (groups, 256-bit ids) still opens
        let v3 = RepoConfig {
            version: 3,
            block_id: "blake3-keyed".into(),
            ..enc.clone()
        };
        assert_eq!(RepoConfig::decode(&v3.encode().unwrap()).unwrap(), v3);
        assert!(!v3.compact());
        let mut newer = cfg.clone();
        newer.version = 5;
        let e = RepoConfig::decode(&newer.encode().unwrap()).unwrap_err();
        assert!(
            matches!(e, RepoError::UnsupportedVersion { found: 5, .. }),
            "{e}"
        );
        // version 1 (before BLAKE3 ids) still opens with its own functions
        for (encryption, id) in [("none", "sha256"), ("aes-256-gcm", "hmac-sha256")] {
            let old = RepoConfig {
                version: 1,
                encryption: encryption.into(),
                block_id: id.into(),
                group_blocks: None,
                ..cfg.clone()
            };
            assert_eq!(RepoConfig::decode(&old.encode().unwrap()).unwrap(), old);
        }
        // a function the version or the encryption does not allow
        for (version, encryption, id) in [
            (1, "none", "blake3"),
            (2, "none", "blake3-keyed"),
            (2, "aes-256-gcm", "blake3"),
            (2, "none", "md5"),
            (3, "none", "blake3-128"),
            (4, "none", "blake3"),
            (4, "aes-256-gcm", "blake3-128"),
        ] {
            let bad = RepoConfig {
                version,
                encryption: encryption.into(),
                block_id: id.into(),
                group_blocks: None,
                ..cfg.clone()
            };
            let e = RepoConfig::decode(&bad.encode().unwrap()).unwrap_err();
            assert!(e.to_string().contains("block id function"), "{e}");
        }
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(body in "\\PC{0,200}") {
            let obj = object::seal(ObjectKind::Config, CONFIG_KEY, body.as_bytes(), Compression::None, None);
            let _ = RepoConfig::decode(&obj);
        }
    }
}
