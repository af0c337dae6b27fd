//! PTX compiled from `kernels/`, cached on disk per device.
//!
//! A file is named by its unit, the device's architecture and a digest of
//! everything that shapes the PTX (the unit's source with its headers, the
//! compile options, NVRTC's version), so an edited kernel, another device or
//! another NVRTC never reads a stale entry, and no entry is ever rewritten.
//! Files are written to a temporary name and renamed: a reader sees a whole
//! file or none. An unreadable cache only costs a compile.

use std::path::{Path, PathBuf};

use super::kernels::{digest, Unit};
use super::{nvrtc, CudaError};

/// The environment variable that overrides the cache folder.
pub const CACHE_ENV: &str = "LOIP_PTX_CACHE";

/// A folder of cached PTX.
#[derive(Clone, Debug)]
pub struct PtxCache {
    dir: PathBuf,
}

/// Where a unit's PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtxSource {
    Cache,
    Compiled,
}

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> PtxCache {
        PtxCache { dir: dir.into() }
    }

    /// `$LOIP_PTX_CACHE`, else `$XDG_CACHE_HOME/loip/ptx`, else
    /// `~/.cache/loip/ptx`, else a folder in the temporary directory.
    pub fn default_location() -> PtxCache {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = env(CACHE_ENV)
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("loip/ptx")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/loip/ptx")))
            .unwrap_or_else(|| std::env::temp_dir().join("loip-ptx"));
        PtxCache::new(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `unit` compiled for `arch`.
    pub fn path_for(&self, unit: &Unit, arch: &str) -> Result<PathBuf, CudaError> {
        let (major, minor) = nvrtc::version()?;
        let source = unit.source();
        let opts = nvrtc::options(arch).join(" ");
        let version = format!("nvrtc {major}.{minor}");
        let key = digest(&[&source, &opts, &version]);
        Ok(self
            .dir
            .join(format!("{}-{arch}-{}.ptx", unit.name(), &key[..16])))
    }

    /// The PTX of `unit` for `arch`: read from the cache, or compiled and
    /// stored. A compile error is returned with NVRTC's log; a cache that
    /// cannot be read or written is logged and passed by.
    pub fn get(&self, unit: &Unit, arch: &str) -> Result<(String, PtxSource), CudaError> {
        let path = self.path_for(unit, arch)?;
        match std::fs::read_to_string(&path) {
            Ok(ptx) if looks_like_ptx(&ptx) => return Ok((ptx, PtxSource::Cache)),
            Ok(_) => log::warn!("PTX cache: {} is not PTX; compiling again", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("PTX cache: cannot read {}: {e}", path.display()),
        }
        let ptx = nvrtc::compile(unit.file, &unit.source(), arch)?;
        if let Err(e) = write_atomic(&path, ptx.as_bytes()) {
            log::warn!("PTX cache: cannot write {}: {e}", path.display());
        }
        Ok((ptx, PtxSource::Compiled))
    }

    /// Removes a cached entry (one the driver refused to load).
    pub fn forget(&self, unit: &Unit, arch: &str) {
        if let Ok(path) = self.path_for(unit, arch) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// PTX text starts with comments and has a `.version` directive.
fn looks_like_ptx(s: &str) -> bool {
    s.contains(".version") && s.contains(".target")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("ptx"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
