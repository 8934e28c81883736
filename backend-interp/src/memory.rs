//! Physical memory access: RAM through vm-memory, everything else as staged MMIO.

use std::collections::VecDeque;

use duet_core::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::cpu::{Abort, Cpu, Flow};
use crate::hostmem::Access;

/// What the last exit left for the run loop to fill in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// An MMIO read of `len` bytes at `addr`: the scratch buffer holds the data at the next run.
    Mmio {
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
    },
    /// A port read of `size` bytes: the scratch buffer holds the data at the next run.
    Port {
        /// Width in bytes.
        size: u8,
    },
}

/// Data of MMIO and port accesses that cross an exit: the instruction is re-executed with it.
#[derive(Debug, Default)]
pub(crate) struct IoStage {
    /// MMIO reads the run loop completed for the current instruction, in program order:
    /// (address, length, data) — no allocation per read.
    reads: Vec<(u64, usize, [u8; 16])>,
    /// Next entry of `reads` a re-executed access consumes.
    cursor: usize,
    /// The value the run loop supplied for the current IN/INS.
    pub port_in: Option<u32>,
    /// MMIO writes not yet handed to the run loop, oldest first.
    pub writes: VecDeque<(u64, Vec<u8>)>,
    /// Length of `writes` when the current attempt began (writes of an aborted attempt are dropped).
    writes_mark: usize,
    /// What the last exit waits for.
    pub awaiting: Option<Awaiting>,
    /// The buffer lent to the run loop with an exit.
    pub scratch: [u8; 16],
}

impl IoStage {
    /// Starts (or restarts) executing an instruction.
    #[inline]
    pub fn begin(&mut self) {
        self.cursor = 0;
        self.writes_mark = self.writes.len();
    }

    /// The instruction retired or raised an exception: its staged reads are used up.
    #[inline]
    pub fn finish(&mut self) {
        if !self.reads.is_empty() {
            self.reads.clear();
        }
        self.cursor = 0;
        self.port_in = None;
    }

    /// The attempt aborted to fetch data: drop the writes it queued (they will be queued again).
    pub fn rollback_writes(&mut self) {
        self.writes.truncate(self.writes_mark);
    }

    /// Whether an instruction is waiting to be re-executed with data the run loop supplied.
    pub fn resuming(&self) -> bool {
        !self.reads.is_empty() || self.port_in.is_some()
    }

    /// The run loop filled the scratch buffer: record it for the re-executed instruction.
    pub fn complete(&mut self) {
        match self.awaiting.take() {
            Some(Awaiting::Mmio { addr, len }) => {
                self.reads.push((addr, len.min(16), self.scratch));
            }
            Some(Awaiting::Port { size }) => {
                let mut b = [0u8; 4];
                let n = usize::from(size).min(4);
                b[..n].copy_from_slice(&self.scratch[..n]);
                self.port_in = Some(u32::from_le_bytes(b));
            }
            None => {}
        }
    }
}

impl Cpu {
    /// Reads RAM at `pa`; `false` where any byte is not RAM. One region lookup and a copy when
    /// the range lies in one region (the common case), else vm-memory's general path.
    #[inline]
    pub fn ram_read(&self, pa: u64, buf: &mut [u8]) -> bool {
        match self.host.read(pa, buf) {
            Access::Done => true,
            Access::NotRam => false,
            Access::Slow => self.ram_read_slow(pa, buf),
        }
    }

    /// `ram_read` past the page cache: ranges crossing a page, MMIO, partial pages.
    #[inline(never)]
    fn ram_read_slow(&self, pa: u64, buf: &mut [u8]) -> bool {
        if let Some(r) = self.mem.find_region(GuestAddress(pa)) {
            let off = pa - r.start_addr().0;
            if off.saturating_add(buf.len() as u64) <= r.len() {
                return r.read_slice(buf, MemoryRegionAddress(off)).is_ok();
            }
        }
        self.mem.read_slice(buf, GuestAddress(pa)).is_ok()
    }

    /// Writes RAM at `pa`; `false` where any byte is not RAM (as `ram_read`).
    #[inline]
    pub fn ram_write(&self, pa: u64, data: &[u8]) -> bool {
        match self.host.write(pa, data) {
            Access::Done => true,
            Access::NotRam => false,
            Access::Slow => self.ram_write_slow(pa, data),
        }
    }

    /// `ram_write` past the page cache.
    #[inline(never)]
    fn ram_write_slow(&self, pa: u64, data: &[u8]) -> bool {
        if let Some(r) = self.mem.find_region(GuestAddress(pa)) {
            let off = pa - r.start_addr().0;
            if off.saturating_add(data.len() as u64) <= r.len() {
                return r.write_slice(data, MemoryRegionAddress(off)).is_ok();
            }
        }
        self.mem.write_slice(data, GuestAddress(pa)).is_ok()
    }

    /// Reads guest physical memory; an unbacked address is MMIO (an exit, then re-execution).
    pub fn phys_read(&mut self, pa: u64, buf: &mut [u8]) -> Flow {
        if self.ram_read(pa, buf) {
            return Ok(());
        }
        if self.delivering {
            buf.fill(0xff);
            return Ok(());
        }
        let io = &mut self.io;
        match io.reads.get(io.cursor) {
            Some((addr, len, data)) if *addr == pa && *len == buf.len() => {
                buf.copy_from_slice(data.get(..*len).unwrap_or(&[]));
                io.cursor += 1;
                Ok(())
            }
            _ => Err(Abort::MmioRead { addr: pa, len: buf.len() }),
        }
    }

    /// Writes guest physical memory (dropping decoded instructions of the pages written) or queues MMIO.
    pub fn phys_write(&mut self, pa: u64, data: &[u8]) -> Flow {
        if self.ram_write(pa, data) {
            self.code_lines.wrote(pa, data.len());
        } else {
            self.io.writes.push_back((pa, data.to_vec()));
        }
        Ok(())
    }

    /// Reads a paging-structure or descriptor entry; unbacked memory reads as all ones (PC behaviour).
    pub fn phys_read_u64(&self, pa: u64) -> u64 {
        let mut b = [0u8; 8];
        if self.ram_read(pa, &mut b) {
            u64::from_le_bytes(b)
        } else {
            u64::MAX
        }
    }

    /// Reads a 32-bit paging-structure entry; unbacked memory reads as all ones.
    pub fn phys_read_u32(&self, pa: u64) -> u32 {
        let mut b = [0u8; 4];
        if self.ram_read(pa, &mut b) {
            u32::from_le_bytes(b)
        } else {
            u32::MAX
        }
    }

    /// Writes back a paging-structure entry (accessed/dirty bits); ignored outside RAM.
    pub fn phys_write_entry(&mut self, pa: u64, bytes: &[u8]) {
        if self.ram_write(pa, bytes) {
            self.code_lines.wrote(pa, bytes.len());
        }
    }
}
