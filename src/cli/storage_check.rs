//! `walvault storage-check`: write, read, list and delete a probe object, so an
//! operator learns before the first backup that the location, credentials and
//! permissions work.

use std::time::Instant;

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Args;

use super::output::outln;
use super::Settings;
use crate::storage;

/// Options of `walvault storage-check`.
#[derive(Debug, Args)]
pub struct StorageCheckArgs {
    /// Size of the probe object in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub size: usize,
}

pub(super) async fn run(settings: &Settings, args: StorageCheckArgs) -> anyhow::Result<()> {
    let url = settings.repo()?;
    let store = storage::open(url, &settings.storage).await?;
    let key = format!(
        "{}/locks/storage-check-{:016x}",
        settings.stanza,
        rand::random::<u64>()
    );
    let data: Bytes = (0..args.size)
        .map(|_| rand::random::<u8>())
        .collect::<Vec<u8>>()
        .into();
    let step = |name: &str, t: Instant| -> anyhow::Result<()> {
        outln!("{name:<8} ok  {:>8.1} ms", t.elapsed().as_secs_f64() * 1e3)
    };

    let t = Instant::now();
    store.put(&key, data.clone()).await?;
    step("put", t)?;

    let result = async {
        let t = Instant::now();
        let back = store.get(&key).await?;
        ensure!(
            back == data,
            "read back {} bytes that differ from the {} written",
            back.len(),
            data.len()
        );
        step("get", t)?;

        let t = Instant::now();
        let listed = storage::list_all(store.as_ref(), &key).await?;
        ensure!(
            listed
                .iter()
                .any(|o| o.key == key && o.size == data.len() as u64),
            "the probe object {key} is missing from the listing"
        );
        step("list", t)?;
        Ok(())
    }
    .await;

    let t = Instant::now();
    let deleted = store
        .delete(&key)
        .await
        .context("removing the probe object");
    result?;
    deleted?;
    ensure!(
        store.head(&key).await?.is_none(),
        "the probe object {key} is still there after delete"
    );
    step("delete", t)?;
    outln!("storage at {} works", store.location())?;
    Ok(())
}
