//! The GPU: probing, its context and stream, the kernels loaded from the
//! PTX cache, and typed launches of each kernel.
//!
//! Buffers are passed to kernels as device addresses, so weights may live
//! in device memory or in host-registered memory the GPU maps ([`super::uma`])
//! and the kernels cannot tell. Launch shapes here match the comments in
//! `kernels/*.cu`. Needs a GPU: verified on one, not in CI.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute as Attr, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::cache::{PtxCache, PtxSource};
use super::kernels::{self, Unit};
use super::CudaError;
use crate::compute::backend::MemoryModel;
use crate::model::dtype::GgmlType;

/// What the driver reports about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub total_mem: usize,
    pub memory: MemoryModel,
}

impl DeviceInfo {
    /// The virtual architecture kernels are compiled for (`compute_87`).
    pub fn arch(&self) -> String {
        format!("compute_{}{}", self.capability.0, self.capability.1)
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sm_{}{}, {:.1} GiB, {})",
            self.name,
            self.capability.0,
            self.capability.1,
            self.total_mem as f64 / (1u64 << 30) as f64,
            match self.memory.weight_home() {
                crate::compute::backend::WeightHome::MappedHost => "unified memory",
                crate::compute::backend::WeightHome::Device => "discrete memory",
            }
        )
    }
}

/// Loads the driver library and initializes it, or says why not. cudarc
/// panics when it first calls a driver function and `libcuda` is missing,
/// so the library is probed before any call.
fn init_driver() -> Result<(), CudaError> {
    // SAFETY: only opens and closes the library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::DriverMissing);
    }
    match cudarc::driver::result::init() {
        Ok(()) => {}
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => return Err(CudaError::NoDevice),
        Err(e) => return Err(CudaError::driver("cuInit", e)),
    }
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
    if n == 0 {
        return Err(CudaError::NoDevice);
    }
    Ok(())
}

/// Finds device 0 and creates its context: `Ok` means kernels can run.
pub fn probe() -> Result<DeviceInfo, CudaError> {
    init_driver()?;
    let ctx = CudaContext::new(0).map_err(|e| CudaError::driver("cuCtxCreate", e))?;
    info(&ctx)
}

fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, CudaError> {
    let attr = |a: Attr| {
        ctx.attribute(a)
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))
    };
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx
            .name()
            .map_err(|e| CudaError::driver("cuDeviceGetName", e))?,
        capability: ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("cuDeviceComputeCapability", e))?,
        total_mem: ctx
            .total_mem()
            .map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?,
        memory: MemoryModel {
            integrated: attr(Attr::CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0,
            unified_addressing: attr(Attr::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? != 0,
            can_map_host: attr(Attr::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? != 0,
        },
    })
}

/// A weight matrix on the GPU's address space: `rows` rows of `cols`
/// elements of `ty` in the GGUF layout, row `r` at `ptr + r * row_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct WeightView {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    /// Device address (of device memory or of mapped host memory).
    pub ptr: u64,
}

impl WeightView {
    /// Checks that the shape is whole blocks.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, ptr: u64) -> Result<Self, CudaError> {
        let row_bytes = ty.row_bytes(cols as u64).ok_or_else(|| {
            CudaError::Shape(format!("{ty}: {cols} columns are not whole blocks"))
        })?;
        Ok(WeightView {
            ty,
            rows,
            cols,
            row_bytes: row_bytes as usize,
            ptr,
        })
    }
}

/// Shapes of one attention launch over one sequence's cache.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_tok: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Positions the cache has room for (its stride between kv heads).
    pub cap: usize,
}

/// One device with the loop's kernels loaded.
pub struct Gpu {
    pub info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    matmul: Arc<CudaModule>,
    ops: Arc<CudaModule>,
}

/// Rows per block of the matrix kernels and tokens per block of matmul
/// (ROWS_PER_BLOCK and TOK_TILE in kernels/matmul.cu).
const ROWS_PER_BLOCK: usize = 8;
const TOK_TILE: usize = 8;

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn int(n: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(n).map_err(|_| CudaError::Shape(format!("{what} = {n} does not fit an int")))
}

