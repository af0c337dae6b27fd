//! The node's database: profiles survive a reopen; a corrupt, truncated,
//! zero-byte or older-schema database is set aside and rebuilt with a
//! warning, and the node still starts (RELIABILITY.md, "State on disk").
//! `tests/store_kills.rs` kills a writer a hundred times.

use std::path::{Path, PathBuf};

use loip::store::{ProfileKey, Store, SCHEMA_KEY};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Thing {
    name: String,
    value: f64,
}

const KEY: ProfileKey = ProfileKey {
    model: [1; 32],
    hardware: [2; 32],
};

fn thing() -> Thing {
    Thing {
        name: "x".into(),
        value: 1.5,
    }
}

/// A database with one profile in it, closed.
fn populated(tmp: &TempDir) -> PathBuf {
    let dir = tmp.path().join("data");
    let s = Store::open(&dir).unwrap();
    assert!(s.recovery().is_none());
    s.put_profile(&KEY, &thing()).unwrap();
    s.flush().unwrap();
    drop(s);
    dir
}

/// Opens a damaged database: it must succeed, report the recovery, leave
/// the old directory beside the new one, and start empty and usable.
fn assert_rebuilt(dir: &Path, why: &str) {
    let s = Store::open(dir).unwrap_or_else(|e| panic!("{why}: open refused: {e}"));
    let r = s
        .recovery()
        .unwrap_or_else(|| panic!("{why}: not detected"))
        .clone();
    let name = r
        .set_aside
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("data.corrupt-"), "{why}: {name}");
    assert!(r.set_aside.is_dir(), "{why}: old directory kept");
    assert_eq!(r.set_aside.parent(), dir.parent());
    assert!(s.get_profile::<Thing>(&KEY).unwrap().is_none(), "{why}");
    s.put_profile(&KEY, &thing()).unwrap();
    s.flush().unwrap();
    drop(s);
    // The rebuilt database is a good one: no recovery on the next open.
    let s = Store::open(dir).unwrap();
    assert!(s.recovery().is_none(), "{why}: rebuilt database reopens");
    assert_eq!(s.get_profile::<Thing>(&KEY).unwrap(), Some(thing()));
}

#[test]
fn profiles_survive_a_reopen() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    let s = Store::open(&dir).unwrap();
    assert!(s.recovery().is_none());
    assert_eq!(s.get_profile::<Thing>(&KEY).unwrap(), Some(thing()));
    let other = ProfileKey {
        hardware: [3; 32],
        ..KEY
    };
    assert!(s.get_profile::<Thing>(&other).unwrap().is_none());
}

/// A process killed while sled wrote a snapshot leaves a torn
/// `snap.<lsn>.generating`, which sled 0.34 reads on open as the newest
/// snapshot: the database opens anyway, with everything flushed.
#[test]
fn a_snapshot_torn_by_a_kill_does_not_set_the_database_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    let torn = dir.join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&torn, b"half a snapshot, no checksum").unwrap();
    let s = Store::open(&dir).unwrap();
    if let Some(r) = s.recovery() {
        panic!("set aside: {}", r.reason);
    }
    assert_eq!(s.get_profile::<Thing>(&KEY).unwrap(), Some(thing()));
    assert!(!torn.exists(), "the torn snapshot is removed");
}

#[test]
fn a_zero_byte_database_file_is_set_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    std::fs::write(dir.join("db"), b"").unwrap();
    assert_rebuilt(&dir, "zero-byte db");
}

#[test]
fn garbage_bytes_are_set_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    let len = std::fs::metadata(dir.join("db")).unwrap().len() as usize;
    let mut state = 0x1234_5678_9abc_def0u64;
    let garbage: Vec<u8> = (0..len.max(4096))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(dir.join("db"), garbage).unwrap();
    assert_rebuilt(&dir, "garbage db");
}

#[test]
fn a_truncated_database_is_set_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("db"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    drop(f);
    assert_rebuilt(&dir, "truncated db");
}

#[test]
fn a_garbage_config_file_is_set_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    std::fs::write(dir.join("conf"), b"\xff\xfe not a sled config").unwrap();
    assert_rebuilt(&dir, "garbage conf");
}

#[test]
fn an_older_schema_is_set_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    {
        let db = sled::open(&dir).unwrap();
        db.insert(SCHEMA_KEY, &0u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    assert_rebuilt(&dir, "schema 0");
}

#[test]
fn a_database_without_a_schema_version_is_set_aside() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("data");
    {
        let db = sled::open(&dir).unwrap();
        db.insert(b"something", b"old").unwrap();
        db.flush().unwrap();
    }
    assert_rebuilt(&dir, "no schema key");
}

#[test]
fn a_database_in_use_is_an_error_not_a_rebuild() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    let held = Store::open(&dir).unwrap();
    let e = Store::open(&dir).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop(held);
    assert!(Store::open(&dir).unwrap().recovery().is_none());
}

#[test]
fn a_value_of_another_type_is_a_decode_error() {
    let tmp = TempDir::new().unwrap();
    let dir = populated(&tmp);
    let s = Store::open(&dir).unwrap();
    let e = s.get_profile::<Vec<u32>>(&KEY).unwrap_err();
    assert!(e.to_string().contains("profile"), "{e}");
}

/// Cut anywhere, the database either still holds the flushed profile or is
/// set aside: flushed data is never lost silently.
#[test]
fn no_truncation_loses_flushed_data_silently() {
    let tmp = TempDir::new().unwrap();
    let probe = populated(&tmp);
    let len = std::fs::metadata(probe.join("db")).unwrap().len();
    for i in 0..16 {
        let cut = len * i / 16;
        let dir = tmp.path().join(format!("cut{i}"));
        let s = Store::open(&dir).unwrap();
        s.put_profile(&KEY, &thing()).unwrap();
        s.flush().unwrap();
        drop(s);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("db"))
            .unwrap();
        f.set_len(cut.min(f.metadata().unwrap().len())).unwrap();
        drop(f);
        let s = Store::open(&dir).unwrap();
        let kept = s.get_profile::<Thing>(&KEY).unwrap();
        assert!(
            s.recovery().is_some() || kept == Some(thing()),
            "cut at {cut} of {len}: profile lost without a warning"
        );
    }
}
