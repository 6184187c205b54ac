//! The addon's global allocator: the system allocator, plus a small cache of freed large blocks
//! that are handed out again to requests of the same size.
//!
//! Why: a training step allocates and frees the same multi-megabyte activation and gradient
//! buffers every step. glibc serves blocks that large with fresh mmaps (or trims them back to
//! the kernel), so each step page-faults every page of them in again, and on a multi-core VM
//! each of those faults costs a TLB shootdown to the other cores. Profiled on ConvMAE-B
//! pretraining in steady state (2-core VM, benches/results/profile-cpu-2026-11-26.md): 7.7% of
//! the samples in the kernel without this cache, 3.8% with it. Keeping freed blocks of the sizes
//! a step uses turns those faults into cache hits.
//!
//! Policy: requests of at least `MIN_BLOCK` bytes are rounded up to a size class (eight classes
//! per power of two, so at most 12.5% more), because the same tensor is not always the same
//! request: rayon's parallel collects grow their buffers in steps. Freed blocks go to the cache,
//! up to `SLOTS` blocks and `capacity` bytes in all: to make room, the blocks freed longest ago
//! are handed back to the system (a step's buffers recur within the step, so the recent ones
//! are the ones asked for again). A request of the same class and alignment takes one back
//! (zeroed first when `alloc_zeroed` asks). Everything smaller goes straight to the system
//! allocator. The cache never allocates, so the global
//! allocator cannot recurse into itself. `CONVMAE_BLOCK_CACHE_MB` sets the capacity (0 turns the
//! cache off); the default is 1024 MiB.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Smallest block kept: below this glibc's own free lists serve reuse well.
pub const MIN_BLOCK: usize = 1 << 20;
/// Most blocks kept at once (a fixed array: the cache must not allocate).
pub const SLOTS: usize = 64;
const DEFAULT_CAPACITY_MB: usize = 1024;
/// Capacity not read from the environment yet.
const UNSET: usize = usize::MAX;

/// The size class of a large request: `size` rounded up to a multiple of an eighth of its
/// power of two.
pub fn class_size(size: usize) -> usize {
    if size < MIN_BLOCK {
        return size;
    }
    let step = (1usize << (usize::BITS - 1 - size.leading_zeros())) / 8;
    size.div_ceil(step) * step
}

/// The layout actually requested from the inner allocator (and cached) for `layout`.
fn class_layout(layout: Layout) -> Layout {
    // SAFETY: rounding a valid size up to a multiple of a power of two at most the size keeps it
    // within isize::MAX for any size a real allocator could serve (the inner allocator refuses
    // the rest), and the alignment is unchanged.
    unsafe { Layout::from_size_align_unchecked(class_size(layout.size()), layout.align()) }
}

#[derive(Clone, Copy)]
struct Slot {
    ptr: *mut u8,
    size: usize,
    align: usize,
    /// When it was freed (a counter): the oldest go first when room is needed.
    freed_at: u64,
}

struct Slots {
    slots: [Option<Slot>; SLOTS],
    bytes: usize,
    frees: u64,
}

// SAFETY: the pointers are owned blocks nobody else references while they sit in the cache.
unsafe impl Send for Slots {}

/// A cache of freed blocks in front of an allocator `A`.
pub struct BlockCache<A: GlobalAlloc> {
    inner: A,
    cache: Mutex<Slots>,
    capacity: AtomicUsize,
}

impl<A: GlobalAlloc> BlockCache<A> {
    /// A cache of at most `capacity` bytes (`UNSET`: read `CONVMAE_BLOCK_CACHE_MB` on first use).
    pub const fn new(inner: A, capacity: Option<usize>) -> Self {
        Self {
            inner,
            cache: Mutex::new(Slots { slots: [None; SLOTS], bytes: 0, frees: 0 }),
            capacity: AtomicUsize::new(match capacity {
                Some(c) => c,
                None => UNSET,
            }),
        }
    }

    fn capacity(&self) -> usize {
        let c = self.capacity.load(Ordering::Relaxed);
        if c != UNSET {
            return c;
        }
        // std::env::var allocates (a small String): fine, small requests bypass the cache.
        let mb = std::env::var("CONVMAE_BLOCK_CACHE_MB").ok().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(DEFAULT_CAPACITY_MB);
        let c = mb.saturating_mul(1 << 20);
        self.capacity.store(c, Ordering::Relaxed);
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding the lock leaves the slots consistent (each update is one write).
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached block of exactly this layout, if one is kept.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let mut c = self.lock();
        let i = c.slots.iter().position(|s| matches!(s, Some(s) if s.size == layout.size() && s.align == layout.align()))?;
        let slot = c.slots[i].take()?;
        c.bytes -= slot.size;
        Some(slot.ptr)
    }

