//! The QUIC endpoint on 127.0.0.1: mutual TLS refusals before any frame is
//! read, bad frames resetting only their stream, bounded memory under a
//! stream flood, and stalled transfers timed out (RELIABILITY.md, "The wire
//! between stages").

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loip::net::frame::{self, Frame, TensorFrame, TensorHeader};
use loip::net::identity::{create_ca, create_node, NodeIdentity};
use loip::net::quic::{self, Endpoint, Limits, PeerConnection};
use loip::net::NodeId;
use tempfile::TempDir;

fn node(dir: &Path, ca: &str, id: u64) -> NodeIdentity {
    let out = dir.join(format!("{ca}-{id}"));
    create_node(&dir.join(ca), &out, NodeId(id)).unwrap();
    NodeIdentity::load(&out).unwrap()
}

fn setup() -> (TempDir, NodeIdentity, NodeIdentity) {
    let dir = tempfile::tempdir().unwrap();
    create_ca(&dir.path().join("ca")).unwrap();
    let a = node(dir.path(), "ca", 0xa);
    let b = node(dir.path(), "ca", 0xb);
    (dir, a, b)
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn test_limits() -> Limits {
    Limits {
        frame_timeout: Duration::from_millis(800),
        ..Limits::default()
    }
}

/// Serves `ep`: every control frame is echoed, every tensor frame answered
/// with a control frame holding its element count. Counts connections.
fn serve_echo(ep: &Endpoint, epoch: Option<u64>) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let ep = ep.clone();
    tokio::spawn(async move {
        while let Some(peer) = ep.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let ep = ep.clone();
            tokio::spawn(async move {
                quic::serve_connection(&ep, peer, epoch, |_, f| match f {
                    Frame::Control(b) => Ok(Some(frame::encode_control(&b)?)),
                    Frame::Tensor(t) => Ok(Some(frame::encode_control(&(t.data.len() as u64))?)),
                })
                .await
            });
        }
    });
    accepted
}

async fn roundtrip(peer: &PeerConnection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = peer.conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "timeout".to_string())?;
    r.map_err(|e| e.to_string())
}

fn tensor(epoch: u64, dims: &[u32]) -> TensorFrame {
    let mut d = [0u32; 4];
    d[..dims.len()].copy_from_slice(dims);
    let n: u32 = dims.iter().product();
    TensorFrame {
        header: TensorHeader {
            epoch,
            request: 1,
            position: 0,
            window: 0,
            dims: d,
            ndims: dims.len() as u8,
        },
        data: (0..n).map(|i| i as f32).collect(),
    }
}

#[tokio::test]
async fn valid_certificates_connect_and_each_side_knows_the_other() {
    let (_d, a, b) = setup();
    let ea = Endpoint::bind(local(), &a, test_limits()).unwrap();
    let eb = Endpoint::bind(local(), &b, test_limits()).unwrap();
    let accepted = {
        let ea = ea.clone();
        tokio::spawn(async move { ea.accept().await.map(|p| p.id) })
    };
    let peer = eb
        .connect(ea.local_addr().unwrap(), NodeId(0xa))
        .await
        .unwrap();
    assert_eq!(peer.id, NodeId(0xa));
    assert_eq!(accepted.await.unwrap(), Some(NodeId(0xb)));

    // Frames both ways through the echo server.
    serve_echo(&eb, Some(3));
    let back = ea
        .connect(eb.local_addr().unwrap(), NodeId(0xb))
        .await
        .unwrap();
    let msg = frame::encode_control(&vec![1u8, 2, 3]).unwrap();
    let reply = roundtrip(&back, &msg).await.unwrap();
    let f = frame::decode(&reply, &Default::default(), None).unwrap();
    assert_eq!(f.control::<Vec<u8>>().unwrap(), msg[5..].to_vec());
    let t = frame::encode_tensor(&tensor(3, &[2, 8])).unwrap();
    let reply = roundtrip(&back, &t).await.unwrap();
    let f = frame::decode(&reply, &Default::default(), None).unwrap();
    assert_eq!(f.control::<u64>().unwrap(), 16);
}

