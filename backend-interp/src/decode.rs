//! Instruction fetch and the decode cache: decoded instructions keyed by physical address, each
//! with its handler and flag masks resolved at decode time, dropped when the guest writes their
//! bytes (self-modifying code).
//!
//! The cache is direct-mapped on the physical address, so a lookup is one index and one tag
//! compare. Each page has a bitmap of the 64-byte lines that hold cached code: a guest write
//! checks that bitmap first and only when it touches a line with code drops the entries whose
//! bytes it overlaps. Stack and data writes near code (real-mode guests keep the stack just
//! below their code) therefore cost one bitmap test and keep the code cached.

use duet_core::vm_memory::{Bytes, GuestAddress};
use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use crate::cpu::{gp, unsupported, Cpu, Flow};
use crate::instructions::{Handler, Operands};
use crate::mmu::Kind;

/// Cache slots (a power of two): 16 KiB of consecutive code never collides with itself.
const SLOTS: usize = 1 << 14;
/// Tag of an empty slot (no physical address shifts to it).
const EMPTY: u64 = u64::MAX;
/// Pages above this are not cached (it bounds the line bitmap to 8 MiB: RAM below 4 GiB).
const MAX_PAGES: u64 = 1 << 20;

/// A decoded instruction with what the step loop needs about it, worked out once at decode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Decoded {
    /// The instruction, decoded at IP 0.
    pub ins: Instruction,
    /// The function that executes it (from the dispatch table in `instructions`).
    pub exec: Handler,
    /// Operands of a register form, for the fast handlers.
    pub ops: Operands,
    /// RFLAGS bits it writes, per iced-x86 (RFLAGS layout).
    pub written: u64,
    /// RFLAGS bits it leaves undefined, per iced-x86 (RFLAGS layout).
    pub undefined: u64,
    /// INT n, INT3, INTO or INT1: its delivery clears TF, so no single-step trap follows.
    pub software_int: bool,
    /// IRET/IRETD/IRETQ: the only instructions that load RF.
    pub iret: bool,
    /// Not legacy-encoded (VEX/EVEX/XOP): #UD in real-address and virtual-8086 mode.
    pub vex: bool,
    /// A fast register form: it changes no state when it fails, so the step loop keeps no
    /// copy of the registers to restore.
    pub fast: bool,
}

impl Decoded {
    /// Resolves handler and flag masks of `ins`.
    pub fn new(ins: Instruction) -> Self {
        use iced_x86::Mnemonic::{Int, Int1, Int3, Into, Iret, Iretd, Iretq};
        let m = ins.mnemonic();
        let (exec, ops, fast) = crate::instructions::resolve(&ins);
        Decoded {
            exec,
            ops,
            written: crate::flags::from_iced(ins.rflags_modified()),
            undefined: crate::flags::from_iced(ins.rflags_undefined()),
            software_int: matches!(m, Int | Int3 | Into | Int1),
            iret: matches!(m, Iret | Iretd | Iretq),
            vex: ins.encoding() != iced_x86::EncodingKind::Legacy,
            fast,
            ins,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// `pa << 8 | bitness`, or `EMPTY`.
    tag: u64,
    d: Decoded,
}

/// Which bytes of guest RAM hold cached code, and the writes that hit them since the step
/// loop last looked: the part of the decode cache guest writes see (it lives in `Cpu`).
#[derive(Debug, Default)]
pub(crate) struct CodeLines {
    /// Per physical page, the 64-byte lines some cached instruction covers (a superset).
    lines: Vec<u64>,
    /// Writes that touched a line with code, to drop from the cache after this step.
    pending: Vec<(u64, u64)>,
    /// More writes hit code than `pending` keeps: drop everything.
    overflow: bool,
}

/// Writes to code remembered exactly per step; beyond this the whole cache is dropped.
const MAX_PENDING: usize = 64;

impl CodeLines {
    /// Whether `[pa, pa + len)` touches a line that holds cached code.
    fn touches_code(&self, pa: u64, len: u64) -> bool {
        let end = pa.saturating_add(len.max(1) - 1);
        let mut page = pa >> 12;
        while page <= end >> 12 {
            let Some(&lines) = self.lines.get(page as usize) else { return false };
            let lo = if page == pa >> 12 { pa & 0xfff } else { 0 };
            let hi = if page == end >> 12 { end & 0xfff } else { 0xfff };
            if lines & line_mask(lo, hi) != 0 {
                return true;
            }
            page += 1;
        }
        false
    }

    /// The guest wrote `[pa, pa + len)`: remember it if it may have changed cached code.
    #[inline]
    pub fn wrote(&mut self, pa: u64, len: usize) {
        if self.lines.is_empty() || !self.touches_code(pa, len as u64) {
            return;
        }
        if self.pending.len() < MAX_PENDING {
            self.pending.push((pa, len as u64));
        } else {
            self.overflow = true;
        }
    }

    /// Whether writes wait to be applied to the cache.
    #[inline]
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.overflow
    }

    fn mark(&mut self, pa: u64, len: u64) {
        let page = (pa >> 12) as usize;
        if self.lines.len() <= page {
            self.lines.resize(page + 1, 0);
        }
        if let Some(l) = self.lines.get_mut(page) {
            *l |= line_mask(pa & 0xfff, (pa & 0xfff) + len - 1);
        }
    }
}

/// Decoded instructions by (physical address, bitness), direct-mapped. It lives beside the CPU
/// (in the vCPU), so the step loop runs an instruction straight from its slot; guest writes
/// reach it through [`CodeLines`] after each step.
#[derive(Debug)]
pub(crate) struct DecodeCache {
    slots: Vec<Slot>,
    /// The last instruction that could not be cached (it crosses a page, or is invalid).
    uncached: Decoded,
}

impl Default for DecodeCache {
    fn default() -> Self {
        let d = Decoded::new(Instruction::default());
        DecodeCache { slots: vec![Slot { tag: EMPTY, d }; SLOTS], uncached: d }
    }
}

/// Mask of the lines covering page offsets `lo..=hi` (both below 0x1000).
fn line_mask(lo: u64, hi: u64) -> u64 {
    let (a, b) = (lo >> 6, hi >> 6);
    let upto_b = if b >= 63 { u64::MAX } else { (1u64 << (b + 1)) - 1 };
    upto_b & !((1u64 << a) - 1)
}

impl DecodeCache {
    fn tag(pa: u64, bitness: u32) -> u64 {
        (pa << 8) | u64::from(bitness)
    }

