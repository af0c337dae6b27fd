//! Cluster and node identity: the cluster CA, node certificates whose SAN
//! names the node id, and the node id itself, kept per device.
//!
//! # Files
//!
//! `loip provision ca --out DIR` writes `DIR/ca.crt` and `DIR/ca.key`.
//! `loip provision node --ca DIR --out DIR` writes `node.crt`, `node.key`
//! and a copy of `ca.crt` into the node directory, which is then all a
//! device needs. Keys are created with mode 0600 and never overwritten.
//!
//! # The node id in the certificate
//!
//! A node certificate carries exactly one DNS SAN, `<id>.node.loip`
//! ([`node_dns_name`]), where `<id>` is the node id as 16 hex digits. A
//! dialler names the id it expects as the TLS server name, so a peer whose
//! certificate is for another id fails the handshake; an accepting node
//! reads the dialler's id from its (CA-verified) certificate with
//! [`node_id_from_cert`].
//!
//! # The node id on the device
//!
//! [`resolve_node_id`] decides the id at start, against a small
//! [`IdentityStore`]: the id is kept with a fingerprint of the hardware. On
//! first start the id of the provisioned certificate is adopted. When the
//! stored fingerprint no longer matches (an image copied to another
//! machine), a fresh id is made, so two machines never share one; that
//! machine then needs its own certificate.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::NodeId;

