//! A storage backend under test, local or on a real Garage server, and what
//! keeps it alive.

use std::sync::Arc;

use tempfile::TempDir;
use walvault::repo::{InitParams, KdfCost, Repository, Secret};
use walvault::storage::{LocalDir, RetryPolicy, Retrying, Storage};

use super::s3::S3Server;

/// A backend and its guards.
pub struct Backend {
    /// The bare backend (for fault injection).
    pub raw: Arc<dyn Storage>,
    /// The backend behind the retry layer, as the command line uses it.
    pub store: Arc<dyn Storage>,
    _dir: Option<TempDir>,
    _server: Option<S3Server>,
}

impl Backend {
    /// A fresh local directory.
    pub fn local() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Storage> = Arc::new(LocalDir::open(dir.path().join("repo")).unwrap());
        Backend {
            store: Arc::new(Retrying::new(raw.clone(), RetryPolicy::default())),
            raw,
            _dir: Some(dir),
            _server: None,
        }
    }

    /// A prefix of a bucket on a fresh Garage server.
    pub async fn s3() -> Backend {
        let server = S3Server::start().await;
        let raw: Arc<dyn Storage> = Arc::new(server.storage("under/prefix").await);
        Backend {
            store: Arc::new(Retrying::new(raw.clone(), RetryPolicy::default())),
            raw,
            _dir: None,
            _server: Some(server),
        }
    }
}

/// argon2 costs for tests (the default costs a quarter second per open).
pub fn cheap_kdf() -> KdfCost {
    KdfCost {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    }
}

impl Backend {
    /// A new repository with default parameters on this backend, encrypted
    /// when `secret` is given.
    pub async fn init_repo(&self, secret: Option<&Secret>) -> Arc<Repository> {
        Arc::new(
            Repository::init(
                self.store.clone(),
                &InitParams::default(),
                secret,
                cheap_kdf(),
            )
            .await
            .expect("init repository"),
        )
    }
}

/// Generate `#[tokio::test]`s that run each listed `async fn(&Backend)` once
/// against a local directory (module `local`) and once against Garage (`s3`).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::support::backend::Backend::local()).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::support::backend::Backend::s3().await).await;
                }
            )*
        }
    };
}
