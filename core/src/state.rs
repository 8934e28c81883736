//! Backend-neutral CPU state: plain data that every backend reads and writes.

use std::collections::BTreeMap;

/// RFLAGS bits named by the SDM (Vol. 1 §3.4.3).
pub mod rflags {
    /// Carry flag.
    pub const CF: u64 = 1 << 0;
    /// Reserved bit 1, always set.
    pub const FIXED: u64 = 1 << 1;
    /// Parity flag.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry flag.
    pub const AF: u64 = 1 << 4;
    /// Zero flag.
    pub const ZF: u64 = 1 << 6;
    /// Sign flag.
    pub const SF: u64 = 1 << 7;
    /// Trap flag (single step).
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable flag.
    pub const IF: u64 = 1 << 9;
    /// Direction flag.
    pub const DF: u64 = 1 << 10;
    /// Overflow flag.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume flag.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check.
    pub const AC: u64 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u64 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u64 = 1 << 20;
    /// CPUID is available.
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// Control-register and EFER bits the harness and the backends name.
pub mod ctrl {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.MP: monitor coprocessor.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0.EM: x87 emulation.
    pub const CR0_EM: u64 = 1 << 2;
    /// CR0.TS: task switched.
    pub const CR0_TS: u64 = 1 << 3;
    /// CR0.ET: extension type (always 1 on modern CPUs).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.NE: native x87 error reporting.
    pub const CR0_NE: u64 = 1 << 5;
    /// CR0.WP: supervisor writes honour R/W.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.AM: alignment mask.
    pub const CR0_AM: u64 = 1 << 18;
    /// CR0.NW: not write-through.
    pub const CR0_NW: u64 = 1 << 29;
    /// CR0.CD: cache disable.
    pub const CR0_CD: u64 = 1 << 30;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE: 4 MiB pages in 32-bit paging.
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE: physical address extension.
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.PGE: global pages.
    pub const CR4_PGE: u64 = 1 << 7;
    /// CR4.OSFXSR: FXSAVE/FXRSTOR and SSE enabled by the OS.
    pub const CR4_OSFXSR: u64 = 1 << 9;
    /// CR4.OSXMMEXCPT: unmasked SIMD exceptions.
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    /// EFER.SCE: SYSCALL enable.
    pub const EFER_SCE: u64 = 1 << 0;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE: no-execute enable.
    pub const EFER_NXE: u64 = 1 << 11;
}

/// Well-known MSR indices.
pub mod msr {
    /// IA32_TIME_STAMP_COUNTER.
    pub const TSC: u32 = 0x10;
    /// IA32_APIC_BASE.
    pub const APIC_BASE: u32 = 0x1b;
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_PAT.
    pub const PAT: u32 = 0x277;
    /// IA32_EFER.
    pub const EFER: u32 = 0xc000_0080;
    /// IA32_STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// IA32_LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// IA32_CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// IA32_FMASK.
    pub const SFMASK: u32 = 0xc000_0084;
    /// IA32_FS_BASE.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// IA32_GS_BASE.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// IA32_KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC_AUX.
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// General-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // register names speak for themselves
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl Regs {
    /// Names of the sixteen GPRs in encoding order (RAX = 0 … R15 = 15).
    pub const GPR_NAMES: [&'static str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15",
    ];

    /// The sixteen GPRs in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8…R15).
    pub fn gprs(&self) -> [u64; 16] {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi, self.r8, self.r9,
            self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    /// Sets the sixteen GPRs from an array in encoding order.
    pub fn set_gprs(&mut self, g: &[u64; 16]) {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi, self.r8, self.r9,
            self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ] = *g;
    }
}

/// A segment register with its hidden part, in the layout KVM uses.
///
/// `limit` is the byte-granular effective limit (already scaled by G).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Effective limit in bytes.
    pub limit: u32,
    /// Visible selector.
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B bit).
    pub db: bool,
    /// Descriptor type: code/data (true) or system (false).
    pub s: bool,
    /// 64-bit code segment (L bit).
    pub l: bool,
    /// Granularity.
    pub g: bool,
    /// Available for software.
    pub avl: bool,
    /// Segment is unusable (null selector loaded).
    pub unusable: bool,
}

