//! Guest RAM by host pointer: a small cache from guest physical pages to the host addresses
//! of their mappings, so a RAM access is a table probe and a copy instead of vm-memory's
//! region search and checked slice copy. The interpreter's only unsafe code is here.
//!
//! Why the pointers stay valid: `HostPages` holds an `Arc` of the `GuestMemoryMmap` they point
//! into. A `GuestMemoryMmap` is immutable (adding a region makes a new one), each region owns
//! its mmap until the region is dropped, and the regions live as long as the memory — so as
//! long as this cache. Only whole pages inside one region are cached, and every access stays
//! within its page.

use std::cell::Cell;
use std::sync::Arc;

use duet_core::vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use duet_core::GuestMemory;

/// Sets of cached pages (a power of two), indexed by the page number's low bits.
const SETS: usize = 64;
/// Cached pages in all: two ways per set (set `i` is slots `i` and `i + SETS`), so a copy
/// between two buffers a multiple of `SETS` pages apart keeps both pages.
const SLOTS: usize = 2 * SETS;
/// Page size.
const PAGE: u64 = 0x1000;

/// What a cached-page access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Done: the bytes were RAM.
    Done,
    /// Nothing done: no byte of the page is RAM (MMIO).
    NotRam,
    /// Nothing done: the range crosses a page, or the page is only partly RAM.
    Slow,
}

/// A cached page: RAM at a host address, or no RAM at all.
#[derive(Clone, Copy, Debug)]
enum Page {
    Ram(*mut u8),
    Mmio,
    Mixed,
}

/// Host addresses of recently used guest RAM pages.
pub(crate) struct HostPages {
    /// The memory the cached addresses point into; holding it keeps the mappings alive.
    mem: Arc<GuestMemory>,
    /// Per slot: the cached page number + 1, or 0.
    tags: [Cell<u64>; SLOTS],
    /// Per slot: the host address of the cached page's first byte; null for a page with no
    /// RAM (the regions never change, so that is cached too).
    base: [Cell<*mut u8>; SLOTS],
}

// SAFETY: the raw pointers are addresses into mappings owned by `mem`, which is itself `Send`;
// `HostPages` is used by one thread at a time (it is not `Sync`, the `Cell`s see to that).
unsafe impl Send for HostPages {}

impl std::fmt::Debug for HostPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPages").finish_non_exhaustive()
    }
}

impl HostPages {
    /// An empty cache over `mem`.
    pub fn new(mem: Arc<GuestMemory>) -> Self {
        HostPages {
            mem,
            tags: std::array::from_fn(|_| Cell::new(0)),
            base: std::array::from_fn(|_| Cell::new(std::ptr::null_mut())),
        }
    }

    /// The page holding `pa`: its slot in the first way, else in the second.
    #[inline(always)]
    fn page(&self, pa: u64) -> Page {
        let pfn = pa / PAGE;
        let i = (pfn as usize) & (SETS - 1);
        let hit = |way: usize| {
            let (tag, base) = (self.tags.get(way)?, self.base.get(way)?);
            (tag.get() == pfn + 1).then(|| base.get())
        };
        match hit(i).or_else(|| hit(i + SETS)) {
            Some(p) if p.is_null() => Page::Mmio,
            Some(p) => Page::Ram(p),
            None => self.fill(pfn, i),
        }
    }

    /// Looks `pfn` up in the regions and caches it in the first way of set `i`, the page there
    /// moving to the second way (the least recently filled one drops out).
    #[inline(never)]
    fn fill(&self, pfn: u64, i: usize) -> Page {
        let (Some(tag0), Some(base0), Some(tag1), Some(base1)) =
            (self.tags.get(i), self.base.get(i), self.tags.get(i + SETS), self.base.get(i + SETS))
        else {
            return Page::Mixed;
        };
        let page = self.lookup(pfn);
        if let Page::Ram(_) | Page::Mmio = page {
            tag1.set(tag0.get());
            base1.set(base0.get());
            tag0.set(pfn + 1);
            base0.set(if let Page::Ram(p) = page { p } else { std::ptr::null_mut() });
        }
        page
    }

    /// What guest page `pfn` is: all RAM (and its host address), no RAM, or partly RAM.
    fn lookup(&self, pfn: u64) -> Page {
        let Some(start) = pfn.checked_mul(PAGE) else { return Page::Mixed };
        let end = start.saturating_add(PAGE);
        if let Some(r) = self.mem.find_region(GuestAddress(start)) {
            let off = start - r.start_addr().0;
            if off.saturating_add(PAGE) <= r.len() {
                if let Ok(p) = r.get_host_address(MemoryRegionAddress(off)) {
                    return Page::Ram(p);
                }
            }
            return Page::Mixed;
        }
        if self.mem.iter().any(|r| r.start_addr().0 < end && r.start_addr().0.saturating_add(r.len()) > start)
        {
            return Page::Mixed;
        }
        Page::Mmio
    }

    /// Reads `buf.len()` bytes of RAM at `pa` when they lie in one page that is all RAM.
    #[inline(always)]
    pub fn read(&self, pa: u64, buf: &mut [u8]) -> Access {
        let off = (pa % PAGE) as usize;
        if off + buf.len() > PAGE as usize {
            return Access::Slow;
        }
        let p = match self.page(pa) {
            Page::Ram(p) => p,
            Page::Mmio => return Access::NotRam,
            Page::Mixed => return Access::Slow,
        };
        // SAFETY: `p` is the host address of a whole guest page inside a live mapping (module
        // doc), and `off + buf.len()` is at most the page size, so the source range is inside
        // that mapping; `buf` is a distinct host buffer. Guest RAM is plain bytes (any value is
        // valid) and nothing else writes it while this vCPU runs: a `Machine` runs its vCPU and
        // its devices on one thread, as vm-memory's `get_host_address` requires of its users.
        unsafe { copy(p.add(off), buf.as_mut_ptr(), buf.len()) };
        Access::Done
    }

