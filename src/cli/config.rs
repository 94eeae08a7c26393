//! walvault.toml and the merge of file, environment and command line.
//!
//! Precedence: command line, then environment (`WALVAULT_*`, handled by clap),
//! then the config file, then built-in defaults.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::{GlobalArgs, LogFormat};
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
        })
    }

    /// The repository location, or an error saying how to give one.
    pub fn repo(&self) -> anyhow::Result<&str> {
        self.repo.as_deref().context(
            "no repository given: pass --repo, set WALVAULT_REPO, or set repo in the config file",
        )
    }
}