impl Segment {
    /// A real-mode segment: base = selector × 16, 64 KiB limit, read/write data (or code).
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            base: u64::from(selector) << 4,
            limit: 0xffff,
            selector,
            type_: if code { 0xb } else { 0x3 },
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: false,
            g: false,
            avl: false,
            unusable: false,
        }
    }

    /// Builds the hidden part from an 8-byte descriptor as loaded from a GDT/LDT.
    pub fn from_descriptor(selector: u16, raw: u64) -> Self {
        let limit_raw = (raw & 0xffff) | ((raw >> 32) & 0xf_0000);
        let g = raw & (1 << 55) != 0;
        let limit = if g { (limit_raw << 12) | 0xfff } else { limit_raw } as u32;
        Segment {
            base: ((raw >> 16) & 0xff_ffff) | ((raw >> 32) & 0xff00_0000),
            limit,
            selector,
            type_: ((raw >> 40) & 0xf) as u8,
            s: raw & (1 << 44) != 0,
            dpl: ((raw >> 45) & 3) as u8,
            present: raw & (1 << 47) != 0,
            avl: raw & (1 << 52) != 0,
            l: raw & (1 << 53) != 0,
            db: raw & (1 << 54) != 0,
            g,
            unusable: false,
        }
    }

    /// The 8-byte descriptor this hidden part corresponds to (inverse of [`Segment::from_descriptor`]).
    pub fn to_descriptor(&self) -> u64 {
        let limit = if self.g { u64::from(self.limit) >> 12 } else { u64::from(self.limit) };
        (limit & 0xffff)
            | ((self.base & 0xff_ffff) << 16)
            | (u64::from(self.type_ & 0xf) << 40)
            | (u64::from(self.s) << 44)
            | (u64::from(self.dpl & 3) << 45)
            | (u64::from(self.present) << 47)
            | ((limit & 0xf_0000) << 32)
            | (u64::from(self.avl) << 52)
            | (u64::from(self.l) << 53)
            | (u64::from(self.db) << 54)
            | (u64::from(self.g) << 55)
            | ((self.base & 0xff00_0000) << 32)
    }

    /// The attribute word in VMX access-rights layout (type, S, DPL, P, AVL, L, D/B, G, unusable).
    pub fn attributes(&self) -> u32 {
        u32::from(self.type_ & 0xf)
            | (u32::from(self.s) << 4)
            | (u32::from(self.dpl & 3) << 5)
            | (u32::from(self.present) << 7)
            | (u32::from(self.avl) << 12)
            | (u32::from(self.l) << 13)
            | (u32::from(self.db) << 14)
            | (u32::from(self.g) << 15)
            | (u32::from(self.unusable) << 16)
    }
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (size − 1).
    pub limit: u16,
}

/// Segment registers, descriptor tables, control registers and EFER.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // register names speak for themselves
pub struct SystemRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

impl SystemRegs {
    /// The architectural state after RESET/INIT (SDM Vol. 3A §10.1.1, Table 10-1).
    pub fn reset() -> Self {
        let data = Segment::real_mode(0, false);
        let mut cs = Segment::real_mode(0xf000, true);
        cs.base = 0xffff_0000;
        let tr = Segment { type_: 0xb, present: true, limit: 0xffff, ..Segment::default() };
        let ldt = Segment { type_: 0x2, present: true, limit: 0xffff, ..Segment::default() };
        SystemRegs {
            cs,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt,
            gdt: DescriptorTable { base: 0, limit: 0xffff },
            idt: DescriptorTable { base: 0, limit: 0xffff },
            cr0: 0x6000_0010,
            apic_base: 0xfee0_0900,
            ..SystemRegs::default()
        }
    }

    /// The six data/code segment registers with their names, in ES, CS, SS, DS, FS, GS order.
    pub fn segments(&self) -> [(&'static str, &Segment); 6] {
        [
            ("es", &self.es),
            ("cs", &self.cs),
            ("ss", &self.ss),
            ("ds", &self.ds),
            ("fs", &self.fs),
            ("gs", &self.gs),
        ]
    }
}

/// x87/MMX/SSE state in FXSAVE layout (SDM Vol. 1 §10.5.1, Table 10-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FxArea(pub [u8; 512]);

impl Default for FxArea {
    /// FNINIT state: FCW = 0x037F, MXCSR = 0x1F80, everything else zero.
    fn default() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        FxArea(a)
    }
}

