//! The node's state on disk: a sled database in the data directory, with
//! one tree per concern (DESIGN.md §3, §4): `identity`, `profile`, `links`,
//! `plan` and `adapt`.
//!
//! The database is a cache of things the node can measure or learn again,
//! so a database that cannot be used never stops the node from starting
//! (RELIABILITY.md, "State on disk"): a corrupt, truncated or zero-byte
//! database, or one written by an older schema, is moved into a new
//! directory `<dir>.corrupt-<unix seconds>` beside it, a new empty one is
//! made in its place, and a warning is logged. [`Store::recovery`] tells
//! what happened. Only the database's own files move: the data directory
//! may also hold the model, the status socket and fetched tensors.
//!
//! # Layout
//!
//! - the default tree holds `schema_version`: [`SCHEMA_VERSION`] as a
//!   big-endian u32. A directory that holds database files but no such
//!   key is treated as unusable (sled itself opens a zero-byte database file as an
//!   empty one, which would otherwise lose the data silently);
//! - the default tree also holds `generation`, a big-endian u64 that each
//!   [`Store::flush`] increments, and the file `loip-generation` beside
//!   sled's files holds the last generation known to be on disk, written
//!   (atomically, by rename) only after sled's flush returned. A database
//!   whose generation is behind that file lost flushed writes: sled rolls a
//!   truncated log back to its last consistent point without an error, so
//!   this is how a truncated database is told apart from a good one. A
//!   crash between sled's flush and the file's update leaves the database
//!   ahead of the file, which is fine;
//! - `profile`: key = model digest (32 bytes) ‖ hardware fingerprint (32
//!   bytes); value = the profile as JSON.
//! - `identity`: key `node` = this device's node id and the hardware
//!   fingerprint it was made on (`cluster::state`);
//! - `plan`: key `membership` = the membership hard state: term, vote,
//!   committed and pending plan (`cluster::state`), flushed before the node
//!   acts on it.
//!
//! Values are JSON so that a profile type can gain optional fields without
//! a schema change; the schema version covers the key layout and the
//! meaning of the trees.

pub mod atomic;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Version of the layout above. Bump it when keys or tree meanings change:
/// a database of another version is set aside and rebuilt.
pub const SCHEMA_VERSION: u32 = 1;

/// The key of the schema version in the default tree.
pub const SCHEMA_KEY: &[u8] = b"schema_version";

/// The key of the flush generation in the default tree.
const GENERATION_KEY: &[u8] = b"generation";

/// The file in the data directory that records the last flushed generation.
const GENERATION_FILE: &str = "loip-generation";

/// The trees of DESIGN.md §4.
pub const TREES: [&str; 5] = ["identity", "profile", "links", "plan", "adapt"];

/// One of [`TREES`], for the JSON values of [`Store::get_json`] and
/// [`Store::put_json`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    /// The node id and the hardware it was made on.
    Identity,
    Profile,
    Links,
    /// Plans and the membership state (term, vote, committed plan).
    Plan,
    Adapt,
}

impl Tree {
    pub fn name(self) -> &'static str {
        match self {
            Tree::Identity => TREES[0],
            Tree::Profile => TREES[1],
            Tree::Links => TREES[2],
            Tree::Plan => TREES[3],
            Tree::Adapt => TREES[4],
        }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The data directory cannot be created or read.
    #[error("data directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process has the database open.
    #[error("data directory {}: the database is in use by another process", path.display())]
    Locked { path: PathBuf },
    /// An unusable database could not be moved out of the way.
    #[error("data directory {}: cannot set the unusable database aside ({reason}): {source}", path.display())]
    SetAside {
        path: PathBuf,
        reason: String,
        source: std::io::Error,
    },
    /// sled failed on a fresh database, or while reading or writing.
    #[error("database {}: {message}", path.display())]
    Db { path: PathBuf, message: String },
    /// A stored value does not decode (written by a different program).
    #[error("database {}: tree `{tree}`: value does not decode: {message}", path.display())]
    Decode {
        path: PathBuf,
        tree: &'static str,
        message: String,
    },
}

