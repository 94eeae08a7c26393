//! walvault's own PostgreSQL client against real servers: every
//! authentication method, replication commands, server errors with SQLSTATE,
//! TLS in every sslmode with SCRAM channel binding.

use walvault::pg::{ConnParams, PgConnection, PgError, TimelineId};

use crate::support::free_port;
use crate::support::pg::{PgCluster, PASSWORD, PASSWORD_USER};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

fn params(s: &str) -> ConnParams {
    ConnParams::parse_with_env(s, &|_| None).unwrap()
}

#[tokio::test]
async fn identify_system_and_show_over_a_unix_socket() {
    let c = PgCluster::start();
    let mut conn = c.replication().await;
    let sys = conn.identify_system().await.unwrap();
    assert_eq!(
        sys.system_id.to_string(),
        c.psql("SELECT system_identifier FROM pg_control_system()")
    );
    assert_eq!(sys.timeline, TimelineId::FIRST);
    assert!(sys.xlogpos.is_valid());
    assert_eq!(conn.wal_segment_size().await.unwrap().bytes(), 16 << 20);
    let num: u32 = c.psql("SHOW server_version_num").parse().unwrap();
    assert_eq!(conn.server_version_num(), Some(num));
    assert_eq!(conn.show("wal_level").await.unwrap(), "replica");
    conn.close().await;
}

#[tokio::test]
async fn scram_over_tcp_and_a_wrong_password() {
    let c = PgCluster::start();
    let ok = format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} password={PASSWORD}",
        c.port
    );
    let mut conn = PgConnection::connect(&params(&ok), true).await.unwrap();
    assert!(conn.identify_system().await.unwrap().xlogpos.is_valid());
    // the server holds our walsender, logged in over TCP (where pg_hba demands SCRAM)
    let n = c.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
         AND usename = '{PASSWORD_USER}' AND client_addr = '127.0.0.1' AND application_name = 'walvault'"
    ));
    assert_eq!(n, "1");
    let bad = format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} password=wrong",
        c.port
    );
    let e = PgConnection::connect(&params(&bad), true)
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("28P01"), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "password authentication failed for user \"{PASSWORD_USER}\""
        )),
        "{e}"
    );
    let none = format!("host=127.0.0.1 port={} user={PASSWORD_USER}", c.port);
    let e = PgConnection::connect(&params(&none), true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("asks for a password"), "{e}");
}

#[tokio::test]
async fn md5_cleartext_and_pgpass() {
    let c = PgCluster::start();
    c.psql(
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pass';
         SET password_encryption = 'scram-sha-256'; CREATE ROLE plainuser LOGIN PASSWORD 'plain-pass';",
    );
    let hba = std::fs::read_to_string(c.datadir.join("pg_hba.conf")).unwrap();
    c.write_file(
        "pg_hba.conf",
        &format!(
            "host all md5user 127.0.0.1/32 md5\nhost all plainuser 127.0.0.1/32 password\n{hba}"
        ),
    );
    c.reload_conf();
    for (user, pw) in [("md5user", "md5-pass"), ("plainuser", "plain-pass")] {
        let p = params(&format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname=postgres",
            c.port
        ));
        let mut conn = PgConnection::connect(&p, false)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let r = conn.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(r.text(0, "current_user").as_deref(), Some(user));
    }
    // the password from a password file
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!("127.0.0.1:{}:*:{PASSWORD_USER}:{PASSWORD}\n", c.port),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = params(&format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} passfile={}",
        c.port,
        pgpass.display()
    ));
    assert_eq!(p.password.as_deref(), Some(PASSWORD));
    PgConnection::connect(&p, true).await.unwrap();
}

