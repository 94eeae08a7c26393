//! `walvault key add|remove|list`: the secrets that open an encrypted
//! repository. The master key never changes, so no data is rewritten.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use super::config::read_secret;
use super::output::outln;
use super::Settings;
use crate::repo::KdfCost;

/// The `key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the key slots.
    List,
    /// Add a passphrase or key file (the repository is opened with the current one).
    Add(AddArgs),
    /// Remove a key slot by id (never the last one).
    Remove {
        /// Slot id, as `walvault key list` shows it.
        id: String,
    },
}

/// Options of `walvault key add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// File holding the new passphrase (else env WALVAULT_NEW_PASSPHRASE).
    #[arg(long, conflicts_with = "new_key_file")]
    pub new_passphrase_file: Option<PathBuf>,
    /// New key file.
    #[arg(long)]
    pub new_key_file: Option<PathBuf>,
    /// A note shown by `key list` (who or what uses this key).
    #[arg(long, default_value = "")]
    pub label: String,
}

pub(super) async fn run(settings: &Settings, cmd: KeyCommand) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    if repo.keys().is_none() {
        bail!(
            "the repository at {} is not encrypted: it has no keys",
            repo.storage().location()
        );
    }
    match cmd {
        KeyCommand::List => {
            outln!("{:<16}  {:<10}  {:<25}  label", "id", "kind", "created")?;
            for s in repo.list_keys().await? {
                outln!(
                    "{:<16}  {:<10}  {:<25}  {}",
                    s.id,
                    s.kind,
                    s.created,
                    s.label
                )?;
            }
        }
        KeyCommand::Add(a) => {
            let new = read_secret(
                a.new_key_file.as_deref(),
                a.new_passphrase_file.as_deref(),
                std::env::var("WALVAULT_NEW_PASSPHRASE").ok(),
            )?;
            let Some(new) = new else {
                bail!("give the new secret: --new-passphrase-file, --new-key-file, or env WALVAULT_NEW_PASSPHRASE");
            };
            let slot = repo.add_key(&new, &a.label, KdfCost::default()).await?;
            outln!("added key slot {} ({})", slot.id, slot.kind)?;
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(&id).await?;
            outln!("removed key slot {id}")?;
        }
    }
    Ok(())
}
