//! One daemon per stanza.
//!
//! A running daemon holds a lease of purpose [`DAEMON_PURPOSE`] in
//! `<stanza>/locks/`, written and refreshed like a backup's. A second
//! daemon on the same stanza would take every scheduled backup twice,
//! fight the first for the replication slot and run expire beside it, so
//! it refuses to start and names the holder.
//!
//! A lease whose holder is known to be gone does not count: one of this
//! host whose process id no longer runs a program of this one's name
//! (after a kill -9, or in a restarted container), and this process's own
//! (a reload takes the new stanza's lease before it lets go of the old).
//! A holder on another host counts until its lease lapses, at most
//! [`LEASE_TTL`](crate::repo::gc::LEASE_TTL) after its last refresh, or
//! until an operator who knows that host is lost starts the new daemon
//! with `--take-over`.
//!
//! Two daemons that start at the same moment both write their lease and
//! then look again: the one whose lease started later (by time, then by
//! holder name) lets go of it and refuses.

use std::sync::Arc;

use crate::repo::gc::{live_leases, this_holder, Lease, LeaseRecord, DAEMON_PURPOSE};
use crate::repo::{RepoError, Repository, StanzaPaths};

/// Why the daemon cannot run on a stanza.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another daemon holds the stanza.
    #[error(
        "another walvault daemon runs on stanza {stanza} of this repository: {holder} (host:pid), \
         running since {started}; its lease lapses at {expires} unless it is refreshed. \
         Stop that daemon first; if its host is lost, start this one with --take-over"
    )]
    Held {
        /// The stanza.
        stanza: String,
        /// `host:pid` of the other daemon.
        holder: String,
        /// When its lease was taken (UTC).
        started: String,
        /// When its lease lapses unless refreshed (UTC).
        expires: String,
    },
    /// The repository could not be read or written.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Take the daemon's lease on `stanza`, refused while another daemon holds
/// one (`take_over`: whatever the other holds).
pub async fn claim(
    repo: Arc<Repository>,
    stanza: &str,
    take_over: bool,
) -> Result<Lease, ClaimError> {
    claim_as(
        repo,
        stanza,
        take_over,
        &this_holder(),
        &gone_from_this_host,
    )
    .await
}

