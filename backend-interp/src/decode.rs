//! Instruction fetch and the decode cache: straight-line blocks of decoded instructions keyed
//! by physical address and code size, each instruction with its handler and flag masks resolved
//! at decode time, dropped when the guest writes their bytes (self-modifying code).
//!
//! A block runs from its first instruction up to and including the first one that may branch or
//! change what the step loop works out once per block (mode, CS, paging, RFLAGS.TF/IF/RF, the
//! interrupt shadow, debug registers, a halt or port exit); it never crosses its page and holds
//! at most `MAX_BLOCK` instructions. Lookup is one direct-mapped index probe and one key compare
//! per block. Each page has a bitmap of the 64-byte lines that hold cached code: a guest write
//! checks that bitmap first and only when it touches a line with code drops the blocks whose
//! bytes it overlaps. Stack and data writes near code (real-mode guests keep the stack just
//! below their code) therefore cost one bitmap test and keep the code cached. Creating and
//! clearing the cache allocates and walks nothing up front (the index comes with the first block).

use std::collections::HashMap;

use duet_core::vm_memory::{Bytes, GuestAddress};
use iced_x86::{Code, Decoder, DecoderError, Instruction, Mnemonic, OpKind, Register};

use crate::cpu::{gp, unsupported, Abort, Cpu, Flow};
use crate::instructions::{Handler, Operands};
use crate::mmu::Kind;

/// Index slots (a power of two).
const INDEX: usize = 1 << 14;
/// Instructions in one block at most.
const MAX_BLOCK: usize = 64;
/// Blocks kept (live or dropped) before the whole cache is cleared.
const MAX_BLOCKS: usize = 1 << 15;
/// Bytes read ahead to decode one block.
const WINDOW: usize = 512;
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
    /// A fast form, or one that writes no register before it can fail: the step loop keeps no
    /// copy of the registers to restore.
    pub fast: bool,
    /// Falls through to the next instruction and changes nothing a block fixes at its start:
    /// a block goes on after it.
    pub straight: bool,
    /// A near branch (JMP, Jcc, CALL, RET, LOOPcc, JrCXZ): it changes nothing a block fixes at
    /// its start but RIP, so the block loop may go on at its target's block (block chaining).
    pub chain: bool,
    /// Length in bytes.
    pub len: u8,
    /// Mask of RIP after it: all ones when decoded as 64-bit code, else 32 bits.
    pub ip_mask: u64,
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
            straight: straight(&ins),
            chain: near_branch(&ins),
            len: ins.len() as u8,
            ip_mask: if ins.code_size() == iced_x86::CodeSize::Code64 { u64::MAX } else { 0xffff_ffff },
            ins,
        }
    }
}

/// Whether `ins` neither branches nor changes the mode, CS, paging, the debug registers,
/// RFLAGS.TF/IF/VM/IOPL, the interrupt shadow or the halt state, and asks for no exit after it
/// retires: data movement and arithmetic on general registers and memory only (any of them may
/// still fault, which ends the block on the fault path).
fn straight(ins: &Instruction) -> bool {
    use Mnemonic::*;
    let plain = matches!(
        ins.mnemonic(),
        Mov | Movzx
            | Movsx
            | Movsxd
            | Lea
            | Xchg
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Bswap
            | Cmpxchg
            | Xadd
            | Xlatb
            | Cmova
            | Cmovae
            | Cmovb
            | Cmovbe
            | Cmove
            | Cmovg
            | Cmovge
            | Cmovl
            | Cmovle
            | Cmovne
            | Cmovno
            | Cmovnp
            | Cmovns
            | Cmovo
            | Cmovp
            | Cmovs
            | Seta
            | Setae
            | Setb
            | Setbe
            | Sete
            | Setg
            | Setge
            | Setl
            | Setle
            | Setne
            | Setno
            | Setnp
            | Setns
            | Seto
            | Setp
            | Sets
            | Add
            | Adc
            | Sub
            | Sbb
            | Cmp
            | And
            | Or
            | Xor
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Mul
            | Imul
            | Div
            | Idiv
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Push
            | Pop
            | Nop
            | Clc
            | Stc
            | Cmc
            | Cld
            | Std
            | Lahf
            | Sahf
            | Popcnt
            | Lzcnt
            | Tzcnt
            | Movbe
            | Salc
    );
    plain
        && ins.encoding() == iced_x86::EncodingKind::Legacy
        && (0..ins.op_count()).all(|i| {
            ins.op_kind(i) != OpKind::Register || {
                let r = ins.op_register(i);
                !r.is_segment_register() && !r.is_cr() && !r.is_dr() && !r.is_tr()
            }
        })
}