/// The key of a stored device profile: it is valid for one model file
/// layout on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProfileKey {
    /// Digest of the model's GGUF header and file size.
    pub model: [u8; 32],
    /// Digest of the CPU model, core count, memory and ISA.
    pub hardware: [u8; 32],
}

impl ProfileKey {
    fn bytes(&self) -> [u8; 64] {
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&self.model);
        k[32..].copy_from_slice(&self.hardware);
        k
    }
}

/// What [`Store::open`] did with a database it could not use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Where the old directory now is.
    pub set_aside: PathBuf,
    /// Why it could not be used.
    pub reason: String,
}

/// The open database. Clones share it (sled's handles are shared, and so
/// is the flush generation), so that a thread of the node (the ring's
/// compute thread) can keep its own state in it.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    profile: sled::Tree,
    /// Serializes flushes, and holds the last generation flushed.
    generation: std::sync::Arc<std::sync::Mutex<u64>>,
    recovery: Option<Recovery>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("recovery", &self.recovery)
            .finish()
    }
}

/// Why a database that exists cannot be used, or `Ok` if it can.
enum Opened {
    Usable(sled::Db),
    Unusable(String),
    Locked,
}

/// Opens sled at `dir`, catching the panics sled raises on some corrupt
/// files (they are a property of the file, not a bug of ours).
fn try_open(dir: &Path) -> Opened {
    let dir = dir.to_path_buf();
    let result = std::panic::catch_unwind(move || sled::Config::new().path(dir).open());
    match result {
        Ok(Ok(db)) => Opened::Usable(db),
        Ok(Err(sled::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock") =>
        {
            Opened::Locked
        }
        Ok(Err(e)) => Opened::Unusable(format!("sled cannot open it: {e}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            Opened::Unusable(format!("sled panicked opening it: {msg}"))
        }
    }
}

/// The generation in the database (0 when it was never flushed by
/// [`Store::flush`]).
fn db_generation(db: &sled::Db) -> Result<u64, String> {
    match db.get(GENERATION_KEY) {
        Ok(None) => Ok(0),
        Ok(Some(v)) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| format!("generation of {} bytes", v.len())),
        Err(e) => Err(format!("cannot read the generation: {e}")),
    }
}

/// The generation recorded in the file of `dir` (0 when there is none).
fn file_generation(dir: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(dir.join(GENERATION_FILE)) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{GENERATION_FILE} holds {:?}", s.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("cannot read {GENERATION_FILE}: {e}")),
    }
}

/// Writes `generation` to the file of `dir`, replacing it whole.
fn write_generation(dir: &Path, generation: u64) -> std::io::Result<()> {
    atomic::write(
        &dir.join(GENERATION_FILE),
        format!("{generation}\n").as_bytes(),
        0o644,
    )
}

/// Why an opened database cannot be used, if it cannot.
fn schema_problem(db: &sled::Db, dir: &Path) -> Option<String> {
    match (db_generation(db), file_generation(dir)) {
        (Err(e), _) | (_, Err(e)) => return Some(e),
        (Ok(d), Ok(f)) if d < f => {
            return Some(format!(
                "truncated or damaged: it holds writes up to flush {d}, but flush {f} had completed"
            ))
        }
        _ => {}
    }
    match db.get(SCHEMA_KEY) {
        Ok(Some(v)) if v.len() == 4 => {
            let found = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            (found != SCHEMA_VERSION)
                .then(|| format!("schema version {found}, this program uses {SCHEMA_VERSION}"))
        }
        Ok(Some(v)) => Some(format!("schema version of {} bytes", v.len())),
        Ok(None) => Some("no schema version: an older, empty or damaged database".into()),
        Err(e) => Some(format!("cannot read the schema version: {e}")),
    }
}

fn db_err(dir: &Path) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |e| StoreError::Db {
        path: dir.to_path_buf(),
        message: e.to_string(),
    }
}

