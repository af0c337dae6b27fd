//! Finding NVRTC and compiling kernels to PTX with it.
//!
//! cudarc opens `libnvrtc` by its usual names on first use and panics when
//! none loads, so [`load`] is called first and turns a missing library into
//! an error. `LOIP_NVRTC` may name the library file or the folder that holds
//! it (the pip package `nvidia-cuda-nvrtc-cu12` puts it in
//! `site-packages/nvidia/cuda_nvrtc/lib`, which no loader searches): the
//! file is opened by its path with `RTLD_GLOBAL`, and cudarc's later open of
//! `libnvrtc.so.12` finds it loaded, by its soname. NVRTC itself opens
//! `libnvrtc-builtins.so.12.x` when compiling; the wheel's libnvrtc finds it
//! beside itself through its `$ORIGIN` run path, and it is preloaded from
//! the same folder as well, for builds without that run path.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{CompileError, CompileOptions};

use super::CudaError;

/// The environment variable naming NVRTC's library file or folder.
pub const NVRTC_ENV: &str = "LOIP_NVRTC";

/// Makes NVRTC loadable, once per process; the error says what was tried.
pub fn load() -> Result<(), CudaError> {
    static LOADED: OnceLock<Result<(), CudaError>> = OnceLock::new();
    LOADED.get_or_init(load_once).clone()
}

fn load_once() -> Result<(), CudaError> {
    let mut tried = Vec::new();
    if let Some(given) = std::env::var_os(NVRTC_ENV) {
        let given = PathBuf::from(given);
        let files = library_files(&given).map_err(|e| {
            CudaError::NvrtcMissing(format!("{NVRTC_ENV}={}: {e}", given.display()))
        })?;
        // Builtins first: libnvrtc may look for them as soon as it loads.
        for f in files.builtins.iter().chain(files.nvrtc.iter()) {
            dlopen_global(f).map_err(|e| {
                CudaError::NvrtcMissing(format!("{NVRTC_ENV}: cannot load {}: {e}", f.display()))
            })?;
        }
        tried.push(format!("{NVRTC_ENV}={}", given.display()));
    }
    // SAFETY: only opens and closes the library by its usual names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    tried.push("libnvrtc.so, libnvrtc.so.12, ... on the loader's path".into());
    Err(CudaError::NvrtcMissing(format!(
        "tried {}; install NVRTC (`pip install nvidia-cuda-nvrtc-cu12`, or the CUDA toolkit) and set {NVRTC_ENV} to the folder with libnvrtc.so.*",
        tried.join(", ")
    )))
}

/// The NVRTC libraries found at a path: the file itself, or in a folder the
/// `libnvrtc.so*` and `libnvrtc-builtins.so*` files (not the `.alt.`
/// variants).
struct LibraryFiles {
    nvrtc: Option<PathBuf>,
    builtins: Option<PathBuf>,
}

fn library_files(path: &Path) -> std::io::Result<LibraryFiles> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        return Ok(LibraryFiles {
            nvrtc: Some(path.to_path_buf()),
            builtins: None,
        });
    }
    let mut names: Vec<String> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.contains(".alt."))
        .collect();
    // Longest name first: libnvrtc.so.12.9.86 over the libnvrtc.so link.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let find = |prefix: &str| {
        names
            .iter()
            .find(|n| n.starts_with(prefix))
            .map(|n| path.join(n))
    };
    let files = LibraryFiles {
        nvrtc: find("libnvrtc.so"),
        builtins: find("libnvrtc-builtins.so"),
    };
    if files.nvrtc.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no libnvrtc.so* in this folder",
        ));
    }
    Ok(files)
}

/// Opens a library by path for the life of the process, its symbols global.
fn dlopen_global(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid C string; the handle is kept open on purpose.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a C string or null.
        let msg = unsafe { libc::dlerror() };
        return Err(if msg.is_null() {
            "dlopen failed".into()
        } else {
            unsafe { std::ffi::CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        });
    }
    Ok(())
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), CudaError> {
    load()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; the pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::NvrtcMissing(format!(
            "nvrtcVersion failed: {r:?}"
        )));
    }
    Ok((major, minor))
}

/// The options every unit is compiled with: no contraction of a product
/// and an add into an FMA unless written, IEEE division and square root,
/// subnormals kept (the CPU's arithmetic, README "Numerics").
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ]
}

/// Compiles `source` (named `file` in the log) for `arch` (`compute_87`)
/// to PTX; a failure carries NVRTC's log.
pub fn compile(file: &str, source: &str, arch: &str) -> Result<String, CudaError> {
    load()?;
    if source.contains('\0') {
        return Err(CudaError::Compile {
            file: file.into(),
            arch: arch.into(),
            log: "the source contains a NUL byte".into(),
        });
    }
    let opts = CompileOptions {
        options: options(arch),
        name: Some(file.to_string()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => Err(CudaError::Compile {
            file: file.into(),
            arch: arch.into(),
            log: log.to_string_lossy().trim().to_string(),
        }),
        Err(e) => Err(CudaError::Compile {
            file: file.into(),
            arch: arch.into(),
            log: format!("{e:?}"),
        }),
    }
}
