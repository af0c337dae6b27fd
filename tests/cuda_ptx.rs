//! The CUDA kernels without a GPU: every unit of `kernels/` compiles to PTX
//! with NVRTC (from the pip package `nvidia-cuda-nvrtc-cu12` in CI) for the
//! Jetson architectures and defines every entry point the backend launches;
//! a broken kernel's error carries NVRTC's log; the PTX cache compiles once;
//! and probing a machine without a driver is an error, not a panic.
//!
//! NVRTC is found through `LOIP_NVRTC`, else through python3's `nvidia.cuda_nvrtc`
//! package, else on the loader's path. Without it these tests say so and
//! pass, except with `LOIP_REQUIRE_NVRTC` set (scripts/setup-test.sh sets
//! it, having installed the package).
#![cfg(feature = "cuda")]

use std::path::Path;
use std::sync::OnceLock;

use loip::compute::cuda::kernels::{self, entry_points, UNITS};
use loip::compute::cuda::{nvrtc, CudaError, PtxCache, PtxSource};

/// Architectures every unit must compile for: Jetson Nano (5.3), Xavier
/// (7.2) and Orin (8.7).
const ARCHS: [&str; 3] = ["compute_53", "compute_72", "compute_87"];

/// Whether NVRTC loaded; the first call points `LOIP_NVRTC` at the pip
/// package when it is not set.
fn nvrtc_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        if std::env::var_os(nvrtc::NVRTC_ENV).is_none() {
            if let Some(dir) = pip_nvrtc_dir() {
                // SAFETY (edition 2021: safe): set before any thread reads it,
                // inside the one-time initialisation.
                std::env::set_var(nvrtc::NVRTC_ENV, dir);
            }
        }
        match nvrtc::load() {
            Ok(()) => true,
            Err(e) => {
                if std::env::var_os("LOIP_REQUIRE_NVRTC").is_some() {
                    panic!("LOIP_REQUIRE_NVRTC is set but {e}");
                }
                eprintln!("skipping: {e}");
                false
            }
        }
    })
}

/// The lib folder of the pip package `nvidia-cuda-nvrtc-cu12`, if python3
/// has it.
fn pip_nvrtc_dir() -> Option<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], 'lib'))",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && Path::new(&dir).is_dir()).then_some(dir)
}

#[test]
fn every_file_in_kernels_is_compiled() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
        .collect();
    on_disk.sort();
    let mut known: Vec<String> = UNITS
        .iter()
        .map(|u| u.file.to_string())
        .chain(kernels::HEADERS.iter().map(|h| h.file.to_string()))
        .collect();
    known.sort();
    assert_eq!(
        on_disk, known,
        "kernels/ and compute::cuda::kernels must list the same files"
    );
    for u in UNITS {
        assert_eq!(std::fs::read_to_string(dir.join(u.file)).unwrap(), u.text);
        for h in u.headers {
            assert_eq!(std::fs::read_to_string(dir.join(h.file)).unwrap(), h.text);
        }
    }
}

#[test]
fn every_kernel_compiles_to_ptx() {
    if !nvrtc_ready() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    for unit in UNITS {
        for arch in ARCHS {
            let t = std::time::Instant::now();
            let ptx =
                nvrtc::compile(unit.file, &unit.source(), arch).unwrap_or_else(|e| panic!("{e}"));
            eprintln!(
                "{} for {arch}: {} bytes of PTX in {:?}",
                unit.file,
                ptx.len(),
                t.elapsed()
            );
            let target = arch.replace("compute_", "sm_");
            assert!(
                ptx.contains(&format!(".target {target}")),
                "{}: {arch}",
                unit.file
            );
            for name in entry_points(&unit) {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{} for {arch} lacks kernel {name}",
                    unit.file
                );
            }
        }
    }
}

#[test]
fn no_kernel_has_a_fused_add_it_did_not_ask_for() {
    // --fmad=false: every fma in the PTX comes from an fmaf() in the
    // source. The matrix kernels have one per product; rmsnorm and
    // attention a few; swiglu and rope none.
    if !nvrtc_ready() {
        return;
    }
    let ptx = nvrtc::compile(kernels::OPS.file, &kernels::OPS.source(), "compute_87").unwrap();
    for entry in ["swiglu", "rope"] {
        let start = ptx.find(&format!(".entry {entry}(")).unwrap();
        let body = &ptx[start..];
        let end = body[1..].find(".entry ").map_or(body.len(), |i| i + 1);
        assert!(
            !body[..end].contains("fma.rn.f32"),
            "{entry} has a contracted fma"
        );
    }
}

#[test]
fn a_broken_kernel_reports_nvrtcs_log() {
    if !nvrtc_ready() {
        return;
    }
    let src = kernels::custom_source(
        "broken.cu",
        "extern \"C\" __global__ void broken(float* x) {\n    x[0] = no_such_name;\n}\n",
    );
    match nvrtc::compile("broken.cu", &src, "compute_87") {
        Err(CudaError::Compile { file, arch, log }) => {
            assert_eq!((file.as_str(), arch.as_str()), ("broken.cu", "compute_87"));
            assert!(log.contains("no_such_name"), "log: {log}");
            assert!(
                log.contains("broken.cu(2)"),
                "the log names file and line: {log}"
            );
            let shown = CudaError::Compile { file, arch, log }.to_string();
            assert!(shown.starts_with("kernel broken.cu does not compile for compute_87"));
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn the_ptx_cache_compiles_once_per_device() {
    if !nvrtc_ready() {
        return;
    }
    let dir = tempfile::TempDir::new().unwrap();
    let cache = PtxCache::new(dir.path().join("ptx"));
    let unit = kernels::OPS;
    let (first, how) = cache.get(&unit, "compute_87").unwrap();
    assert_eq!(how, PtxSource::Compiled);
    let (again, how) = cache.get(&unit, "compute_87").unwrap();
    assert_eq!((how, &again), (PtxSource::Cache, &first));
    // Another device is another entry.
    assert_eq!(
        cache.get(&unit, "compute_72").unwrap().1,
        PtxSource::Compiled
    );
    let path = cache.path_for(&unit, "compute_87").unwrap();
    assert!(path.starts_with(cache.dir()));
    // A damaged entry is compiled again and replaced.
    std::fs::write(&path, "garbage").unwrap();
    assert_eq!(
        cache.get(&unit, "compute_87").unwrap(),
        (first, PtxSource::Compiled)
    );
    // An unwritable cache costs only the compile.
    let blocked = PtxCache::new(dir.path().join("file-not-dir"));
    std::fs::write(dir.path().join("file-not-dir"), "x").unwrap();
    assert_eq!(
        blocked.get(&unit, "compute_87").unwrap().1,
        PtxSource::Compiled
    );
}

#[test]
fn probing_without_a_driver_is_an_error_not_a_panic() {
    if Path::new("/dev/nvidiactl").exists() || Path::new("/dev/nvhost-ctrl").exists() {
        eprintln!("skipping: an NVIDIA device node is present");
        return;
    }
    let e = loip::compute::cuda::probe().unwrap_err();
    assert!(
        matches!(e, CudaError::DriverMissing | CudaError::NoDevice),
        "{e}"
    );
    let e = loip::compute::backend::probe_gpu().unwrap_err();
    assert!(e.to_string().starts_with("no usable CUDA GPU: "), "{e}");
}
