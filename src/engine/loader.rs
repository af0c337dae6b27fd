//! The streaming loader: a dedicated thread that reads streamed units from
//! the model file into K rotating, page-aligned slots, ahead of use.
//!
//! Reads bypass the page cache (O_DIRECT where the filesystem allows it,
//! else a plain read followed by `POSIX_FADV_DONTNEED`), so the memory
//! budget is real and the measured bandwidth honest.
//!
//! Concurrency contract (who owns a slot, and when it is handed over): a
//! slot belongs to the loader thread from the moment it receives the slot's
//! index on the `free` channel until it sends the slot back on the `ready`
//! channel; from then until `release` sends it to `free` again it belongs to
//! compute, which only reads it. Channels carry the hand-over, so no slot is
//! ever written and read at the same time.

use std::cell::UnsafeCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::weights::{Model, Unit};
use super::EngineError;
use crate::compute::cpu::blocks::Packing;
use crate::model::gguf::TensorInfo;

/// O_DIRECT wants offsets, lengths and buffers aligned to the logical block
/// size; 4 KiB covers every common device.
const ALIGN: u64 = 4096;

/// Where a streamed unit lies in the file.
#[derive(Clone, Debug)]
pub struct Span {
    pub unit: Unit,
    /// Aligned start, in the file.
    pub start: u64,
    /// Aligned length.
    pub len: u64,
    /// `(tensor name, offset of its bytes within the span)`.
    pub tensors: Vec<(String, usize, usize)>,
}

impl Span {
    /// The span of `unit` in `model`'s file: one aligned read covering all
    /// its tensors (they are adjacent in files written layer by layer).
    pub fn of(model: &Model, unit: Unit) -> Span {
        let base = model.gguf().data_offset();
        let ts = model.unit_tensors(unit);
        let lo = ts.iter().map(|(_, t)| base + t.offset).min().unwrap_or(0);
        let hi = ts
            .iter()
            .map(|(_, t)| base + t.offset + t.size)
            .max()
            .unwrap_or(0);
        let start = lo / ALIGN * ALIGN;
        let len = hi.next_multiple_of(ALIGN) - start;
        Span {
            unit,
            start,
            len,
            tensors: ts
                .iter()
                .map(|(_, t)| {
                    (
                        t.name.clone(),
                        (base + t.offset - start) as usize,
                        t.size as usize,
                    )
                })
                .collect(),
        }
    }
}

/// Loading statistics, for `--json` timings and the benchmark.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LoadStats {
    /// Times compute waited for a slot that was not ready yet.
    pub bubbles: u64,
    /// Total time of those waits.
    pub bubble_s: f64,
    /// Units read and bytes read from storage.
    pub units_read: u64,
    pub bytes_read: u64,
    /// Time the loader spent in reads.
    pub read_s: f64,
    /// Whether reads bypassed the page cache with O_DIRECT.
    pub direct_io: bool,
}

impl LoadStats {
    /// Achieved storage read bandwidth, bytes per second.
    pub fn read_bandwidth(&self) -> f64 {
        self.bytes_read as f64 / self.read_s.max(1e-9)
    }
}

/// How streamed units reach compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    /// The loader thread reads ahead into K slots (the default).
    Prefetch,
    /// Compute reads each unit when it needs it, into one slot: the
    /// no-prefetch baseline.
    OnDemand,
}

struct Slots(Vec<UnsafeCell<memmap2::MmapMut>>);

// SAFETY: ownership of each slot is handed over through channels (module
// docs), so a slot is never accessed by two threads at once.
unsafe impl Sync for Slots {}
unsafe impl Send for Slots {}

struct Loaded {
    slot: usize,
    pos: usize,
    result: Result<(), String>,
    bytes: u64,
    read_s: f64,
}

/// A slot handed to compute, holding one streamed unit.
#[must_use = "a slot must be released"]
pub struct Slot {
    idx: usize,
    pos: usize,
    error: Option<String>,
}

/// The model file opened for streaming, with the stamp it had at load.
struct Source {
    file: File,
    path: PathBuf,
    direct: bool,
    len: u64,
    modified: Option<SystemTime>,
}

