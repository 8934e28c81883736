//! The one list of what KVM cannot decide on the hosts duet was tried on, and of results that
//! depend on the host rather than the architecture: each entry names itself, gives the reason
//! (SDM section, DEVELOPERS.md, the corpus case that pins it) and the hosts — vendor and KVM
//! kind — it was verified on. The judge counts a case one of these explains as undecided, never
//! as a divergence, and never drops it:
//! - on a host the limit was verified on, as a known limit;
//! - on a host with the same kind of KVM but another vendor (where nobody has checked whether
//!   the limit holds), as `unknown host`, but only when the case needs it: KVM still runs, and a
//!   case whose runs agree is decided;
//! - bare-metal KVM (`kvm_intel`, `kvm_amd`) is the silicon: no KVM limit applies, it decides.

use duet_core::Vendor;
use iced_x86::{Instruction, Mnemonic};

use super::case::{FuzzMode, Outcome, Parsed};
use super::diff::Diff;
use crate::host::{Host, KvmKind};

mod outcome;
pub use outcome::{only_flag_bits, KVM_PVM_OUTCOME_LIMITS};

/// An AMD host whose `/dev/kvm` is `kvm_pvm` (this development host).
pub const AMD_PVM: Host = Host { vendor: Vendor::Amd, kvm: KvmKind::Pvm };
/// An Intel host whose `/dev/kvm` is `kvm_pvm`.
pub const INTEL_PVM: Host = Host { vendor: Vendor::Intel, kvm: KvmKind::Pvm };
/// Verified under `kvm_pvm` on both vendors (DEVELOPERS.md's first table: raw KVM ioctls
/// against QEMU and the SDM on an Intel and an AMD host).
pub const PVM_BOTH: &[Host] = &[INTEL_PVM, AMD_PVM];
/// Verified under `kvm_pvm` on AMD only: found by `duet fuzz` on this host, or a fact of AMD
/// silicon (ring-3 code runs natively under `kvm_pvm`).
pub const PVM_AMD: &[Host] = &[AMD_PVM];
/// Verified under `kvm_pvm` on Intel only (found by `duet fuzz` on an Intel host).
pub const PVM_INTEL: &[Host] = &[INTEL_PVM];

/// The hosts a limit holds on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosts {
    /// Every host: the result depends on the host whatever the KVM (time, model-specific facts
    /// the generator cannot avoid).
    Every,
    /// These hosts (vendor and KVM kind), where it was verified.
    Only(&'static [Host]),
}

/// How a limit stands on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Verified on this host: KVM cannot decide such a case here.
    Known,
    /// Verified only on hosts with this host's kind of KVM but another vendor: nobody knows
    /// whether it holds here, so a case that needs it is undecided (`unknown host`).
    Unknown,
    /// Not about this host's kind of KVM (bare metal, or no KVM): it does not apply.
    NotHere,
}

impl Hosts {
    /// How a limit verified on these hosts stands on `host`.
    pub fn standing(self, host: Host) -> Standing {
        match self {
            Hosts::Every => Standing::Known,
            Hosts::Only(hosts) if hosts.contains(&host) => Standing::Known,
            Hosts::Only(hosts) if hosts.iter().any(|h| h.kvm == host.kvm) => Standing::Unknown,
            Hosts::Only(_) => Standing::NotHere,
        }
    }
}

impl std::fmt::Display for Hosts {
    /// `AMD kvm_pvm`, `Intel kvm_pvm and AMD kvm_pvm`, `every host`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hosts::Every => f.write_str("every host"),
            Hosts::Only(hosts) => {
                let names: Vec<String> = hosts.iter().map(|h| format!("{} {}", h.vendor, h.kvm)).collect();
                f.write_str(&names.join(" and "))
            }
        }
    }
}

