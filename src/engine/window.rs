//! The window executor: a contiguous range of units run on a batch of
//! hidden states, with each sequence's KV cache for just those layers.
//!
//! A window that starts at the first layer embeds its tokens; one that ends
//! with the head applies the output norm and the head and gives logits; any
//! other takes `n_embd` f32 per token from the previous window and hands as
//! many to the next. The single-node [`forward`](super::forward::forward)
//! is this executor on one window that holds every unit, so both paths run
//! the same per-unit code in the same order and give the same bits.
//!
//! # Streaming
//!
//! A node streams the streamed units of all its windows through one
//! [`Streamer`], cyclically, in the order the node runs them (its windows
//! in plan order). Each run of a window takes exactly that window's
//! streamed units from the streamer, in order, even when it fails part-way
//! (the rest are taken and released unused), so the loader stays in step
//! and reads the next window's units while this one computes. A node that
//! must pass over a window without running it calls [`skip_window`].

use super::forward::{
    embed, load_hidden, prepare_positions, run_unit, validate, with_unit, Scratch, TokenIn,
};
use super::kv::KvCache;
use super::loader::{Slot, Streamer};
use super::weights::{Model, Unit};
use super::EngineError;
use crate::compute::cpu::Pool;

/// Where a window's residual stream comes from.
#[derive(Clone, Copy, Debug)]
pub enum WindowInput<'a> {
    /// The batch's token ids are embedded here (the first window).
    Embed,
    /// `n_embd` values per token of the batch, from the previous window.
    Hidden(&'a [f32]),
}

/// What a window runs with: the model, compute threads, reusable buffers
/// and the node's streamer.
pub struct Exec<'a> {
    pub model: &'a Model,
    pub pool: &'a Pool,
    pub scratch: &'a mut Scratch,
    pub streamer: Option<&'a mut Streamer>,
    /// A test and benchmark feature: each unit's run is stretched to this
    /// many times its compute time ([`stretch`]); 1 (or less): off.
    pub compute_factor: f64,
}

impl Exec<'_> {
    /// Runs `units` (consecutive, in use order) on `batch`, appending each
    /// token's keys and values for those layers to its sequence's cache.
    /// When the window ends with the head, `logits` receives a row of
    /// `n_vocab` per token of `want`; otherwise the residual stream is left
    /// in [`Scratch::hidden`] for the next window.
    pub fn run(
        &mut self,
        units: &[Unit],
        input: WindowInput<'_>,
        batch: &[TokenIn],
        caches: &mut [KvCache],
        want: &[usize],
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let prepared = self.prepare(input, batch, caches);
        if let Err(e) = prepared {
            skip_window(self.streamer.as_deref_mut(), units);
            return Err(e);
        }
        let factor = self.compute_factor;
        for (i, &unit) in units.iter().enumerate() {
            let (model, pool) = (self.model, self.pool);
            let scratch = &mut *self.scratch;
            let r = with_unit(model, self.streamer.as_deref_mut(), unit, |w| {
                let clock = ComputeClock::start(pool, factor);
                run_unit(model, pool, scratch, w, unit, batch, caches, want, logits);
                clock.stretch();
            });
            if let Err(e) = r {
                skip_window(self.streamer.as_deref_mut(), &units[i + 1..]);
                return Err(e);
            }
        }
        for tok in batch {
            caches[tok.seq].set_len(tok.pos + 1);
        }
        Ok(())
    }

    /// As [`Exec::run`], but the window's streamed units stay taken after
    /// the run, in `held`, for the next micro-batch of the same visit: the
    /// first run takes them from the streamer (in order), later runs reuse
    /// them, and [`Held::finish`] gives them back. A run that fails leaves
    /// the streamer as it is; `finish` takes what no run took.
    #[allow(clippy::too_many_arguments)]
    pub fn run_held(
        &mut self,
        units: &[Unit],
        input: WindowInput<'_>,
        batch: &[TokenIn],
        caches: &mut [KvCache],
        want: &[usize],
        logits: &mut Vec<f32>,
        held: &mut Held,
    ) -> Result<(), EngineError> {
        self.prepare(input, batch, caches)?;
        let factor = self.compute_factor;
        for &unit in units {
            let (model, pool) = (self.model, self.pool);
            let scratch = &mut *self.scratch;
            let streamed = self.streamer.as_deref().is_some_and(|s| s.streams(unit));
            let weights = if streamed {
                let s = self.streamer.as_deref_mut().expect("a streamer streams it");
                if !held.slots.iter().any(|(u, _)| *u == unit) {
                    held.slots.push((unit, s.acquire(unit)));
                }
                let (_, slot) = held
                    .slots
                    .iter()
                    .find(|(u, _)| *u == unit)
                    .expect("just taken");
                s.view(model, slot)?
            } else {
                model.weights(unit)?
            };
            let clock = ComputeClock::start(pool, factor);
            run_unit(
                model, pool, scratch, weights, unit, batch, caches, want, logits,
            );
            clock.stretch();
        }
        for tok in batch {
            caches[tok.seq].set_len(tok.pos + 1);
        }
        Ok(())
    }

    fn prepare(
        &mut self,
        input: WindowInput<'_>,
        batch: &[TokenIn],
        caches: &mut [KvCache],
    ) -> Result<(), EngineError> {
        let embeds = matches!(input, WindowInput::Embed);
        validate(self.model, batch, caches, embeds)?;
        match input {
            WindowInput::Embed => embed(self.model, self.scratch, batch)?,
            WindowInput::Hidden(h) => load_hidden(self.model, self.scratch, batch.len(), h)?,
        }
        prepare_positions(self.model, self.scratch, batch, caches);
        Ok(())
    }
}