impl Source {
    fn open(path: &Path, len: u64, modified: Option<SystemTime>) -> Result<Source, EngineError> {
        let err = |e: std::io::Error| EngineError::Read(path.display().to_string(), e.to_string());
        let (file, direct) = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            // tmpfs and some overlay filesystems refuse O_DIRECT.
            Err(_) => (File::open(path).map_err(err)?, false),
        };
        Ok(Source {
            file,
            path: path.to_owned(),
            direct,
            len,
            modified,
        })
    }

    /// The file `model` was loaded from.
    fn of_model(model: &Model) -> Result<Source, EngineError> {
        let gguf = model.gguf();
        let path = gguf
            .path()
            .ok_or_else(|| EngineError::Batch("streaming needs a model file".into()))?
            .to_owned();
        let stamp = gguf.file_stamp().cloned();
        Source::open(&path, gguf.file_len(), stamp.and_then(|s| s.modified))
    }

    /// Reads `span` into `buf`, after checking that the file has not
    /// changed since the model was loaded.
    fn read(&self, span: &Span, buf: &mut [u8]) -> Result<(), String> {
        let meta = self.file.metadata().map_err(|e| e.to_string())?;
        if meta.len() != self.len || meta.modified().ok() != self.modified {
            return Err(format!(
                "model file {} changed on disk while streaming (size {} → {})",
                self.path.display(),
                self.len,
                meta.len()
            ));
        }
        let want = (span.len.min(self.len - span.start)) as usize;
        let mut done = 0;
        while done < want {
            // O_DIRECT needs whole aligned blocks: read up to the span's
            // aligned length even past the data we need.
            let n = self
                .file
                .read_at(&mut buf[done..span.len as usize], span.start + done as u64)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            if n == 0 {
                return Err(format!(
                    "{} is truncated at {}",
                    self.path.display(),
                    span.start + done as u64
                ));
            }
            done += n;
        }
        if !self.direct {
            // SAFETY: plain syscall on an open descriptor.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    span.start as i64,
                    span.len as i64,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        Ok(())
    }
}

/// An anonymous buffer for a slot, advised for transparent huge pages:
/// compute reads a streamed unit from its slot as it reads a resident one
/// from memory, and through 4 KiB pages that costs about a third more
/// (DESIGN.md §8), as much as the resident weights gain from huge pages.
fn slot_buffer(len: usize) -> std::io::Result<memmap2::MmapMut> {
    let buf = memmap2::MmapMut::map_anon(len)?;
    #[cfg(target_os = "linux")]
    let _ = buf.advise(memmap2::Advice::HugePage);
    Ok(buf)
}

/// A model file opened for reads exactly as the loader does them (aligned,
/// bypassing the page cache), for measuring storage: the profiler times
/// these reads.
pub struct ColdReader {
    source: Source,
    buf: memmap2::MmapMut,
}

impl ColdReader {
    /// Opens `model`'s file, with a buffer for reads up to `max_len` bytes.
    pub fn open(model: &Model, max_len: u64) -> Result<ColdReader, EngineError> {
        let source = Source::of_model(model)?;
        let buf = slot_buffer(max_len.next_multiple_of(ALIGN).max(ALIGN) as usize)
            .map_err(EngineError::Memory)?;
        if !source.direct {
            // Without O_DIRECT the first read of each range must not find
            // it cached: drop the file's pages first.
            super::offload::drop_page_cache(&source.path)
                .map_err(|e| EngineError::Read(source.path.display().to_string(), e.to_string()))?;
        }
        Ok(ColdReader { source, buf })
    }

