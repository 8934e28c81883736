//! The MMU: segmentation (offset → linear) and paging (linear → physical) with a TLB.

pub(crate) mod paging;
pub(crate) mod segment;

use iced_x86::{Instruction, OpKind, Register};

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
    #[inline]
    pub fn read_lin(&mut self, lin: u64, buf: &mut [u8], sup: bool) -> Flow {
        self.read_lin_as(lin, buf, sup, Kind::Read)
    }

    /// Reads at linear `lin` with the paging checks of `kind`: `Kind::Write` for the read of a
    /// read-modify-write instruction, which the processor makes with write intent.
    pub(crate) fn read_lin_as(&mut self, lin: u64, buf: &mut [u8], sup: bool, kind: Kind) -> Flow {
        let m = self.lin_mask();
        let lin = lin & m;
        let first = usize::try_from(0x1000 - (lin & 0xfff)).unwrap_or(0x1000).min(buf.len());
        let pa = self.translate(lin, kind, sup)?;
        if first == buf.len() {
            return self.phys_read(pa, buf);
        }
        let lin2 = lin.wrapping_add(first as u64) & m;
        let pa2 = self.translate(lin2, kind, sup)?;
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

    /// Reads `bytes` at `seg:off` for a read-modify-write instruction: the segment is checked
    /// for a write and the page translated for a write, so a fault reports W/R = 1 and sets
    /// the dirty bit. SDM Vol. 3A §4.7: W/R is the access that caused the fault; the processor
    /// makes the first access of a read-modify-write (CMPXCHG, ADD m, SHL m, XCHG m, …) with
    /// write intent, and hardware reports W/R = 1 for it (KVM, fixtures/corpus
    /// rmw-page-fault-write-bit.json).
    pub fn read_mem_rmw(&mut self, seg: Register, off: u64, bytes: u32) -> Flow<u64> {
        let lin = self.seg_linear(seg, off, bytes, true)?;
        let mut b = [0u8; 8];
        let n = (bytes as usize).min(8);
        self.read_lin_as(lin, &mut b[..n], false, Kind::Write)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `read_op` for the destination of a read-modify-write instruction: a memory operand is
    /// read with write intent (`read_mem_rmw`); registers as `read_op` reads them.
    pub fn read_op_rmw(&mut self, ins: &Instruction, op: u32) -> Flow<u64> {
        if ins.op_kind(op) == OpKind::Register || !Self::is_mem(ins, op) {
            return self.read_op(ins, op);
        }
        let (seg, off) = self.mem_addr(ins, op);
        let n = self.op_bytes(ins, op);
        self.read_mem_rmw(seg, off, n)
    }
}