#[tokio::test]
async fn slots_and_server_errors() {
    let c = PgCluster::start();
    let mut conn = c.replication().await;
    conn.create_physical_slot("walvault_t", true).await.unwrap();
    let info = conn
        .read_replication_slot("walvault_t")
        .await
        .unwrap()
        .unwrap();
    assert!(info.restart_lsn.is_some_and(|l| l.is_valid()), "{info:?}");
    assert_eq!(
        c.psql("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'walvault_t'"),
        "physical"
    );
    assert_eq!(conn.read_replication_slot("nosuch").await.unwrap(), None);
    conn.drop_slot("walvault_t").await.unwrap();
    let e = conn.drop_slot("walvault_t").await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("42704"), "{e}");
    assert!(
        e.to_string()
            .contains("replication slot \"walvault_t\" does not exist"),
        "{e}"
    );
    // the connection is still usable after an error
    assert!(conn.identify_system().await.is_ok());
    assert!(conn.create_physical_slot("Bad-Name", false).await.is_err());
}

#[tokio::test]
async fn timeline_history_after_a_promotion() {
    let primary = PgCluster::start();
    let standby = PgCluster::standby_of(&primary);
    standby.promote();
    let mut conn = standby.replication().await;
    assert_eq!(conn.identify_system().await.unwrap().timeline.get(), 2);
    let (name, content) = conn
        .timeline_history(TimelineId::new(2).unwrap())
        .await
        .unwrap();
    assert_eq!(name, "00000002.history");
    let text = String::from_utf8(content.to_vec()).unwrap();
    assert!(text.starts_with("1\t0/"), "{text:?}");
}

#[tokio::test]
async fn unreachable_server_and_timeouts() {
    let port = free_port();
    let e = PgConnection::connect(&params(&format!("host=127.0.0.1 port={port} user=x")), true)
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    // a listener that never answers: the connect timeout applies
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    let e = PgConnection::connect(
        &params(&format!("host=127.0.0.1 port={p} user=x connect_timeout=1")),
        true,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, PgError::Timeout { secs: 1, .. }), "{e}");
}

/// A CA certificate (PEM) and its key pair.
pub(crate) fn test_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

/// A server certificate for `names` (DNS names or IP addresses) signed by
/// the CA: (certificate PEM, key PEM).
pub(crate) fn server_cert(
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    names: &[&str],
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A cluster with TLS on whose pg_hba lets the password user in over TCP only
/// with TLS (`hostssl`); its certificate names `names`. Returns it and the CA
/// file.
fn tls_cluster(dir: &std::path::Path, names: &[&str]) -> (PgCluster, std::path::PathBuf) {
    let mut c = PgCluster::start();
    let (ca, ca_key) = test_ca("walvault test CA");
    let (cert, key) = server_cert(&ca, &ca_key, names);
    let ca_file = dir.join("root.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    c.write_file(
        "pg_hba.conf",
        &format!(
            "local all all trust\n\
             local replication all trust\n\
             hostssl all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n\
             hostssl replication {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
        ),
    );
    c.enable_tls(&cert, &key);
    (c, ca_file)
}

async fn ssl_of_own_backend(conn: &mut PgConnection) -> String {
    let r = conn
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    r.text(0, "ssl").unwrap()
}

#[tokio::test]
async fn tls_require_uses_scram_channel_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _ca) = tls_cluster(dir.path(), &["localhost", "127.0.0.1"]);
    let base = format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} password={PASSWORD} dbname={PASSWORD_USER}",
        c.port
    );
    let mut conn = PgConnection::connect(&params(&format!("{base} sslmode=require")), false)
        .await
        .unwrap();
    assert!(conn.tls_in_use());
    // the server offers SCRAM-SHA-256-PLUS over TLS; logging in with it means
    // the server checked our tls-server-end-point binding
    assert_eq!(conn.auth_mechanism(), Some("SCRAM-SHA-256-PLUS"));
    assert_eq!(ssl_of_own_backend(&mut conn).await, "t");
    conn.close().await;
    // prefer (libpq's default over TCP) takes TLS too
    let mut conn = PgConnection::connect(&params(&base), false).await.unwrap();
    assert_eq!(conn.auth_mechanism(), Some("SCRAM-SHA-256-PLUS"));
    assert_eq!(ssl_of_own_backend(&mut conn).await, "t");
    // replication connections speak TLS as well
    let mut repl = PgConnection::connect(&params(&format!("{base} sslmode=require")), true)
        .await
        .unwrap();
    assert!(repl.identify_system().await.unwrap().xlogpos.is_valid());
    // hostssl: plain text is refused by pg_hba
    let e = PgConnection::connect(&params(&format!("{base} sslmode=disable")), false)
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("28000"), "{e}");
    // a wrong password over TLS is still a wrong password
    let bad = format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} password=wrong dbname={PASSWORD_USER} sslmode=require",
        c.port
    );
    let e = PgConnection::connect(&params(&bad), false)
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("28P01"), "{e}");
}

