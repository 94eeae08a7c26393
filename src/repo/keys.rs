//! Key slots: `keys/<id>` objects, each holding the master key wrapped by a key
//! derived from one secret — a passphrase (argon2id) or a key file (HKDF).
//! Adding or removing a slot never rewrites data.

use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::object::{self, ObjectKind};
use super::RepoError;
use crate::codec::{from_hex, to_hex, Compression, MasterKey};

/// Folder of key slots at the repository root.
pub const KEYS_PREFIX: &str = "keys/";
const SLOT_VERSION: u32 = 1;

/// A secret that opens a key slot.
#[derive(Clone)]
pub enum Secret {
    /// A passphrase, stretched with argon2id.
    Passphrase(String),
    /// The contents of a key file (at least 32 bytes of high-entropy data).
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Passphrase(_) => "Secret::Passphrase(..)",
            Secret::KeyFile(_) => "Secret::KeyFile(..)",
        })
    }
}

/// argon2id cost for new passphrase slots.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory, KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfCost {
    /// 64 MiB, 3 passes, 1 lane: about a quarter second here, and expensive
    /// for anyone guessing passphrases on stolen key slots.
    fn default() -> Self {
        KdfCost {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

/// A key slot as stored (JSON in the object envelope).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeySlot {
    /// Version of this structure.
    pub version: u32,
    /// The slot's id (its object name after `keys/`).
    pub id: String,
    /// "passphrase" or "keyfile".
    pub kind: String,
    /// A note for `key list`.
    pub label: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// argon2id cost (passphrase slots).
    pub kdf: Option<KdfCost>,
    /// Random salt (hex).
    pub salt: String,
    /// nonce || AES-256-GCM(master key) || tag, hex; associated data binds
    /// the slot id and repository id.
    pub wrapped_key: String,
}

fn wrapping_key(secret: &Secret, salt: &[u8], kdf: Option<KdfCost>) -> Result<[u8; 32], RepoError> {
    let mut out = [0u8; 32];
    match secret {
        Secret::Passphrase(p) => {
            let c = kdf.unwrap_or_default();
            let params = argon2::Params::new(c.m_cost_kib, c.t_cost, c.p_cost, Some(32))
                .map_err(|e| RepoError::KeyDerivation(format!("parameters: {e}")))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(p.as_bytes(), salt, &mut out)
                .map_err(|e| RepoError::KeyDerivation(e.to_string()))?;
        }
        Secret::KeyFile(bytes) => {
            let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), bytes);
            let _ = hk.expand(b"walvault key file v1", &mut out);
        }
    }
    Ok(out)
}

fn slot_aad(slot_id: &str, repo_id: &str) -> Vec<u8> {
    format!("walvault key slot {slot_id} {repo_id}").into_bytes()
}

/// Check a secret before it protects a repository.
pub fn validate_secret(secret: &Secret) -> Result<(), RepoError> {
    match secret {
        Secret::Passphrase(p) if p.chars().count() < 8 => Err(RepoError::WeakSecret(
            "the passphrase is shorter than 8 characters; choose a longer one",
        )),
        Secret::KeyFile(k) if k.len() < 32 => Err(RepoError::WeakSecret(
            "the key file holds fewer than 32 bytes; make one with: head -c 32 /dev/urandom | base64 > FILE",
        )),
        _ => Ok(()),
    }
}

impl KeySlot {
    /// Wrap `master` under `secret` in a new slot.
    pub fn create(
        master: &MasterKey,
        secret: &Secret,
        repo_id: &str,
        label: &str,
        cost: KdfCost,
    ) -> Result<KeySlot, RepoError> {
        validate_secret(secret)?;
        let id = to_hex(&rand::random::<[u8; 8]>());
        let salt: [u8; 16] = rand::random();
        let kdf = matches!(secret, Secret::Passphrase(_)).then_some(cost);
        let wk = wrapping_key(secret, &salt, kdf)?;
        let sealed = crate::codec::crypto_seal(&wk, &slot_aad(&id, repo_id), &master.0);
        Ok(KeySlot {
            version: SLOT_VERSION,
            id,
            kind: match secret {
                Secret::Passphrase(_) => "passphrase",
                Secret::KeyFile(_) => "keyfile",
            }
            .into(),
            label: label.to_owned(),
            created: chrono::Utc::now().to_rfc3339(),
            kdf,
            salt: to_hex(&salt),
            wrapped_key: to_hex(&sealed),
        })
    }