    fn slot(pa: u64) -> usize {
        (pa as usize) & (SLOTS - 1)
    }

    /// The instruction decoded at `pa` for `bitness`, if cached.
    #[inline]
    pub fn get(&self, pa: u64, bitness: u32) -> Option<&Decoded> {
        let s = self.slots.get(Self::slot(pa))?;
        (s.tag == Self::tag(pa, bitness)).then_some(&s.d)
    }

    /// Caches `d`, decoded at `pa`, when it lies wholly in that page (else keeps it aside for
    /// this step only), marking its lines in `lines`.
    pub fn insert(&mut self, pa: u64, bitness: u32, d: Decoded, lines: &mut CodeLines) -> &Decoded {
        let len = d.ins.len() as u64;
        if pa >> 12 >= MAX_PAGES || len == 0 || (pa & 0xfff) + len > 0x1000 || d.ins.is_invalid() {
            self.uncached = d;
            return &self.uncached;
        }
        lines.mark(pa, len);
        let i = Self::slot(pa);
        match self.slots.get_mut(i) {
            Some(s) => {
                *s = Slot { tag: Self::tag(pa, bitness), d };
                &s.d
            }
            None => {
                self.uncached = d;
                &self.uncached
            }
        }
    }

    /// Applies the writes `lines` collected: drops the instructions whose bytes they overlap.
    pub fn apply(&mut self, lines: &mut CodeLines) {
        if std::mem::take(&mut lines.overflow) {
            lines.pending.clear();
            self.clear(lines);
            return;
        }
        for (pa, len) in lines.pending.drain(..) {
            let end = pa.saturating_add(len.max(1));
            let overlaps = |s: &Slot| {
                let start = s.tag >> 8;
                s.tag != EMPTY && start < end && start.saturating_add(s.d.ins.len() as u64) > pa
            };
            if len > 4096 {
                for s in self.slots.iter_mut().filter(|s| overlaps(s)) {
                    s.tag = EMPTY;
                }
                continue;
            }
            // An instruction is at most 15 bytes: only those starting up to 14 bytes before reach in.
            for a in pa.saturating_sub(14)..end {
                if let Some(s) = self.slots.get_mut(Self::slot(a)) {
                    if s.tag >> 8 == a && overlaps(s) {
                        s.tag = EMPTY;
                    }
                }
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self, lines: &mut CodeLines) {
        for s in self.slots.iter_mut() {
            s.tag = EMPTY;
        }
        lines.lines.clear();
        lines.pending.clear();
        lines.overflow = false;
    }
}

impl Cpu {
    /// Fetches and decodes the instruction at CS:RIP (decoded with IP 0: branch targets and
    /// RIP-relative displacements are relative to the instruction's start).
    #[inline(always)]
    pub fn fetch<'c>(&mut self, code: &'c mut DecodeCache) -> Flow<&'c Decoded> {
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
        // Looked up twice on a hit: the borrow checker cannot yet see that the miss arm's borrow
        // is a different one (NLL problem case 3).
        let d = if code.get(pa, bitness).is_some() {
            code.get(pa, bitness).ok_or_else(|| unsupported("decode cache"))?
        } else {
            self.decode_at(lin, pa, bitness, code)?
        };
        let ins = &d.ins;
        // CS limit check on the whole instruction outside 64-bit mode (SDM Vol. 3A §5.3).
        if !self.mode64() {
            let last = (rip & 0xffff_ffff).wrapping_add((ins.len() as u64).saturating_sub(1));
            if last > u64::from(self.sregs.cs.limit) {
                return Err(gp(0));
            }
        }
        Ok(d)
    }

