//! The QUIC endpoint: quinn with rustls (ring), mutual TLS against the
//! cluster CA, ALPN `loip/3`, explicit limits, and validated frames on
//! bidirectional streams.
//!
//! # Versions
//!
//! The ALPN names the wire protocol, `loip/<PROTOCOL>`: every frame and
//! message encoding, and the plan body. Nodes of the same protocol work
//! together whatever their program versions; a change to any encoding
//! bumps [`PROTOCOL`], and then TLS itself refuses a node of the other
//! protocol before any frame is read: both sides get a
//! [`NetError::Version`] that says so, and neither reads a byte it could
//! misunderstand.
//!
//! # Who is on the other end
//!
//! Both sides present a node certificate and verify the other's chain
//! against the cluster CA; a peer with no certificate or one from another CA
//! fails the handshake. A dialler names the node id it expects (from mDNS or
//! its peer list) as the TLS server name, so a peer whose SAN is another id
//! fails the handshake too. An accepting node takes the dialler's id from
//! its verified certificate. Nothing is read from a connection before both
//! checks have passed.
//!
//! # Memory
//!
//! quinn's defaults leave the connection receive window unbounded, so every
//! limit is set here ([`Limits`]): stream and connection windows, concurrent
//! streams, pending incoming connections and their buffers. Frames are read
//! into memory only against a shared [`ByteBudget`], so all frames being
//! received on an endpoint together never hold more than its size; a
//! stream that waits for budget stops reading and flow control holds the
//! sender back.
//!
//! # A restarted node
//!
//! QUIC lets a restarted endpoint end its peers' old connections at once
//! with a stateless reset, but only when it recognizes the connection ids
//! of the run before and can compute the reset tokens that run handed
//! out. quinn draws fresh keys for both each run, so peers of a node
//! restarted on the same port would send into a dead connection until the
//! idle timeout (10 s) and lose what they sent. The keys are derived from
//! the node's private key instead ([`endpoint_config`]): the same node
//! gets the same keys every run, and a peer's next packet to the old
//! connection (a keep-alive at the latest) ends it, so the peer redials.
//!
//! # Cancel safety
//!
//! [`read_frame`] is not cancel safe: dropping it mid-frame loses the bytes
//! read so far, and the stream must then be reset (as [`serve_connection`]
//! does on a timeout).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::frame::{self, Frame, FrameError, FrameLimits, TensorFrame, TensorHeader};
use super::identity::{self, NodeIdentity};
use super::NodeId;

/// The wire protocol this build speaks (see "Versions" above). 2: nodes
/// gossip their serving figures (`Wire::Stats`). 3: ring hops carry the
/// prompt lengths of their step, nodes tell the head their KV capacity,
/// and the figures carry their demotions (KV pressure in the ring).
pub const PROTOCOL: u32 = 3;

/// The ALPN protocol id of [`PROTOCOL`].
pub const ALPN: &[u8] = b"loip/3";

/// The protocol this process speaks: [`PROTOCOL`], unless the test knob
/// `LOIP_TEST_PROTOCOL` makes it act as a build of another protocol.
pub fn protocol() -> u32 {
    static P: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        std::env::var("LOIP_TEST_PROTOCOL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PROTOCOL)
    })
}

/// The program version this process announces: the crate's, unless the
/// test knob `LOIP_TEST_VERSION` says otherwise.
pub fn program_version() -> String {
    std::env::var("LOIP_TEST_VERSION").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_string())
}

fn alpn() -> Vec<u8> {
    format!("loip/{}", protocol()).into_bytes()
}

/// A failed handshake's error: [`NetError::Version`] when TLS found no
/// protocol both sides speak.
fn handshake_error(addr: SocketAddr, e: impl std::fmt::Display) -> NetError {
    let message = e.to_string();
    // TLS alert 120, no_application_protocol: no ALPN in common.
    if message.contains("error 120")
        || message.contains("NoApplicationProtocol")
        || message.contains("no_application_protocol")
    {
        NetError::Version {
            addr,
            ours: protocol(),
        }
    } else {
        NetError::Handshake { addr, message }
    }
}