/// Whether a file of the data directory belongs to the database: sled's
/// (`db`, `conf`, `blobs/`, `snap.*`) or ours (`loip-generation`). Other
/// files (a model, the status socket, fetched tensors) are left alone.
fn is_db_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    matches!(name.as_ref(), "db" | "conf" | "blobs")
        || name.starts_with("snap.")
        || name.starts_with(GENERATION_FILE)
}

/// Whether `dir` is missing or holds no database file.
fn is_fresh(dir: &Path) -> Result<bool, StoreError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(|source| StoreError::Dir {
                    path: dir.to_path_buf(),
                    source,
                })?;
                if is_db_file(&e.file_name()) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Removes the snapshots sled was still writing when its process died;
/// whether it removed any.
///
/// sled 0.34 writes a snapshot as `snap.<lsn>.generating`, then renames
/// it to `snap.<lsn>`; a snapshot is complete only once renamed. But on
/// open it reads the last file named `snap.*` in sorted order, which is a
/// `.generating` one when the process was killed between the two, and a
/// torn one fails its checksum: `Corruption { at: None }`, and a good
/// database would be set aside (a hundred kills in `tests/store_kills.rs`
/// hit this about once in fifty runs). Without it sled reads the last
/// complete snapshot and replays the log after it; should that lose a
/// flushed write, the generation check still sets the database aside.
fn remove_torn_snapshots(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut removed = false;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    log::warn!(
                        "removed {}, a snapshot sled had not finished writing",
                        e.path().display()
                    );
                    removed = true;
                }
                Err(err) => log::warn!("cannot remove {}: {err}", e.path().display()),
            }
        }
    }
    removed
}

/// Moves the database files of `dir` into a new directory beside it,
/// `<dir>.corrupt-<unix seconds>` (with a counter if that exists already);
/// the directory's other files stay where they are.
fn set_aside(dir: &Path, reason: &str) -> Result<PathBuf, StoreError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = dir
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let mut to = dir.with_file_name(format!("{name}.corrupt-{secs}"));
    let mut n = 1;
    while to.exists() {
        to = dir.with_file_name(format!("{name}.corrupt-{secs}-{n}"));
        n += 1;
    }
    let err = |source| StoreError::SetAside {
        path: dir.to_path_buf(),
        reason: reason.to_string(),
        source,
    };
    std::fs::create_dir(&to).map_err(err)?;
    for e in std::fs::read_dir(dir).map_err(err)? {
        let e = e.map_err(err)?;
        if is_db_file(&e.file_name()) {
            std::fs::rename(e.path(), to.join(e.file_name())).map_err(err)?;
        }
    }
    Ok(to)
}