    /// Whether reads bypass the page cache with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.source.direct
    }

    /// Length of the file.
    pub fn file_len(&self) -> u64 {
        self.source.len
    }

    /// Reads `len` bytes at `start` (both rounded out to whole aligned
    /// blocks, as the loader reads a unit's span); returns the bytes read
    /// and the seconds the read took.
    pub fn read(&mut self, start: u64, len: u64) -> Result<(u64, f64), EngineError> {
        let a = start / ALIGN * ALIGN;
        let b = (start + len).next_multiple_of(ALIGN);
        if b - a > self.buf.len() as u64 || a >= self.source.len {
            return Err(EngineError::Batch(format!(
                "cold read of {len} bytes at {start}: outside the file or the buffer"
            )));
        }
        let span = Span {
            unit: Unit::Head,
            start: a,
            len: b - a,
            tensors: Vec::new(),
        };
        let t = Instant::now();
        self.source
            .read(&span, &mut self.buf)
            .map_err(|e| EngineError::Read(self.source.path.display().to_string(), e))?;
        Ok((span.len, t.elapsed().as_secs_f64()))
    }
}

/// A test and benchmark feature (off unless asked for): caps the
/// streamer's storage read bandwidth, so that one machine can stand for a
/// device with slower storage. Reads stay real (O_DIRECT, the same bytes);
/// a read of `n` bytes then takes at least `n / bytes_per_s`: the reader
/// sleeps for the rest. Numerics are untouched.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ReadPace {
    /// Bytes per second; must be positive.
    pub bytes_per_s: f64,
}

impl ReadPace {
    /// The time a read of `bytes` takes at this pace.
    fn seconds(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_s.max(1.0))
    }
}

/// Paces a sequence of reads at [`ReadPace::bytes_per_s`]: a read of
/// `bytes` is due `bytes / rate` after it started, and the reader sleeps
/// until then. A read that the host made late (its disk busy with other
/// work, so the real read outlasted the paced time) is made up by the
/// next one, which is due earlier by as much (at most its own paced
/// time), so that the host's hiccups do not slow the emulated device.
#[derive(Debug, Default)]
struct ReadClock {
    /// How late the last read finished past its due time.
    late: Duration,
}

impl ReadClock {
    /// Sleeps until a read of `bytes` begun at `started` is due.
    fn wait(&mut self, pace: Option<ReadPace>, started: Instant, bytes: u64) {
        let Some(p) = pace.filter(|p| p.bytes_per_s > 0.0) else {
            return;
        };
        let t = p.seconds(bytes);
        let due = started + t - self.late.min(t);
        let now = Instant::now();
        match due.checked_duration_since(now) {
            Some(rest) => {
                std::thread::sleep(rest);
                self.late = Duration::ZERO;
            }
            None => self.late = now - due,
        }
    }
}

/// Streams the units of a placement, in the order a step uses them.
pub struct Streamer {
    mode: StreamMode,
    pace: Option<ReadPace>,
    clock: ReadClock,
    spans: Arc<Vec<Span>>,
    slots: Arc<Slots>,
    /// Position in `spans` of the unit compute needs next.
    next: usize,
    ready: Option<Receiver<Loaded>>,
    free: Option<Sender<usize>>,
    source: Option<Arc<Source>>,
    thread: Option<JoinHandle<()>>,
    stats: LoadStats,
}

impl Streamer {
    /// Starts streaming `units` of `model` (in use order) through `k`
    /// slots. `k` is ignored in on-demand mode, which uses one.
    pub fn start(
        model: &Model,
        units: &[Unit],
        k: usize,
        mode: StreamMode,
    ) -> Result<Streamer, EngineError> {
        Streamer::start_paced(model, units, k, mode, None)
    }

