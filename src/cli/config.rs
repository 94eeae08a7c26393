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
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Same as `--repo`.
    pub repo: Option<String>,
    /// Same as `--pg` (backup, stream, check, daemon): the server, as a
    /// libpq conninfo or postgres:// URL.
    pub pg: Option<String>,
    /// Same as `--stanza`.
    pub stanza: Option<String>,
    /// Same as `--log-format`.
    pub log_format: Option<LogFormat>,
    /// How much is logged: error, warn, info (the default), debug, trace,
    /// or a filter such as "warn,walvault=debug". `-v`/`-q` and the
    /// environment variable WALVAULT_LOG win over it. The daemon applies a
    /// new one on SIGHUP.
    pub log_level: Option<String>,
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
    /// The budgets `check` judges and the daemon enforces.
    #[serde(default)]
    pub budgets: crate::ops::check::Budgets,
    /// The sidecar's settings and schedules.
    #[serde(default)]
    pub daemon: crate::daemon::DaemonOptions,
    /// Where the daemon sends alerts.
    #[serde(default, rename = "alert")]
    pub alerts: Vec<crate::daemon::alerts::SinkConfig>,
    /// File sets of `walvault files backup --set NAME`: `[files.NAME]`.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, super::files::FileSetConfig>,
    /// More repositories: `copy --to NAME` writes to them; restore,
    /// restore-pitr and wal-fetch fall back to them in this order.
    #[serde(default, rename = "repository")]
    pub repositories: Vec<RepositoryConfig>,
}

/// A `[[repository]]` entry of walvault.toml.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// The name `copy --to` and `--repository` use.
    pub name: String,
    /// Its location: a directory or `s3://bucket/prefix`.
    pub repo: String,
    /// Storage class of the objects written to an S3 repository
    /// (`STANDARD_IA`, `GLACIER_IR`: classes read with ordinary GETs).
    pub storage_class: Option<String>,
    /// Its key file (when encrypted).
    pub key_file: Option<std::path::PathBuf>,
    /// Its passphrase file (when encrypted).
    pub passphrase_file: Option<std::path::PathBuf>,
    /// Its S3 settings (default: the top-level `[s3]` table).
    pub s3: Option<S3Config>,
    /// Its retention policy (default: the top-level `[retention]`).
    pub retention: Option<super::retention::RetentionConfig>,
}

impl Config {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            // one line that names the line: toml's own text is a
            // multi-line drawing
            let at = e
                .span()
                .map(|s| format!(" line {}", line_of(&text, s.start)))
                .unwrap_or_default();
            anyhow::anyhow!(
                "config file {}{at}: {}",
                path.display(),
                e.message().trim_end()
            )
        })?;
        config.daemon.validate().map_err(|e| {
            anyhow::anyhow!("config file {}{}: {e}", path.display(), e.line_in(&text))
        })?;
        for a in &config.alerts {
            a.validate().map_err(|e| {
                anyhow::anyhow!("config file {}{}: {e}", path.display(), e.line_in(&text))
            })?;
        }
        Ok(config)
    }
}

/// The 1-based line of byte `at` of `text`.
pub fn line_of(text: &str, at: usize) -> usize {
    text.get(..at)
        .unwrap_or(text)
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
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
    /// The log filter of walvault.toml's `log_level`, checked.
    pub log_level: Option<String>,
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
    /// `[[repository]]`.
    pub repositories: Vec<RepositoryConfig>,
    /// `pg` of the file (commands' `--pg` and `WALVAULT_PG` win).
    pub pg: Option<String>,
    /// `[budgets]`.
    pub budgets: crate::ops::check::Budgets,
    /// `[daemon]`.
    pub daemon: crate::daemon::DaemonOptions,
    /// `[[alert]]`.
    pub alerts: Vec<crate::daemon::alerts::SinkConfig>,
    /// `[files.<set>]`.
    pub files: std::collections::BTreeMap<String, super::files::FileSetConfig>,
}

