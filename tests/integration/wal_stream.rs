//! Streaming replication against a real server: the segments walvault
//! assembles from XLogData equal the server's own WAL files byte for byte.

use walvault::pg::wire::Backend;
use walvault::pg::TimelineId;
use walvault::wal::receive::{parse_message, status_update, SegmentAssembler, WalMessage};

use crate::support::pg::{PgCluster, PgOptions};

async fn stream_one_segment(c: &PgCluster) {
    let mut conn = c.replication().await;
    let sys = conn.identify_system().await.unwrap();
    let seg = conn.wal_segment_size().await.unwrap();
    let start = sys.xlogpos.segment(seg).start_lsn(seg).unwrap();
    conn.create_temporary_physical_slot("walvault_test_stream")
        .await
        .unwrap();
    conn.send_query(&format!(
        "START_REPLICATION SLOT walvault_test_stream PHYSICAL {start} TIMELINE 1"
    ))
    .await
    .unwrap();
    assert_eq!(conn.recv().await.unwrap(), Backend::CopyBothResponse);

    // make WAL and finish the segment
    c.psql("CREATE TABLE w AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    c.psql("SELECT pg_switch_wal()");

    let mut asm = SegmentAssembler::new(start, TimelineId::FIRST, seg).unwrap();
    let segment = loop {
        let data = conn.copy_data().await.unwrap().expect("stream ended");
        match parse_message(data).unwrap() {
            WalMessage::XLogData { start, data, .. } => {
                if let Some(s) = asm.push(start, &data).unwrap().into_iter().next() {
                    break s;
                }
            }
            WalMessage::Keepalive {
                reply_requested, ..
            } => {
                if reply_requested {
                    let pos = asm.position();
                    conn.send_copy_data(&status_update(pos, pos, pos, 0, false))
                        .await
                        .unwrap();
                }
            }
        }
    };
    let on_server = std::fs::read(c.datadir.join("pg_wal").join(segment.name.to_string())).unwrap();
    assert_eq!(segment.data.len() as u64, seg.bytes());
    assert!(
        segment.data == on_server,
        "streamed segment {} differs from the server's file",
        segment.name
    );

    // end the stream cleanly; the connection stays usable
    conn.send_copy_done().await.unwrap();
    loop {
        match conn.recv().await.unwrap() {
            Backend::ReadyForQuery(_) => break,
            Backend::CopyData(_) | Backend::CopyDone | Backend::CommandComplete(_) => {}
            Backend::RowDescription(_) | Backend::DataRow(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(conn.identify_system().await.is_ok());
}

#[tokio::test]
async fn streamed_segment_equals_the_servers_file() {
    stream_one_segment(&PgCluster::start()).await;
}

#[tokio::test]
async fn streamed_segment_with_64mb_segments() {
    stream_one_segment(&PgCluster::start_with(PgOptions {
        wal_segsize_mb: Some(64),
        ..PgOptions::default()
    }))
    .await;
}