    /// [`Streamer::start`] with reads paced to `pace` (a benchmark
    /// feature; `None`: as fast as the storage goes).
    pub fn start_paced(
        model: &Model,
        units: &[Unit],
        k: usize,
        mode: StreamMode,
        pace: Option<ReadPace>,
    ) -> Result<Streamer, EngineError> {
        let source = Arc::new(Source::of_model(model)?);
        let spans: Arc<Vec<Span>> = Arc::new(units.iter().map(|&u| Span::of(model, u)).collect());
        let slot_len = spans.iter().map(|s| s.len).max().unwrap_or(ALIGN) as usize;
        let k = if mode == StreamMode::OnDemand {
            1
        } else {
            k.max(1)
        };
        let slots = Arc::new(Slots(
            (0..k)
                .map(|_| slot_buffer(slot_len).map(UnsafeCell::new))
                .collect::<Result<_, _>>()
                .map_err(EngineError::Memory)?,
        ));
        let mut s = Streamer {
            mode,
            pace,
            clock: ReadClock::default(),
            spans: spans.clone(),
            slots: slots.clone(),
            next: 0,
            ready: None,
            free: None,
            source: Some(source.clone()),
            thread: None,
            stats: LoadStats {
                direct_io: source.direct,
                ..LoadStats::default()
            },
        };
        if mode == StreamMode::Prefetch && !spans.is_empty() {
            let (free_tx, free_rx) = channel::<usize>();
            let (ready_tx, ready_rx) = channel::<Loaded>();
            for i in 0..k {
                let _ = free_tx.send(i);
            }
            let thread = std::thread::Builder::new()
                .name("loip-loader".into())
                .spawn(move || load_loop(source, spans, slots, pace, free_rx, ready_tx))
                .map_err(EngineError::Memory)?;
            s.ready = Some(ready_rx);
            s.free = Some(free_tx);
            s.thread = Some(thread);
        }
        Ok(s)
    }