impl Settings {
    /// Merge the command line (and environment) over the config file.
    pub fn resolve(args: &GlobalArgs) -> anyhow::Result<Settings> {
        let mut file = match &args.config {
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
        // relative paths of [[repository]] entries are relative to the
        // config file, wherever walvault runs (PostgreSQL runs wal-fetch in
        // the data directory)
        let base = args
            .config
            .as_deref()
            .and_then(|c| std::path::absolute(c).ok())
            .and_then(|c| c.parent().map(Path::to_path_buf));
        if let Some(base) = &base {
            for r in &mut file.repositories {
                if !r.repo.contains("://") && Path::new(&r.repo).is_relative() {
                    r.repo = base.join(&r.repo).display().to_string();
                }
                for p in [&mut r.key_file, &mut r.passphrase_file]
                    .into_iter()
                    .flatten()
                {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &file.repositories {
            let valid = !r.name.is_empty()
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                bail!(
                    "[[repository]] name {:?}: use letters, digits, '-' and '_'",
                    r.name
                );
            }
            if !names.insert(r.name.clone()) {
                bail!("two [[repository]] entries are named {:?}", r.name);
            }
            if r.storage_class.is_some() && !r.repo.starts_with("s3://") {
                bail!(
                    "[[repository]] {:?}: storage_class applies to S3 repositories only, and {} is not one",
                    r.name,
                    r.repo
                );
            }
        }
        Ok(Settings {
            repo: args.repo.clone().or(file.repo),
            stanza,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            log_level: file
                .log_level
                .map(|l| super::log_filter(&l).map(|_| l))
                .transpose()?,
            storage: StorageOptions {
                s3: file.s3,
                retry: file.retry,
            },
            retention: file.retention,
            drill: file.drill,
            repositories: file.repositories,
            pg: file.pg,
            budgets: file.budgets,
            daemon: file.daemon,
            alerts: file.alerts,
            files: file.files,
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

    /// The server connection: `--pg`/`WALVAULT_PG` (`given`), else `pg` of
    /// the config file.
    pub fn pg<'a>(&'a self, given: Option<&'a str>) -> anyhow::Result<&'a str> {
        given
            .or(self.pg.as_deref())
            .context("no server given: pass --pg, set WALVAULT_PG, or set pg in the config file")
    }

    /// The `[[repository]]` entry `name`, or an error listing the names.
    pub fn repository(&self, name: &str) -> anyhow::Result<&RepositoryConfig> {
        self.repositories
            .iter()
            .find(|r| r.name == name)
            .with_context(|| {
                let names: Vec<&str> = self.repositories.iter().map(|r| r.name.as_str()).collect();
                if names.is_empty() {
                    format!("there is no repository {name:?}: walvault.toml has no [[repository]] entries")
                } else {
                    format!("there is no repository {name:?}: walvault.toml names {}", names.join(", "))
                }
            })
    }

    /// Open the `[[repository]]` entry `r` with its own secret and S3
    /// settings.
    pub async fn open_entry(
        &self,
        r: &RepositoryConfig,
    ) -> anyhow::Result<crate::repo::Repository> {
        open_entry(r, &self.storage).await
    }

    /// The repositories a recovery may read, in order: the main one, then
    /// each `[[repository]]` (`None` stands for the main one).
    /// With none at all, the error that says how to give one.
    pub fn recovery_sources(&self) -> anyhow::Result<Vec<Option<&RepositoryConfig>>> {
        let mut v: Vec<Option<&RepositoryConfig>> = Vec::new();
        if self.repo.is_some() {
            v.push(None);
        }
        v.extend(self.repositories.iter().map(Some));
        if v.is_empty() {
            self.repo()?;
        }
        Ok(v)
    }

    /// [`Settings::recovery_sources`], starting with the `[[repository]]`
    /// `first` when given (the one a recovery was restored from).
    pub fn recovery_sources_from(
        &self,
        first: Option<&str>,
    ) -> anyhow::Result<Vec<Option<&RepositoryConfig>>> {
        let mut v = self.recovery_sources()?;
        if let Some(name) = first {
            let entry = self.repository(name)?;
            v.retain(|s| s.is_none_or(|r| r.name != name));
            v.insert(0, Some(entry));
        }
        Ok(v)
    }

    /// Open a recovery source: `None` is the main repository.
    pub async fn open_source(
        &self,
        source: Option<&RepositoryConfig>,
    ) -> anyhow::Result<crate::repo::Repository> {
        match source {
            None => self.open_repository().await,
            Some(r) => self.open_entry(r).await,
        }
    }
}

/// Open the `[[repository]]` entry `r` with its own secret and S3
/// settings (its `s3` table, else `storage`'s).
pub async fn open_entry(
    r: &RepositoryConfig,
    storage: &StorageOptions,
) -> anyhow::Result<crate::repo::Repository> {
    let mut s3 = r.s3.clone().unwrap_or_else(|| storage.s3.clone());
    if r.storage_class.is_some() {
        s3.storage_class = r.storage_class.clone();
    }
    let opts = StorageOptions {
        s3,
        retry: storage.retry,
    };
    let st = crate::storage::open(&r.repo, &opts)
        .await
        .with_context(|| format!("repository {}", r.name))?;
    let secret = read_secret(r.key_file.as_deref(), r.passphrase_file.as_deref(), None)?;
    crate::repo::Repository::open(st, secret.as_ref())
        .await
        .with_context(|| format!("repository {} ({})", r.name, r.repo))
}

/// The name of a recovery source in messages.
pub fn source_name(source: Option<&RepositoryConfig>) -> String {
    match source {
        None => "the main repository".to_owned(),
        Some(r) => format!("repository {} ({})", r.name, r.repo),
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