/// Connection close codes.
pub const CLOSE_OK: u32 = 0;
pub const CLOSE_BAD_IDENTITY: u32 = 0x10;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("handshake with {addr}: {message}")]
    Handshake { addr: SocketAddr, message: String },
    #[error(
        "{addr} speaks another version of the loip protocol than this node \
         (loip/{ours}, program {}): run one release on every node",
        program_version()
    )]
    Version { addr: SocketAddr, ours: u32 },
    #[error("peer at {addr}: {message}")]
    PeerIdentity { addr: SocketAddr, message: String },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Every limit of an endpoint, set explicitly.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Concurrent bidirectional streams a peer may open.
    pub max_bidi_streams: u32,
    /// Unidirectional streams are not used.
    pub max_uni_streams: u32,
    /// Unread bytes buffered per stream.
    pub stream_window: u32,
    /// Unread bytes buffered per connection.
    pub connection_window: u32,
    /// Bytes we may have in flight to a peer.
    pub send_window: u64,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Handshakes waiting to be accepted, and their buffered bytes.
    pub max_incoming: usize,
    pub incoming_buffer: u64,
    pub frames: FrameLimits,
    /// A frame whose first byte arrived must be complete within this.
    pub frame_timeout: Duration,
    /// Bytes of frames being received, for the whole endpoint.
    pub frame_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bidi_streams: 16,
            max_uni_streams: 0,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            send_window: 16 << 20,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            max_incoming: 64,
            incoming_buffer: 64 << 10,
            frames: FrameLimits::default(),
            frame_timeout: Duration::from_secs(10),
            frame_budget: 64 << 20,
        }
    }
}

impl Limits {
    fn transport(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(self.idle_timeout)
                    .unwrap_or(quinn::IdleTimeout::from(VarInt::from_u32(10_000))),
            ))
            .keep_alive_interval(Some(self.keep_alive))
            .datagram_receive_buffer_size(None);
        t
    }
}

/// Bytes of frames in memory, shared by every stream of an endpoint.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: usize,
    in_use: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// Budget held by a received frame; returned when dropped.
