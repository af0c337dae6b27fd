//! For the tests of the ring runtime in one process: the single-node
//! engine's greedy answers to check rings against, and nodes on loopback
//! with real QUIC and mutual TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use loip::cluster::ring::{Peer, RingOutput};
use loip::engine::forward::TokenIn;
use loip::engine::generate::{argmax, Engine};
use loip::net::identity::NodeIdentity;
use loip::net::quic::{Endpoint, Limits};
use loip::net::NodeId;

/// The single-node engine's greedy answer to `prompt`: `n` tokens, and
/// the logits each was picked from when `keep_logits`.
pub fn greedy(engine: &mut Engine, prompt: &[u32], n: usize, keep_logits: bool) -> RingOutput {
    let mut cache = engine.new_cache();
    let mut logits = engine.prefill(&mut cache, prompt, false).unwrap();
    let mut out = RingOutput {
        tokens: Vec::new(),
        logits: Vec::new(),
    };
    loop {
        let t = argmax(&logits);
        out.tokens.push(t);
        if keep_logits {
            out.logits.push(logits.clone());
        }
        if out.tokens.len() == n {
            return out;
        }
        let tok = TokenIn {
            id: t,
            seq: 0,
            pos: cache.len(),
        };
        logits = engine
            .step(&[tok], std::slice::from_mut(&mut cache), &[0])
            .unwrap()
            .to_vec();
    }
}

/// A CA in `dir` and `n` node identities under it, with the ids `first`,
/// `first + 1`, …; returns them loaded.
pub fn identities(dir: &Path, n: usize, first: u64) -> Vec<NodeIdentity> {
    super::cluster::identities(dir, n as u64, |k| NodeId(first + k - 1));
    (1..=n)
        .map(|k| NodeIdentity::load(&dir.join(format!("n{k}"))).unwrap())
        .collect()
}

/// The endpoints' limits: a frame that stalls for 2 s fails.
pub fn limits() -> Limits {
    Limits {
        frame_timeout: Duration::from_secs(2),
        ..Limits::default()
    }
}

/// The runtime of the nodes' network tasks: two worker threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An endpoint on 127.0.0.1 for each of `ids`, with [`limits`], and the
/// peers they make; call it inside the runtime ([`runtime`]'s `enter`).
pub fn endpoints(ids: &[NodeIdentity]) -> (Vec<Endpoint>, Vec<Peer>) {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let endpoints: Vec<Endpoint> = ids
        .iter()
        .map(|id| Endpoint::bind(local, id, limits()).unwrap())
        .collect();
    let peers = endpoints
        .iter()
        .map(|e| Peer {
            id: e.id(),
            addr: e.local_addr().unwrap(),
        })
        .collect();
    (endpoints, peers)
}