    /// Reads up to 15 bytes at `lin`/`pa`, decodes them and caches the result when it fits the page.
    fn decode_at<'c>(
        &mut self,
        lin: u64,
        pa: u64,
        bitness: u32,
        code: &'c mut DecodeCache,
    ) -> Flow<&'c Decoded> {
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
        let d = Decoded::new(ins);
        if ins.len() <= first {
            Ok(code.insert(pa, bitness, d, &mut self.code_lines))
        } else {
            // Crossing into the next page: decoded for this step only.
            code.uncached = d;
            Ok(&code.uncached)
        }
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

    fn nop(len: usize) -> Decoded {
        // 66 90 / 90 and friends: any instruction of the right length will do.
        let bytes = [0x66u8; 15];
        let mut b = bytes[..len - 1].to_vec();
        b.push(0x90);
        Decoded::new(Decoder::with_ip(16, &b, 0, DecoderOptions::NONE).decode())
    }

    #[test]
    fn cache_keys_on_address_and_bitness() {
        let (mut c, mut l) = (DecodeCache::default(), CodeLines::default());
        c.insert(0x1010, 16, nop(1), &mut l);
        assert!(c.get(0x1010, 16).is_some());
        assert!(c.get(0x1010, 32).is_none());
        // Same slot, another page: a miss, not a wrong hit.
        assert!(c.get(0x1010 + SLOTS as u64, 16).is_none());
        // An instruction crossing its page is not cached.
        c.insert(0x1fff, 16, nop(2), &mut l);
        assert!(c.get(0x1fff, 16).is_none());
    }

    #[test]
    fn writes_drop_exactly_the_instructions_they_overlap() {
        let (mut c, mut l) = (DecodeCache::default(), CodeLines::default());
        let write = |c: &mut DecodeCache, l: &mut CodeLines, pa, len| {
            l.wrote(pa, len);
            c.apply(l);
        };
        c.insert(0x1010, 16, nop(3), &mut l); // 0x1010..=0x1012
        c.insert(0x1013, 16, nop(1), &mut l);
        c.insert(0x1ff0, 32, nop(2), &mut l);
        c.insert(0x2000, 16, nop(1), &mut l);
        // A write to a line without code (a real-mode stack under its code) is not even queued.
        l.wrote(0x1fa0, 16);
        assert!(!l.has_pending());
        // A write just below the code, in its line, keeps everything.
        write(&mut c, &mut l, 0x1000, 16);
        assert!(c.get(0x1010, 16).is_some() && c.get(0x1013, 16).is_some());
        // A write into the middle of an instruction drops it and only it.
        write(&mut c, &mut l, 0x1012, 1);
        assert!(c.get(0x1010, 16).is_none());
        assert!(c.get(0x1013, 16).is_some() && c.get(0x1ff0, 32).is_some());
        // A write straddling a page boundary drops on both sides.
        write(&mut c, &mut l, 0x1fff, 2);
        assert!(c.get(0x2000, 16).is_none());
        assert!(c.get(0x1ff0, 32).is_some());
        write(&mut c, &mut l, 0x1ff1, 1);
        assert!(c.get(0x1ff0, 32).is_none());
        // A large write drops everything it covers.
        c.insert(0x1010, 16, nop(3), &mut l);
        write(&mut c, &mut l, 0, 0x10000);
        assert!(c.get(0x1010, 16).is_none() && c.get(0x1013, 16).is_none());
        // Too many writes in one step drop the whole cache.
        c.insert(0x1013, 16, nop(1), &mut l);
        for _ in 0..=MAX_PENDING {
            l.wrote(0x1010, 1);
        }
        c.apply(&mut l);
        assert!(c.get(0x1013, 16).is_none() && !l.has_pending());
    }

    #[test]
    fn line_masks_cover_the_offsets() {
        assert_eq!(line_mask(0, 0), 1);
        assert_eq!(line_mask(0x3f, 0x40), 0b11);
        assert_eq!(line_mask(0, 0xfff), u64::MAX);
        assert_eq!(line_mask(0xfc0, 0xfff), 1 << 63);
    }
}
