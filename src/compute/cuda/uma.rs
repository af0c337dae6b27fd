//! Unified memory: host memory the GPU reads in place (DESIGN.md §5).
//!
//! On a Jetson the GPU and the CPU share one DRAM. A resident layer's bytes
//! are already in memory, mapped from the GGUF file; registering that range
//! with `cuMemHostRegister` (read-only, device-mapped) gives the GPU an
//! address for the same pages, so the weights are never copied. A streamed
//! layer goes from storage into a [`HostSlot`]: page-aligned host memory,
//! registered once, that the loader thread fills and the kernels read.
//!
//! Ownership of a slot: the loader thread writes it only while the compute
//! side does not use it, and hands it over when the read is complete; the
//! compute side hands it back after the stream has synchronized past the
//! last kernel that read it (the engine's slot protocol, engine/loader.rs).
//!
//! [`CopyStats`] counts the bytes the GPU reads in place and the bytes
//! copied to device memory, to report the copy avoided. Needs a GPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use super::CudaError;

/// Bytes read in place and bytes copied, over a process's life.
#[derive(Debug, Default)]
pub struct CopyStats {
    mapped: AtomicU64,
    copied: AtomicU64,
}

impl CopyStats {
    pub fn add_mapped(&self, bytes: usize) {
        self.mapped.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn add_copied(&self, bytes: usize) {
        self.copied.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes the GPU read in place: the copy avoided.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Bytes copied to device memory.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn check(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(CudaError::OutOfMemory { bytes: 0 }),
        other => Err(CudaError::Driver {
            call,
            msg: format!("{other:?}"),
        }),
    }
}

/// A host range registered with the driver and mapped into the GPU's
/// address space; unregistered on drop.
pub struct Registered {
    ctx: Arc<CudaContext>,
    /// The registered pages: the range rounded out to whole pages.
    base: *mut libc::c_void,
    len: usize,
    /// Offset of the caller's first byte in the registered pages.
    offset: usize,
    device_base: u64,
}

// SAFETY: the registration is a handle to pages owned elsewhere; the driver
// calls on it are thread-safe.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

impl Registered {
    /// Registers the pages under `ptr..ptr + len`: read-only when `read_only`
    /// (a file mapping the process may not write), device-mapped. The pages
    /// must stay mapped until this is dropped.
    ///
    /// # Safety
    /// `ptr..ptr + len` is mapped memory that outlives the returned value.
    pub unsafe fn new(
        ctx: &Arc<CudaContext>,
        ptr: *const u8,
        len: usize,
        read_only: bool,
    ) -> Result<Registered, CudaError> {
        ctx.bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        let page = page_size();
        let start = ptr as usize & !(page - 1);
        let end = (ptr as usize + len).next_multiple_of(page);
        let base = start as *mut libc::c_void;
        let mut flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        if read_only {
            flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
        }
        check(
            "cuMemHostRegister",
            sys::cuMemHostRegister_v2(base, end - start, flags),
        )?;
        let mut device_base: sys::CUdeviceptr = 0;
        if let Err(e) = check(
            "cuMemHostGetDevicePointer",
            sys::cuMemHostGetDevicePointer_v2(&mut device_base, base, 0),
        ) {
            sys::cuMemHostUnregister(base);
            return Err(e);
        }
        Ok(Registered {
            ctx: ctx.clone(),
            base,
            len: end - start,
            offset: ptr as usize - start,
            device_base,
        })
    }

    /// The GPU's address of the caller's first byte.
    pub fn device_ptr(&self) -> u64 {
        self.device_base + self.offset as u64
    }

    /// Bytes registered (whole pages).
    pub fn registered_len(&self) -> usize {
        self.len
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `base` was registered by `new` and not yet unregistered.
        let r = unsafe { sys::cuMemHostUnregister(self.base) };
        if r != sys::CUresult::CUDA_SUCCESS {
            log::warn!("cuMemHostUnregister: {r:?}");
        }
    }
}

/// A streaming slot: page-aligned host memory, registered and mapped, that
/// the loader fills from storage and the kernels read in place.
pub struct HostSlot {
    /// Unregistered by hand in `drop`, before the pages are unmapped.
    reg: std::mem::ManuallyDrop<Registered>,
    mem: *mut u8,
    len: usize,
}

// SAFETY: the slot owns its pages; who may touch them when is the slot
// protocol in the module comment.
unsafe impl Send for HostSlot {}

impl HostSlot {
    /// A slot of `len` bytes (rounded up to whole pages).
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<HostSlot, CudaError> {
        let len = len.max(1).next_multiple_of(page_size());
        // SAFETY: an anonymous private mapping; checked for failure.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(CudaError::OutOfMemory { bytes: len });
        }
        // SAFETY: the mapping lives until drop, after `reg` is dropped.
        match unsafe { Registered::new(ctx, mem as *const u8, len, false) } {
            Ok(reg) => Ok(HostSlot {
                reg: std::mem::ManuallyDrop::new(reg),
                mem: mem as *mut u8,
                len,
            }),
            Err(e) => {
                // SAFETY: the mapping made above.
                unsafe { libc::munmap(mem, len) };
                Err(e)
            }
        }
    }

    /// The slot's bytes, for the loader to fill while it owns the slot.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.mem, self.len) }
    }

    /// The GPU's address of the slot's first byte.
    pub fn device_ptr(&self) -> u64 {
        self.reg.device_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        // SAFETY: `reg` is not used again; the pages are unmapped only after
        // the driver has let go of them.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.reg);
            libc::munmap(self.mem as *mut libc::c_void, self.len);
        }
    }
}