    /// The streamed units, in use order.
    pub fn units(&self) -> impl Iterator<Item = Unit> + '_ {
        self.spans.iter().map(|s| s.unit)
    }

    pub fn streams(&self, unit: Unit) -> bool {
        self.spans.iter().any(|s| s.unit == unit)
    }

    /// Bytes of memory the slots take.
    pub fn slot_bytes(&self) -> usize {
        // SAFETY: only the length is read, which never changes.
        self.slots
            .0
            .iter()
            .map(|s| unsafe { (&*s.get()).len() })
            .sum()
    }

    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats = LoadStats {
            direct_io: self.stats.direct_io,
            ..LoadStats::default()
        };
    }

    /// Waits for `unit`, which must be the next streamed unit of the step.
    /// A wait counts as a loading bubble.
    pub fn acquire(&mut self, unit: Unit) -> Slot {
        let pos = self.next;
        // The next acquire is for the unit after this one, whether or not
        // this slot is still held then (a window visited by several
        // micro-batches holds its streamed units until the visit ends).
        self.next = (pos + 1) % self.spans.len();
        if self.spans[pos].unit != unit {
            return Slot {
                idx: usize::MAX,
                pos,
                error: Some(format!(
                    "loader out of step: expected {}, got {unit}",
                    self.spans[pos].unit
                )),
            };
        }
        match self.mode {
            StreamMode::OnDemand => {
                let t = Instant::now();
                let source = self
                    .source
                    .as_ref()
                    .expect("on-demand streamer has a source");
                // SAFETY: in on-demand mode compute alone owns the slot.
                let buf = unsafe { &mut *self.slots.0[0].get() };
                let result = source.read(&self.spans[pos], buf);
                self.clock.wait(self.pace, t, self.spans[pos].len);
                let dt = t.elapsed().as_secs_f64();
                self.stats.bubbles += 1;
                self.stats.bubble_s += dt;
                self.stats.read_s += dt;
                self.stats.units_read += 1;
                self.stats.bytes_read += self.spans[pos].len;
                Slot {
                    idx: 0,
                    pos,
                    error: result.err(),
                }
            }
            StreamMode::Prefetch => {
                let rx = self
                    .ready
                    .as_ref()
                    .expect("prefetching streamer has a channel");
                let loaded = match rx.try_recv() {
                    Ok(l) => Ok(l),
                    Err(TryRecvError::Empty) => {
                        let t = Instant::now();
                        let l = rx.recv_timeout(Duration::from_secs(600));
                        self.stats.bubbles += 1;
                        self.stats.bubble_s += t.elapsed().as_secs_f64();
                        l.map_err(|_| "the loader thread stopped".to_string())
                    }
                    Err(TryRecvError::Disconnected) => Err("the loader thread stopped".to_string()),
                };
                match loaded {
                    Ok(l) => {
                        self.stats.units_read += 1;
                        self.stats.bytes_read += l.bytes;
                        self.stats.read_s += l.read_s;
                        let mut result = l.result;
                        if result.is_err() && l.pos == pos {
                            // The read ahead may have met a moment when
                            // storage failed: read once more, now, before
                            // failing the step, so that a failure that has
                            // passed does not fail a later request.
                            let t = Instant::now();
                            let source = self.source.as_ref().expect("streamer has a source");
                            // SAFETY: compute owns the slot from `ready`
                            // until `release` (module docs).
                            let buf = unsafe { &mut *self.slots.0[l.slot].get() };
                            result = source.read(&self.spans[pos], buf);
                            let dt = t.elapsed().as_secs_f64();
                            self.stats.bubbles += 1;
                            self.stats.bubble_s += dt;
                            self.stats.read_s += dt;
                        }
                        let error = result.err().or_else(|| {
                            (l.pos != pos)
                                .then(|| format!("loader delivered unit {} for {}", l.pos, pos))
                        });
                        Slot {
                            idx: l.slot,
                            pos,
                            error,
                        }
                    }
                    Err(e) => Slot {
                        idx: usize::MAX,
                        pos,
                        error: Some(e),
                    },
                }
            }
        }
    }

    /// The weights of the unit in `slot`, or the error that loading it hit.
    pub fn view<'a>(
        &'a self,
        model: &'a Model,
        slot: &Slot,
    ) -> Result<super::weights::UnitWeights<'a>, EngineError> {
        if let Some(e) = &slot.error {
            return Err(EngineError::Read(
                self.spans[slot.pos].unit.to_string(),
                e.clone(),
            ));
        }
        // SAFETY: compute owns the slot until `release` (module docs).
        let buf: &'a [u8] = unsafe { &*self.slots.0[slot.idx].get() };
        let span = &self.spans[slot.pos];
        model.unit_weights(span.unit, |t: &TensorInfo| {
            let &(_, off, len) = span
                .tensors
                .iter()
                .find(|(n, _, _)| *n == t.name)
                .ok_or_else(|| EngineError::NotResident(t.name.clone()))?;
            Ok((&buf[off..off + len], Packing::Gguf))
        })
    }

    /// Gives the slot back to the loader. Slots may be held several at a
    /// time (at most the streamer's [`Streamer::slots`], or the loader
    /// waits for one forever) and given back in any order.
    pub fn release(&mut self, slot: Slot) {
        if slot.idx != usize::MAX {
            if let Some(free) = &self.free {
                let _ = free.send(slot.idx);
            }
        }
    }

    /// Slots: how many streamed units may be held at once. In on-demand
    /// mode one, whose buffer the next acquire overwrites.
    pub fn slots(&self) -> usize {
        self.slots.0.len()
    }

    /// After a failed step, takes and releases the rest of the step's units
    /// so that the loader and compute agree on where the next step starts.
    pub fn finish_step(&mut self) {
        while self.next != 0 {
            let unit = self.spans[self.next].unit;
            let slot = self.acquire(unit);
            if slot.idx == usize::MAX {
                // The loader is gone: nothing left to keep in step.
                self.next = 0;
                return;
            }
            self.release(slot);
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // Closing the free channel ends the loader loop.
        self.free = None;
        self.ready = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The loader thread: fills free slots with the units in cyclic use order.
fn load_loop(
    source: Arc<Source>,
    spans: Arc<Vec<Span>>,
    slots: Arc<Slots>,
    pace: Option<ReadPace>,
    free: Receiver<usize>,
    ready: Sender<Loaded>,
) {
    let mut pos = 0;
    let mut clock = ReadClock::default();
    while let Ok(slot) = free.recv() {
        let span = &spans[pos];
        // SAFETY: the loader owns `slot` between `free` and `ready`.
        let buf = unsafe { &mut *slots.0[slot].get() };
        let t = Instant::now();
        let result = source.read(span, buf);
        clock.wait(pace, t, span.len);
        let loaded = Loaded {
            slot,
            pos,
            result,
            bytes: span.len,
            read_s: t.elapsed().as_secs_f64(),
        };
        if ready.send(loaded).is_err() {
            return;
        }
        pos = (pos + 1) % spans.len();
    }
}
