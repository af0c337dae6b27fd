//! The two baselines of DESIGN.md §6, planned and simulated by the same
//! code as `loip` so that comparisons are fair.
//!
//! - `contiguous`: every device, in the given order, one window each; unit
//!   counts in proportion to the memory budgets; units that do not fit are
//!   streamed into one slot, read when the window's input arrives (no
//!   prefetch).
//! - `ring` (prima.cpp's piped ring): every device, in the given order, `k`
//!   rounds of windows of equal size (sizes differ by at most one unit,
//!   larger ones first), with as many slots as a window has units, so that
//!   a whole window can be prefetched; `k` is the smallest number of rounds
//!   for which every device can hold those slots beside its KV cache and
//!   scratch: prima.cpp's rule of enough rounds that each window fits in
//!   memory.
//!
//! Both keep as many units resident as fit (the page cache does this for
//! prima.cpp's mmap-ed weights). Both use the micro-batching with the best
//! simulated throughput.

use super::cost::Costs;
use super::placement::{Layout, Loading};
use super::search::{choose_micro_batches, does_not_fit, fill_all, proportional, SearchInfo};
use super::{PlanError, Planner};

/// The devices a baseline uses: all, in the given order, or the first `U`
/// when there are more devices than units.
fn all_devices(costs: &Costs) -> Vec<usize> {
    (0..costs.n_devices().min(costs.n_units())).collect()
}

/// The contiguous layout, residency filled; `Err(overflow)` if a device
/// cannot hold its share.
fn contiguous_try(costs: &Costs) -> Result<Layout, u64> {
    let ring = all_devices(costs);
    let sizes = proportional(costs, &ring, costs.n_units(), 1);
    let mut layout = Layout::ring(ring, &sizes, 1, Loading::OnDemand);
    if fill_all(costs, &mut layout) {
        Ok(layout)
    } else {
        layout.streamed.iter_mut().for_each(|s| *s = true);
        Err(costs.overflow(&layout))
    }
}

/// Equal window sizes for `k` rounds over `r` devices.
fn equal_sizes(u: usize, r: usize, k: usize) -> Vec<usize> {
    let w = k * r;
    (0..w).map(|i| u / w + usize::from(i < u % w)).collect()
}

fn ring_try(costs: &Costs) -> Result<Layout, u64> {
    let ring = all_devices(costs);
    let (u, r) = (costs.n_units(), ring.len());
    let mut overflow = u64::MAX;
    for k in 1..=u / r {
        let slots = u.div_ceil(k * r) as u32;
        let mut layout = Layout::ring(
            ring.clone(),
            &equal_sizes(u, r, k),
            slots,
            Loading::Prefetch,
        );
        // A window's worth of slots must fit beside KV and scratch.
        layout.streamed.iter_mut().for_each(|s| *s = true);
        let windows_fit =
            (0..r).all(|pos| costs.memory(&layout, pos).total() <= costs.budget(ring[pos]));
        overflow = overflow.min(costs.overflow(&layout));
        if windows_fit && fill_all(costs, &mut layout) {
            return Ok(layout);
        }
    }
    Err(overflow)
}

/// The contiguous baseline's layout before micro-batching, if it fits.
pub(crate) fn contiguous_layout(costs: &Costs) -> Option<Layout> {
    contiguous_try(costs).ok()
}

/// The ring baseline's layout before micro-batching, if it fits.
pub(crate) fn ring_layout(costs: &Costs) -> Option<Layout> {
    ring_try(costs).ok()
}

fn finish(
    costs: &Costs,
    planner: Planner,
    tried: Result<Layout, u64>,
) -> Result<(Layout, SearchInfo), PlanError> {
    let mut layout = tried.map_err(|overflow| does_not_fit(costs, planner, overflow))?;
    choose_micro_batches(costs, &mut layout);
    Ok((
        layout,
        SearchInfo {
            exhaustive: false,
            evaluations: 1,
        },
    ))
}

pub(crate) fn contiguous(costs: &Costs) -> Result<(Layout, SearchInfo), PlanError> {
    finish(costs, Planner::Contiguous, contiguous_try(costs))
}

pub(crate) fn ring(costs: &Costs) -> Result<(Layout, SearchInfo), PlanError> {
    finish(costs, Planner::Ring, ring_try(costs))
}