    /// Keeps a freed block, handing the oldest kept blocks back to the inner allocator to make
    /// room; false when the block alone exceeds the capacity (the caller then frees it).
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        let capacity = self.capacity();
        if layout.size() > capacity {
            return false;
        }
        let mut c = self.lock();
        loop {
            let full = !c.slots.iter().any(Option::is_none);
            if c.bytes + layout.size() <= capacity && !full {
                break;
            }
            let oldest = (0..SLOTS).filter(|&i| c.slots[i].is_some()).min_by_key(|&i| c.slots[i].map_or(u64::MAX, |s| s.freed_at));
            let Some(slot) = oldest.and_then(|i| c.slots[i].take()) else { return false };
            c.bytes -= slot.size;
            // SAFETY: the block came from the inner allocator with this size and alignment.
            unsafe { self.inner.dealloc(slot.ptr, Layout::from_size_align_unchecked(slot.size, slot.align)) };
        }
        let free = c.slots.iter().position(Option::is_none).expect("a slot was freed above");
        c.frees += 1;
        let freed_at = c.frees;
        c.slots[free] = Some(Slot { ptr, size: layout.size(), align: layout.align(), freed_at });
        c.bytes += layout.size();
        true
    }

    /// Bytes held in the cache now.
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }
}

unsafe impl<A: GlobalAlloc> GlobalAlloc for BlockCache<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < MIN_BLOCK {
            return self.inner.alloc(layout);
        }
        let class = class_layout(layout);
        self.take(class).unwrap_or_else(|| self.inner.alloc(class))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < MIN_BLOCK {
            return self.inner.alloc_zeroed(layout);
        }
        let class = class_layout(layout);
        match self.take(class) {
            Some(p) => {
                // Zeroing memory already mapped is far cheaper than faulting in fresh zero pages.
                std::ptr::write_bytes(p, 0, layout.size());
                p
            }
            None => self.inner.alloc_zeroed(class),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < MIN_BLOCK {
            return self.inner.dealloc(ptr, layout);
        }
        let class = class_layout(layout);
        if !self.keep(ptr, class) {
            self.inner.dealloc(ptr, class)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN_BLOCK && new_size < MIN_BLOCK {
            return self.inner.realloc(ptr, layout, new_size);
        }
        // Through alloc / dealloc so that both sizes can come from and go to the cache.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;
    use std::sync::atomic::AtomicUsize;

    /// The system allocator, counting the calls that reach it.
    struct Counting {
        allocs: AtomicUsize,
        frees: AtomicUsize,
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            self.allocs.fetch_add(1, Ordering::Relaxed);
            System.alloc(l)
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            self.frees.fetch_add(1, Ordering::Relaxed);
            System.dealloc(p, l)
        }
    }

    fn cache(capacity: usize) -> BlockCache<Counting> {
        BlockCache::new(Counting { allocs: AtomicUsize::new(0), frees: AtomicUsize::new(0) }, Some(capacity))
    }

    #[test]
    fn a_freed_large_block_serves_the_next_request_of_its_size_zeroed_when_asked() {
        let c = cache(64 << 20);
        let l = Layout::from_size_align(3 << 20, 64).unwrap();
        unsafe {
            let p = c.alloc(l);
            std::ptr::write_bytes(p, 0xAB, l.size());
            c.dealloc(p, l);
            assert_eq!(c.cached_bytes(), 3 << 20);
            assert_eq!(c.inner.frees.load(Ordering::Relaxed), 0);
            let q = c.alloc_zeroed(l);
            assert_eq!(q, p, "the cached block is handed back");
            assert!(std::slice::from_raw_parts(q, l.size()).iter().all(|&b| b == 0));
            assert_eq!(c.cached_bytes(), 0);
            // Another size or alignment does not match.
            c.dealloc(q, l);
            let other = Layout::from_size_align(3 << 20, 128).unwrap();
            let r = c.alloc(other);
            assert_ne!(r, q);
            c.dealloc(r, other);
            assert_eq!(c.inner.allocs.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn small_blocks_bypass_and_the_capacity_and_slot_limits_hold() {
        let c = cache(5 << 20);
        let small = Layout::from_size_align(1000, 8).unwrap();
        let big = Layout::from_size_align(2 << 20, 8).unwrap();
        unsafe {
            let s = c.alloc(small);
            c.dealloc(s, small);
            assert_eq!((c.cached_bytes(), c.inner.frees.load(Ordering::Relaxed)), (0, 1));
            // Two 2 MiB blocks fit in 5 MiB: the third freed evicts the first.
            let blocks: Vec<*mut u8> = (0..3).map(|_| c.alloc(big)).collect();
            for &b in &blocks {
                c.dealloc(b, big);
            }
            assert_eq!(c.cached_bytes(), 4 << 20);
            assert_eq!(c.inner.frees.load(Ordering::Relaxed), 2);
            let (x, y) = (c.alloc(big), c.alloc(big));
            assert!([x, y].contains(&blocks[1]) && [x, y].contains(&blocks[2]), "the two most recent are kept");
            c.dealloc(x, big);
            c.dealloc(y, big);
            // A block larger than the whole cache is freed at once.
            let huge = Layout::from_size_align(6 << 20, 8).unwrap();
            let h = c.alloc(huge);
            c.dealloc(h, huge);
            assert_eq!(c.cached_bytes(), 4 << 20);
        }
        let c = cache(usize::MAX / 2);
        let l = Layout::from_size_align(MIN_BLOCK, 8).unwrap();
        unsafe {
            let blocks: Vec<*mut u8> = (0..SLOTS + 3).map(|_| c.alloc(l)).collect();
            for &b in &blocks {
                c.dealloc(b, l);
            }
            assert_eq!(c.cached_bytes(), SLOTS * MIN_BLOCK);
            assert_eq!(c.inner.frees.load(Ordering::Relaxed), 3, "the three oldest were handed back");
            for &b in &blocks[..3] {
                assert_ne!(c.alloc(l), b);
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_the_threshold() {
        let c = cache(64 << 20);
        let l = Layout::from_size_align(4096, 8).unwrap();
        unsafe {
            let p = c.alloc(l);
            for i in 0..4096 {
                *p.add(i) = (i % 251) as u8;
            }
            let q = c.realloc(p, l, 2 << 20);
            let grown = Layout::from_size_align(2 << 20, 8).unwrap();
            assert!((0..4096).all(|i| *q.add(i) == (i % 251) as u8));
            let r = c.realloc(q, grown, 100);
            assert!((0..100).all(|i| *r.add(i) == (i % 251) as u8));
            assert_eq!(c.cached_bytes(), 2 << 20, "the grown block went to the cache");
            c.dealloc(r, Layout::from_size_align(100, 8).unwrap());
        }
    }

    #[test]
    fn requests_in_one_size_class_share_blocks() {
        assert_eq!(class_size(1000), 1000);
        assert_eq!(class_size(MIN_BLOCK), MIN_BLOCK);
        assert_eq!(class_size(MIN_BLOCK + 1), MIN_BLOCK + MIN_BLOCK / 8);
        // A [6272, 1024] f32 buffer (24.5 MiB) takes a 26 MiB block (steps of 2 MiB above 16 MiB).
        assert_eq!(class_size(25_690_112), 27_262_976);
        for size in [MIN_BLOCK, 3 << 20, 25_690_112, (1 << 30) + 5] {
            let c = class_size(size);
            assert!(c >= size && c - size <= size / 8, "{size} -> {c}");
        }
        let c = cache(64 << 20);
        let (a, b) = (Layout::from_size_align(5_000_000, 8).unwrap(), Layout::from_size_align(5_100_000, 8).unwrap());
        unsafe {
            let p = c.alloc(a);
            c.dealloc(p, a);
            let q = c.alloc(b);
            assert_eq!(p, q, "5.0 and 5.1 MB are one class");
            std::ptr::write_bytes(q, 1, b.size());
            c.dealloc(q, b);
        }
        assert_eq!(c.inner.allocs.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_capacity_of_zero_turns_the_cache_off() {
        let c = cache(0);
        let l = Layout::from_size_align(2 << 20, 8).unwrap();
        unsafe {
            let p = c.alloc(l);
            c.dealloc(p, l);
        }
        assert_eq!((c.cached_bytes(), c.inner.frees.load(Ordering::Relaxed)), (0, 1));
    }
}