#[tokio::test]
async fn tls_verify_full_and_verify_ca_check_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (c, ca_file) = tls_cluster(dir.path(), &["localhost", "127.0.0.1"]);
    let conninfo = |host: &str, mode: &str, root: &std::path::Path| {
        params(&format!(
            "host={host} port={} user={PASSWORD_USER} password={PASSWORD} dbname={PASSWORD_USER} sslmode={mode} sslrootcert={}",
            c.port,
            root.display()
        ))
    };
    for host in ["localhost", "127.0.0.1"] {
        for mode in ["verify-full", "verify-ca"] {
            let mut conn = PgConnection::connect(&conninfo(host, mode, &ca_file), false)
                .await
                .unwrap_or_else(|e| panic!("{host} {mode}: {e}"));
            assert_eq!(conn.auth_mechanism(), Some("SCRAM-SHA-256-PLUS"));
            assert_eq!(ssl_of_own_backend(&mut conn).await, "t");
        }
    }
    // a CA that did not sign the server's certificate
    let (other, _) = test_ca("someone else's CA");
    let wrong = dir.path().join("wrong.crt");
    std::fs::write(&wrong, other.pem()).unwrap();
    for mode in ["verify-full", "verify-ca"] {
        let e = PgConnection::connect(&conninfo("localhost", mode, &wrong), false)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, PgError::Tls { .. }), "{text}");
        assert!(text.contains("certificate is not trusted"), "{text}");
        assert!(text.contains(&format!("(sslmode={mode})")), "{text}");
        assert!(text.contains(&format!("localhost:{}", c.port)), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
    // no root certificate file
    let missing = dir.path().join("missing.crt");
    let e = PgConnection::connect(&conninfo("localhost", "verify-full", &missing), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("missing.crt does not exist"), "{e}");
}

#[tokio::test]
async fn tls_against_a_server_without_ssl() {
    let c = PgCluster::start();
    let base = format!(
        "host=127.0.0.1 port={} user={PASSWORD_USER} password={PASSWORD} dbname={PASSWORD_USER}",
        c.port
    );
    let e = PgConnection::connect(&params(&format!("{base} sslmode=require")), false)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("the server does not accept TLS connections (sslmode=require)"),
        "{e}"
    );
    let mut conn = PgConnection::connect(&params(&format!("{base} sslmode=prefer")), false)
        .await
        .unwrap();
    assert!(!conn.tls_in_use());
    assert_eq!(conn.auth_mechanism(), Some("SCRAM-SHA-256"));
    assert_eq!(ssl_of_own_backend(&mut conn).await, "f");
}

#[tokio::test]
async fn tls_verify_full_refuses_a_host_name_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (c, ca_file) = tls_cluster(dir.path(), &["db.example"]);
    let conninfo = |mode: &str| {
        params(&format!(
            "host=127.0.0.1 port={} user={PASSWORD_USER} password={PASSWORD} dbname={PASSWORD_USER} sslmode={mode} sslrootcert={}",
            c.port,
            ca_file.display()
        ))
    };
    let e = PgConnection::connect(&conninfo("verify-full"), false)
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("does not name host \"127.0.0.1\""), "{text}");
    assert!(text.contains("(sslmode=verify-full)"), "{text}");
    // verify-ca checks the chain only
    let mut conn = PgConnection::connect(&conninfo("verify-ca"), false)
        .await
        .unwrap();
    assert_eq!(ssl_of_own_backend(&mut conn).await, "t");
}