#[derive(Debug)]
pub struct BudgetHold {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    in_use: Arc<AtomicUsize>,
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.in_use.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl ByteBudget {
    pub fn new(total: usize) -> ByteBudget {
        let total = total.min(u32::MAX as usize);
        ByteBudget {
            sem: Arc::new(Semaphore::new(total)),
            total,
            in_use: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn hold(&self, bytes: usize) -> Result<BudgetHold, FrameError> {
        let n = u32::try_from(bytes.min(self.total)).map_err(|_| FrameError::TooLarge {
            len: bytes,
            max: self.total,
        })?;
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| FrameError::Stream("endpoint closed".into()))?;
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok(BudgetHold {
            _permit: permit,
            bytes,
            in_use: self.in_use.clone(),
        })
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// A received frame and the budget it holds.
#[derive(Debug)]
pub struct Received {
    pub frame: Frame,
    pub hold: BudgetHold,
}

fn read_err(e: quinn::ReadExactError) -> FrameError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        quinn::ReadExactError::ReadError(e) => FrameError::Stream(e.to_string()),
    }
}

/// Reads one frame. `Ok(None)` at a clean end of stream. Tensor frames must
/// carry `epoch` when it is given. The body must arrive within `timeout`
/// of the frame's first byte.
pub async fn read_frame(
    recv: &mut RecvStream,
    limits: &FrameLimits,
    epoch: Option<u64>,
    budget: &ByteBudget,
    timeout: Duration,
) -> Result<Option<Received>, FrameError> {
    let mut first = [0u8; 1];
    match recv.read(&mut first).await {
        Ok(None) => return Ok(None),
        Ok(Some(0)) => return Err(FrameError::Truncated),
        Ok(Some(_)) => {}
        Err(e) => return Err(FrameError::Stream(e.to_string())),
    }
    tokio::time::timeout(timeout, read_rest(recv, first[0], limits, epoch, budget))
        .await
        .map_err(|_| FrameError::Timeout)?
        .map(Some)
}

async fn read_rest(
    recv: &mut RecvStream,
    first: u8,
    limits: &FrameLimits,
    epoch: Option<u64>,
    budget: &ByteBudget,
) -> Result<Received, FrameError> {
    let mut head = [0u8; 5];
    head[0] = first;
    recv.read_exact(&mut head[1..]).await.map_err(read_err)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let kind = head[4];
    // Refuse before allocating anything.
    frame::check_length(len, kind, limits)?;
    if kind == frame::KIND_CONTROL {
        let hold = budget.hold(len).await?;
        let mut body = vec![0u8; len - 1];
        recv.read_exact(&mut body).await.map_err(read_err)?;
        return Ok(Received {
            frame: Frame::Control(body),
            hold,
        });
    }
    let mut hb = [0u8; frame::TENSOR_HEADER];
    recv.read_exact(&mut hb).await.map_err(read_err)?;
    let header = TensorHeader::decode(&hb)?;
    let n = frame::check_tensor(&header, len, limits, epoch)?;
    let hold = budget.hold(4 * n).await?;
    let mut data = vec![0f32; n];
    recv.read_exact(bytemuck::cast_slice_mut(&mut data))
        .await
        .map_err(read_err)?;
    if cfg!(target_endian = "big") {
        for v in &mut data {
            *v = f32::from_bits(u32::from_le(v.to_bits()));
        }
    }
    Ok(Received {
        frame: Frame::Tensor(TensorFrame { header, data }),
        hold,
    })
}

/// Resets both halves of a stream with the frame error's code.
pub fn reset_stream(send: &mut SendStream, recv: &mut RecvStream, err: &FrameError) {
    let code = VarInt::from_u32(err.code());
    let _ = recv.stop(code);
    let _ = send.reset(code);
}

/// A connection to an authenticated peer.
#[derive(Clone, Debug)]
pub struct PeerConnection {
    pub id: NodeId,
    pub conn: Connection,
}

/// A QUIC endpoint that is both server and client.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    client: quinn::ClientConfig,
    any_client: quinn::ClientConfig,
    pub limits: Limits,
    pub budget: ByteBudget,
    id: NodeId,
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, NetError> {
    let mut r = RootCertStore::empty();
    r.add(ca.clone())
        .map_err(|e| NetError::Tls(format!("cluster CA certificate: {e}")))?;
    Ok(Arc::new(r))
}

/// The server half: a node certificate, client certificates required and
/// verified against the CA.
pub fn server_crypto(
    ca: &CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<QuicServerConfig, NetError> {
    let provider = ring_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn()];
    QuicServerConfig::try_from(cfg).map_err(|e| NetError::Tls(e.to_string()))
}

/// The client half: the server's certificate verified against the CA and
/// the expected node id; our certificate presented when given.
pub fn client_crypto(
    ca: &CertificateDer<'static>,
    own: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<QuicClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match own {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert], key)
            .map_err(|e| NetError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn()];
    QuicClientConfig::try_from(cfg).map_err(|e| NetError::Tls(e.to_string()))
}

/// Verifies a server's chain against the CA and its SAN against the node id
/// its own certificate names: for static peers, whose id is not known
/// before dialling. The CA still decides who is a member.
#[derive(Debug)]
struct AnyNodeVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let id = identity::node_id_from_cert(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        self.0.verify_server_cert(
            end_entity,
            intermediates,
            &identity::server_name(id),
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn any_node_client_crypto(
    ca: &CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<QuicClientConfig, NetError> {
    let provider = ring_provider();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider.clone())
            .build()
            .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyNodeVerifier(inner)))
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn()];
    QuicClientConfig::try_from(cfg).map_err(|e| NetError::Tls(e.to_string()))
}