    /// The master key, if `secret` opens this slot.
    pub fn unwrap_key(
        &self,
        secret: &Secret,
        repo_id: &str,
    ) -> Result<Option<MasterKey>, RepoError> {
        let kind_matches = matches!(
            (secret, self.kind.as_str()),
            (Secret::Passphrase(_), "passphrase") | (Secret::KeyFile(_), "keyfile")
        );
        if !kind_matches {
            return Ok(None);
        }
        let corrupt = |r: &str| RepoError::Corrupt {
            object: self.object_name(),
            reason: r.to_owned(),
        };
        let salt = from_hex(&self.salt).ok_or_else(|| corrupt("salt is not hex"))?;
        let sealed =
            from_hex(&self.wrapped_key).ok_or_else(|| corrupt("wrapped key is not hex"))?;
        let wk = wrapping_key(secret, &salt, self.kdf)?;
        match crate::codec::crypto_open(&wk, &slot_aad(&self.id, repo_id), &sealed) {
            Ok(k) if k.len() == 32 => {
                let mut m = [0u8; 32];
                m.copy_from_slice(&k);
                Ok(Some(MasterKey(m)))
            }
            Ok(_) => Err(corrupt("wrapped key has the wrong length")),
            Err(_) => Ok(None),
        }
    }

    /// `keys/<id>`.
    pub fn object_name(&self) -> String {
        format!("{KEYS_PREFIX}{}", self.id)
    }

    pub(crate) fn encode(&self) -> Result<bytes::Bytes, RepoError> {
        let body = serde_json::to_vec_pretty(self).map_err(RepoError::encode("a key slot"))?;
        Ok(object::seal(
            ObjectKind::Key,
            &self.object_name(),
            &body,
            Compression::None,
            None,
        ))
    }

    pub(crate) fn decode(name: &str, data: &[u8]) -> Result<KeySlot, RepoError> {
        let body = object::open(ObjectKind::Key, name, data, None, 1 << 20)?;
        let corrupt = |reason: String| RepoError::Corrupt {
            object: name.to_owned(),
            reason,
        };
        let slot: KeySlot = serde_json::from_slice(&body).map_err(|e| corrupt(e.to_string()))?;
        if slot.version > SLOT_VERSION || slot.version == 0 {
            return Err(RepoError::UnsupportedVersion {
                object: name.to_owned(),
                found: slot.version,
                supported: SLOT_VERSION,
            });
        }
        if slot.object_name() != name {
            return Err(corrupt(format!(
                "slot id {} does not match its name",
                slot.id
            )));
        }
        if let Some(k) = slot.kdf {
            // refuse costs that would exhaust memory before trying them
            if k.m_cost_kib > 4 * 1024 * 1024 || k.t_cost > 100 || k.p_cost > 64 {
                return Err(corrupt("argon2 cost out of range".into()));
            }
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHEAP: KdfCost = KdfCost {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn wrap_unwrap_and_wrong_secrets() {
        let master = MasterKey([9; 32]);
        let pass = Secret::Passphrase("long enough passphrase".into());
        let slot = KeySlot::create(&master, &pass, "repo", "l", CHEAP).unwrap();
        let back = KeySlot::decode(&slot.object_name(), &slot.encode().unwrap()).unwrap();
        assert_eq!(back.unwrap_key(&pass, "repo").unwrap().unwrap().0, master.0);
        assert!(back
            .unwrap_key(&Secret::Passphrase("another passphrase".into()), "repo")
            .unwrap()
            .is_none());
        assert!(
            back.unwrap_key(&pass, "other-repo").unwrap().is_none(),
            "slot moved to another repository"
        );
        assert!(back
            .unwrap_key(&Secret::KeyFile(vec![1; 32]), "repo")
            .unwrap()
            .is_none());
        assert!(KeySlot::decode("keys/other", &slot.encode().unwrap()).is_err());
        assert!(
            KeySlot::create(&master, &Secret::Passphrase("short".into()), "r", "", CHEAP).is_err()
        );
        assert!(KeySlot::create(&master, &Secret::KeyFile(vec![1; 16]), "r", "", CHEAP).is_err());
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(body in "\\PC{0,300}") {
            let obj = object::seal(ObjectKind::Key, "keys/x", body.as_bytes(), Compression::None, None);
            let _ = KeySlot::decode("keys/x", &obj);
        }
    }
}