/// A known limit of a host's hardware backend recognised from the program: cases it matches are
/// not decided by KVM there.
#[derive(Clone, Copy, Debug)]
pub struct HostLimit {
    /// Short name.
    pub name: &'static str,
    /// The hosts it was verified on.
    pub hosts: Hosts,
    /// Why KVM cannot decide it there (DEVELOPERS.md, `duet doctor --kvm-selfcheck`).
    pub reason: &'static str,
    /// Whether the limit applies to an instruction (given the one decoded before it, if any).
    pub(super) applies: fn(FuzzMode, &Instruction, Option<&Instruction>) -> bool,
}

/// A known limit of a host's hardware backend recognised from the two outcomes (a state, not an
/// instruction, triggers it): a divergence it matches is counted as undecided, never dropped.
#[derive(Clone, Copy, Debug)]
pub struct OutcomeLimit {
    /// Short name.
    pub name: &'static str,
    /// The hosts it was verified on.
    pub hosts: Hosts,
    /// Why KVM cannot decide it there, and what the SDM says.
    pub reason: &'static str,
    /// Whether it explains the divergence `diff` between the runs (kvm, interp) of a case.
    pub(super) applies: fn(&Parsed, &Outcome, &Outcome, &Diff) -> bool,
}

/// A limit that matched a case, and how it stands on the host that ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matched {
    /// The limit's name.
    pub name: &'static str,
    /// Its reason.
    pub reason: &'static str,
    /// Where it was verified.
    pub hosts: Hosts,
    /// How it stands on the host.
    pub standing: Standing,
}

impl Matched {
    /// Why the case is undecided, in words (`known KVM limit …` or `unknown host: …`).
    pub fn why(&self, host: Host) -> String {
        match self.standing {
            Standing::Unknown => format!(
                "unknown host: `{}` was verified on {} (this host is {host}); {}",
                self.name, self.hosts, self.reason
            ),
            _ => format!("known KVM limit `{}`: {}", self.name, self.reason),
        }
    }
}

impl Matched {
    /// The limit `name` (with its `reason`, verified on `hosts`) as it stands on `host`.
    fn of(name: &'static str, reason: &'static str, hosts: Hosts, host: Host) -> Matched {
        Matched { name, reason, hosts, standing: hosts.standing(host) }
    }
}

impl HostLimit {
    fn matched(&self, host: Host) -> Matched {
        Matched::of(self.name, self.reason, self.hosts, host)
    }
}

impl OutcomeLimit {
    fn matched(&self, host: Host) -> Matched {
        Matched::of(self.name, self.reason, self.hosts, host)
    }
}

/// The first of `found` that is known on the host, else the first whose host is unknown.
fn best(found: impl Iterator<Item = Matched>) -> Option<Matched> {
    let found: Vec<Matched> = found.filter(|m| m.standing != Standing::NotHere).collect();
    found.iter().find(|m| m.standing == Standing::Known).or(found.first()).copied()
}

/// The limit recognised from the program of `p` that stands on `host`, if any: known limits
/// first ([`KVM_PVM_LIMITS`], then [`HOST_SPECIFIC_LIMITS`]), then those whose host is unknown.
pub fn instruction_limit(host: Host, p: &Parsed) -> Option<Matched> {
    let scan = |list: &[HostLimit], s: Standing| {
        let here: Vec<HostLimit> = list.iter().filter(|l| l.hosts.standing(host) == s).copied().collect();
        super::judge::host_limit(p, &here)
    };
    [Standing::Known, Standing::Unknown]
        .into_iter()
        .flat_map(|s| [KVM_PVM_LIMITS, HOST_SPECIFIC_LIMITS].map(|list| (list, s)))
        .find_map(|(list, s)| scan(list, s))
        .map(|l| l.matched(host))
}

/// The limits recognised from the program that are known on `host` (what a campaign that avoids
/// host limits redraws for).
pub fn known_instruction_limits(host: Host) -> Vec<HostLimit> {
    KVM_PVM_LIMITS
        .iter()
        .chain(HOST_SPECIFIC_LIMITS)
        .filter(|l| l.hosts.standing(host) == Standing::Known)
        .copied()
        .collect()
}