/// The server never yields a connection, and the client cannot use one.
async fn assert_refused(
    server: &Endpoint,
    accepted: &AtomicUsize,
    attempt: impl std::future::Future<Output = Result<PeerConnection, String>>,
) {
    match attempt.await {
        Err(_) => {}
        Ok(peer) => {
            // TLS 1.3 clients may finish before the server has checked them:
            // the connection must then die before any frame is read.
            let msg = frame::encode_control(&1u8).unwrap();
            assert!(
                roundtrip(&peer, &msg).await.is_err(),
                "a refused peer got an answer"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "the server accepted it");
    let _ = server;
}

async fn dial_with(
    crypto: quinn::crypto::rustls::QuicClientConfig,
    addr: SocketAddr,
    name: &str,
) -> Result<PeerConnection, String> {
    let mut ep = quinn::Endpoint::client(local()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = ep
        .connect(addr, name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(PeerConnection {
        id: NodeId(0),
        conn,
    })
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let (_d, a, _b) = setup();
    let ea = Endpoint::bind(local(), &a, test_limits()).unwrap();
    let accepted = serve_echo(&ea, None);
    let crypto = quic::client_crypto(&a.ca, None).unwrap();
    let addr = ea.local_addr().unwrap();
    assert_refused(
        &ea,
        &accepted,
        dial_with(crypto, addr, "000000000000000a.node.loip"),
    )
    .await;
}

#[tokio::test]
async fn a_node_of_another_cluster_is_refused_both_ways() {
    let (d, a, _b) = setup();
    create_ca(&d.path().join("other")).unwrap();
    let stranger = node(d.path(), "other", 0xc);
    let ea = Endpoint::bind(local(), &a, test_limits()).unwrap();
    let accepted = serve_echo(&ea, None);
    let es = Endpoint::bind(local(), &stranger, test_limits()).unwrap();
    let addr = ea.local_addr().unwrap();
    // The stranger dials us: its certificate is from another CA.
    assert_refused(&ea, &accepted, async {
        es.connect(addr, NodeId(0xa))
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    // We dial the stranger: its certificate does not chain to our CA.
    let stranger_accepted = serve_echo(&es, None);
    let err = ea.connect(es.local_addr().unwrap(), NodeId(0xc)).await;
    assert!(err.is_err(), "connected to a node of another cluster");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stranger_accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_peer_whose_san_is_not_the_claimed_id_is_refused() {
    let (_d, a, b) = setup();
    let ea = Endpoint::bind(local(), &a, test_limits()).unwrap();
    serve_echo(&ea, None);
    let eb = Endpoint::bind(local(), &b, test_limits()).unwrap();
    // mDNS said node 0xd lives at a's address (a spoofed advert).
    let err = eb
        .connect(ea.local_addr().unwrap(), NodeId(0xd))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("handshake"), "{err}");
}

#[tokio::test]
async fn bad_frames_reset_their_stream_and_the_endpoint_keeps_serving() {
    let (_d, a, b) = setup();
    let ea = Endpoint::bind(local(), &a, test_limits()).unwrap();
    serve_echo(&ea, Some(5));
    let eb = Endpoint::bind(local(), &b, test_limits()).unwrap();
    let peer = eb
        .connect(ea.local_addr().unwrap(), NodeId(0xa))
        .await
        .unwrap();

    let good = frame::encode_tensor(&tensor(5, &[4, 4])).unwrap();
    let mut unknown_kind = good.clone();
    unknown_kind[4] = 77;
    let mut oversized = good.clone();
    oversized[..4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let mut bad_shape = good.clone();
    bad_shape[4 + 1 + 28..4 + 1 + 32].copy_from_slice(&5u32.to_le_bytes());
    let wrong_epoch = frame::encode_tensor(&tensor(4, &[4, 4])).unwrap();
    let mut bad_dtype = good.clone();
    bad_dtype[5] = 3;
    let control_garbage = {
        let mut v = 9u32.to_le_bytes().to_vec();
        v.push(frame::KIND_CONTROL);
        v.extend_from_slice(&[0xff; 8]);
        v
    };
    let cases: [(&str, Vec<u8>, u32); 6] = [
        ("unknown kind", unknown_kind, 2),
        ("oversized", oversized, 1),
        ("length is not the dims product", bad_shape, 3),
        ("out of epoch", wrong_epoch, 4),
        ("bad dtype", bad_dtype, 3),
        ("truncated", good[..good.len() - 3].to_vec(), 7),
    ];
    for (what, bytes, code) in cases {
        let err = roundtrip(&peer, &bytes).await.unwrap_err();
        assert!(
            err.contains(&format!("reset by peer: error {code}"))
                || err.contains(&format!("stopped by peer: error {code}")),
            "{what}: {err}"
        );
    }
    // A control frame the handler cannot use is answered (echo takes any
    // bytes); garbage postcard in a typed handler is covered by Frame::control.
    assert!(roundtrip(&peer, &control_garbage).await.is_ok());
    // Still serving, on the same connection.
    let reply = roundtrip(&peer, &good).await.unwrap();
    let f = frame::decode(&reply, &Default::default(), None).unwrap();
    assert_eq!(f.control::<u64>().unwrap(), 16);
}

#[tokio::test]
async fn a_stream_flood_keeps_frame_memory_within_the_budget() {
    let (_d, a, b) = setup();
    let limits = Limits {
        frame_budget: 8 << 20,
        frame_timeout: Duration::from_millis(600),
        ..Limits::default()
    };
    let ea = Endpoint::bind(local(), &a, limits).unwrap();
    serve_echo(&ea, None);
    let eb = Endpoint::bind(local(), &b, test_limits()).unwrap();
    let peer = eb
        .connect(ea.local_addr().unwrap(), NodeId(0xa))
        .await
        .unwrap();

    // 64 streams, each announcing a 4 MiB tensor, sending a quarter of it,
    // then stalling. Only two fit the 8 MiB budget at once; the rest wait
    // and all are timed out.
    let big = frame::encode_tensor(&tensor(0, &[1024, 1024])).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let conn = peer.conn.clone();
        let part = big[..big.len() / 4].to_vec();
        tasks.push(tokio::spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let _ = send.write_all(&part).await;
            let r = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 20)).await;
            Some(format!("{r:?}"))
        }));
    }
    let mut timed_out = 0;
    for t in tasks {
        if let Some(r) = t.await.unwrap() {
            if r.contains("Reset(6)") {
                timed_out += 1;
            }
        }
    }
    assert_eq!(
        timed_out, 64,
        "every stalled stream is reset with the timeout code"
    );
    assert!(ea.budget.peak() > 0, "the flood reached the budget");
    assert!(
        ea.budget.peak() <= ea.budget.total(),
        "peak {} over {}",
        ea.budget.peak(),
        ea.budget.total()
    );
    // And the endpoint still serves.
    let reply = roundtrip(&peer, &frame::encode_tensor(&tensor(0, &[3])).unwrap())
        .await
        .unwrap();
    assert_eq!(
        frame::decode(&reply, &Default::default(), None)
            .unwrap()
            .control::<u64>()
            .unwrap(),
        3
    );
}

#[tokio::test]
async fn a_static_peer_is_dialled_without_knowing_its_id() {
    let (d, a, b) = setup();
    let ea = Endpoint::bind(local(), &a, test_limits()).unwrap();
    let accepted = serve_echo(&ea, None);
    let eb = Endpoint::bind(local(), &b, test_limits()).unwrap();
    let peer = eb.connect_any(ea.local_addr().unwrap()).await.unwrap();
    assert_eq!(peer.id, NodeId(0xa), "the id comes from the certificate");
    let msg = frame::encode_control(&7u32).unwrap();
    assert!(roundtrip(&peer, &msg).await.is_ok());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Still only members of this cluster.
    create_ca(&d.path().join("other")).unwrap();
    let stranger = node(d.path(), "other", 0xc);
    let es = Endpoint::bind(local(), &stranger, test_limits()).unwrap();
    serve_echo(&es, None);
    assert!(eb.connect_any(es.local_addr().unwrap()).await.is_err());
}

/// A node killed and restarted on its port ends its peers' connections of
/// the run before at once, with a stateless reset, rather than leaving
/// them to send into nothing until the idle timeout.
#[test]
fn a_node_restarted_on_its_port_resets_the_connections_of_its_last_run() {
    let (_d, a, b) = setup();
    let limits = Limits {
        keep_alive: Duration::from_millis(200),
        ..test_limits()
    };
    // The first run of node a lives on a runtime of its own, so that it
    // can die without a word, as a killed process does.
    let first_run = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = first_run.block_on(async {
        let ea = Endpoint::bind(local(), &a, limits).unwrap();
        serve_echo(&ea, None);
        ea.local_addr().unwrap()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let eb = Endpoint::bind(local(), &b, limits).unwrap();
        let peer = eb.connect(addr, NodeId(0xa)).await.unwrap();
        let msg = frame::encode_control(&7u32).unwrap();
        assert!(roundtrip(&peer, &msg).await.is_ok());

        first_run.shutdown_background();
        let t0 = std::time::Instant::now();
        let ea = loop {
            match Endpoint::bind(addr, &a, limits) {
                Ok(e) => break e,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    eprintln!("port {} not free yet: {e}", addr.port());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        serve_echo(&ea, None);
        let why = tokio::time::timeout(Duration::from_secs(30), peer.conn.closed())
            .await
            .expect("the old connection ends");
        assert!(
            matches!(why, quinn::ConnectionError::Reset),
            "reset by the restarted node, not {why}"
        );
        let again = eb.connect(addr, NodeId(0xa)).await.unwrap();
        assert!(roundtrip(&again, &msg).await.is_ok());
    });
}