impl Store {
    /// Opens (or creates) the database in `dir`. A database that cannot be
    /// used is set aside and replaced by an empty one, with a warning: the
    /// only errors are an unusable directory, a database another process
    /// holds, and a failure to move the bad one away.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let fresh = is_fresh(&dir)?;
        let mut opened = try_open(&dir);
        if matches!(opened, Opened::Unusable(_)) && remove_torn_snapshots(&dir) {
            opened = try_open(&dir);
        }
        let problem = match opened {
            Opened::Locked => return Err(StoreError::Locked { path: dir }),
            Opened::Usable(db) if fresh => {
                return Store::init(dir, db, None);
            }
            Opened::Usable(db) => match schema_problem(&db, &dir) {
                None => return Store::init(dir, db, None),
                Some(p) => p,
            },
            Opened::Unusable(message) if fresh => {
                return Err(StoreError::Db { path: dir, message })
            }
            Opened::Unusable(p) => p,
        };
        // sled's handle (if any) is dropped here, before the rename.
        let to = set_aside(&dir, &problem)?;
        log::warn!(
            "database {} is unusable ({problem}); moved it to {} and started an empty one",
            dir.display(),
            to.display()
        );
        let recovery = Recovery {
            set_aside: to,
            reason: problem,
        };
        match try_open(&dir) {
            Opened::Usable(db) => Store::init(dir, db, Some(recovery)),
            Opened::Locked => Err(StoreError::Locked { path: dir }),
            Opened::Unusable(message) => Err(StoreError::Db { path: dir, message }),
        }
    }

    /// Writes the schema version if missing and opens the trees.
    fn init(dir: PathBuf, db: sled::Db, recovery: Option<Recovery>) -> Result<Store, StoreError> {
        let err = db_err(&dir);
        if db.get(SCHEMA_KEY).map_err(&err)?.is_none() {
            db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                .map_err(&err)?;
        }
        for t in TREES {
            db.open_tree(t).map_err(&err)?;
        }
        let profile = db.open_tree("profile").map_err(&err)?;
        db.flush().map_err(&err)?;
        let generation = db_generation(&db).map_err(|message| StoreError::Db {
            path: dir.clone(),
            message,
        })?;
        drop(err);
        Ok(Store {
            dir,
            db,
            profile,
            generation: std::sync::Arc::new(std::sync::Mutex::new(generation)),
            recovery,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Set when the database found at open was unusable and replaced.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The profile stored under `key`, if any. A value that does not decode
    /// as `T` is an error: the caller can measure again and overwrite it.
    pub fn get_profile<T: DeserializeOwned>(
        &self,
        key: &ProfileKey,
    ) -> Result<Option<T>, StoreError> {
        let Some(v) = self.profile.get(key.bytes()).map_err(db_err(&self.dir))? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Decode {
                path: self.dir.clone(),
                tree: "profile",
                message: e.to_string(),
            })
    }

    /// Stores `profile` under `key` (durable after [`Store::flush`]).
    pub fn put_profile<T: Serialize>(
        &self,
        key: &ProfileKey,
        profile: &T,
    ) -> Result<(), StoreError> {
        let v = serde_json::to_vec(profile).map_err(|e| StoreError::Decode {
            path: self.dir.clone(),
            tree: "profile",
            message: e.to_string(),
        })?;
        self.profile
            .insert(key.bytes(), v)
            .map_err(db_err(&self.dir))?;
        Ok(())
    }

    /// The JSON value under `key` in `tree`, if any. A value that does not
    /// decode as `T` is a [`StoreError::Decode`].
    pub fn get_json<T: DeserializeOwned>(
        &self,
        tree: Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        let t = self.db.open_tree(tree.name()).map_err(db_err(&self.dir))?;
        let Some(v) = t.get(key).map_err(db_err(&self.dir))? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Decode {
                path: self.dir.clone(),
                tree: tree.name(),
                message: e.to_string(),
            })
    }

    /// Stores `value` as JSON under `key` in `tree` (durable after
    /// [`Store::flush`]).
    pub fn put_json<T: Serialize>(
        &self,
        tree: Tree,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let v = serde_json::to_vec(value).map_err(|e| StoreError::Decode {
            path: self.dir.clone(),
            tree: tree.name(),
            message: e.to_string(),
        })?;
        let t = self.db.open_tree(tree.name()).map_err(db_err(&self.dir))?;
        t.insert(key, v).map_err(db_err(&self.dir))?;
        Ok(())
    }

    /// Writes everything inserted so far to disk; when it returns, a crash
    /// or a reopen keeps it (see the module docs on generations).
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = *generation + 1;
        self.db
            .insert(GENERATION_KEY, &next.to_be_bytes())
            .map_err(db_err(&self.dir))?;
        self.db.flush().map_err(db_err(&self.dir))?;
        write_generation(&self.dir, next).map_err(|source| StoreError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        *generation = next;
        Ok(())
    }
}

/// The default data directory: `$LOIP_DATA_DIR`, else
/// `$XDG_DATA_HOME/loip`, else `~/.local/share/loip`, else `./loip-data`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOIP_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("loip");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/loip");
    }
    PathBuf::from("loip-data")
}