/// [`claim`] as `holder`, with `gone` saying which other holders are known
/// to have stopped.
async fn claim_as(
    repo: Arc<Repository>,
    stanza: &str,
    take_over: bool,
    holder: &str,
    gone: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Lease, ClaimError> {
    let paths = StanzaPaths::new(stanza);
    let others = |leases: Vec<LeaseRecord>| -> Vec<LeaseRecord> {
        leases
            .into_iter()
            .filter(|l| l.purpose == DAEMON_PURPOSE && l.holder != holder && !gone(&l.holder))
            .collect()
    };
    let before = others(live_leases(&repo, &paths).await?);
    if let (Some(other), false) = (before.first(), take_over) {
        return Err(held(stanza, other));
    }
    let lease = Lease::acquire_as(repo.clone(), &paths, DAEMON_PURPOSE, holder.to_owned()).await?;
    if take_over {
        for other in &before {
            tracing::warn!(
                "taking stanza {stanza} over from the daemon {} (--take-over: it must not run any more)",
                other.holder
            );
        }
        return Ok(lease);
    }
    let mine = (lease.started(), holder);
    let earlier = others(live_leases(&repo, &paths).await?)
        .into_iter()
        .filter(|l| (l.started, l.holder.as_str()) < mine)
        .min_by(|a, b| (a.started, &a.holder).cmp(&(b.started, &b.holder)));
    if let Some(other) = earlier {
        lease.release().await;
        return Err(held(stanza, &other));
    }
    Ok(lease)
}

fn held(stanza: &str, l: &LeaseRecord) -> ClaimError {
    let time = |secs: i64| {
        chrono::DateTime::from_timestamp(secs, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| secs.to_string())
    };
    ClaimError::Held {
        stanza: stanza.to_owned(),
        holder: l.holder.clone(),
        started: time(l.started),
        expires: time(l.expires),
    }
}

/// A holder `host:pid` of this host whose process is gone: no such process,
/// or one that runs another program (its id was reused).
fn gone_from_this_host(holder: &str) -> bool {
    let Some((host, pid)) = holder.rsplit_once(':') else {
        return false;
    };
    let here = this_holder();
    let this_host = here.rsplit_once(':').map_or("", |(h, _)| h);
    if host != this_host {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm"));
    match (comm(&pid.to_string()), comm("self")) {
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => true,
        (Ok(theirs), Ok(ours)) => theirs != ours,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{InitParams, KdfCost};

    async fn repo() -> (tempfile::TempDir, Arc<Repository>) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(crate::storage::LocalDir::open(dir.path()).unwrap());
        let repo = Repository::init(storage, &InitParams::default(), None, KdfCost::default())
            .await
            .unwrap();
        (dir, Arc::new(repo))
    }

    fn nobody_gone(_: &str) -> bool {
        false
    }

    /// A daemon of another host holds the stanza: refused, naming it, until
    /// it lets go or --take-over; other stanzas and other leases do not
    /// count; the same holder (a reload) takes a second lease.
    #[tokio::test]
    async fn a_second_daemon_is_refused_until_the_first_lets_go() {
        let (_dir, repo) = repo().await;
        let first = claim_as(repo.clone(), "main", false, "db1:100", &nobody_gone)
            .await
            .unwrap();
        let err = claim_as(repo.clone(), "main", false, "db2:200", &nobody_gone)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ClaimError::Held { ref holder, .. } if holder == "db1:100"),
            "{text}"
        );
        assert!(
            text.contains("--take-over") && text.contains("stanza main"),
            "{text}"
        );
        // another stanza, a backup's lease, the same process again
        let other = claim_as(repo.clone(), "other", false, "db2:200", &nobody_gone)
            .await
            .unwrap();
        let backup = Lease::acquire_as(
            repo.clone(),
            &StanzaPaths::new("main"),
            "backup",
            "db2:200".into(),
        )
        .await
        .unwrap();
        let again = claim_as(repo.clone(), "main", false, "db1:100", &nobody_gone)
            .await
            .unwrap();
        again.release().await;
        // gone: its lease does not count
        let gone = |h: &str| h == "db1:100";
        claim_as(repo.clone(), "main", false, "db2:200", &gone)
            .await
            .unwrap()
            .release()
            .await;
        // taken over while it holds
        let taken = claim_as(repo.clone(), "main", true, "db3:300", &nobody_gone)
            .await
            .unwrap();
        taken.release().await;
        first.release().await;
        claim_as(repo.clone(), "main", false, "db2:200", &nobody_gone)
            .await
            .unwrap()
            .release()
            .await;
        for l in [other, backup] {
            l.release().await;
        }
    }

    /// Two daemons whose first looks both found the stanza free: each
    /// writes its lease and looks again; the one whose lease is later lets
    /// go of it and is refused, the earlier one keeps the stanza.
    #[tokio::test]
    async fn of_two_daemons_starting_together_the_earlier_lease_wins() {
        let (_dir, repo) = repo().await;
        let paths = StanzaPaths::new("main");
        let racing = Lease::acquire_as(repo.clone(), &paths, DAEMON_PURPOSE, "db9:9".into())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // db1's first look misses db9's lease (written meanwhile), its
        // second sees it
        let looks = std::sync::atomic::AtomicUsize::new(0);
        let unseen_once =
            |h: &str| h == "db9:9" && looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        let err = claim_as(repo.clone(), "main", false, "db1:1", &unseen_once)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClaimError::Held { ref holder, .. } if holder == "db9:9"),
            "{err}"
        );
        assert_eq!(
            looks.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "both looks ran"
        );
        let left: Vec<String> = live_leases(&repo, &paths)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.holder)
            .collect();
        assert_eq!(left, ["db9:9"], "db1 let go of its lease");
        racing.release().await;
    }

    #[test]
    fn a_holder_of_this_host_is_gone_when_its_process_is() {
        let me = this_holder();
        let host = me.rsplit_once(':').unwrap().0;
        assert!(!gone_from_this_host(&me), "this process runs");
        // pid 1 runs a program of another name (init), a huge pid none
        assert!(gone_from_this_host(&format!("{host}:1")));
        assert!(gone_from_this_host(&format!("{host}:4194304000")));
        assert!(!gone_from_this_host("some-other-host:1"));
        assert!(!gone_from_this_host("no pid here"));
    }
}
