//! `walvault init`: create a repository.

use anyhow::{bail, Context};
use clap::Args;

use super::output::outln;
use super::Settings;
use crate::codec::Compression;
use crate::repo::{InitParams, KdfCost, Repository};

/// Options of `walvault init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Encrypt everything with a random master key, wrapped by the passphrase
    /// (WALVAULT_PASSPHRASE or --passphrase-file) or key file (--key-file).
    #[arg(long)]
    pub encrypt: bool,
    /// Block size files are cut at: a multiple of 8KiB (e.g. 8KiB, 32KiB).
    #[arg(long, default_value = "8KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Compression of new blocks: zstd:LEVEL (1-22, or a fast level -1 to
    /// -7), zstd (level 3), lz4 or none. zstd:1 over block groups stores
    /// half of LZ4's bytes in about the same backup time; lz4 restores
    /// about 5% faster.
    #[arg(long, default_value = "zstd:1")]
    pub compression: Compression,
    /// Target size of a pack (e.g. 16MiB).
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub pack_size: u64,
    /// New blocks compressed together, at most (default: 256KiB of blocks,
    /// 32 of 8KiB, with zstd; 128KiB, 16, with lz4). 1 stores every block
    /// alone, a repository walvault releases before block groups (and
    /// before 128-bit block ids) can read.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub group_blocks: Option<u32>,
}

pub(super) async fn run(settings: &Settings, args: InitArgs) -> anyhow::Result<()> {
    let secret = settings.secret()?;
    match (&secret, args.encrypt) {
        (None, true) => bail!(
            "--encrypt needs a passphrase (WALVAULT_PASSPHRASE or --passphrase-file) or a key file (--key-file)"
        ),
        (Some(_), false) => bail!(
            "a passphrase or key file was given but --encrypt was not; add --encrypt, or unset them for an unencrypted repository"
        ),
        _ => {}
    }
    let params = InitParams {
        block_size: u32::try_from(args.block_size).context("block size too large")?,
        compression: args.compression,
        pack_size: u32::try_from(args.pack_size).context("pack size too large")?,
        group_blocks: args.group_blocks,
    };
    let storage = settings.storage().await?;
    let repo = Repository::init(storage, &params, secret.as_ref(), KdfCost::default()).await?;
    let c = repo.config();
    outln!(
        "created repository {} at {}",
        c.repo_id,
        repo.storage().location()
    )?;
    let grouping = match c.group_blocks() {
        1 => "each block alone (readable by walvault before block groups)".to_owned(),
        n => format!("over groups of up to {n} blocks"),
    };
    outln!(
        "encryption {}, block size {} bytes, compression {} {grouping}, pack size {} bytes",
        c.encryption,
        c.block_size,
        c.compression,
        c.pack_size
    )?;
    if repo.keys().is_some() {
        outln!("keep the passphrase or key file safe: without it nothing in this repository can be restored")?;
    }
    Ok(())
}

/// Parse `8192`, `8KiB`, `8K`, `32MiB`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, crate::pg::ParseError> {
    let bad = |why: &str| crate::pg::ParseError::new("size", s, why);
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| bad("expected a number of bytes, KiB, MiB or GiB (e.g. 8KiB, 32MiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "kB" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        _ => return Err(bad("unknown unit (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| bad("too large"))
}