impl Gpu {
    /// Opens device `ordinal`, and loads the kernels from `cache`
    /// (compiling them on first use for this device).
    pub fn open(ordinal: usize, cache: &PtxCache) -> Result<Gpu, CudaError> {
        init_driver()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver("cuCtxCreate", e))?;
        let info = info(&ctx)?;
        let arch = info.arch();
        let matmul = load_unit(&ctx, cache, &kernels::MATMUL, &arch)?;
        let ops = load_unit(&ctx, cache, &kernels::OPS, &arch)?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            info,
            ctx,
            stream,
            matmul,
            ops,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `n` zeroed f32 in device memory; running out is `OutOfMemory`.
    pub fn zeros(&self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| oom(e, n * 4, "cuMemAlloc"))
    }

    /// A device copy of `data`.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .clone_htod(data)
            .map_err(|e| oom(e, std::mem::size_of_val(data), "cuMemcpyHtoD"))
    }

    /// The contents of a device buffer (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        self.stream
            .clone_dtoh(s)
            .map_err(|e| CudaError::driver("cuMemcpyDtoH", e))
    }

    /// Waits for every launch so far; a kernel's fault shows here.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }

    fn function(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, CudaError> {
        module
            .load_function(name)
            .map_err(|e| CudaError::driver("cuModuleGetFunction", e))
    }

    /// `out = W x` for `n_tok` tokens (x is `[n_tok][cols]`, out
    /// `[n_tok][rows]`); one token takes the matrix-vector kernel, more the
    /// matrix-matrix one, with identical bits per (row, token).
    pub fn matmul(
        &self,
        w: &WeightView,
        x: &CudaSlice<f32>,
        n_tok: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if x.len() < n_tok * w.cols || out.len() < n_tok * w.rows || n_tok == 0 {
            return Err(CudaError::Shape(format!(
                "matmul {}x{} on {n_tok} tokens: x holds {}, out {}",
                w.rows,
                w.cols,
                x.len(),
                out.len()
            )));
        }
        let suffix = kernels::format_suffix(w.ty);
        let (rows, cols) = (int(w.rows, "rows")?, int(w.cols, "cols")?);
        let row_bytes = w.row_bytes as u64;
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (op, _go) = out.device_ptr_mut(&self.stream);
        let grid_rows = w.rows.div_ceil(ROWS_PER_BLOCK) as u32;
        let block = (16, ROWS_PER_BLOCK as u32, 1);
        if n_tok == 1 {
            let f = self.function(&self.matmul, &format!("matvec_{suffix}"))?;
            let cfg = LaunchConfig {
                grid_dim: (grid_rows, 1, 1),
                block_dim: block,
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&f);
            b.arg(&w.ptr)
                .arg(&row_bytes)
                .arg(&rows)
                .arg(&cols)
                .arg(&xp)
                .arg(&op);
            // SAFETY: the arguments match the kernel's signature and the
            // buffers' sizes were checked above.
            unsafe { b.launch(cfg) }.map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        } else {
            let f = self.function(&self.matmul, &format!("matmul_{suffix}"))?;
            let cfg = LaunchConfig {
                grid_dim: (grid_rows, n_tok.div_ceil(TOK_TILE) as u32, 1),
                block_dim: block,
                shared_mem_bytes: 0,
            };
            let nt = int(n_tok, "n_tok")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&w.ptr)
                .arg(&row_bytes)
                .arg(&rows)
                .arg(&cols)
                .arg(&xp)
                .arg(&nt)
                .arg(&op);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        }
        Ok(())
    }

    /// `out[i] = row ids[i] of W`, dequantized: the embedding lookup.
    pub fn rows(
        &self,
        w: &WeightView,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let n = ids.len();
        if out.len() < n * w.cols {
            return Err(CudaError::Shape(format!(
                "rows: out holds {}, need {}",
                out.len(),
                n * w.cols
            )));
        }
        let f = self.function(
            &self.matmul,
            &format!("rows_{}", kernels::format_suffix(w.ty)),
        )?;
        let (cols, ni) = (int(w.cols, "cols")?, int(n, "ids")?);
        let row_bytes = w.row_bytes as u64;
        let (ip, _gi) = ids.device_ptr(&self.stream);
        let (op, _go) = out.device_ptr_mut(&self.stream);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&w.ptr)
            .arg(&row_bytes)
            .arg(&cols)
            .arg(&ip)
            .arg(&ni)
            .arg(&op);
        // SAFETY: sizes checked; ids must be < rows (the engine validates
        // token ids before a step).
        unsafe { b.launch(grid_1d(n * w.cols)) }
            .map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        Ok(())
    }

    /// RMSNorm of each row of `x` (rows of `w.len()`), into `out`.
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let n = w.len();
        if n == 0 || !x.len().is_multiple_of(n) || out.len() < x.len() {
            return Err(CudaError::Shape(format!(
                "rmsnorm: x {}, w {n}, out {}",
                x.len(),
                out.len()
            )));
        }
        let rows = x.len() / n;
        let f = self.function(&self.ops, "rmsnorm")?;
        let (ni, ri) = (int(n, "n")?, int(rows, "rows")?);
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (op, _go) = out.device_ptr_mut(&self.stream);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (16, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&wp).arg(&eps).arg(&ni).arg(&ri).arg(&op);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg) }.map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        Ok(())
    }

    /// RoPE in place on `x = [n_tok][n_heads][head_dim]` with `cs =
    /// [n_tok][head_dim / 2]` (cos, sin) pairs, flattened.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cs: &CudaSlice<f32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<(), CudaError> {
        if x.len() < n_tok * n_heads * head_dim
            || cs.len() < n_tok * head_dim
            || !head_dim.is_multiple_of(2)
        {
            return Err(CudaError::Shape(format!(
                "rope: x {}, cs {}",
                x.len(),
                cs.len()
            )));
        }
        let f = self.function(&self.ops, "rope")?;
        let (t, h, d) = (
            int(n_tok, "n_tok")?,
            int(n_heads, "n_heads")?,
            int(head_dim, "head_dim")?,
        );
        let (cp, _gc) = cs.device_ptr(&self.stream);
        let (xp, _gx) = x.device_ptr_mut(&self.stream);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&cp).arg(&t).arg(&h).arg(&d);
        // SAFETY: sizes checked above.
        unsafe { b.launch(grid_1d(n_tok * n_heads * head_dim / 2)) }
            .map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        Ok(())
    }

    /// `gate = SiLU(gate) * up`.
    pub fn swiglu(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<(), CudaError> {
        if up.len() < gate.len() {
            return Err(CudaError::Shape(format!(
                "swiglu: gate {}, up {}",
                gate.len(),
                up.len()
            )));
        }
        let f = self.function(&self.ops, "swiglu")?;
        let n = gate.len() as u64;
        let (up_p, _gu) = up.device_ptr(&self.stream);
        let (gp, _gg) = gate.device_ptr_mut(&self.stream);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&gp).arg(&up_p).arg(&n);
        // SAFETY: sizes checked above.
        unsafe { b.launch(grid_1d(n as usize)) }
            .map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        Ok(())
    }

    /// Writes `src = [n_tok][n_head_kv][head_dim]` at positions `pos` of a
    /// cache laid out `[n_head_kv][cap][head_dim]`.
    pub fn kv_store(
        &self,
        src: &CudaSlice<f32>,
        pos: &CudaSlice<u32>,
        shape: AttentionShape,
        cache: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let AttentionShape {
            n_tok,
            n_head_kv,
            head_dim,
            cap,
            ..
        } = shape;
        if src.len() < n_tok * n_head_kv * head_dim
            || pos.len() < n_tok
            || cache.len() < n_head_kv * cap * head_dim
        {
            return Err(CudaError::Shape(
                "kv_store: buffers smaller than the shape".into(),
            ));
        }
        let f = self.function(&self.ops, "kv_store")?;
        let (t, h, d, c) = (
            int(n_tok, "n_tok")?,
            int(n_head_kv, "n_head_kv")?,
            int(head_dim, "head_dim")?,
            int(cap, "cap")?,
        );
        let (sp, _gs) = src.device_ptr(&self.stream);
        let (pp, _gp) = pos.device_ptr(&self.stream);
        let (cp, _gc) = cache.device_ptr_mut(&self.stream);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&sp).arg(&pp).arg(&t).arg(&h).arg(&d).arg(&c).arg(&cp);
        // SAFETY: sizes checked; positions must be < cap (the caller's cache
        // reserved them).
        unsafe { b.launch(grid_1d(n_tok * n_head_kv * head_dim)) }
            .map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        Ok(())
    }

    /// Causal GQA attention of `q = [n_tok][n_head][head_dim]` over one
    /// sequence's cache, token t attending positions `0..=pos[t]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        pos: &CudaSlice<u32>,
        shape: AttentionShape,
        scores: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let AttentionShape {
            n_tok,
            n_head,
            n_head_kv,
            head_dim,
            cap,
        } = shape;
        let qn = n_tok * n_head * head_dim;
        let kvn = n_head_kv * cap * head_dim;
        if n_head_kv == 0
            || !n_head.is_multiple_of(n_head_kv)
            || q.len() < qn
            || out.len() < qn
            || k.len() < kvn
            || v.len() < kvn
            || pos.len() < n_tok
            || scores.len() < n_tok * n_head * cap
        {
            return Err(CudaError::Shape(
                "attention: buffers smaller than the shape".into(),
            ));
        }
        let f = self.function(&self.ops, "attention")?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (h, hk, d, c) = (
            int(n_head, "n_head")?,
            int(n_head_kv, "n_head_kv")?,
            int(head_dim, "head_dim")?,
            int(cap, "cap")?,
        );
        let (qp, _gq) = q.device_ptr(&self.stream);
        let (kp, _gk) = k.device_ptr(&self.stream);
        let (vp, _gv) = v.device_ptr(&self.stream);
        let (pp, _gp) = pos.device_ptr(&self.stream);
        let (sp, _gs) = scores.device_ptr_mut(&self.stream);
        let (op, _go) = out.device_ptr_mut(&self.stream);
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, n_tok as u32, 1),
            block_dim: (16, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&pp)
            .arg(&h)
            .arg(&hk)
            .arg(&d)
            .arg(&c)
            .arg(&scale)
            .arg(&sp)
            .arg(&op);
        // SAFETY: sizes checked; positions must be < cap.
        unsafe { b.launch(cfg) }.map_err(|e| CudaError::driver("cuLaunchKernel", e))?;
        Ok(())
    }
}

/// Loads `unit` into `ctx`; a cached PTX the driver refuses is dropped and
/// compiled again once.
fn load_unit(
    ctx: &Arc<CudaContext>,
    cache: &PtxCache,
    unit: &Unit,
    arch: &str,
) -> Result<Arc<CudaModule>, CudaError> {
    let (ptx, source) = cache.get(unit, arch)?;
    match ctx.load_module(Ptx::from_src(ptx)) {
        Ok(m) => Ok(m),
        Err(e) if source == PtxSource::Cache => {
            log::warn!(
                "cached PTX of {} refused by the driver ({e:?}); compiling again",
                unit.file
            );
            cache.forget(unit, arch);
            let (ptx, _) = cache.get(unit, arch)?;
            ctx.load_module(Ptx::from_src(ptx))
                .map_err(|e| CudaError::driver("cuModuleLoadData", e))
        }
        Err(e) => Err(CudaError::driver("cuModuleLoadData", e)),
    }
}

fn oom(e: cudarc::driver::DriverError, bytes: usize, call: &'static str) -> CudaError {
    match CudaError::driver(call, e) {
        CudaError::OutOfMemory { .. } => CudaError::OutOfMemory { bytes },
        other => other,
    }
}
