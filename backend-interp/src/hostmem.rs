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

/// Cached pages (a power of two), direct-mapped on the page number.
const SLOTS: usize = 64;
/// Page size.
const PAGE: u64 = 0x1000;

/// Host addresses of recently used guest RAM pages.
pub(crate) struct HostPages {
    /// The memory the cached addresses point into; holding it keeps the mappings alive.
    mem: Arc<GuestMemory>,
    /// Per slot: the cached page number + 1, or 0.
    tags: [Cell<u64>; SLOTS],
    /// Per slot: the host address of the cached page's first byte.
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

    /// The host address of the first byte of the RAM page holding `pa`, or `None` where that
    /// page is not wholly RAM (MMIO, or a region that ends inside the page).
    #[inline(always)]
    fn page(&self, pa: u64) -> Option<*mut u8> {
        let pfn = pa / PAGE;
        let i = (pfn as usize) & (SLOTS - 1);
        let (tag, base) = (self.tags.get(i)?, self.base.get(i)?);
        if tag.get() == pfn + 1 {
            return Some(base.get());
        }
        self.fill(pfn, tag, base)
    }

    #[inline(never)]
    fn fill(&self, pfn: u64, tag: &Cell<u64>, base: &Cell<*mut u8>) -> Option<*mut u8> {
        let start = pfn.checked_mul(PAGE)?;
        let r = self.mem.find_region(GuestAddress(start))?;
        let off = start - r.start_addr().0;
        if off.checked_add(PAGE)? > r.len() {
            return None;
        }
        let p = r.get_host_address(MemoryRegionAddress(off)).ok()?;
        tag.set(pfn + 1);
        base.set(p);
        Some(p)
    }

    /// Reads `buf.len()` bytes of RAM at `pa` when they lie in one cached-or-cacheable page;
    /// `false` (nothing read) otherwise, for the caller's general path.
    #[inline(always)]
    pub fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        let off = (pa % PAGE) as usize;
        if off + buf.len() > PAGE as usize {
            return false;
        }
        let Some(p) = self.page(pa) else { return false };
        // SAFETY: `p` is the host address of a whole guest page inside a live mapping (module
        // doc), and `off + buf.len()` is at most the page size, so the source range is inside
        // that mapping; `buf` is a distinct host buffer. Guest RAM is plain bytes (any value is
        // valid) and nothing else writes it while this vCPU runs: a `Machine` runs its vCPU and
        // its devices on one thread, as vm-memory's `get_host_address` requires of its users.
        unsafe { std::ptr::copy_nonoverlapping(p.add(off), buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Writes `data` to RAM at `pa` when it lies in one cached-or-cacheable page; `false`
    /// (nothing written) otherwise, for the caller's general path.
    #[inline(always)]
    pub fn write(&self, pa: u64, data: &[u8]) -> bool {
        let off = (pa % PAGE) as usize;
        if off + data.len() > PAGE as usize {
            return false;
        }
        let Some(p) = self.page(pa) else { return false };
        // SAFETY: as in `read`: the destination range lies inside one page of a live, writable
        // (MAP_SHARED read/write) guest RAM mapping, `data` is a distinct host buffer, and no
        // other access to guest RAM runs concurrently with this vCPU.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(off), data.len()) };
        true
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
        assert!(h.write(0x1ffc, &[1, 2, 3, 4]));
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x1ffc)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, [1, 2, 3, 4]);
        mem.write_slice(&[9, 8], GuestAddress(0x2000)).unwrap_or_else(|e| panic!("{e}"));
        let mut c = [0u8; 2];
        assert!(h.read(0x2000, &mut c));
        assert_eq!(c, [9, 8]);
        // Crossing a page, or past RAM: the general path's business.
        assert!(!h.read(0x1fff, &mut c));
        assert!(!h.read(0x3000, &mut c));
        assert!(!h.write(0x3000, &c));
        // A page and another SLOTS pages on share a slot without mixing.
        let big = duet_core::Guest::new("unit", 0x80000).build_memory().unwrap_or_else(|e| panic!("{e}"));
        let h = HostPages::new(big.clone());
        let far = 0x2000 + SLOTS as u64 * PAGE;
        assert!(h.write(0x2000, &[1]) && h.write(far, &[2]));
        let mut one = [0u8];
        assert!(h.read(0x2000, &mut one) && one == [1]);
        assert!(h.read(far, &mut one) && one == [2]);
    }
}