/// Whether `ins` is a near branch: it changes RIP (and for CALL/RET the stack) but not CS, the
/// mode, RFLAGS or anything else a block fixes at its start.
fn near_branch(ins: &Instruction) -> bool {
    ins.encoding() == iced_x86::EncodingKind::Legacy
        && (ins.is_jcc_short_or_near()
            || ins.is_jmp_short_or_near()
            || ins.is_jmp_near_indirect()
            || ins.is_call_near()
            || ins.is_call_near_indirect()
            || ins.is_loop()
            || ins.is_loopcc()
            || ins.is_jcx_short()
            || ins.mnemonic() == Mnemonic::Ret)
}

/// A straight-line run of decoded instructions starting at one physical address.
#[derive(Debug)]
pub(crate) struct Block {
    /// `pa << 8 | bitness`.
    key: u64,
    /// Still valid: no guest write has touched its bytes since it was decoded.
    live: bool,
    /// Bytes its instructions cover.
    pub bytes: u64,
    /// The instructions, in order; empty when the first one cannot be cached (it crosses the
    /// page or is invalid): the step loop then decodes it on its own.
    pub ins: Vec<Decoded>,
}

impl Block {
    fn start(&self) -> u64 {
        self.key >> 8
    }
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
        if self.lines.is_empty() {
            return;
        }
        // Within one 64-byte line (most data writes): one bit of that page's mask.
        let last = pa.saturating_add((len.max(1) - 1) as u64);
        let code = if pa >> 6 == last >> 6 {
            self.lines.get((pa >> 12) as usize).is_some_and(|&l| (l >> ((pa >> 6) & 63)) & 1 != 0)
        } else {
            self.touches_code(pa, len as u64)
        };
        if !code {
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

/// Decoded blocks by (physical address, bitness). It lives beside the CPU (in the vCPU), so
/// the step loop runs instructions straight from their block; guest writes reach it through
/// [`CodeLines`] after each instruction. Blocks are decoded as the profile's vendor decodes
/// (`Cpu::decoder_options`); a vCPU's profile never changes, so the key needs no vendor.
#[derive(Debug)]
pub(crate) struct DecodeCache {
    /// Direct-mapped on the start address: block number + 1, or 0. Entries are hints, checked
    /// against the block's key, so stale ones are harmless; allocated with the first block.
    index: Vec<u32>,
    /// Every block decoded since the last clear, dropped ones included.
    blocks: Vec<Block>,
    /// Physical page → the blocks that start in it, for dropping on writes.
    by_page: HashMap<u64, Vec<u32>>,
    /// The last instruction decoded outside any block (it crosses a page, or is invalid).
    uncached: Decoded,
    /// The block returned for pages that are not cached.
    empty: Block,
    /// Build blocks of one instruction (the last block was cut short by an exit or a fault).
    pub short: bool,
}

impl Default for DecodeCache {
    fn default() -> Self {
        DecodeCache {
            index: Vec::new(),
            blocks: Vec::new(),
            by_page: HashMap::new(),
            uncached: Decoded::new(Instruction::default()),
            empty: Block { key: u64::MAX, live: false, bytes: 0, ins: Vec::new() },
            short: false,
        }
    }
}

/// Mask of the lines covering page offsets `lo..=hi` (both below 0x1000).
fn line_mask(lo: u64, hi: u64) -> u64 {
    let (a, b) = (lo >> 6, hi >> 6);
    let upto_b = if b >= 63 { u64::MAX } else { (1u64 << (b + 1)) - 1 };
    upto_b & !((1u64 << a) - 1)
}

impl DecodeCache {
    fn key(pa: u64, bitness: u32) -> u64 {
        (pa << 8) | u64::from(bitness)
    }

    fn slot(pa: u64) -> usize {
        ((pa ^ (pa >> 14)) as usize) & (INDEX - 1)
    }

    /// The block decoded at `pa` for `bitness`, if cached and still valid.
    #[inline]
    pub fn block(&self, pa: u64, bitness: u32) -> Option<&Block> {
        let id = *self.index.get(Self::slot(pa))?;
        let b = self.blocks.get((id as usize).wrapping_sub(1))?;
        (b.key == Self::key(pa, bitness) && b.live).then_some(b)
    }

    /// Caches `ins`, decoded at `pa` and lying wholly in its page, as a block, marking its
    /// lines in `lines`.
    fn insert(&mut self, pa: u64, bitness: u32, ins: Vec<Decoded>, lines: &mut CodeLines) -> &Block {
        if pa >> 12 >= MAX_PAGES {
            return &self.empty;
        }
        if self.blocks.len() >= MAX_BLOCKS {
            self.clear(lines);
        }
        if self.index.is_empty() {
            self.index = vec![0; INDEX];
        }
        let bytes: u64 = ins.iter().map(|d| d.ins.len() as u64).sum();
        // An empty block covers its first byte, so that writing there drops it too.
        lines.mark(pa, bytes.max(1));
        let id = self.blocks.len() as u32;
        if let Some(slot) = self.index.get_mut(Self::slot(pa)) {
            *slot = id + 1;
        }
        self.by_page.entry(pa >> 12).or_default().push(id);
        self.blocks.push(Block { key: Self::key(pa, bitness), live: true, bytes, ins });
        self.blocks.last().unwrap_or(&self.empty)
    }

    /// Applies the writes `lines` collected: drops the blocks whose bytes they overlap.
    pub fn apply(&mut self, lines: &mut CodeLines) {
        if std::mem::take(&mut lines.overflow) {
            lines.pending.clear();
            self.clear(lines);
            return;
        }
        let DecodeCache { by_page, blocks, .. } = self;
        for (pa, len) in lines.pending.drain(..) {
            let end = pa.saturating_add(len.max(1));
            for page in (pa >> 12)..=((end - 1) >> 12) {
                let Some(ids) = by_page.get_mut(&page) else { continue };
                ids.retain(|&id| match blocks.get_mut(id as usize) {
                    Some(b) if b.live && b.start() < end && b.start() + b.bytes.max(1) > pa => {
                        b.live = false;
                        false
                    }
                    Some(b) => b.live,
                    None => false,
                });
            }
        }
    }

    /// Drops everything (O(blocks decoded since the last clear); nothing when none were).
    pub fn clear(&mut self, lines: &mut CodeLines) {
        self.blocks.clear();
        self.by_page.clear();
        lines.lines.clear();
        lines.pending.clear();
        lines.overflow = false;
    }
}

impl Cpu {
    /// The linear address of CS:RIP after the canonical (64-bit mode) or CS-limit check on its
    /// first byte, which come before paging (SDM Vol. 3A §5.3, §6.9 Table 6-2 priority 8).
    #[inline(always)]
    pub fn code_linear(&self) -> Flow<u64> {
        let rip = self.rip;
        if self.mode64() {
            if !crate::cpu::canonical(rip) {
                return Err(gp(0));
            }
            Ok(rip)
        } else if rip & 0xffff_ffff > u64::from(self.sregs.cs.limit) {
            Err(gp(0))
        } else {
            Ok(self.sregs.cs.base.wrapping_add(rip & 0xffff_ffff) & 0xffff_ffff)
        }
    }

    /// The cached block at physical `pa` for `bitness`, decoded and cached now on a miss.
    #[inline(always)]
    pub fn block_at<'c>(&mut self, pa: u64, bitness: u32, code: &'c mut DecodeCache) -> &'c Block {
        if code.block(pa, bitness).is_some() {
            // Looked up twice on a hit: the borrow checker cannot yet see that the miss arm's
            // borrow is a different one (NLL problem case 3).
            return code.block(pa, bitness).unwrap_or(&code.empty);
        }
        self.build_block(pa, bitness, code)
    }

