//! The software CPU's architectural state and the small accessors every instruction uses.

use std::collections::BTreeMap;
use std::sync::Arc;

use duet_core::state::{ctrl, rflags};
use duet_core::{CpuidProfile, FxArea, GuestMemory, Segment, SystemRegs, Vendor};
use iced_x86::{DecoderOptions, Register};

use crate::decode::CodeLines;
use crate::hostmem::HostPages;
use crate::memory::IoStage;
use crate::mmu::paging::Tlb;

/// An architectural exception raised by an instruction (SDM Vol. 3A §6.3.1, Table 6-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exception {
    /// Vector number.
    pub vector: u8,
    /// Error code pushed with the exception, if the vector has one.
    pub error: Option<u32>,
    /// For #PF: the linear address that goes to CR2 when the exception is delivered.
    pub cr2: Option<u64>,
}

/// Why an instruction did not retire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Abort {
    /// It raised an exception; RIP still names it.
    Exception(Exception),
    /// It needs an MMIO read first: the run loop returns `MmioRead` and re-executes it.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Bytes to read.
        len: usize,
    },
    /// It needs a port read first: the run loop returns `IoIn` and re-executes it.
    IoIn {
        /// Port.
        port: u16,
        /// Width in bytes.
        size: u8,
    },
    /// The interpreter does not implement it; the string says what.
    Unsupported(String),
    /// The instruction would be fetched from a guest physical address no RAM backs.
    UnbackedFetch {
        /// Guest physical address.
        addr: u64,
    },
    /// Exception delivery failed three times over: the CPU shuts down.
    Shutdown,
}

/// The result of an instruction step or of one access within it.
pub(crate) type Flow<T = ()> = Result<T, Abort>;

/// Vector numbers (SDM Vol. 3A Table 6-1).
pub(crate) mod vector {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Breakpoint.
    pub const BP: u8 = 3;
    /// Overflow.
    pub const OF: u8 = 4;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Debug.
    pub const DB: u8 = 1;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
}

/// An exception without an error code.
pub(crate) fn fault(v: u8) -> Abort {
    Abort::Exception(Exception { vector: v, error: None, cr2: None })
}

/// An exception with an error code.
pub(crate) fn fault_code(v: u8, code: u32) -> Abort {
    Abort::Exception(Exception { vector: v, error: Some(code), cr2: None })
}

/// #GP(code).
pub(crate) fn gp(code: u32) -> Abort {
    fault_code(vector::GP, code)
}

/// #UD.
pub(crate) fn ud() -> Abort {
    fault(vector::UD)
}

/// `Unsupported` with a reason.
pub(crate) fn unsupported(what: impl Into<String>) -> Abort {
    Abort::Unsupported(what.into())
}

/// An exit an instruction asks for after it retired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Post {
    /// HLT.
    Hlt,
    /// OUT/OUTS of `size` bytes of `value` to `port`.
    IoOut {
        /// Port.
        port: u16,
        /// Width.
        size: u8,
        /// Value (low `size` bytes).
        value: u32,
    },
}

/// Where a general-purpose register operand lives in the register file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GprSlot {
    /// Encoding number (RAX = 0 … R15 = 15).
    pub index: usize,
    /// Width in bytes.
    pub bytes: u8,
    /// AH, CH, DH or BH: bits 15:8 of the register.
    pub high8: bool,
}

/// Where GPR `r` lives, or `None` when `r` is no general-purpose register.
pub(crate) fn gpr_slot(r: Register) -> Option<GprSlot> {
    let n = r as u32;
    let (al, ax, eax, rax) =
        (Register::AL as u32, Register::AX as u32, Register::EAX as u32, Register::RAX as u32);
    let slot = |index: u32, bytes: u8, high8: bool| Some(GprSlot { index: index as usize, bytes, high8 });
    match n {
        _ if (al..al + 4).contains(&n) => slot(n - al, 1, false),
        _ if (al + 4..al + 8).contains(&n) => slot(n - al - 4, 1, true),
        _ if (al + 8..al + 20).contains(&n) => slot(n - al - 4, 1, false),
        _ if (ax..ax + 16).contains(&n) => slot(n - ax, 2, false),
        _ if (eax..eax + 16).contains(&n) => slot(n - eax, 4, false),
        _ if (rax..rax + 16).contains(&n) => slot(n - rax, 8, false),
        _ => None,
    }
}

