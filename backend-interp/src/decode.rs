//! Instruction fetch and the decode cache: decoded instructions keyed by physical address,
//! dropped page by page when the guest writes that page (self-modifying code).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use duet_core::vm_memory::{Bytes, GuestAddress};
use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use crate::cpu::{gp, unsupported, Cpu, Flow};
use crate::mmu::Kind;

/// A multiplicative hash for integer keys (the FxHash scheme): the default SipHash costs more
/// than the rest of a cache lookup, and these keys are not attacker-chosen hash-flooding input
/// in any way that matters (a guest can only slow itself down).
#[derive(Clone, Copy, Debug, Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type Fx = BuildHasherDefault<FxHasher>;

/// Decoded instructions of each physical page, keyed by (offset, bitness).
#[derive(Debug, Default)]
pub(crate) struct DecodeCache {
    pages: HashMap<u64, HashMap<u32, Instruction, Fx>, Fx>,
}

impl DecodeCache {
    fn key(pa: u64, bitness: u32) -> u32 {
        (pa & 0xfff) as u32 | (bitness << 16)
    }

    /// The instruction decoded at `pa` for `bitness`, if cached.
    pub fn get(&self, pa: u64, bitness: u32) -> Option<&Instruction> {
        self.pages.get(&(pa >> 12))?.get(&Self::key(pa, bitness))
    }

    /// Caches an instruction that lies wholly in the page of `pa`.
    pub fn insert(&mut self, pa: u64, bitness: u32, ins: Instruction) {
        self.pages.entry(pa >> 12).or_default().insert(Self::key(pa, bitness), ins);
    }

    /// Drops the decoded instructions of every page `[pa, pa + len)` touches.
    pub fn invalidate(&mut self, pa: u64, len: usize) {
        if self.pages.is_empty() {
            return;
        }
        let first = pa >> 12;
        let last = pa.wrapping_add(len.max(1) as u64 - 1) >> 12;
        self.pages.remove(&first);
        if last != first {
            self.pages.remove(&last);
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.pages.clear();
    }
}

impl Cpu {
    /// Fetches and decodes the instruction at CS:RIP (decoded with IP 0: branch targets and
    /// RIP-relative displacements are relative to the instruction's start).
    pub fn fetch(&mut self) -> Flow<Instruction> {
        let bitness = self.bitness();
        let rip = self.rip;
        let lin = if self.mode64() {
            if !crate::cpu::canonical(rip) {
                return Err(gp(0));
            }
            rip
        } else if rip & 0xffff_ffff > u64::from(self.sregs.cs.limit) {
            // Segmentation comes before paging: a RIP beyond the CS limit is #GP(0) even where its
            // page is not present (SDM Vol. 3A §5.3, §6.9 Table 6-2 priority 8).
            return Err(gp(0));
        } else {
            self.sregs.cs.base.wrapping_add(rip & 0xffff_ffff) & 0xffff_ffff
        };
        let pa = self.translate(lin, Kind::Exec, false)?;
        let ins = match self.code.get(pa, bitness) {
            Some(i) => *i,
            None => self.decode_at(lin, pa, bitness)?,
        };
        // CS limit check on the whole instruction outside 64-bit mode (SDM Vol. 3A §5.3).
        if !self.mode64() {
            let last = (rip & 0xffff_ffff).wrapping_add((ins.len() as u64).saturating_sub(1));
            if last > u64::from(self.sregs.cs.limit) {
                return Err(gp(0));
            }
        }
        Ok(ins)
    }

    /// Reads up to 15 bytes at `lin`/`pa`, decodes them and caches the result when it fits the page.
    fn decode_at(&mut self, lin: u64, pa: u64, bitness: u32) -> Flow<Instruction> {
        let mut buf = [0u8; 15];
        let first = (0x1000 - (lin & 0xfff)).min(15) as usize;
        if self.mem.read_slice(&mut buf[..first], GuestAddress(pa)).is_err() {
            return Err(unsupported(format!("instruction fetch from unbacked address {pa:#x}")));
        }
        let mut ins = Instruction::default();
        let mut dec = Decoder::with_ip(bitness, buf.get(..first).unwrap_or(&[]), 0, DecoderOptions::NONE);
        dec.decode_out(&mut ins);
        if ins.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes && first < 15 {
            // The instruction runs into the next page: fetch it only now (SDM Vol. 3A §4.7 CR2 is then
            // the address of that page), unless those bytes lie beyond the CS limit: then #GP(0)
            // wins over the #PF the next page might raise (SDM Vol. 3A §5.3).
            let next_off = (self.rip & 0xffff_ffff).wrapping_add(first as u64);
            if !self.mode64() && next_off > u64::from(self.sregs.cs.limit) {
                return Err(gp(0));
            }
            let lin2 = lin.wrapping_add(first as u64) & if self.long_mode() { u64::MAX } else { 0xffff_ffff };
            let pa2 = self.translate(lin2, Kind::Exec, false)?;
            if self.mem.read_slice(&mut buf[first..], GuestAddress(pa2)).is_err() {
                return Err(unsupported(format!("instruction fetch from unbacked address {pa2:#x}")));
            }
            let mut dec = Decoder::with_ip(bitness, &buf, 0, DecoderOptions::NONE);
            dec.decode_out(&mut ins);
        }
        if ins.len() <= first && !ins.is_invalid() {
            self.code.insert(pa, bitness, ins);
        }
        Ok(ins)
    }

    /// The raw bytes of the instruction at CS:RIP, for `Unsupported` reports (best effort).
    pub fn bytes_at_rip(&mut self, len: usize) -> Vec<u8> {
        let lin =
            if self.mode64() { self.rip } else { self.sregs.cs.base.wrapping_add(self.rip) & 0xffff_ffff };
        let mut out = Vec::new();
        for i in 0..len.min(15) as u64 {
            let l = lin.wrapping_add(i);
            let Ok(pa) = self.translate(l, Kind::Exec, false) else { break };
            let mut b = [0u8];
            if self.mem.read_slice(&mut b, GuestAddress(pa)).is_err() {
                break;
            }
            out.push(b[0]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_invalidate_drops_whole_page_and_keeps_others() {
        let mut c = DecodeCache::default();
        let i = Instruction::default();
        c.insert(0x1010, 16, i);
        c.insert(0x1ff0, 32, i);
        c.insert(0x2000, 16, i);
        assert!(c.get(0x1010, 16).is_some());
        assert!(c.get(0x1010, 32).is_none());
        c.invalidate(0x1800, 1);
        assert!(c.get(0x1010, 16).is_none() && c.get(0x1ff0, 32).is_none());
        assert!(c.get(0x2000, 16).is_some());
        // A write straddling a page boundary drops both pages.
        c.insert(0x1010, 16, i);
        c.invalidate(0x1fff, 2);
        assert!(c.get(0x1010, 16).is_none() && c.get(0x2000, 16).is_none());
    }
}
