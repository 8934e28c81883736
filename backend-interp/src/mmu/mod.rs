//! The MMU: segmentation (offset → linear) and paging (linear → physical) with a TLB.

pub(crate) mod paging;
pub(crate) mod segment;

use crate::cpu::{Cpu, Flow};

/// What a linear access does, for the paging permission checks (SDM Vol. 3A §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Exec,
}

impl Cpu {
    /// Mask of linear addresses: 32 bits outside IA-32e mode.
    fn lin_mask(&self) -> u64 {
        if self.long_mode() {
            u64::MAX
        } else {
            0xffff_ffff
        }
    }

    /// Reads `buf.len()` bytes at linear `lin`; `sup` marks implicit supervisor accesses (GDT, IDT, TSS).
    pub fn read_lin(&mut self, lin: u64, buf: &mut [u8], sup: bool) -> Flow {
        let m = self.lin_mask();
        let lin = lin & m;
        let first = usize::try_from(0x1000 - (lin & 0xfff)).unwrap_or(0x1000).min(buf.len());
        let pa = self.translate(lin, Kind::Read, sup)?;
        if first == buf.len() {
            return self.phys_read(pa, buf);
        }
        let lin2 = lin.wrapping_add(first as u64) & m;
        let pa2 = self.translate(lin2, Kind::Read, sup)?;
        let (a, b) = buf.split_at_mut(first);
        self.phys_read(pa, a)?;
        self.phys_read(pa2, b)
    }

    /// Writes `data` at linear `lin` after translating every page it touches (no partial write on #PF).
    pub fn write_lin(&mut self, lin: u64, data: &[u8], sup: bool) -> Flow {
        let m = self.lin_mask();
        let lin = lin & m;
        let first = usize::try_from(0x1000 - (lin & 0xfff)).unwrap_or(0x1000).min(data.len());
        let pa = self.translate(lin, Kind::Write, sup)?;
        if first == data.len() {
            return self.phys_write(pa, data);
        }
        let lin2 = lin.wrapping_add(first as u64) & m;
        let pa2 = self.translate(lin2, Kind::Write, sup)?;
        let (a, b) = data.split_at(first);
        self.phys_write(pa, a)?;
        self.phys_write(pa2, b)
    }

    /// Reads a little-endian value of `bytes` (1–8) at linear `lin`.
    pub fn read_lin_u(&mut self, lin: u64, bytes: u32, sup: bool) -> Flow<u64> {
        let mut b = [0u8; 8];
        let n = (bytes as usize).min(8);
        self.read_lin(lin, &mut b[..n], sup)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes the low `bytes` (1–8) bytes of `v` at linear `lin`.
    pub fn write_lin_u(&mut self, lin: u64, bytes: u32, v: u64, sup: bool) -> Flow {
        let n = (bytes as usize).min(8);
        self.write_lin(lin, &v.to_le_bytes()[..n], sup)
    }
}