/// The id in a connection's verified peer certificate.
fn peer_cert_id(conn: &Connection) -> Result<NodeId, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
    certs
        .as_deref()
        .and_then(|c| c.first())
        .ok_or_else(|| "no certificate".to_string())
        .and_then(|c| identity::node_id_from_cert(c).map_err(|e| e.to_string()))
}

/// The endpoint settings that make `identity`'s endpoints the same every
/// run (see "A restarted node" above): the stateless-reset key, and the
/// key of the connection-id hash, by which an endpoint tells ids of its
/// own (which it resets) from noise (which it drops). Both are one-way
/// hashes of the private key, so they reveal nothing of it.
fn endpoint_config(identity: &NodeIdentity) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(label);
        ctx.update(identity.key.secret_der());
        ctx.finish()
    };
    let reset = derive(b"loip stateless reset key\0");
    let cid = derive(b"loip connection id key\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

impl Endpoint {
    /// Binds a UDP socket at `addr` and serves and dials as `identity`.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        limits: Limits,
    ) -> Result<Endpoint, NetError> {
        let transport = Arc::new(limits.transport());
        let server_tls = server_crypto(
            &identity.ca,
            identity.cert.clone(),
            identity.key.clone_key(),
        )?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server
            .transport_config(transport.clone())
            .max_incoming(limits.max_incoming)
            .incoming_buffer_size(limits.incoming_buffer)
            .incoming_buffer_size_total(limits.incoming_buffer * limits.max_incoming as u64)
            .migration(false);
        let client_tls = client_crypto(
            &identity.ca,
            Some((identity.cert.clone(), identity.key.clone_key())),
        )?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport.clone());
        let any_tls = any_node_client_crypto(
            &identity.ca,
            identity.cert.clone(),
            identity.key.clone_key(),
        )?;
        let mut any_client = quinn::ClientConfig::new(Arc::new(any_tls));
        any_client.transport_config(transport);
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
        let inner = quinn::Endpoint::new(
            endpoint_config(identity),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NetError::Bind { addr, source })?;
        Ok(Endpoint {
            inner,
            client,
            any_client,
            limits,
            budget: ByteBudget::new(limits.frame_budget),
            id: identity.id,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Dials `addr`, expecting node `id` there.
    pub async fn connect(&self, addr: SocketAddr, id: NodeId) -> Result<PeerConnection, NetError> {
        let name = identity::node_dns_name(id);
        let conn = self.dial(self.client.clone(), addr, &name).await?;
        Ok(PeerConnection { id, conn })
    }

    /// Dials a static peer whose id is not known: any node certificate of
    /// the cluster is accepted and its id read from it.
    pub async fn connect_any(&self, addr: SocketAddr) -> Result<PeerConnection, NetError> {
        // The name is not checked (the verifier uses the certificate's own).
        let conn = self
            .dial(self.any_client.clone(), addr, "peer.node.loip")
            .await?;
        let id = peer_cert_id(&conn).map_err(|message| NetError::PeerIdentity { addr, message })?;
        Ok(PeerConnection { id, conn })
    }

    /// Connects to `addr` with `client`, presenting server name `name`.
    async fn dial(
        &self,
        client: quinn::ClientConfig,
        addr: SocketAddr,
        name: &str,
    ) -> Result<quinn::Connection, NetError> {
        let connecting =
            self.inner
                .connect_with(client, addr, name)
                .map_err(|e| NetError::Connect {
                    addr,
                    message: e.to_string(),
                })?;
        connecting.await.map_err(|e| handshake_error(addr, e))
    }

    /// The next authenticated incoming connection; `None` once closed.
    /// Handshakes that fail are skipped (and counted in the log).
    pub async fn accept(&self) -> Option<PeerConnection> {
        loop {
            let incoming = self.inner.accept().await?;
            let addr = incoming.remote_address();
            match accept_one(incoming).await {
                Ok(p) => return Some(p),
                Err(e) => log::warn!("refused {addr}: {e}"),
            }
        }
    }

    pub fn close(&self) {
        self.inner.close(VarInt::from_u32(CLOSE_OK), b"bye");
    }
}

/// Completes one handshake and reads the peer's node id from its
/// certificate.
pub async fn accept_one(incoming: quinn::Incoming) -> Result<PeerConnection, NetError> {
    let addr = incoming.remote_address();
    let conn = incoming.await.map_err(|e| handshake_error(addr, e))?;
    match peer_cert_id(&conn) {
        Ok(id) => Ok(PeerConnection { id, conn }),
        Err(message) => {
            conn.close(VarInt::from_u32(CLOSE_BAD_IDENTITY), b"bad identity");
            Err(NetError::PeerIdentity { addr, message })
        }
    }
}

/// What a stream handler answers to a frame.
pub type Reply = Result<Option<Vec<u8>>, FrameError>;

/// A task that takes over a stream after its first frame: for replies of
/// many frames (a tensor sent in chunks). It owns both halves and must end
/// them (finish or reset) itself.
pub type StreamTask =
    Box<dyn FnOnce(SendStream, RecvStream) -> futures_util::future::BoxFuture<'static, ()> + Send>;

/// What a stream handler of [`serve_connection_with`] does with a frame.
pub enum Handled {
    /// Write these frame bytes back (or nothing) and read the next frame.
    Reply(Option<Vec<u8>>),
    /// Hand the stream to a task; the serving loop stops reading it.
    TakeOver(StreamTask),
}

/// Serves every bidirectional stream a peer opens: each frame is read and
/// validated, then given to `handler`, whose reply (encoded frame bytes)
/// is written back on the same stream. A bad frame, a handler error or a
/// stalled frame resets that stream with the error's code; the connection
/// and the other streams go on. Returns when the connection closes.
pub async fn serve_connection<H>(
    endpoint: &Endpoint,
    peer: PeerConnection,
    epoch: Option<u64>,
    handler: H,
) where
    H: Fn(NodeId, Frame) -> Reply + Send + Sync + 'static,
{
    serve_connection_with(endpoint, peer, epoch, move |id, f| {
        handler(id, f).map(Handled::Reply)
    })
    .await
}

/// As [`serve_connection`], and the handler may take a stream over
/// ([`Handled::TakeOver`]) to answer with many frames.
pub async fn serve_connection_with<H>(
    endpoint: &Endpoint,
    peer: PeerConnection,
    epoch: Option<u64>,
    handler: H,
) where
    H: Fn(NodeId, Frame) -> Result<Handled, FrameError> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (mut send, mut recv) = match peer.conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let handler = handler.clone();
        let limits = endpoint.limits;
        let budget = endpoint.budget.clone();
        let id = peer.id;
        tokio::spawn(async move {
            loop {
                let got = read_frame(
                    &mut recv,
                    &limits.frames,
                    epoch,
                    &budget,
                    limits.frame_timeout,
                )
                .await;
                let result = match got {
                    Ok(None) => {
                        let _ = send.finish();
                        return;
                    }
                    Ok(Some(r)) => handler(id, r.frame),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(Handled::Reply(Some(bytes))) => {
                        if send.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Ok(Handled::Reply(None)) => {}
                    Ok(Handled::TakeOver(task)) => {
                        task(send, recv).await;
                        return;
                    }
                    Err(e) => {
                        log::debug!("peer {id}: stream reset: {e}");
                        reset_stream(&mut send, &mut recv, &e);
                        return;
                    }
                }
            }
        });
    }
}
