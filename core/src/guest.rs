//! What to load before a run: guest RAM size, optional ROM, byte images and the start state.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::state::CpuState;
use crate::GuestMemory;

/// Largest RAM a guest may ask for: RAM sits below the 32-bit MMIO hole at 3 GiB.
pub const MAX_RAM: u64 = 0xc000_0000;

/// A byte image placed at a guest physical address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Load {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Everything needed to start a guest identically on any backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guest {
    /// Name shown in reports.
    pub name: String,
    /// Bytes of RAM, mapped from guest physical 0.
    pub ram_size: u64,
    /// Extra memory regions outside RAM (e.g. a firmware image just below 4 GiB): base and size.
    pub extra_regions: Vec<(u64, u64)>,
    /// Images copied into memory before the run, in order (later ones overwrite earlier ones).
    pub loads: Vec<Load>,
    /// The CPU state at the first instruction.
    pub state: CpuState,
}

/// An error preparing guest memory.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    /// RAM size is zero, not page-aligned or too large.
    #[error("guest RAM of {size:#x} bytes is not possible: it must be a non-zero multiple of 4 KiB and at most 3 GiB")]
    BadRamSize {
        /// The size asked for.
        size: u64,
    },
    /// A region overlaps another or is not page-aligned.
    #[error("memory region {base:#x}+{size:#x} is misaligned or overlaps RAM or another region")]
    BadRegion {
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// An image does not fit in the memory it is loaded into.
    #[error("image `{what}` of {len} bytes at {addr:#x} does not fit in guest memory (RAM is {ram:#x} bytes); use a larger --mem or a lower load address")]
    DoesNotFit {
        /// What was being loaded.
        what: String,
        /// Load address.
        addr: u64,
        /// Length.
        len: usize,
        /// RAM size.
        ram: u64,
    },
    /// vm-memory refused to create the mapping.
    #[error("cannot allocate guest memory: {0}")]
    Alloc(String),
}

impl Guest {
    /// A guest with `ram_size` bytes of RAM, nothing loaded, in the RESET state.
    pub fn new(name: impl Into<String>, ram_size: u64) -> Self {
        Guest {
            name: name.into(),
            ram_size,
            extra_regions: Vec::new(),
            loads: Vec::new(),
            state: CpuState::reset(),
        }
    }

    /// Adds an image at `addr`.
    pub fn load(&mut self, addr: u64, bytes: impl Into<Vec<u8>>) -> &mut Self {
        self.loads.push(Load { addr, bytes: bytes.into() });
        self
    }

    /// The memory regions (base, size) this guest needs, RAM first.
    pub fn regions(&self) -> Result<Vec<(u64, u64)>, GuestError> {
        let size = self.ram_size;
        if size == 0 || size % 4096 != 0 || size > MAX_RAM {
            return Err(GuestError::BadRamSize { size });
        }
        let mut regions = vec![(0, size)];
        for &(base, size) in &self.extra_regions {
            let bad = GuestError::BadRegion { base, size };
            let end = base.checked_add(size).ok_or(bad.clone())?;
            if size == 0 || base % 4096 != 0 || size % 4096 != 0 || end > 1 << 40 {
                return Err(bad);
            }
            if regions.iter().any(|&(b, s)| base < b + s && b < end) {
                return Err(bad);
            }
            regions.push((base, size));
        }
        Ok(regions)
    }

    /// Allocates fresh guest memory and copies every image into it.
    pub fn build_memory(&self) -> Result<Arc<GuestMemory>, GuestError> {
        let ranges: Vec<(GuestAddress, usize)> =
            self.regions()?.iter().map(|&(b, s)| (GuestAddress(b), s as usize)).collect();
        let mem = GuestMemory::from_ranges(&ranges).map_err(|e| GuestError::Alloc(e.to_string()))?;
        self.load_into(&mem)?;
        Ok(Arc::new(mem))
    }

    /// Copies every image into `mem` (used to reset memory between runs).
    pub fn load_into(&self, mem: &GuestMemory) -> Result<(), GuestError> {
        for (i, l) in self.loads.iter().enumerate() {
            mem.write_slice(&l.bytes, GuestAddress(l.addr)).map_err(|_| GuestError::DoesNotFit {
                what: format!("{} #{i}", self.name),
                addr: l.addr,
                len: l.bytes.len(),
                ram: self.ram_size,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_land_in_memory_and_oversized_ones_are_refused() {
        let mut g = Guest::new("t", 0x10000);
        g.load(0xfff0, vec![1, 2, 3]);
        let mem = g.build_memory().unwrap();
        let mut b = [0u8; 3];
        mem.read_slice(&mut b, GuestAddress(0xfff0)).unwrap();
        assert_eq!(b, [1, 2, 3]);
        g.load(0xfff0, vec![0; 0x20]);
        assert!(matches!(g.build_memory(), Err(GuestError::DoesNotFit { addr: 0xfff0, len: 0x20, .. })));
    }

    #[test]
    fn ram_size_and_regions_are_validated() {
        assert!(Guest::new("t", 0).regions().is_err());
        assert!(Guest::new("t", 4097).regions().is_err());
        assert!(Guest::new("t", MAX_RAM + 4096).regions().is_err());
        let mut g = Guest::new("t", 0x10000);
        g.extra_regions.push((0xffff_0000, 0x10000));
        assert_eq!(g.regions().unwrap(), vec![(0, 0x10000), (0xffff_0000, 0x10000)]);
        g.extra_regions.push((0x8000, 0x1000));
        assert!(g.regions().is_err());
    }
}