/// The DNS suffix of node SANs.
pub const SAN_SUFFIX: &str = ".node.loip";
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: already exists; refusing to overwrite a key or certificate", path.display())]
    Exists { path: PathBuf },
    #[error("{}: not a PEM {what}", path.display())]
    Pem { path: PathBuf, what: &'static str },
    #[error("{}: the CA key cannot be used: {message}", path.display())]
    CaKey { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("identity store: {0}")]
    Store(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The SAN of node `id`: `<16 hex digits>.node.loip`.
pub fn node_dns_name(id: NodeId) -> String {
    format!("{id}{SAN_SUFFIX}")
}

/// The TLS server name a dialler expects from node `id`.
pub fn server_name(id: NodeId) -> ServerName<'static> {
    ServerName::try_from(node_dns_name(id))
        .expect("16 hex digits and a fixed suffix form a valid DNS name")
}

/// SHA-256 of the CA certificate's DER: the cluster fingerprint announced
/// over mDNS (a hint only; the handshake is what proves membership).
pub fn cluster_fingerprint(ca: &CertificateDer<'_>) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, ca.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Writes `bytes` to a new file with `mode`; never replaces a file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                IdentityError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), IdentityError> {
    for p in paths {
        if p.exists() {
            return Err(IdentityError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// The CA's parameters, derived from its key alone, so that the issuer can
/// be rebuilt from `ca.key` without parsing `ca.crt`.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let d = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let tag: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "loip");
    dn.push(DnType::CommonName, format!("loip cluster CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// What `provision ca` wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: [u8; 32],
}

/// Creates a new cluster CA in `dir` (created if missing).
pub fn create_ca(dir: &Path) -> Result<CaFiles, IdentityError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
    let cert = ca_params(&key)
        .self_signed(&key)
        .map_err(|e| IdentityError::Generate(e.to_string()))?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(CaFiles {
        cert: cert_path,
        key: key_path,
        fingerprint: cluster_fingerprint(cert.der()),
    })
}

/// What `provision node` wrote.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub id: NodeId,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Creates a certificate and key for node `id` signed by the CA in
/// `ca_dir`, in `out` with a copy of the CA certificate.
pub fn create_node(ca_dir: &Path, out: &Path, id: NodeId) -> Result<NodeFiles, IdentityError> {
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| IdentityError::CaKey {
        path: ca_key_path.clone(),
        message: e.to_string(),
    })?;
    let ca_cert_pem = fs::read(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_der = CertificateDer::from_pem_slice(&ca_cert_pem).map_err(|_| IdentityError::Pem {
        path: ca_cert_path.clone(),
        what: "certificate",
    })?;
    // The CA certificate must be the one made from this key.
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let check = ca_params(&ca_key)
        .self_signed(&ca_key)
        .map_err(|e| IdentityError::Generate(e.to_string()))?;
    if !same_subject_key(check.der(), &ca_der) {
        return Err(IdentityError::CaKey {
            path: ca_key_path,
            message: format!("it does not belong to {}", ca_cert_path.display()),
        });
    }

    fs::create_dir_all(out).map_err(io_err(out))?;
    let cert_path = out.join(NODE_CERT_FILE);
    let key_path = out.join(NODE_KEY_FILE);
    let ca_copy = out.join(CA_CERT_FILE);
    refuse_existing(&[&cert_path, &key_path])?;

    let key = KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "loip");
    dn.push(DnType::CommonName, id.to_string());
    params.distinguished_name = dn;
    params.subject_alt_names =
        vec![SanType::DnsName(node_dns_name(id).try_into().map_err(
            |e: rcgen::Error| IdentityError::Generate(e.to_string()),
        )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| IdentityError::Generate(e.to_string()))?;

    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    if !ca_copy.exists() {
        write_new(&ca_copy, &ca_cert_pem, 0o644)?;
    }
    Ok(NodeFiles {
        id,
        cert: cert_path,
        key: key_path,
        ca: ca_copy,
    })
}

/// Whether two certificates have the same subject and public key (the
/// parts a rebuilt CA certificate shares with the original).
fn same_subject_key(a: &[u8], b: &[u8]) -> bool {
    let (Ok(ta), Ok(tb)) = (tbs_fields(a), tbs_fields(b)) else {
        return false;
    };
    // fields: version, serial, signature alg, issuer, validity, subject, spki
    ta.len() > 6 && tb.len() > 6 && ta[5] == tb[5] && ta[6] == tb[6]
}

/// A node's credentials, loaded for the QUIC endpoint.
#[derive(Debug)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            id: self.id,
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl NodeIdentity {
    /// Loads `node.crt`, `node.key` and `ca.crt` from `dir`; the id is the
    /// one in the certificate's SAN.
    pub fn load(dir: &Path) -> Result<NodeIdentity, IdentityError> {
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read(&p).map(|b| (p.clone(), b)).map_err(io_err(&p))
        };
        let (cp, cert) = read(NODE_CERT_FILE)?;
        let (kp, key) = read(NODE_KEY_FILE)?;
        let (ap, ca) = read(CA_CERT_FILE)?;
        let cert = CertificateDer::from_pem_slice(&cert).map_err(|_| IdentityError::Pem {
            path: cp,
            what: "certificate",
        })?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|_| IdentityError::Pem {
            path: kp,
            what: "private key",
        })?;
        let ca = CertificateDer::from_pem_slice(&ca).map_err(|_| IdentityError::Pem {
            path: ap,
            what: "certificate",
        })?;
        let id = node_id_from_cert(&cert)?;
        Ok(NodeIdentity { id, cert, key, ca })
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        cluster_fingerprint(&self.ca)
    }
}

// ---------------------------------------------------------------------------
// A minimal DER reader: just enough to find the DNS SANs of a certificate.
// The input is bounded by its own length fields, every read is checked, and
// anything unexpected is an error (never a panic).

struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    /// The whole element, header included.
    raw: &'a [u8],
}

fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), IdentityError> {
    let bad = || IdentityError::Certificate("malformed DER".into());
    let (&tag, rest) = input.split_first().ok_or_else(bad)?;
    if tag & 0x1f == 0x1f {
        return Err(bad()); // multi-byte tags never occur in certificates
    }
    let (&first, mut rest) = rest.split_first().ok_or_else(bad)?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | b as usize;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(bad());
    }
    let header = input.len() - rest.len();
    Ok((
        Tlv {
            tag,
            body: &rest[..len],
            raw: &input[..header + len],
        },
        &rest[len..],
    ))
}

fn seq_items(body: &[u8]) -> Result<Vec<Tlv<'_>>, IdentityError> {
    let mut items = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if items.len() > 64 {
            return Err(IdentityError::Certificate("too many DER elements".into()));
        }
        let (t, r) = read_tlv(rest)?;
        items.push(t);
        rest = r;
    }
    Ok(items)
}

/// The raw fields of the TBSCertificate, with the `[0]` version filled in
/// when absent so that indices are fixed.
fn tbs_fields(cert: &[u8]) -> Result<Vec<&[u8]>, IdentityError> {
    let bad = |m: &str| IdentityError::Certificate(m.to_string());
    let (c, _) = read_tlv(cert)?;
    if c.tag != 0x30 {
        return Err(bad("not a certificate"));
    }
    let (tbs, _) = read_tlv(c.body)?;
    if tbs.tag != 0x30 {
        return Err(bad("not a certificate"));
    }
    let items = seq_items(tbs.body)?;
    let mut fields: Vec<&[u8]> = Vec::new();
    if items.first().is_none_or(|t| t.tag != 0xa0) {
        fields.push(&[]);
    }
    fields.extend(items.iter().map(|t| t.raw));
    Ok(fields)
}

