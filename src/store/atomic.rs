//! Files replaced whole: written under a temporary name in the same
//! directory, fsynced, renamed over the old one and the directory fsynced,
//! so a crash, a kill or a full disk never leaves a half-written file under
//! the name a reader trusts.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Marks the temporary names, so callers and tests can tell them apart.
pub const TEMP_MARK: &str = ".partial-";

/// The temporary name of `path` for this process.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}{TEMP_MARK}{}", std::process::id()))
}

/// Writes whatever `fill` produces to `path` with permissions `mode`. On
/// any error the temporary file is removed and `path` is as it was.
pub fn write_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        fill(&mut f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// [`write_with`] for bytes in memory.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_with(path, mode, |f| io::Write::write_all(f, bytes))
}

/// Makes a rename or a new entry in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}