/// The outcome limit that explains the divergence `diff` between `kvm` and `interp` on `host`,
/// if any (known limits first).
pub fn outcome_limit(
    host: Host,
    p: &Parsed,
    kvm: &Outcome,
    interp: &Outcome,
    diff: &Diff,
) -> Option<Matched> {
    best(
        KVM_PVM_OUTCOME_LIMITS
            .iter()
            .filter(|l| l.hosts.standing(host) != Standing::NotHere && (l.applies)(p, kvm, interp, diff))
            .map(|l| l.matched(host)),
    )
}

/// Every known limit of nested `kvm_pvm` KVM recognised from the program (DEVELOPERS.md), each with
/// the hosts it was verified on.
pub const KVM_PVM_LIMITS: &[HostLimit] = &[
    HostLimit {
        name: "bcd-arpl-bound",
        hosts: Hosts::Only(PVM_BOTH),
        reason: "DAA, AAA, AAS, ARPL and BOUND end in KVM_EXIT_INTERNAL_ERROR (emulation failure)",
        applies: |_, i, _| {
            matches!(
                i.mnemonic(),
                Mnemonic::Daa | Mnemonic::Aaa | Mnemonic::Aas | Mnemonic::Arpl | Mnemonic::Bound
            )
        },
    },
    HostLimit {
        name: "real-mode-int",
        hosts: Hosts::Only(PVM_BOTH),
        reason: "a real-mode INT n never completes (SDM Vol. 3A §21.1.4 says it vectors through the IVT)",
        applies: |m, i, _| m == FuzzMode::Real && is_soft_int(i),
    },
    HostLimit {
        name: "ring3-int",
        hosts: Hosts::Only(PVM_BOTH),
        reason:
            "INT n from ring 3 through a DPL-3 gate triple-faults (SDM Vol. 3A §6.12: delivered at CPL 0)",
        applies: |m, i, _| m == FuzzMode::Long64Ring3 && is_soft_int(i),
    },
    HostLimit {
        name: "pvm-emulation-failure",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm cannot emulate these (KVM_EXIT_INTERNAL_ERROR in ring 0, a wrong #UD in ring 3): VERR, VERW, LAR, LSL, LFENCE, MFENCE, SFENCE, FWAIT, UD0, UD1, ENDBR32/64 and hint NOPs with operands",
        applies: |_, i, _| {
            matches!(
                i.mnemonic(),
                Mnemonic::Verr | Mnemonic::Verw | Mnemonic::Lar | Mnemonic::Lsl | Mnemonic::Lfence | Mnemonic::Mfence
                    | Mnemonic::Sfence | Mnemonic::Wait | Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Endbr32
                    | Mnemonic::Endbr64 | Mnemonic::Reservednop
            ) || (i.mnemonic() == Mnemonic::Nop && i.op_count() > 0)
        },
    },
    HostLimit {
        name: "fsgsbase",
        hosts: Hosts::Only(PVM_AMD),
        reason: "RDFSBASE, RDGSBASE, WRFSBASE and WRGSBASE run under kvm_pvm although CR4.FSGSBASE = 0 (SDM Vol. 2B RDFSBASE: #UD)",
        applies: |_, i, _| {
            matches!(i.mnemonic(), Mnemonic::Rdfsbase | Mnemonic::Rdgsbase | Mnemonic::Wrfsbase | Mnemonic::Wrgsbase)
        },
    },
    HostLimit {
        name: "ring3-selectors",
        hosts: Hosts::Only(PVM_AMD),
        reason: "in 64-bit ring 3, kvm_pvm shows the data segment selectors as 0 (MOV r/m, Sreg and PUSH Sreg read 0, not the loaded selector)",
        applies: |m, i, _| {
            m == FuzzMode::Long64Ring3
                && (matches!(i.code(), iced_x86::Code::Mov_rm16_Sreg | iced_x86::Code::Mov_r32m16_Sreg | iced_x86::Code::Mov_r64m16_Sreg)
                    || (matches!(i.mnemonic(), Mnemonic::Push) && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register()))
        },
    },
    HostLimit {
        name: "msrs",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm returns 0 for RDMSR of MSRs it does not know and drops such WRMSRs instead of #GP(0) (SDM Vol. 2B RDMSR/WRMSR), even with kvm.ignore_msrs=N",
        applies: |_, i, _| matches!(i.mnemonic(), Mnemonic::Rdmsr | Mnemonic::Wrmsr),
    },
    HostLimit {
        name: "enter-operand-size",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm ignores an operand-size prefix on ENTER (66 C8 pushes 4 bytes in 32-bit code, 2 in 16-bit code; SDM Vol. 2A ENTER: the push is of the operand size)",
        applies: |m, i, _| {
            i.mnemonic() == Mnemonic::Enter
                && match m.bitness() {
                    16 => i.code() != iced_x86::Code::Enterw_imm16_imm8,
                    32 => i.code() != iced_x86::Code::Enterd_imm16_imm8,
                    _ => i.code() != iced_x86::Code::Enterq_imm16_imm8,
                }
        },
    },
    HostLimit {
        name: "enter-nesting",
        hosts: Hosts::Only(PVM_AMD),
        reason: "ENTER with a nesting level above 0 is an emulation failure under kvm_pvm in ring 0 and a wrong #UD in ring 3 (SDM Vol. 2A ENTER: it copies the frame pointers; DEVELOPERS.md)",
        applies: |_, i, _| i.mnemonic() == Mnemonic::Enter && i.immediate8_2nd() % 32 != 0,
    },
    HostLimit {
        name: "int-n-protected",
        hosts: Hosts::Only(PVM_AMD),
        reason: "INT n, INT3 and INTO in protected and long mode: kvm_pvm fails to emulate them (KVM_EXIT_INTERNAL_ERROR) or raises #GP instead of delivering through the gate (SDM Vol. 2A INT n; DEVELOPERS.md)",
        applies: |m, i, _| m != FuzzMode::Real && is_soft_int(i),
    },
    HostLimit {
        name: "invalid-encodings",
        hosts: Hosts::Only(PVM_AMD),
        reason: "byte sequences iced-x86 decodes as invalid (reserved encodings, #UD on Intel parts, SDM Vol. 2 Appendix A) may execute on this AMD host, where kvm_pvm runs the code natively (vendor-specific decoding of reserved opcodes)",
        applies: |_, i, _| i.code() == iced_x86::Code::INVALID,
    },
    HostLimit {
        name: "aad-aam",
        hosts: Hosts::Only(PVM_AMD),
        reason: "KVM's instruction emulator (16-bit code under kvm_pvm) sets AAD's and AAM's SF, ZF, PF from AX/EAX instead of AL (SDM Vol. 2A AAD, AAM; DEVELOPERS.md)",
        applies: |_, i, _| matches!(i.mnemonic(), Mnemonic::Aad | Mnemonic::Aam),
    },
    HostLimit {
        name: "int1",
        hosts: Hosts::Only(PVM_AMD),
        reason: "INT1 (ICEBP) is an emulation failure in ring 0 and #UD in ring 3 (SDM Vol. 3A §6.15 / Vol. 2A INT1: #DB through gate 1 without a DPL check)",
        applies: |_, i, _| i.mnemonic() == Mnemonic::Int1,
    },
    HostLimit {
        name: "store-system-register-to-memory",
        hosts: Hosts::Only(PVM_AMD),
        reason: "STR, SLDT, SMSW, SGDT, SIDT and MOV Sreg (REX.W) to memory are emulated by kvm_pvm: it reads the destination first (an extra MMIO read) and with REX.W writes 8 bytes (SDM Vol. 2B STR: a 16-bit store regardless of operand size)",
        applies: |_, i, _| {
            (matches!(i.mnemonic(), Mnemonic::Str | Mnemonic::Sldt | Mnemonic::Smsw | Mnemonic::Sgdt | Mnemonic::Sidt)
                || i.code() == iced_x86::Code::Mov_r64m16_Sreg)
                && i.op0_kind() == iced_x86::OpKind::Memory
        },
    },
    HostLimit {
        name: "cmpxchg-r32-ring0",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm's ring-0 emulator zero-extends the 64-bit register destination of a failed 32-bit CMPXCHG; ring-3 code runs natively and keeps the upper half, as the silicon does (DEVELOPERS.md; fixtures/corpus/regressions/cmpxchg-r32-fail-upper-half.json)",
        applies: |m, i, _| {
            m == FuzzMode::Long64
                && i.mnemonic() == Mnemonic::Cmpxchg
                && i.op0_kind() == iced_x86::OpKind::Register
                && i.op0_register().size() == 4
        },
    },
    HostLimit {
        name: "cpuid-host-leaves",
        hosts: Hosts::Only(PVM_AMD),
        reason: "the guest's CPUID shows the host's leaves 1, 7 and 0xD under kvm_pvm, not the profile given with KVM_SET_CPUID2 (DEVELOPERS.md)",
        applies: |_, i, _| i.mnemonic() == Mnemonic::Cpuid,
    },
    HostLimit {
        name: "cr4-feature-bits",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm accepts CR4 bits the host enumerates (FSGSBASE, OSXSAVE, SMEP, SMAP, PKE, UMIP, LA57, PCIDE …) although the guest's CPUID profile does not; SDM Vol. 3A §2.5 and Vol. 2B MOV CRn: setting a bit the processor does not enumerate is #GP(0) (fixtures/corpus/regressions/cr4-fsgsbase*.json)",
        applies: |_, i, prev| {
            // The generator's CR4 snippet: `mov r, cr4; xor eax, imm32; mov cr4, r`.
            const HOST_ONLY: u64 = (1 << 11) | (1 << 12) | (0x7f << 16) | (1 << 23) | (1 << 24);
            i.code().op_code().op_kinds().contains(&iced_x86::OpCodeOperandKind::cr_reg)
                && i.op0_register() == iced_x86::Register::CR4
                && prev.is_some_and(|p| p.mnemonic() == Mnemonic::Xor && p.immediate(1) & HOST_ONLY != 0)
        },
    },
    HostLimit {
        name: "movbe-ring0",
        hosts: Hosts::Only(PVM_AMD),
        reason: "without MOVBE in the profile the answer is #UD before any memory access (SDM Vol. 2B MOVBE, Exceptions; the software CPU decodes then faults); kvm_pvm's emulator translates the memory operand first and sets the paging-structure accessed bits",
        applies: |m, i, _| m.cpl() == 0 && i.mnemonic() == Mnemonic::Movbe,
    },
    HostLimit {
        name: "ring3-segment-loads",
        hosts: Hosts::Only(PVM_AMD),
        reason: "in 64-bit ring 3, kvm_pvm does not show a data segment register loaded with a null selector by MOV Sreg, POP Sreg or LFS/LGS/LSS (the old selector stays visible), and LDT selectors resolve against kvm_pvm's own LDT, not the guest's LDTR (SDM Vol. 2B MOV/POP/LDS: a null selector is loaded; a TI = 1 selector with an invalid LDTR is #GP(selector))",
        applies: |m, i, _| {
            m == FuzzMode::Long64Ring3
                && ((i.mnemonic() == Mnemonic::Mov && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register())
                    || (i.mnemonic() == Mnemonic::Pop && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register())
                    || matches!(i.mnemonic(), Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss))
        },
    },
    HostLimit {
        name: "far-pointer-rex-w",
        hosts: Hosts::Only(PVM_AMD),
        reason: "LSS, LFS, LGS and far JMP/CALL through memory with REX.W: kvm_pvm's instruction emulator (which also handles these segment loads in ring 3) reads an m16:64 far pointer whatever the vendor; an AMD part ignores REX.W there and reads m16:32 (AMD64 APM Vol. 3; iced-x86 DecoderOptions::AMD; QEMU agrees for LSS/LFS/LGS; fixtures/corpus/regressions/lss-rex-w-reads-m16-32-on-amd.json)",
        applies: |m, i, _| {
            use iced_x86::Code;
            m.bitness() == 64
                && matches!(i.code(), Code::Lss_r64_m1664 | Code::Lfs_r64_m1664 | Code::Lgs_r64_m1664 | Code::Jmp_m1664 | Code::Call_m1664)
        },
    },
    HostLimit {
        name: "ring3-syscall",
        hosts: Hosts::Only(PVM_BOTH),
        reason: "SYSCALL from ring 3 stays at CPL 3 (SDM Vol. 2B SYSCALL: CPL 0)",
        applies: |m, i, _| m == FuzzMode::Long64Ring3 && i.mnemonic() == Mnemonic::Syscall,
    },
];

/// Instructions whose results are host-specific on any host (see [`HOST_SPECIFIC`]): the
/// generator never draws them, but a branch into the middle of another instruction can reach
/// their bytes; such a case is undecided everywhere.
pub const HOST_SPECIFIC_LIMITS: &[HostLimit] = &[HostLimit {
    name: "time-stamp-counter",
    hosts: Hosts::Every,
    reason: "RDTSC, RDTSCP and RDPMC read time or counters: the two runs happen at different times",
    applies: |_, i, _| matches!(i.mnemonic(), Mnemonic::Rdtsc | Mnemonic::Rdtscp | Mnemonic::Rdpmc),
}];

fn is_soft_int(i: &Instruction) -> bool {
    matches!(i.mnemonic(), Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into | Mnemonic::Int1)
}

/// Results that depend on the host rather than on the CPU's architecture; never generated.
pub const HOST_SPECIFIC: &[(&str, &str)] = &[
    ("RDTSC, RDTSCP, RDPMC", "read time or performance counters: the two runs happen at different times"),
    (
        "CPUID leaves beyond the shared profile",
        "both backends apply one profile; values outside it are the host's",
    ),
    ("accesses to 0xfeffc000-0xfeffffff", "KVM reserves these pages (TSS and identity map) for itself"),
    (
        "a 2- or 4-byte access wrapping past 4 GiB in a segment with a 4 GiB limit",
        "SDM Vol. 3A §5.3: may or may not fault, implementation-specific (kvm_pvm wraps, the interpreter faults)",
    ),
    (
        "the number and size of MMIO reads",
        "KVM's instruction emulator reads ahead for string instructions and merges far-pointer loads; reads return a pattern of the address, so their effect on registers is still compared, the read exits themselves are not",
    ),
    (
        "descriptor tables or gates in MMIO",
        "kvm_pvm cannot read system structures from MMIO (it shuts down); the interpreter reads them through the bus",
    ),
    (
        "IOPL > 0 at CPL 3",
        "kvm_pvm runs ring 3 with IOPL 0 whatever the guest sets; ring-3 cases start with IOPL 0, so their final OUT is a #GP",
    ),
    (
        "PUSH of a segment register with a 32- or 64-bit operand size",
        "SDM Vol. 2B PUSH: the upper bytes of the stack slot are either zeroed or left unmodified, by processor; never generated",
    ),
    (
        "RDRAND, RDSEED",
        "random by design, and hardware executes them whatever CPUID says; never generated",
    ),
    (
        "EFLAGS.TF set by the guest (POPF)",
        "kvm_pvm does not deliver the single-step #DB to the guest; the generator's POPF never sets TF",
    ),
    (
        "memory and registers after a triple fault",
        "a shutdown leaves partial frames and registers that are implementation-specific; only the stop and the exits before it are compared",
    ),
    (
        "EFLAGS.AC at exception delivery",
        "kvm_pvm clears AC when it delivers an exception, hardware keeps it; the generator never sets AC",
    ),
];