    /// Writes `data` to RAM at `pa` when it lies in one page that is all RAM.
    #[inline(always)]
    pub fn write(&self, pa: u64, data: &[u8]) -> Access {
        let off = (pa % PAGE) as usize;
        if off + data.len() > PAGE as usize {
            return Access::Slow;
        }
        let p = match self.page(pa) {
            Page::Ram(p) => p,
            Page::Mmio => return Access::NotRam,
            Page::Mixed => return Access::Slow,
        };
        // SAFETY: as in `read`: the destination range lies inside one page of a live, writable
        // (MAP_SHARED read/write) guest RAM mapping, `data` is a distinct host buffer, and no
        // other access to guest RAM runs concurrently with this vCPU.
        unsafe { copy(data.as_ptr(), p.add(off), data.len()) };
        Access::Done
    }
}

/// `copy_nonoverlapping` with the common operand widths as fixed-size copies (a load and a
/// store instead of a call to `memcpy`).
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping(src, dst, len)`.
#[inline(always)]
unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `len` readable bytes at `src`, `len` writable bytes at
    // `dst`, and no overlap; each arm copies exactly `len` bytes, unaligned.
    unsafe {
        match len {
            1 => *dst = *src,
            2 => dst.cast::<[u8; 2]>().write_unaligned(src.cast::<[u8; 2]>().read_unaligned()),
            4 => dst.cast::<[u8; 4]>().write_unaligned(src.cast::<[u8; 4]>().read_unaligned()),
            8 => dst.cast::<[u8; 8]>().write_unaligned(src.cast::<[u8; 8]>().read_unaligned()),
            _ => std::ptr::copy_nonoverlapping(src, dst, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use duet_core::vm_memory::Bytes;

    use super::*;

    #[test]
    fn reads_and_writes_reach_guest_ram_and_stop_at_its_end() {
        let mem = duet_core::Guest::new("unit", 0x3000).build_memory().unwrap_or_else(|e| panic!("{e}"));
        let h = HostPages::new(mem.clone());
        assert_eq!(h.write(0x1ffc, &[1, 2, 3, 4]), Access::Done);
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x1ffc)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, [1, 2, 3, 4]);
        mem.write_slice(&[9, 8], GuestAddress(0x2000)).unwrap_or_else(|e| panic!("{e}"));
        let mut c = [0u8; 2];
        assert_eq!(h.read(0x2000, &mut c), Access::Done);
        assert_eq!(c, [9, 8]);
        // Crossing a page is the general path's business; past RAM is MMIO (twice: now cached).
        assert_eq!(h.read(0x1fff, &mut c), Access::Slow);
        assert_eq!(h.read(0x3000, &mut c), Access::NotRam);
        assert_eq!(h.write(0x3000, &c), Access::NotRam);
        // A page only partly RAM is the general path's too.
        let odd = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1800)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(HostPages::new(Arc::new(odd)).read(0x1900, &mut c), Access::Slow);
        // A page and another SETS pages on do not mix.
        let big = duet_core::Guest::new("unit", 0x80000).build_memory().unwrap_or_else(|e| panic!("{e}"));
        let h = HostPages::new(big.clone());
        let far = 0x2000 + SETS as u64 * PAGE;
        assert_eq!((h.write(0x2000, &[1]), h.write(far, &[2])), (Access::Done, Access::Done));
        let mut one = [0u8];
        assert!(h.read(0x2000, &mut one) == Access::Done && one == [1]);
        assert!(h.read(far, &mut one) == Access::Done && one == [2]);
    }

    /// Whether page `pfn` is cached.
    fn cached(h: &HostPages, pfn: u64) -> bool {
        h.tags.iter().any(|t| t.get() == pfn + 1)
    }

    #[test]
    fn two_buffers_a_power_of_two_apart_stay_cached_and_a_full_set_evicts_correctly() {
        let mem = duet_core::Guest::new("unit", 0x40_0000).build_memory().unwrap_or_else(|e| panic!("{e}"));
        let h = HostPages::new(mem.clone());
        // A copy from 2 MiB to 3 MiB touches pages 0x200 + k and 0x300 + k in turn.
        let mut b = [0u8; 8];
        for k in 0..16u64 {
            assert_eq!(h.read((0x200 + k) * PAGE, &mut b), Access::Done);
            assert_eq!(h.write((0x300 + k) * PAGE, &b), Access::Done);
        }
        assert!((0..16u64).all(|k| cached(&h, 0x200 + k) && cached(&h, 0x300 + k)));
        // Three pages of one set: each access still reaches its own page.
        let set = |pfn: u64| (pfn as usize) & (SETS - 1);
        let same: Vec<u64> = (1..0x400u64).filter(|&p| set(p) == set(0)).take(3).collect();
        assert_eq!(same.len(), 3);
        for (i, &p) in same.iter().enumerate() {
            assert_eq!(h.write(p * PAGE, &[i as u8 + 1]), Access::Done);
        }
        for _ in 0..2 {
            for (i, &p) in same.iter().enumerate() {
                let mut one = [0u8];
                assert!(h.read(p * PAGE, &mut one) == Access::Done && one == [i as u8 + 1]);
            }
        }
        // The two most recently filled pages of the set are the ones kept.
        assert!(cached(&h, same[1]) && cached(&h, same[2]) && !cached(&h, same[0]));
    }
}
