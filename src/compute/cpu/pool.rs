//! A persistent pool of compute threads.
//!
//! A decode step runs a couple of hundred small matrix-vector products, so
//! the cost of handing out work matters more than its balance: workers spin
//! on an epoch counter for a short while after each job, then park. Rayon's
//! join or a scoped spawn per product costs several times more per step
//! (DESIGN.md §8), which is why this is written here rather than taken from
//! a crate.
//!
//! Concurrency contract: `run` hands the same `&dyn Fn(thread, n_threads)` to
//! every thread and returns only after all of them have returned from it, so
//! the closure may borrow from the caller's stack. Each thread owns the part
//! of the output its index selects; the closure must not write elsewhere.
//! Compute threads are plain OS threads, never async runtime workers.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    epoch: AtomicU64,
    /// The current job; valid while `pending > 0` for the current epoch.
    job: UnsafeCell<Option<&'static Job>>,
    pending: AtomicUsize,
    asleep: Vec<AtomicBool>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the dispatching thread while every worker
// waits for the next epoch, and read by workers only after they observe it.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    /// Serializes callers: one job at a time.
    dispatch: Mutex<()>,
}

impl Pool {
    /// A pool of `n_threads` threads in total, the calling thread included.
    pub fn new(n_threads: usize) -> Pool {
        let n = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            asleep: (0..n).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let workers = (1..n)
            .map(|idx| {
                let s = shared.clone();
                let handle = thread::Builder::new()
                    .name(format!("loip-compute-{idx}"))
                    .spawn(move || worker(s, idx, n))
                    .expect("spawning a compute thread");
                let t = handle.thread().clone();
                (handle, t)
            })
            .collect();
        Pool {
            shared,
            workers,
            dispatch: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(thread, n_threads)` on every thread and waits for all.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.n_threads();
        if n == 1 {
            job(0, 1);
            return;
        }
        let _guard = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: workers only read `job` after seeing the new epoch, and we
        // wait below until all of them are done with it before returning.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<
                &(dyn Fn(usize, usize) + Sync + '_),
                &'static Job,
            >(job));
        }
        s.pending.store(n - 1, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (i, (_, t)) in self.workers.iter().enumerate() {
            if s.asleep[i + 1].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        let caller = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0, n)));
        let start = Instant::now();
        while s.pending.load(Ordering::Acquire) != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        if let Err(p) = caller {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a compute thread panicked");
        }
    }
}

fn worker(s: Arc<Shared>, idx: usize, n: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                s.asleep[idx].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    thread::park_timeout(Duration::from_millis(100));
                }
                s.asleep[idx].store(false, Ordering::SeqCst);
            }
        };
        seen = epoch;
        // SAFETY: the dispatcher set `job` before bumping the epoch and keeps
        // it alive until `pending` reaches zero.
        let Some(job) = (unsafe { *s.job.get() }) else {
            s.pending.fetch_sub(1, Ordering::AcqRel);
            continue;
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(idx, n))).is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (h, t) in self.workers.drain(..) {
            t.unpark();
            let _ = h.join();
        }
    }
}

/// The contiguous share `[start, end)` of `n` items that thread `idx` of
/// `n_threads` owns, in units of `align` items (the last share takes the rest).
pub fn share(n: usize, idx: usize, n_threads: usize, align: usize) -> (usize, usize) {
    let units = n.div_ceil(align);
    let start = (units * idx / n_threads * align).min(n);
    let end = (units * (idx + 1) / n_threads * align).min(n);
    (start, end)
}

/// A raw pointer that may be shared with pool threads writing disjoint parts.
pub struct SendPtr<T>(pub *mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer; a method, so closures capture the whole `SendPtr`.
    pub fn get(self) -> *mut T {
        self.0
    }
}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_once_per_job() {
        let pool = Pool::new(3);
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }

    #[test]
    fn shares_cover_the_range_without_overlap() {
        for n in [0, 1, 7, 64, 575, 49152] {
            for threads in 1..6 {
                let mut next = 0;
                for i in 0..threads {
                    let (s, e) = share(n, i, threads, 4);
                    assert_eq!(s, next);
                    assert!(e >= s);
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = Pool::new(2);
        std::thread::sleep(Duration::from_millis(5));
        let hit = AtomicUsize::new(0);
        pool.run(&|_, _| {
            hit.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hit.load(Ordering::SeqCst), 2);
    }
}
