//! walvault.toml and the merge of file, environment and command line.
//!
//! Precedence: command line, then environment (`WALVAULT_*`, handled by clap),
//! then the config file, then built-in defaults.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::{GlobalArgs, LogFormat};
use crate::repo::Secret;
use crate::storage::{RetrySettings, S3Config, StorageOptions};

/// The contents of walvault.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Same as `--repo`.
    pub repo: Option<String>,
    /// Same as `--stanza`.
    pub stanza: Option<String>,
    /// Same as `--log-format`.
    pub log_format: Option<LogFormat>,
    /// S3 connection settings.
    #[serde(default)]
    pub s3: S3Config,
    /// Retry policy for storage operations.
    #[serde(default)]
    pub retry: RetrySettings,
    /// The retention policy of `expire` (and of `backup`'s expire after it).
    #[serde(default)]
    pub retention: super::retention::RetentionConfig,
    /// The checks and settings of `drill`.
    #[serde(default)]
    pub drill: super::drill::DrillConfig,
}

impl Config {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))
    }
}

/// Options after merging all sources.
#[derive(Debug)]
pub struct Settings {
    /// Repository location, when one was given anywhere.
    pub repo: Option<String>,
    /// Stanza name.
    pub stanza: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Storage settings.
    pub storage: StorageOptions,
    /// `--passphrase-file`.
    pub passphrase_file: Option<std::path::PathBuf>,
    /// `--key-file`.
    pub key_file: Option<std::path::PathBuf>,
    /// `--config`.
    pub config_path: Option<std::path::PathBuf>,
    /// `-q` given: no progress bar.
    pub quiet: bool,
    /// `[retention]`.
    pub retention: super::retention::RetentionConfig,
    /// `[drill]`.
    pub drill: super::drill::DrillConfig,
}

impl Settings {
    /// Merge the command line (and environment) over the config file.
    pub fn resolve(args: &GlobalArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        let stanza = args
            .stanza
            .clone()
            .or(file.stanza)
            .unwrap_or_else(|| "main".to_owned());
        let valid = !stanza.is_empty()
            && stanza.len() <= 64
            && stanza
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !stanza.starts_with('.');
        if !valid {
            bail!("invalid stanza name {stanza:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'");
        }
        Ok(Settings {
            repo: args.repo.clone().or(file.repo),
            stanza,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            storage: StorageOptions {
                s3: file.s3,
                retry: file.retry,
            },
            retention: file.retention,
            drill: file.drill,
            passphrase_file: args.passphrase_file.clone(),
            key_file: args.key_file.clone(),
            config_path: args.config.clone(),
            quiet: args.quiet > 0,
        })
    }

    /// The repository location, or an error saying how to give one.
    pub fn repo(&self) -> anyhow::Result<&str> {
        self.repo.as_deref().context(
            "no repository given: pass --repo, set WALVAULT_REPO, or set repo in the config file",
        )
    }
}

impl Settings {
    /// The secret that opens the repository: `--key-file`, `--passphrase-file`,
    /// or env `WALVAULT_PASSPHRASE`; `None` when none is given.
    pub fn secret(&self) -> anyhow::Result<Option<Secret>> {
        read_secret(
            self.key_file.as_deref(),
            self.passphrase_file.as_deref(),
            std::env::var("WALVAULT_PASSPHRASE").ok(),
        )
    }

    /// Open the storage of the repository location.
    pub async fn storage(&self) -> anyhow::Result<std::sync::Arc<dyn crate::storage::Storage>> {
        Ok(crate::storage::open(self.repo()?, &self.storage).await?)
    }

    /// Open the repository with the configured secret.
    pub async fn open_repository(&self) -> anyhow::Result<crate::repo::Repository> {
        let storage = self.storage().await?;
        Ok(crate::repo::Repository::open(storage, self.secret()?.as_ref()).await?)
    }
}

/// A secret from a key file, a passphrase file, or a passphrase value (first given wins).
pub fn read_secret(
    key_file: Option<&Path>,
    passphrase_file: Option<&Path>,
    passphrase: Option<String>,
) -> anyhow::Result<Option<Secret>> {
    if let Some(p) = key_file {
        let data =
            std::fs::read(p).with_context(|| format!("cannot read key file {}", p.display()))?;
        return Ok(Some(Secret::KeyFile(trim_ascii_end(data))));
    }
    if let Some(p) = passphrase_file {
        let data = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read passphrase file {}", p.display()))?;
        return Ok(Some(Secret::Passphrase(
            data.trim_end_matches(['\n', '\r']).to_owned(),
        )));
    }
    Ok(passphrase.filter(|p| !p.is_empty()).map(Secret::Passphrase))
}

/// Key files usually end in a newline that is not part of the key.
fn trim_ascii_end(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v
}