/// The dNSName entries of the certificate's subjectAltName.
fn dns_sans(cert: &[u8]) -> Result<Vec<String>, IdentityError> {
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
    let (c, _) = read_tlv(cert)?;
    let (tbs, _) = read_tlv(c.body)?;
    let mut names = Vec::new();
    for field in seq_items(tbs.body)? {
        if field.tag != 0xa3 {
            continue; // [3] extensions
        }
        let (exts, _) = read_tlv(field.body)?;
        for ext in seq_items(exts.body)? {
            let parts = seq_items(ext.body)?;
            let Some(oid) = parts.first() else { continue };
            if oid.tag != 0x06 || oid.body != SAN_OID {
                continue;
            }
            let Some(value) = parts.last().filter(|p| p.tag == 0x04) else {
                return Err(IdentityError::Certificate("malformed SAN extension".into()));
            };
            let (general_names, _) = read_tlv(value.body)?;
            for gn in seq_items(general_names.body)? {
                if gn.tag == 0x82 {
                    let s = std::str::from_utf8(gn.body)
                        .map_err(|_| IdentityError::Certificate("SAN is not ASCII".into()))?;
                    names.push(s.to_string());
                }
            }
        }
    }
    Ok(names)
}

/// The node id named by a node certificate: its one DNS SAN must be
/// `<id>.node.loip`. Call only on a certificate already verified against
/// the cluster CA.
pub fn node_id_from_cert(cert: &CertificateDer<'_>) -> Result<NodeId, IdentityError> {
    let names = dns_sans(cert.as_ref())?;
    let ids: Vec<NodeId> = names
        .iter()
        .filter_map(|n| n.strip_suffix(SAN_SUFFIX))
        .filter_map(|s| s.parse().ok())
        .collect();
    match ids.as_slice() {
        [id] => {
            // Cross-check with webpki's own name matching.
            let ee = webpki::EndEntityCert::try_from(cert)
                .map_err(|e| IdentityError::Certificate(format!("{e:?}")))?;
            ee.verify_is_valid_for_subject_name(&server_name(*id))
                .map_err(|e| IdentityError::Certificate(format!("{e:?}")))?;
            Ok(*id)
        }
        [] => Err(IdentityError::Certificate(format!(
            "no `<id>{SAN_SUFFIX}` name among the SANs {names:?}"
        ))),
        _ => Err(IdentityError::Certificate(format!(
            "more than one node id among the SANs {names:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// The node id on the device.

/// What is kept per device: the id and the hardware it was made on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdentity {
    pub id: NodeId,
    pub hardware: [u8; 32],
}

/// Where the id is kept: sled's `identity` tree (`cluster::state`).
pub trait IdentityStore {
    fn load(&self) -> Result<Option<StoredIdentity>, IdentityError>;
    /// Must be durable when it returns.
    fn save(&mut self, id: &StoredIdentity) -> Result<(), IdentityError>;
}

/// How the id was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdOrigin {
    /// The stored id, on the hardware it was made on.
    Kept,
    /// First start: the id of the provisioned certificate.
    FromCertificate,
    /// First start without a certificate: a fresh id.
    Created,
    /// The hardware changed (a copied image): a fresh id replaces `old`.
    Regenerated { old: NodeId },
}

/// Decides this device's node id (see the module docs). `fresh` supplies a
/// random id when one must be made.
pub fn resolve_node_id(
    store: &mut dyn IdentityStore,
    hardware: [u8; 32],
    cert_id: Option<NodeId>,
    fresh: impl FnOnce() -> NodeId,
) -> Result<(NodeId, IdOrigin), IdentityError> {
    let (id, origin) = match store.load()? {
        Some(s) if s.hardware == hardware => return Ok((s.id, IdOrigin::Kept)),
        Some(s) => {
            let mut id = fresh();
            if id == s.id {
                id = NodeId(id.0 ^ 1);
            }
            (id, IdOrigin::Regenerated { old: s.id })
        }
        None => match cert_id {
            Some(id) => (id, IdOrigin::FromCertificate),
            None => (fresh(), IdOrigin::Created),
        },
    };
    store.save(&StoredIdentity { id, hardware })?;
    Ok((id, origin))
}

/// A random node id from the operating system's generator.
pub fn random_node_id() -> NodeId {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random generator works");
    NodeId(u64::from_le_bytes(b))
}

/// A fingerprint of this machine: the MAC addresses of its physical network
/// interfaces, its DMI product UUID (where readable) and its CPU model.
/// A copied disk image keeps `/etc/machine-id`, so that is not used.
pub fn hardware_fingerprint() -> [u8; 32] {
    let mut parts: Vec<String> = Vec::new();
    if let Ok(dir) = fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let p = e.path();
            if p.join("device").exists() {
                if let Ok(mac) = fs::read_to_string(p.join("address")) {
                    parts.push(format!("mac {}", mac.trim()));
                }
            }
        }
    }
    if let Ok(uuid) = fs::read_to_string("/sys/class/dmi/id/product_uuid") {
        parts.push(format!("uuid {}", uuid.trim()));
    }
    if let Ok(cpu) = fs::read_to_string("/proc/cpuinfo") {
        if let Some(line) = cpu.lines().find(|l| l.starts_with("model name")) {
            parts.push(line.to_string());
        }
    }
    parts.sort();
    let d = ring::digest::digest(&ring::digest::SHA256, parts.join("\n").as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn provisioned_node_carries_its_id_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca(&dir.path().join("ca")).unwrap();
        let id = NodeId(0x0123_4567_89ab_cdef);
        let node = create_node(&dir.path().join("ca"), &dir.path().join("n1"), id).unwrap();
        for key in [&ca.key, &node.key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let ident = NodeIdentity::load(&dir.path().join("n1")).unwrap();
        assert_eq!(ident.id, id);
        assert_eq!(ident.fingerprint(), ca.fingerprint);
        // Never overwritten.
        assert!(matches!(
            create_node(&dir.path().join("ca"), &dir.path().join("n1"), id),
            Err(IdentityError::Exists { .. })
        ));
        assert!(matches!(
            create_ca(&dir.path().join("ca")),
            Err(IdentityError::Exists { .. })
        ));
    }

    #[test]
    fn a_ca_key_that_does_not_match_its_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(&dir.path().join("a")).unwrap();
        create_ca(&dir.path().join("b")).unwrap();
        fs::copy(dir.path().join("b/ca.crt"), dir.path().join("a/ca.crt")).unwrap();
        let err = create_node(&dir.path().join("a"), &dir.path().join("n"), NodeId(1)).unwrap_err();
        assert!(matches!(err, IdentityError::CaKey { .. }), "{err}");
    }

    #[test]
    fn garbage_certificates_give_errors_not_panics() {
        let mut seed = 7u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = node_id_from_cert(&CertificateDer::from(bytes));
        }
        // Truncations of a real certificate.
        let dir = tempfile::tempdir().unwrap();
        create_ca(&dir.path().join("ca")).unwrap();
        create_node(&dir.path().join("ca"), &dir.path().join("n"), NodeId(5)).unwrap();
        let ident = NodeIdentity::load(&dir.path().join("n")).unwrap();
        let der = ident.cert.as_ref();
        for cut in 0..der.len() {
            assert!(node_id_from_cert(&CertificateDer::from(der[..cut].to_vec())).is_err());
        }
    }

    struct Mem(Option<StoredIdentity>);
    impl IdentityStore for Mem {
        fn load(&self) -> Result<Option<StoredIdentity>, IdentityError> {
            Ok(self.0)
        }
        fn save(&mut self, id: &StoredIdentity) -> Result<(), IdentityError> {
            self.0 = Some(*id);
            Ok(())
        }
    }

    #[test]
    fn the_id_is_kept_adopted_or_regenerated_by_hardware() {
        let hw_a = [1u8; 32];
        let hw_b = [2u8; 32];
        let mut store = Mem(None);
        let (id, o) = resolve_node_id(&mut store, hw_a, Some(NodeId(42)), || NodeId(7)).unwrap();
        assert_eq!((id, o), (NodeId(42), IdOrigin::FromCertificate));
        let (id, o) = resolve_node_id(&mut store, hw_a, Some(NodeId(42)), || NodeId(7)).unwrap();
        assert_eq!((id, o), (NodeId(42), IdOrigin::Kept));
        // The same image on another machine: a different id.
        let mut copy = Mem(store.0);
        let (id, o) = resolve_node_id(&mut copy, hw_b, Some(NodeId(42)), || NodeId(7)).unwrap();
        assert_eq!(
            (id, o),
            (NodeId(7), IdOrigin::Regenerated { old: NodeId(42) })
        );
        let (id, _) = resolve_node_id(&mut copy, hw_b, None, || NodeId(8)).unwrap();
        assert_eq!(id, NodeId(7));
        // Even if the generator repeats the old id.
        let mut copy = Mem(store.0);
        let (id, _) = resolve_node_id(&mut copy, hw_b, None, || NodeId(42)).unwrap();
        assert_ne!(id, NodeId(42));
    }

    #[test]
    fn the_hardware_fingerprint_is_stable() {
        assert_eq!(hardware_fingerprint(), hardware_fingerprint());
    }
}