/// A window's streamed units held across the runs of one visit
/// ([`Exec::run_held`]).
#[derive(Default)]
pub struct Held {
    slots: Vec<(Unit, Slot)>,
}

impl Held {
    /// Whether no streamed unit is held (none taken in this visit yet).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Ends the visit of the window of `units`: takes, in order, the
    /// streamed units no run took (so that the streamer moves on to the
    /// next window's), and gives every slot back.
    pub fn finish(&mut self, streamer: Option<&mut Streamer>, units: &[Unit]) {
        let Some(s) = streamer else {
            self.slots.clear();
            return;
        };
        // The held units come first in the streamer's order: give them
        // back before taking the rest, one at a time, so that the loader
        // has slots to read them into.
        let held: Vec<Unit> = self.slots.iter().map(|(u, _)| *u).collect();
        for (_, slot) in self.slots.drain(..) {
            s.release(slot);
        }
        for &u in units {
            if s.streams(u) && !held.contains(&u) {
                let slot = s.acquire(u);
                s.release(slot);
            }
        }
    }
}

/// The compute time of one unit's run, for the emulated slowdown.
///
/// With one compute thread the time is the thread's CPU time, so that time
/// the host gave to other processes is not stretched too (the benchmark
/// runs several nodes on a few shared cores); with more threads, whose
/// work that clock misses, it is wall time.
struct ComputeClock {
    factor: f64,
    wall: std::time::Instant,
    cpu: Option<std::time::Duration>,
}

impl ComputeClock {
    fn start(pool: &Pool, factor: f64) -> ComputeClock {
        let cpu = (factor > 1.0 && pool.n_threads() == 1)
            .then(thread_cpu_time)
            .flatten();
        ComputeClock {
            factor,
            wall: std::time::Instant::now(),
            cpu,
        }
    }

    /// Sleeps, while the unit's slot is still held, until the run has
    /// taken `factor` times its compute time: a device that much slower,
    /// loader and links unchanged.
    fn stretch(self) {
        if self.factor <= 1.0 {
            return;
        }
        let spent = match (self.cpu, thread_cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => self.wall.elapsed(),
        };
        let target = spent.mul_f64(self.factor);
        if let Some(rest) = target.checked_sub(self.wall.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing into a local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Takes and releases, unused, the streamed units among `units`, so that
/// the streamer moves on to the next window's units.
pub fn skip_window(streamer: Option<&mut Streamer>, units: &[Unit]) {
    let Some(s) = streamer else { return };
    for &u in units {
        if s.streams(u) {
            let slot = s.acquire(u);
            s.release(slot);
        }
    }
}

/// The engine units of planner units `range` (planner unit `l < n_layer`
/// is decoder layer `l`, attention then MLP; `n_layer` is the head).
pub fn engine_units(n_layer: usize, range: std::ops::Range<usize>) -> Vec<Unit> {
    range
        .flat_map(|u| {
            if u < n_layer {
                vec![Unit::Attn(u), Unit::Mlp(u)]
            } else {
                vec![Unit::Head]
            }
        })
        .collect()
}
