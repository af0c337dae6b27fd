//! A persistent pool of compute threads.
//!
//! A decode step runs a couple of hundred small matrix-vector products, so
//! the cost of handing out work matters more than its balance: workers spin
//! on the task counter for a short while after each job, then park. Rayon's
//! join or a scoped spawn per product costs several times more per step
//! (DESIGN.md §8), which is why this is written here rather than taken from
//! a crate.
//!
//! A job is split into tasks that threads claim from a shared counter, so a
//! thread the OS has not scheduled yet delays nobody: the others take its
//! tasks. Which thread runs a task never changes what the task computes, so
//! results do not depend on scheduling.
//!
//! Concurrency contract: `run` returns only after every task has returned,
//! so the job may borrow from the caller's stack. The counter packs the
//! job's epoch with the next task index; a thread claims a task only with a
//! compare-and-swap that also checks the epoch, so a late thread can never
//! run a task of a job that has already ended. The task count is tagged
//! with its epoch as well, and a thread uses it only for that epoch: a late
//! thread that read the next job's (larger) count with the old epoch's
//! counter would claim a task index past the old job's end, run that task
//! of the next job early and count it twice, and `run` would wait for
//! ever. Each task owns the part of
//! the output its index selects and must not write elsewhere. Compute
//! threads are plain OS threads, never async runtime workers.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(100);
/// Spins between looks at the clock: reading it costs more than a spin,
/// and a spinner that reads it every time answers a new job later.
const SPINS_PER_CLOCK: u32 = 64;

/// Counts spins and tells when `SPIN` has passed, reading the clock only
/// every `SPINS_PER_CLOCK` spins (and first after that many).
struct Spinner {
    spins: u32,
    start: Option<Instant>,
}

impl Spinner {
    fn new() -> Spinner {
        Spinner {
            spins: 0,
            start: None,
        }
    }

    /// Whether `SPIN` has passed since the first clock read.
    fn expired(&mut self) -> bool {
        self.spins += 1;
        if !self.spins.is_multiple_of(SPINS_PER_CLOCK) {
            return false;
        }
        self.start.get_or_insert_with(Instant::now).elapsed() >= SPIN
    }
}

/// `job(task, n_tasks, thread)`.
type Job = dyn Fn(usize, usize, usize) + Sync;

struct Shared {
    /// `epoch << 32 | next task`.
    next: AtomicU64,
    /// `epoch << 32 | number of tasks`.
    bound: AtomicU64,
    done: AtomicUsize,
    /// The current job; valid while its epoch's tasks are unfinished.
    job: UnsafeCell<Option<&'static Job>>,
    asleep: Vec<AtomicBool>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the dispatching thread between epochs,
// and read by a thread only after it has claimed a task of the current
// epoch, which keeps the epoch (and the job) alive until the task is done.
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
            next: AtomicU64::new(0),
            bound: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            asleep: (0..n).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let workers = (1..n)
            .map(|idx| {
                let s = shared.clone();
                let handle = thread::Builder::new()
                    .name(format!("loip-compute-{idx}"))
                    .spawn(move || worker(s, idx))
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

    /// Runs `job(task, n_tasks, thread)` for every task in `0..n_tasks`
    /// across the threads, and waits for all of them.
    pub fn run(&self, n_tasks: usize, job: &(dyn Fn(usize, usize, usize) + Sync)) {
        if self.workers.is_empty() || n_tasks <= 1 {
            for t in 0..n_tasks {
                job(t, n_tasks, 0);
            }
            return;
        }
        let _guard = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let epoch = (s.next.load(Ordering::Relaxed) >> 32) + 1;
        // SAFETY: no task of the previous epoch is running (we waited for
        // all of them), and we wait below for every task of this one.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<
                &(dyn Fn(usize, usize, usize) + Sync + '_),
                &'static Job,
            >(job));
        }
        assert!(n_tasks <= u32::MAX as usize, "too many tasks");
        s.bound
            .store(epoch << 32 | n_tasks as u64, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.next.store(epoch << 32, Ordering::SeqCst);
        for (i, (_, t)) in self.workers.iter().enumerate() {
            if s.asleep[i + 1].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        let caller = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(s, epoch, 0)));
        let mut spin = Spinner::new();
        while s.done.load(Ordering::Acquire) != n_tasks {
            if !spin.expired() {
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

/// Claims and runs tasks of `epoch` until none are left.
fn work(s: &Shared, epoch: u64, thread: usize) {
    loop {
        let v = s.next.load(Ordering::Acquire);
        if v >> 32 != epoch {
            return;
        }
        let task = (v & 0xffff_ffff) as usize;
        // The count of this epoch's job only (module docs): `bound` is
        // stored before `next`, so an epoch read from `next` has its count
        // in `bound` already, unless a later job replaced it, in which case
        // this epoch is over.
        let b = s.bound.load(Ordering::Acquire);
        if b >> 32 != epoch {
            return;
        }
        let n = (b & 0xffff_ffff) as usize;
        if task >= n {
            return;
        }
        if s.next
            .compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: the claimed task keeps this epoch, and its job, alive.
        if let Some(job) = unsafe { *s.job.get() } {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(task, n, thread)))
                .is_err()
            {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        let mut spin = Spinner::new();
        let epoch = loop {
            let e = s.next.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            if !spin.expired() {
                std::hint::spin_loop();
            } else {
                s.asleep[idx].store(true, Ordering::SeqCst);
                if s.next.load(Ordering::SeqCst) >> 32 == seen && !s.stop.load(Ordering::SeqCst) {
                    thread::park_timeout(Duration::from_millis(100));
                }
                s.asleep[idx].store(false, Ordering::SeqCst);
            }
        };
        seen = epoch;
        work(&s, epoch, idx);
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
    fn every_task_runs_once_per_job() {
        let pool = Pool::new(3);
        for round in 0..1000 {
            let n_tasks = 1 + round % 11;
            let hits: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n_tasks, &|t, n, thread| {
                assert_eq!(n, n_tasks);
                assert!(thread < 3);
                hits[t].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }

    /// A late worker must never take the task count of the next job for
    /// its own: it would run a task of that job twice and count one task
    /// too many, and `run` would then wait for ever. Jobs of alternating
    /// sizes on more threads than cores make the window likely; a watchdog
    /// turns a hang into a failure.
    #[test]
    fn late_workers_never_run_a_task_of_the_next_job() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = Pool::new(4);
            for round in 0..1_000_000usize {
                let n_tasks = if round % 2 == 0 { 2 } else { 16 };
                let hits: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n_tasks, &|t, n, _| {
                    assert_eq!(n, n_tasks);
                    hits[t].fetch_add(1, Ordering::SeqCst);
                });
                if let Some(t) = hits.iter().position(|h| h.load(Ordering::SeqCst) != 1) {
                    let _ = tx.send(Err(format!("round {round}: task {t} ran twice or never")));
                    return;
                }
            }
            let _ = tx.send(Ok(()));
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("the pool hung: a job never saw all its tasks done"),
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
        pool.run(2, &|_, _, _| {
            hit.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hit.load(Ordering::SeqCst), 2);
    }
}