    /// Decodes the block at physical `pa` (up to its page end) and caches it.
    #[inline(never)]
    fn build_block<'c>(&mut self, pa: u64, bitness: u32, code: &'c mut DecodeCache) -> &'c Block {
        let mut buf = [0u8; WINDOW];
        let room = ((0x1000 - (pa & 0xfff)) as usize).min(WINDOW);
        // RAM regions are whole pages, so a window that is not all RAM starts outside RAM (the
        // single-instruction path names the error).
        let n = if self.ram_read(pa, &mut buf[..room]) { room } else { 0 };
        let mut out = Vec::new();
        let max = if code.short { 1 } else { MAX_BLOCK };
        let bytes = buf.get(..n).unwrap_or(&[]);
        let mut dec = Decoder::with_ip(bitness, bytes, 0, self.decoder_options);
        while dec.can_decode() && out.len() < max {
            // Each instruction decoded at IP 0: branch targets and RIP-relative displacements
            // are relative to the instruction's start.
            dec.set_ip(0);
            let at = dec.position();
            let mut ins = Instruction::default();
            dec.decode_out(&mut ins);
            self.vendor_fixup(&mut ins, bytes.get(at..).unwrap_or(&[]));
            // Invalid, or running past the window (the page): the block ends before it.
            if ins.is_invalid() {
                break;
            }
            let d = Decoded::new(ins);
            out.push(d);
            if !d.straight {
                break;
            }
        }
        code.insert(pa, bitness, out, &mut self.code_lines)
    }

    /// Fetches and decodes the instruction at CS:RIP (decoded with IP 0: branch targets and
    /// RIP-relative displacements are relative to the instruction's start).
    #[inline(always)]
    pub fn fetch<'c>(&mut self, code: &'c mut DecodeCache) -> Flow<&'c Decoded> {
        let bitness = self.bitness();
        let rip = self.rip;
        let lin = self.code_linear()?;
        let pa = self.translate(lin, Kind::Exec, false)?;
        let d = if !self.block_at(pa, bitness, code).ins.is_empty() {
            code.block(pa, bitness).and_then(|b| b.ins.first()).ok_or_else(|| unsupported("decode cache"))?
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

    /// Reads up to 15 bytes at `lin`/`pa` and decodes them, for this step only (the instruction
    /// crosses into the next page, is invalid, or lies where nothing is cached).
    #[inline(never)]
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
            return Err(Abort::UnbackedFetch { addr: pa });
        }
        let mut ins = Instruction::default();
        let mut dec = Decoder::with_ip(bitness, buf.get(..first).unwrap_or(&[]), 0, self.decoder_options);
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
                return Err(Abort::UnbackedFetch { addr: pa2 });
            }
            let mut dec = Decoder::with_ip(bitness, &buf, 0, self.decoder_options);
            dec.decode_out(&mut ins);
        }
        self.vendor_fixup(&mut ins, &buf);
        code.uncached = Decoded::new(ins);
        Ok(&code.uncached)
    }

    /// Makes invalid what the vendor's decoder accepts but this profile does not: iced-x86's AMD
    /// decoder reads LOCK MOV to/from CR0 as MOV CR8 (AMD's AltMovCr8, CPUID 8000_0001h ECX
    /// bit 4, AMD64 APM Vol. 3 "MOV CRn"); a profile without that feature raises #UD for it, as
    /// LOCK on MOV CRn does on Intel (SDM Vol. 2A §2.1.2). `bytes` start at the instruction.
    fn vendor_fixup(&self, ins: &mut Instruction, bytes: &[u8]) {
        let cr8 =
            matches!(ins.code(), Code::Mov_cr_r32 | Code::Mov_cr_r64 | Code::Mov_r32_cr | Code::Mov_r64_cr)
                && (ins.op0_register() == Register::CR8 || ins.op1_register() == Register::CR8);
        if !cr8 || !self.amd() || self.cpuid.has_ext_ecx(duet_core::cpuid::ext_leaf1::ECX_CR8_LEGACY) {
            return;
        }
        // Legacy and REX prefixes come before the 0F opcode byte; LOCK (F0) among them.
        let prefixes = bytes.iter().take(ins.len()).take_while(|&&b| b != 0x0f);
        if prefixes.into_iter().any(|&b| b == 0xf0) {
            ins.set_code(Code::INVALID);
        }
    }

    /// The raw bytes of the instruction at CS:RIP, for `Unsupported` reports (best effort): read
    /// without side effects (no accessed bits set, no TLB fill).
    pub fn bytes_at_rip(&mut self, len: usize) -> Vec<u8> {
        let lin =
            if self.mode64() { self.rip } else { self.sregs.cs.base.wrapping_add(self.rip) & 0xffff_ffff };
        let mut out = Vec::new();
        for i in 0..len.min(15) as u64 {
            let l = lin.wrapping_add(i);
            let Some(pa) = self.peek_translate(l) else { break };
            let mut b = [0u8];
            if !self.ram_read(pa, &mut b) {
                break;
            }
            out.push(b[0]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::DecoderOptions;

    use super::*;

    fn nop(len: usize) -> Decoded {
        // 66 90 / 90 and friends: any instruction of the right length will do.
        let bytes = [0x66u8; 15];
        let mut b = bytes[..len - 1].to_vec();
        b.push(0x90);
        Decoded::new(Decoder::with_ip(16, &b, 0, DecoderOptions::NONE).decode())
    }

    fn put(c: &mut DecodeCache, l: &mut CodeLines, pa: u64, bitness: u32, len: usize) {
        c.insert(pa, bitness, vec![nop(len)], l);
    }

    #[test]
    fn cache_keys_on_address_and_bitness() {
        let (mut c, mut l) = (DecodeCache::default(), CodeLines::default());
        put(&mut c, &mut l, 0x1010, 16, 1);
        assert!(c.block(0x1010, 16).is_some());
        assert!(c.block(0x1010, 32).is_none());
        // Same index slot, another address: a miss, not a wrong hit.
        assert!(c.block(0x1010 ^ (INDEX as u64) ^ ((INDEX as u64) << 14), 16).is_none());
        // Clearing is a miss afterwards, and a new block reusing the number is found by its key.
        c.clear(&mut l);
        assert!(c.block(0x1010, 16).is_none());
        put(&mut c, &mut l, 0x2020, 16, 1);
        assert!(c.block(0x1010, 16).is_none() && c.block(0x2020, 16).is_some());
    }

    #[test]
    fn straight_line_instructions_continue_a_block_and_the_rest_end_it() {
        let d = |bytes: &[u8]| Decoded::new(Decoder::with_ip(32, bytes, 0, DecoderOptions::NONE).decode());
        assert!(d(&[0x01, 0xd8]).straight); // add eax, ebx
        assert!(d(&[0x8b, 0x03]).straight); // mov eax, [ebx]
        assert!(!d(&[0x75, 0x00]).straight); // jnz
        assert!(!d(&[0x8e, 0xd8]).straight); // mov ds, ax
        assert!(!d(&[0x0f, 0x22, 0xd8]).straight); // mov cr3, eax
        assert!(!d(&[0x9d]).straight); // popf
        assert!(!d(&[0xfb]).straight); // sti
        assert!(!d(&[0x1f]).straight); // pop ds
        assert!(!d(&[0xf3, 0xa4]).straight); // rep movsb
        assert!(!d(&[0xf4]).straight); // hlt
    }

    #[test]
    fn writes_drop_exactly_the_blocks_they_overlap() {
        let (mut c, mut l) = (DecodeCache::default(), CodeLines::default());
        let write = |c: &mut DecodeCache, l: &mut CodeLines, pa, len| {
            l.wrote(pa, len);
            c.apply(l);
        };
        put(&mut c, &mut l, 0x1010, 16, 3); // 0x1010..=0x1012
        put(&mut c, &mut l, 0x1013, 16, 1);
        put(&mut c, &mut l, 0x1ff0, 32, 2);
        put(&mut c, &mut l, 0x2000, 16, 1);
        // A write to a line without code (a real-mode stack under its code) is not even queued.
        l.wrote(0x1fa0, 16);
        assert!(!l.has_pending());
        // A write just below the code, in its line, keeps everything.
        write(&mut c, &mut l, 0x1000, 16);
        assert!(c.block(0x1010, 16).is_some() && c.block(0x1013, 16).is_some());
        // A write into the middle of an instruction drops its block and only it.
        write(&mut c, &mut l, 0x1012, 1);
        assert!(c.block(0x1010, 16).is_none());
        assert!(c.block(0x1013, 16).is_some() && c.block(0x1ff0, 32).is_some());
        // A write straddling a page boundary drops on both sides.
        write(&mut c, &mut l, 0x1fff, 2);
        assert!(c.block(0x2000, 16).is_none());
        assert!(c.block(0x1ff0, 32).is_some());
        write(&mut c, &mut l, 0x1ff1, 1);
        assert!(c.block(0x1ff0, 32).is_none());
        // A large write drops everything it covers.
        put(&mut c, &mut l, 0x1010, 16, 3);
        write(&mut c, &mut l, 0, 0x10000);
        assert!(c.block(0x1010, 16).is_none() && c.block(0x1013, 16).is_none());
        // An empty block (its instruction is not cached) is dropped by a write to its first byte.
        c.insert(0x3000, 16, Vec::new(), &mut l);
        assert!(c.block(0x3000, 16).is_some());
        write(&mut c, &mut l, 0x3000, 1);
        assert!(c.block(0x3000, 16).is_none());
        // Too many writes in one step drop the whole cache.
        put(&mut c, &mut l, 0x1013, 16, 1);
        for _ in 0..=MAX_PENDING {
            l.wrote(0x1010, 1);
        }
        c.apply(&mut l);
        assert!(c.block(0x1013, 16).is_none() && !l.has_pending());
    }

    #[test]
    fn bytes_at_rip_reads_without_setting_accessed_bits() {
        use duet_core::state::ctrl;
        use duet_core::vm_memory::{Bytes, GuestAddress};
        let mut cpu = crate::cpu::test_cpu();
        // 4-level paging, the first 2 MiB identity-mapped by one large page; no entry has A set.
        let entries = [(0x1000u64, 0x2003u64), (0x2000, 0x3003), (0x3000, 0x83)];
        for (at, v) in entries {
            cpu.mem.write_slice(&v.to_le_bytes(), GuestAddress(at)).unwrap_or_else(|e| panic!("{e}"));
        }
        cpu.mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x8000)).unwrap_or_else(|e| panic!("{e}"));
        cpu.sregs.cr3 = 0x1000;
        cpu.sregs.cr4 |= ctrl::CR4_PAE;
        cpu.sregs.efer |= ctrl::EFER_LME | ctrl::EFER_LMA;
        cpu.sregs.cr0 |= ctrl::CR0_PE | ctrl::CR0_PG;
        cpu.sregs.cs = duet_core::Segment::from_descriptor(0x08, 0x00af_9b00_0000_ffff);
        cpu.rip = 0x8000;
        assert_eq!(cpu.bytes_at_rip(2), [0x0f, 0x0b]);
        // SDM Vol. 3A §4.8 sets A only on accesses the program makes; a report is none.
        for (at, v) in entries {
            assert_eq!(cpu.phys_read_u64(at), v, "entry at {at:#x}");
        }
    }

    #[test]
    fn line_masks_cover_the_offsets() {
        assert_eq!(line_mask(0, 0), 1);
        assert_eq!(line_mask(0x3f, 0x40), 0b11);
        assert_eq!(line_mask(0, 0xfff), u64::MAX);
        assert_eq!(line_mask(0xfc0, 0xfff), 1 << 63);
    }
}
