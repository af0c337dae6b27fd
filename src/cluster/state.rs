//! This node's state in the sled store of its data directory
//! (`crate::store`): its node id with the hardware fingerprint it was made
//! on (tree `identity`, key `node`), and the membership hard state: term,
//! vote and plans (tree `plan`, key `membership`).
//!
//! A database that cannot be used is set aside and rebuilt by
//! [`Store::open`] with a warning; the node then starts as on first boot:
//! it adopts its certificate's id again, and starts from term 0 (the
//! membership machine refuses votes for an election timeout after a
//! start, and the cluster's higher terms carry it forward). A stored value
//! that does not decode is treated the same way, value by value.

use std::path::Path;

use super::membership::HardState;
use crate::net::identity::{IdentityError, IdentityStore, StoredIdentity};
use crate::store::{Recovery, Store, StoreError, Tree};

const IDENTITY_KEY: &[u8] = b"node";
const MEMBERSHIP_KEY: &[u8] = b"membership";

/// The node's database, with typed access to what the cluster keeps.
#[derive(Debug)]
pub struct NodeState {
    store: Store,
}

impl NodeState {
    /// Opens (or creates) the database in `data_dir`. A corrupt one is set
    /// aside and rebuilt (logged as a warning); this never fails because
    /// of what the database holds.
    pub fn open(data_dir: &Path) -> Result<NodeState, StoreError> {
        let store = Store::open(data_dir)?;
        if let Some(r) = store.recovery() {
            log::warn!(
                "node state: the database was unusable ({}); it was moved to {} \
                 and this node starts afresh",
                r.reason,
                r.set_aside.display()
            );
        }
        Ok(NodeState { store })
    }

    /// Set when the database found at open was unusable and replaced.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.store.recovery()
    }

    /// The store, for the other trees.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The last saved hard state, or the empty one when there is none or
    /// it does not decode.
    pub fn load_hard_state(&self) -> Result<HardState, StoreError> {
        match self.store.get_json(Tree::Plan, MEMBERSHIP_KEY) {
            Ok(h) => Ok(h.unwrap_or_default()),
            Err(e @ StoreError::Decode { .. }) => {
                log::warn!("node state: {e}; starting from term 0");
                Ok(HardState::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Saves `h` and flushes: it is on disk when this returns, before any
    /// message that depends on it is sent.
    pub fn save_hard_state(&self, h: &HardState) -> Result<(), StoreError> {
        self.store.put_json(Tree::Plan, MEMBERSHIP_KEY, h)?;
        self.store.flush()
    }
}

impl IdentityStore for NodeState {
    fn load(&self) -> Result<Option<StoredIdentity>, IdentityError> {
        match self.store.get_json(Tree::Identity, IDENTITY_KEY) {
            Ok(v) => Ok(v),
            Err(e @ StoreError::Decode { .. }) => {
                log::warn!("node state: {e}; the node id is decided afresh");
                Ok(None)
            }
            Err(e) => Err(IdentityError::Store(e.to_string())),
        }
    }

    fn save(&mut self, id: &StoredIdentity) -> Result<(), IdentityError> {
        self.store
            .put_json(Tree::Identity, IDENTITY_KEY, id)
            .and_then(|()| self.store.flush())
            .map_err(|e| IdentityError::Store(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::identity::{resolve_node_id, IdOrigin};
    use crate::net::NodeId;

    #[test]
    fn hard_state_and_id_survive_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let h = HardState {
            term: 9,
            voted_for: Some(NodeId(3)),
            ..Default::default()
        };
        {
            let mut s = NodeState::open(&dir).unwrap();
            assert_eq!(s.load_hard_state().unwrap(), HardState::default());
            s.save_hard_state(&h).unwrap();
            let (id, o) = resolve_node_id(&mut s, [1; 32], Some(NodeId(42)), || NodeId(7)).unwrap();
            assert_eq!((id, o), (NodeId(42), IdOrigin::FromCertificate));
        }
        let mut s = NodeState::open(&dir).unwrap();
        assert!(s.recovery().is_none());
        assert_eq!(s.load_hard_state().unwrap(), h);
        let (id, o) = resolve_node_id(&mut s, [1; 32], Some(NodeId(42)), || NodeId(7)).unwrap();
        assert_eq!((id, o), (NodeId(42), IdOrigin::Kept));
        // The same database on other hardware: a new id, kept from then on.
        let (id, o) = resolve_node_id(&mut s, [2; 32], Some(NodeId(42)), || NodeId(7)).unwrap();
        assert_eq!(
            (id, o),
            (NodeId(7), IdOrigin::Regenerated { old: NodeId(42) })
        );
        drop(s);
        let mut s = NodeState::open(&dir).unwrap();
        let (id, o) = resolve_node_id(&mut s, [2; 32], None, || NodeId(8)).unwrap();
        assert_eq!((id, o), (NodeId(7), IdOrigin::Kept));
    }

    #[test]
    fn a_zero_byte_or_garbage_database_is_set_aside_and_rebuilt() {
        for (name, bytes) in [("zero", Vec::new()), ("garbage", vec![0xa5u8; 4096])] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("data");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("db"), &bytes).unwrap();
            std::fs::write(dir.join("conf"), &bytes).unwrap();
            // Not the database's: stays where it is.
            std::fs::write(dir.join("model.gguf"), b"weights").unwrap();
            let mut s = NodeState::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
            let r = s
                .recovery()
                .expect("the damaged database is reported")
                .clone();
            assert!(r.set_aside.join("db").exists(), "{name}: {r:?}");
            assert!(!r.set_aside.join("model.gguf").exists(), "{name}");
            assert_eq!(std::fs::read(dir.join("model.gguf")).unwrap(), b"weights");
            assert_eq!(s.load_hard_state().unwrap(), HardState::default());
            let (id, _) = resolve_node_id(&mut s, [1; 32], Some(NodeId(5)), || NodeId(6)).unwrap();
            assert_eq!(id, NodeId(5), "{name}");
            s.save_hard_state(&HardState {
                term: 2,
                ..Default::default()
            })
            .unwrap();
            drop(s);
            let s = NodeState::open(&dir).unwrap();
            assert!(s.recovery().is_none(), "{name}: the rebuilt one is usable");
            assert_eq!(s.load_hard_state().unwrap().term, 2);
        }
    }

    #[test]
    fn values_that_do_not_decode_are_treated_as_absent() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = NodeState::open(tmp.path()).unwrap();
        s.store()
            .put_json(Tree::Plan, MEMBERSHIP_KEY, &"not a hard state")
            .unwrap();
        s.store()
            .put_json(Tree::Identity, IDENTITY_KEY, &[1, 2, 3])
            .unwrap();
        assert_eq!(s.load_hard_state().unwrap(), HardState::default());
        assert_eq!(IdentityStore::load(&s).unwrap(), None);
        let (id, o) = resolve_node_id(&mut s, [1; 32], Some(NodeId(5)), || NodeId(6)).unwrap();
        assert_eq!((id, o), (NodeId(5), IdOrigin::FromCertificate));
    }
}
