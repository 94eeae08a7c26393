//! systemd's readiness protocol (`Type=notify`): a datagram with
//! `READY=1` once the daemon serves, `STOPPING=1` when it begins to stop,
//! sent to `$NOTIFY_SOCKET` (a path, or an abstract socket when it begins
//! with `@`). Without the variable, nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. `READY=1`) to systemd, if it asked for it.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let s = UnixDatagram::unbound()?;
        let path = socket.to_string_lossy();
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            s.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            s.send_to(state.as_bytes(), &*path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("cannot notify systemd ({state}): {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // the variable is read once per call; tests run in threads, so no
        // other test may use NOTIFY_SOCKET
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