impl FxArea {
    /// x87 control word.
    pub fn fcw(&self) -> u16 {
        u16::from_le_bytes([self.0[0], self.0[1]])
    }
    /// MXCSR.
    pub fn mxcsr(&self) -> u32 {
        u32::from_le_bytes([self.0[24], self.0[25], self.0[26], self.0[27]])
    }
    /// XMM register `i` (0–15) as a 128-bit value.
    pub fn xmm(&self, i: usize) -> u128 {
        let off = 160 + 16 * (i & 15);
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.0[off..off + 16]);
        u128::from_le_bytes(b)
    }
}

/// The complete architectural state of one vCPU that duet reads, writes and compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// GPRs, RIP, RFLAGS.
    pub regs: Regs,
    /// Segments, descriptor tables, control registers, EFER.
    pub sregs: SystemRegs,
    /// x87/SSE state.
    pub fpu: FxArea,
    /// MSRs by index (only those the harness tracks; see [`TRACKED_MSRS`]).
    pub msrs: BTreeMap<u32, u64>,
}

/// MSRs every backend reads back into [`CpuState::msrs`].
pub const TRACKED_MSRS: [u32; 10] = [
    msr::SYSENTER_CS,
    msr::SYSENTER_ESP,
    msr::SYSENTER_EIP,
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SFMASK,
    msr::KERNEL_GS_BASE,
    msr::PAT,
    msr::TSC_AUX,
];

/// The execution mode the CPU is in, derived from CR0, EFER, RFLAGS and CS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuMode {
    /// CR0.PE = 0.
    Real,
    /// Protected mode with EFLAGS.VM = 1.
    Virtual8086,
    /// Protected mode, 16-bit code segment.
    Protected16,
    /// Protected mode, 32-bit code segment.
    Protected32,
    /// Long mode, compatibility sub-mode (CS.L = 0).
    Compatibility,
    /// 64-bit mode.
    Long64,
}

impl CpuState {
    /// The state after RESET (SDM Vol. 3A Table 10-1): real mode at F000:FFF0.
    pub fn reset() -> Self {
        CpuState {
            regs: Regs { rip: 0xfff0, rflags: rflags::FIXED, rdx: 0x600, ..Regs::default() },
            sregs: SystemRegs::reset(),
            fpu: FxArea::default(),
            msrs: BTreeMap::new(),
        }
    }

    /// The current execution mode.
    pub fn mode(&self) -> CpuMode {
        let s = &self.sregs;
        if s.cr0 & ctrl::CR0_PE == 0 {
            CpuMode::Real
        } else if s.efer & ctrl::EFER_LMA != 0 {
            if s.cs.l {
                CpuMode::Long64
            } else {
                CpuMode::Compatibility
            }
        } else if self.regs.rflags & rflags::VM != 0 {
            CpuMode::Virtual8086
        } else if s.cs.db {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        }
    }

    /// Current privilege level (SS.DPL, which equals CS.RPL outside transitions).
    pub fn cpl(&self) -> u8 {
        if self.sregs.cr0 & ctrl::CR0_PE == 0 {
            0
        } else {
            self.sregs.ss.dpl
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_descriptor_round_trips() {
        // Flat 4 GiB 32-bit code: base 0, limit 0xfffff pages, type 0xb, S, P, D, G.
        let raw = 0x00cf_9b00_0000_ffffu64;
        let s = Segment::from_descriptor(0x8, raw);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.type_, 0xb);
        assert!(s.db && s.g && s.present && s.s && !s.l);
        assert_eq!(s.to_descriptor(), raw);
        // A byte-granular descriptor with a high base.
        let raw = 0x1200_9312_3456_0fffu64;
        let s = Segment::from_descriptor(0x10, raw);
        assert_eq!(s.base, 0x1212_3456);
        assert_eq!(s.limit, 0xfff);
        assert_eq!(s.to_descriptor(), raw);
    }

    #[test]
    fn gprs_round_trip_in_encoding_order() {
        let mut r = Regs::default();
        let g: [u64; 16] = std::array::from_fn(|i| i as u64 * 0x11);
        r.set_gprs(&g);
        assert_eq!(r.rcx, 0x11);
        assert_eq!(r.rsp, 0x44);
        assert_eq!(r.r15, 15 * 0x11);
        assert_eq!(r.gprs(), g);
    }

    #[test]
    fn reset_state_is_real_mode_at_reset_vector() {
        let s = CpuState::reset();
        assert_eq!(s.mode(), CpuMode::Real);
        assert_eq!(s.sregs.cs.base + s.regs.rip, 0xffff_fff0);
        assert_eq!(s.cpl(), 0);
    }
}