/// Mask of the low `bytes` bytes.
pub(crate) fn mask(bytes: u32) -> u64 {
    match bytes {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// An operand width normalised to 1, 2, 4 or 8 bytes (anything unexpected counts as 8), so width
/// arithmetic can never divide by zero or shift out of range.
pub(crate) fn width(bytes: u32) -> u32 {
    match bytes {
        1 | 2 | 4 => bytes,
        _ => 8,
    }
}

/// Sign-extends the low `bytes` bytes of `v` to 64 bits.
pub(crate) fn sext(v: u64, bytes: u32) -> u64 {
    match bytes {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// Whether `addr` is canonical for 48-bit linear addresses (SDM Vol. 1 §3.3.7.1).
pub(crate) fn canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

/// The architectural state of the software CPU plus the caches that speed it up.
pub(crate) struct Cpu {
    /// RAX…R15 in encoding order.
    pub gpr: [u64; 16],
    /// Instruction pointer (offset into CS).
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// Segments, descriptor tables, control registers, EFER.
    pub sregs: SystemRegs,
    /// x87/SSE area (stored, not interpreted).
    pub fpu: FxArea,
    /// Storage-only MSRs by index.
    pub msrs: BTreeMap<u32, u64>,
    /// Guest memory.
    pub mem: Arc<GuestMemory>,
    /// Host addresses of guest RAM pages (the fast path of every RAM access).
    pub host: HostPages,
    /// The CPUID table CPUID answers from.
    pub cpuid: CpuidProfile,
    /// The vendor the profile names: it decides every behaviour where Intel and AMD silicon
    /// differ (docs/VENDORS.md). Fixed for the vCPU's life, like the profile.
    pub vendor: Vendor,
    /// iced-x86 decoder options for that vendor: AMD's decoding of 66-prefixed near branches,
    /// REX.W far branches and LSS/LFS/LGS, UD0 and LOCK MOV CR0 (`DecoderOptions::AMD`).
    pub decoder_options: u32,
    /// Physical address width from CPUID 0x8000_0008.
    pub maxphyaddr: u32,
    /// Linear-to-physical translations.
    pub tlb: Tlb,
    /// Where cached decoded instructions lie in RAM, and the writes that hit them this step.
    pub code_lines: CodeLines,
    /// Data of in-flight MMIO and port accesses.
    pub io: IoStage,
    /// Instructions retired.
    pub retired: u64,
    /// Steps executed: instructions retired plus the iterations of REP string instructions.
    pub steps: u64,
    /// TSC = retired + tsc_offset (WRMSR to the TSC moves the offset).
    pub tsc_offset: u64,
    /// Interrupt shadow: instructions left (STI, MOV SS, POP SS set 2: this one and the next).
    pub shadow: u8,
    /// The part of `shadow` a MOV SS or POP SS set (not STI): an Intel CPU also suppresses a
    /// code breakpoint on the next instruction (see `code_breakpoints`).
    pub ss_shadow: u8,
    /// Exit requested by the instruction that just retired.
    pub post: Option<Post>,
    /// HLT executed and no interrupt delivered since.
    pub halted: bool,
    /// RIP of the instruction after the current one.
    pub next_rip: u64,
    /// RFLAGS bits the instructions retired so far left architecturally undefined.
    pub undefined: u64,
    /// This execution's effect on RFLAGS as (written, undefined), where it differs from
    /// iced-x86's static per-instruction masks: a zero-count shift or REP string instruction
    /// writes no flag, and a shift's OF is defined only for a count of 1. Consumed by the step.
    pub flag_effect: Option<(u64, u64)>,
    /// An event is being delivered: reads of unbacked memory return all ones (see `raise`).
    pub delivering: bool,
    /// The last step ran one iteration of a REP string instruction that is not finished.
    pub rep_pending: bool,
    /// DR0–DR3, DR6, DR7 (instruction breakpoints are raised; data and I/O breakpoints are not).
    pub dr: [u64; 6],
    /// PAE paging's PDPTE registers, loaded from memory with CR3 (SDM Vol. 3A §4.4.1).
    pub pdpte: [u64; 4],
    /// XCR0 (XSETBV/XGETBV).
    pub xcr0: u64,
    /// State of RDRAND's deterministic generator.
    pub rng: u64,
}

impl Cpu {
    /// A CPU in the RESET state over `mem`.
    pub fn new(mem: Arc<GuestMemory>, cpuid: CpuidProfile) -> Self {
        let maxphyaddr = (cpuid.lookup(0x8000_0008, 0)[0] & 0xff).clamp(32, 52);
        let reset = duet_core::CpuState::reset();
        let vendor = cpuid.vendor_kind();
        let decoder_options = if vendor == Vendor::Amd { DecoderOptions::AMD } else { DecoderOptions::NONE };
        Cpu {
            gpr: reset.regs.gprs(),
            rip: reset.regs.rip,
            rflags: reset.regs.rflags,
            sregs: reset.sregs,
            fpu: reset.fpu,
            msrs: BTreeMap::new(),
            host: HostPages::new(mem.clone()),
            mem,
            cpuid,
            vendor,
            decoder_options,
            maxphyaddr,
            tlb: Tlb::default(),
            code_lines: CodeLines::default(),
            io: IoStage::default(),
            retired: 0,
            steps: 0,
            tsc_offset: 0,
            shadow: 0,
            ss_shadow: 0,
            post: None,
            halted: false,
            next_rip: 0,
            undefined: 0,
            flag_effect: None,
            delivering: false,
            rep_pending: false,
            // DR6 and DR7 after RESET (SDM Vol. 3A Table 10-1).
            dr: [0, 0, 0, 0, 0xffff_0ff0, 0x400],
            // XCR0 after RESET has only the x87 bit (SDM Vol. 1 §13.3).
            pdpte: [0; 4],
            xcr0: 1,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Whether the profile asks for AMD's behaviour where the vendors differ (Intel's is the
    /// default: `Vendor::Other` follows Intel, as KVM's "Intel compatible" does).
    #[inline]
    pub fn amd(&self) -> bool {
        self.vendor == Vendor::Amd
    }

    /// CR0.PE.
    pub fn protected(&self) -> bool {
        self.sregs.cr0 & ctrl::CR0_PE != 0
    }

    /// Virtual-8086 mode.
    pub fn v86(&self) -> bool {
        self.protected() && self.rflags & rflags::VM != 0
    }

    /// IA-32e mode active (EFER.LMA).
    pub fn long_mode(&self) -> bool {
        self.sregs.efer & ctrl::EFER_LMA != 0
    }

    /// 64-bit mode: IA-32e active and CS.L.
    pub fn mode64(&self) -> bool {
        self.long_mode() && self.sregs.cs.l && self.protected()
    }

    /// Current privilege level: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL (as KVM reports it).
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else if self.rflags & rflags::VM != 0 {
            3
        } else {
            self.sregs.ss.dpl & 3
        }
    }

    /// Code size in bits: 16, 32 or 64. Outside 64-bit and virtual-8086 mode the cached CS.D bit
    /// decides, in real mode too (a CS left with D = 1 by protected mode runs 32-bit code until
    /// it is reloaded, SDM Vol. 3A §10.9.2).
    pub fn bitness(&self) -> u32 {
        if self.mode64() {
            64
        } else if !self.v86() && self.sregs.cs.db {
            32
        } else {
            16
        }
    }

    /// Width of the stack pointer in bytes: 8 in 64-bit mode, else 4 when the cached SS.B is set
    /// (also in real mode), else 2.
    pub fn stack_bytes(&self) -> u32 {
        if self.mode64() {
            8
        } else if !self.v86() && self.sregs.ss.db {
            4
        } else {
            2
        }
    }

    /// The fixed hidden part a virtual-8086 segment load produces (SDM Vol. 3A §20.2.1).
    pub fn v86_segment(sel: u16, code: bool) -> Segment {
        Segment { dpl: 3, ..Segment::real_mode(sel, code) }
    }

    /// In virtual-8086 mode, an IOPL-sensitive instruction with IOPL < 3 is #GP(0) (SDM Vol. 3A
    /// §20.2.7); callers handle CR4.VME's virtual-interrupt forms first (instructions::vme).
    pub fn v86_iopl_check(&self) -> Flow {
        if !self.v86() {
            return Ok(());
        }
        if self.iopl() < 3 {
            return Err(gp(0));
        }
        Ok(())
    }

    /// IOPL field of RFLAGS.
    pub fn iopl(&self) -> u8 {
        ((self.rflags >> 12) & 3) as u8
    }

    /// Reads a GPR (any width, including AH…BH); other registers read as their selector or 0.
    pub fn reg(&self, r: Register) -> u64 {
        if let Some(s) = gpr_slot(r) {
            let v = self.gpr.get(s.index).copied().unwrap_or(0);
            if s.high8 {
                (v >> 8) & 0xff
            } else {
                v & mask(u32::from(s.bytes))
            }
        } else if let Some(seg) = self.seg(r) {
            u64::from(seg.selector)
        } else {
            0
        }
    }

    /// Writes a GPR; a 32-bit write zeroes bits 63:32 (SDM Vol. 1 §3.4.1.1), 8/16-bit writes merge.
    pub fn set_reg(&mut self, r: Register, v: u64) {
        let Some(s) = gpr_slot(r) else { return };
        let Some(slot) = self.gpr.get_mut(s.index) else { return };
        *slot = match (s.bytes, s.high8) {
            (1, true) => (*slot & !0xff00) | ((v & 0xff) << 8),
            (1, false) => (*slot & !0xff) | (v & 0xff),
            (2, _) => (*slot & !0xffff) | (v & 0xffff),
            (4, _) => v & 0xffff_ffff,
            _ => v,
        };
    }

    /// Register by encoding number and width in bytes (RAX=0…R15=15; width 1 means the low byte).
    pub fn gpr_sized(&self, index: usize, bytes: u32) -> u64 {
        self.gpr.get(index).copied().unwrap_or(0) & mask(bytes)
    }

    /// Writes a register by encoding number and width with the usual merge / zero-extension.
    pub fn set_gpr_sized(&mut self, index: usize, bytes: u32, v: u64) {
        if let Some(slot) = self.gpr.get_mut(index) {
            *slot = match bytes {
                1 => (*slot & !0xff) | (v & 0xff),
                2 => (*slot & !0xffff) | (v & 0xffff),
                4 => v & 0xffff_ffff,
                _ => v,
            };
        }
    }

    /// The segment register named by `r`, if it is one.
    pub fn seg(&self, r: Register) -> Option<&Segment> {
        Some(match r {
            Register::ES => &self.sregs.es,
            Register::CS => &self.sregs.cs,
            Register::SS => &self.sregs.ss,
            Register::DS => &self.sregs.ds,
            Register::FS => &self.sregs.fs,
            Register::GS => &self.sregs.gs,
            _ => return None,
        })
    }

    /// Mutable access to the segment register named by `r`.
    pub fn seg_mut(&mut self, r: Register) -> Option<&mut Segment> {
        Some(match r {
            Register::ES => &mut self.sregs.es,
            Register::CS => &mut self.sregs.cs,
            Register::SS => &mut self.sregs.ss,
            Register::DS => &mut self.sregs.ds,
            Register::FS => &mut self.sregs.fs,
            Register::GS => &mut self.sregs.gs,
            _ => return None,
        })
    }

    /// Stack pointer masked to the stack width.
    pub fn sp(&self) -> u64 {
        self.gpr[4] & mask(self.stack_bytes())
    }

    /// Sets the stack pointer, keeping the bits above the stack width (SDM Vol. 1 §6.2.3).
    pub fn set_sp(&mut self, v: u64) {
        let b = self.stack_bytes();
        self.set_gpr_sized(4, if b == 4 { 8 } else { b }, if b == 4 { v & 0xffff_ffff } else { v });
    }

    /// Writes RFLAGS keeping the reserved bits fixed (bit 1 set, bits 3, 5, 15, 22–63 clear).
    pub fn set_rflags(&mut self, v: u64) {
        self.rflags = (v & 0x3f_7fd5) | rflags::FIXED;
    }

    /// Whether status flag `f` is set.
    pub fn flag(&self, f: u64) -> bool {
        self.rflags & f != 0
    }

    /// Sets or clears RFLAGS bits `f`.
    pub fn set_flag(&mut self, f: u64, on: bool) {
        if on {
            self.rflags |= f;
        } else {
            self.rflags &= !f;
        }
    }

    /// Replaces the six status flags with those in `v`.
    pub fn set_status(&mut self, v: u64) {
        self.rflags = (self.rflags & !rflags::STATUS) | (v & rflags::STATUS);
    }

    /// The time-stamp counter: a deterministic count of retired instructions.
    pub fn tsc(&self) -> u64 {
        self.retired.wrapping_add(self.tsc_offset)
    }
}

/// A CPU over 64 KiB of RAM in the RESET state, for unit tests.
#[cfg(test)]
pub(crate) fn test_cpu() -> Cpu {
    let mem = duet_core::Guest::new("unit", 0x10000).build_memory().unwrap_or_else(|e| panic!("{e}"));
    Cpu::new(mem, CpuidProfile::baseline())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reg_merges_narrow_writes_and_zero_extends_32bit() {
        let mut c = test_cpu();
        c.gpr[0] = 0x1122_3344_5566_7788;
        c.set_reg(Register::AH, 0xaa);
        assert_eq!(c.gpr[0], 0x1122_3344_5566_aa88);
        c.set_reg(Register::AX, 0xbbcc);
        assert_eq!(c.gpr[0], 0x1122_3344_5566_bbcc);
        // SDM Vol. 1 §3.4.1.1: a 32-bit destination zero-extends into the full register.
        c.set_reg(Register::EAX, 0xdead_beef);
        assert_eq!(c.gpr[0], 0xdead_beef);
        assert_eq!(c.reg(Register::AH), 0xbe);
    }

    #[test]
    fn gpr_slot_maps_legacy_high_bytes_and_rex_bytes() {
        // AH is bits 15:8 of RAX; SPL (REX) is bits 7:0 of RSP (SDM Vol. 1 §3.4.1.1).
        assert!(matches!(gpr_slot(Register::AH), Some(GprSlot { index: 0, bytes: 1, high8: true })));
        assert!(matches!(gpr_slot(Register::SPL), Some(GprSlot { index: 4, bytes: 1, high8: false })));
        assert!(matches!(gpr_slot(Register::R15L), Some(GprSlot { index: 15, bytes: 1, high8: false })));
        assert!(matches!(gpr_slot(Register::R9D), Some(GprSlot { index: 9, bytes: 4, .. })));
        assert!(gpr_slot(Register::CR0).is_none());
    }

    #[test]
    fn sext_and_canonical_follow_twos_complement() {
        assert_eq!(sext(0x80, 1), 0xffff_ffff_ffff_ff80);
        assert_eq!(sext(0x7fff, 2), 0x7fff);
        assert!(canonical(0xffff_8000_0000_0000));
        assert!(canonical(0x0000_7fff_ffff_ffff));
        assert!(!canonical(0x0000_8000_0000_0000));
    }
}
