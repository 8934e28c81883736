//! Comparing two outcomes, the one list of known host limits, and the third-opinion seam.

use std::collections::BTreeSet;

use duet_core::diff::DiffRow;
use duet_core::state::rflags;
use duet_core::StateDiff;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

use super::case::{parse_hex, Case, FuzzMode, Outcome};
use super::layout::STACK_TOPS;

/// Compares two outcomes; only RFLAGS bits either side reports undefined are masked, in RFLAGS
/// and in pushed FLAGS images on the stacks (an exception frame or PUSHF of undefined flags).
///
/// `initial` reads the 8-byte word at an address of the case's initial image (a word missing
/// from one side's memory map is unchanged there).
pub fn compare(left: (&str, &Outcome), right: (&str, &Outcome), initial: &dyn Fn(u64) -> u64) -> StateDiff {
    let (a, b) = (left.1, right.1);
    let mut d = StateDiff { sides: (left.0.into(), right.0.into()), rows: Vec::new() };
    let row =
        |field: &str, l: &str, r: &str| DiffRow { field: field.into(), left: l.into(), right: r.into() };
    if a.stop != b.stop {
        d.rows.push(row("stop", &a.stop, &b.stop));
    }
    if a.stop == "shutdown" && b.stop == "shutdown" {
        // See HOST_SPECIFIC: after a triple fault only the stop and the exits are compared.
        if a.exits != b.exits {
            d.rows.push(row("exits", &a.exits.join("; "), &b.exits.join("; ")));
        }
        return d;
    }
    let undef = parse_hex(&a.rflags_undefined).unwrap_or(0) | parse_hex(&b.rflags_undefined).unwrap_or(0);
    let keys: BTreeSet<&String> = a.state.keys().chain(b.state.keys()).collect();
    for k in keys {
        let (x, y) = (a.state.get(k), b.state.get(k));
        // An MSR one backend cannot read is a host limit, not a CPU difference.
        if k.starts_with("msr[") && (x.is_none() || y.is_none()) {
            continue;
        }
        let differs = if k == "rflags" {
            let f = |v: Option<&String>| v.and_then(|s| parse_hex(s)).unwrap_or(0) & !undef;
            f(x) != f(y)
        } else {
            x != y
        };
        if differs {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "absent".into());
            d.rows.push(row(k, &show(x), &show(y)));
        }
    }
    let words: BTreeSet<&String> = a.memory.keys().chain(b.memory.keys()).collect();
    for w in words {
        let Some(addr) = parse_hex(w) else { continue };
        let val = |o: &Outcome| o.memory.get(w).and_then(|v| parse_hex(v)).unwrap_or_else(|| initial(addr));
        let (x, y) = (val(a), val(b));
        if x != y && !undefined_flags_image(addr, x ^ y, undef) && !frame_flags(a, addr, x ^ y, undef) {
            d.rows.push(row(&format!("mem[{addr:#x}]"), &format!("{x:016x}"), &format!("{y:016x}")));
        }
    }
    // MMIO reads are left out: their number and size are not architectural (see HOST_SPECIFIC).
    let visible = |o: &Outcome| -> Vec<String> {
        o.exits.iter().filter(|e| !e.starts_with("mmio-read")).cloned().collect()
    };
    let (ea, eb) = (visible(a), visible(b));
    if ea != eb {
        let n = ea.iter().zip(&eb).take_while(|(x, y)| x == y).count();
        let at = |v: &Vec<String>| v.get(n).cloned().unwrap_or_else(|| "(no more exits)".into());
        d.rows.push(row(&format!("exit #{n}"), &at(&ea), &at(&eb)));
    }
    d
}

/// Whether `diff` (two values of the word at `addr`) lies only in undefined flag bits of a
/// 16-bit-aligned FLAGS image within 512 bytes below one of the stacks' tops.
fn undefined_flags_image(addr: u64, diff: u64, undef: u64) -> bool {
    let m = undef & rflags::STATUS;
    let near_stack = STACK_TOPS.iter().any(|&top| addr < top && top - addr <= 512);
    near_stack && m != 0 && (0..4).any(|k| diff & !(m << (16 * k)) == 0)
}

/// Whether `diff` at `addr` lies only in undefined flag bits of the EFLAGS image of the
/// exception frame the fixtures' stub left on the stack (RFLAGS slot just above CS).
fn frame_flags(o: &Outcome, addr: u64, diff: u64, undef: u64) -> bool {
    if !o.stop.starts_with("exception") {
        return false;
    }
    let get = |k: &str| o.state.get(k).and_then(|v| parse_hex(v));
    let (Some(rsp), Some(cr0), Some(efer)) = (get("rsp"), get("cr0"), get("efer")) else { return false };
    let ss = get("ss.base").unwrap_or(0);
    let width = if efer & (1 << 10) != 0 {
        8
    } else if cr0 & 1 != 0 {
        4
    } else {
        2
    };
    let sp = if cr0 & 1 == 0 { rsp & 0xffff } else { rsp };
    let slot = ss.wrapping_add(sp).wrapping_add(width);
    let m = undef & rflags::STATUS;
    if m == 0 || slot < addr || slot >= addr + 8 {
        return false;
    }
    let shift = (slot - addr) * 8;
    diff & !(m << shift) == 0
}

/// A known limit of this host's hardware backend: cases it matches are not decided by KVM here.
#[derive(Clone, Copy, Debug)]
pub struct HostLimit {
    /// Short name.
    pub name: &'static str,
    /// Why KVM cannot decide it here (DEVELOPERS.md, `duet doctor --kvm-selfcheck`).
    pub reason: &'static str,
    applies: fn(FuzzMode, &Instruction) -> bool,
}

/// Every known limit of nested `kvm_pvm` KVM (DEVELOPERS.md), in one place.
pub const KVM_PVM_LIMITS: &[HostLimit] = &[
    HostLimit {
        name: "bcd-arpl-bound",
        reason: "DAA, AAA, AAS, ARPL and BOUND end in KVM_EXIT_INTERNAL_ERROR (emulation failure)",
        applies: |_, i| {
            matches!(
                i.mnemonic(),
                Mnemonic::Daa | Mnemonic::Aaa | Mnemonic::Aas | Mnemonic::Arpl | Mnemonic::Bound
            )
        },
    },
    HostLimit {
        name: "real-mode-int",
        reason: "a real-mode INT n never completes (SDM Vol. 3A §21.1.4 says it vectors through the IVT)",
        applies: |m, i| m == FuzzMode::Real && is_soft_int(i),
    },
    HostLimit {
        name: "ring3-int",
        reason:
            "INT n from ring 3 through a DPL-3 gate triple-faults (SDM Vol. 3A §6.12: delivered at CPL 0)",
        applies: |m, i| m == FuzzMode::Long64Ring3 && is_soft_int(i),
    },
    HostLimit {
        name: "pvm-emulation-failure",
        reason: "kvm_pvm cannot emulate these (KVM_EXIT_INTERNAL_ERROR in ring 0, a wrong #UD in ring 3): VERR, VERW, LAR, LSL, LFENCE, MFENCE, SFENCE, FWAIT, UD0, UD1, ENDBR32/64 and hint NOPs with operands",
        applies: |_, i| {
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
        reason: "RDFSBASE, RDGSBASE, WRFSBASE and WRGSBASE run under kvm_pvm although CR4.FSGSBASE = 0 (SDM Vol. 2B RDFSBASE: #UD)",
        applies: |_, i| {
            matches!(i.mnemonic(), Mnemonic::Rdfsbase | Mnemonic::Rdgsbase | Mnemonic::Wrfsbase | Mnemonic::Wrgsbase)
        },
    },
    HostLimit {
        name: "ring3-selectors",
        reason: "in 64-bit ring 3, kvm_pvm shows the data segment selectors as 0 (MOV r/m, Sreg and PUSH Sreg read 0, not the loaded selector)",
        applies: |m, i| {
            m == FuzzMode::Long64Ring3
                && (matches!(i.code(), iced_x86::Code::Mov_rm16_Sreg | iced_x86::Code::Mov_r32m16_Sreg | iced_x86::Code::Mov_r64m16_Sreg)
                    || (matches!(i.mnemonic(), Mnemonic::Push) && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register()))
        },
    },
    HostLimit {
        name: "msrs",
        reason: "kvm_pvm returns 0 for RDMSR of MSRs it does not know and drops such WRMSRs instead of #GP(0) (SDM Vol. 2B RDMSR/WRMSR), even with kvm.ignore_msrs=N",
        applies: |_, i| matches!(i.mnemonic(), Mnemonic::Rdmsr | Mnemonic::Wrmsr),
    },
    HostLimit {
        name: "enter-operand-size",
        reason: "kvm_pvm ignores an operand-size prefix on ENTER (66 C8 pushes 4 bytes in 32-bit code, 2 in 16-bit code; SDM Vol. 2A ENTER: the push is of the operand size)",
        applies: |m, i| {
            i.mnemonic() == Mnemonic::Enter
                && match m.bitness() {
                    16 => i.code() != iced_x86::Code::Enterw_imm16_imm8,
                    32 => i.code() != iced_x86::Code::Enterd_imm16_imm8,
                    _ => i.code() != iced_x86::Code::Enterq_imm16_imm8,
                }
        },
    },
    HostLimit {
        name: "aad",
        reason: "KVM's instruction emulator (16-bit code under kvm_pvm) sets AAD's SF, ZF, PF from AX instead of AL (SDM Vol. 2A AAD)",
        applies: |_, i| i.mnemonic() == Mnemonic::Aad,
    },
    HostLimit {
        name: "int1",
        reason: "INT1 (ICEBP) is an emulation failure in ring 0 and #UD in ring 3 (SDM Vol. 3A §6.15 / Vol. 2A INT1: #DB through gate 1 without a DPL check)",
        applies: |_, i| i.mnemonic() == Mnemonic::Int1,
    },
    HostLimit {
        name: "store-system-register-to-memory",
        reason: "STR, SLDT, SMSW, SGDT, SIDT and MOV Sreg (REX.W) to memory are emulated by kvm_pvm: it reads the destination first (an extra MMIO read) and with REX.W writes 8 bytes (SDM Vol. 2B STR: a 16-bit store regardless of operand size)",
        applies: |_, i| {
            (matches!(i.mnemonic(), Mnemonic::Str | Mnemonic::Sldt | Mnemonic::Smsw | Mnemonic::Sgdt | Mnemonic::Sidt)
                || i.code() == iced_x86::Code::Mov_r64m16_Sreg)
                && i.op0_kind() == iced_x86::OpKind::Memory
        },
    },
    HostLimit {
        name: "ring3-syscall",
        reason: "SYSCALL from ring 3 stays at CPL 3 (SDM Vol. 2B SYSCALL: CPL 0)",
        applies: |m, i| m == FuzzMode::Long64Ring3 && i.mnemonic() == Mnemonic::Syscall,
    },
];

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

/// A short name for the kind of a divergence: KVM's stop and the classes of fields that differ.
pub fn signature(kvm_stop: &str, diff: &StateDiff) -> String {
    let stop: Vec<&str> = kvm_stop.split_whitespace().take(2).collect();
    let mut classes: Vec<String> = diff
        .rows
        .iter()
        .map(|r| {
            let f = r.field.split(['[', '.', ' ']).next().unwrap_or("");
            f.to_string()
        })
        .collect();
    classes.sort();
    classes.dedup();
    format!("{}: {}", stop.join(" "), classes.join(","))
}

/// Whether KVM ignores unknown MSRs on this host (`/sys/module/kvm/parameters/ignore_msrs`).
pub fn ignore_msrs() -> bool {
    std::fs::read_to_string("/sys/module/kvm/parameters/ignore_msrs").is_ok_and(|v| v.trim() == "Y")
}

/// Whether this host's KVM is `kvm_pvm` (DEVELOPERS.md), whose limits then apply.
pub fn kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The first known host limit `case`'s code runs into, if any (the whole code is decoded).
pub fn host_limit(case: &Case, code: &[u8], limits: &[HostLimit]) -> Option<HostLimit> {
    let ip = super::gen::code_ip(case.mode);
    let mut dec = Decoder::with_ip(case.mode.bitness(), code, ip, DecoderOptions::NONE);
    for ins in &mut dec {
        if let Some(l) = limits.iter().find(|l| (l.applies)(case.mode, &ins)) {
            return Some(*l);
        }
    }
    None
}

/// A third opinion: runs a case from its start state and returns its outcome.
pub trait Reference: Send + Sync {
    /// Name shown in reports ("qemu").
    fn name(&self) -> &'static str;
    /// The outcome of `case`, or why this reference cannot run it.
    fn run(&self, case: &Case) -> Result<Outcome, String>;
}

/// No third opinion: the default of a campaign (QEMU costs a process per case).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoReference;

impl Reference for NoReference {
    fn name(&self) -> &'static str {
        "qemu"
    }
    fn run(&self, _case: &Case) -> Result<Outcome, String> {
        Err("no third opinion asked (`duet fuzz --reference` asks QEMU)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_undefined_flags_are_masked_only_near_a_stack() {
        let af = rflags::AF;
        assert!(undefined_flags_image(0x7bf0, af << 32, af));
        assert!(!undefined_flags_image(0x7bf0, rflags::CF << 32, af));
        assert!(!undefined_flags_image(0xa000, af, af));
    }

    #[test]
    fn rflags_compare_masks_undefined_bits_and_exits_show_first_difference() {
        let mut a = Outcome { stop: "halted".into(), rflags_undefined: "0x10".into(), ..Outcome::default() };
        a.state.insert("rflags".into(), "0x2".into());
        let mut b = a.clone();
        b.state.insert("rflags".into(), "0x12".into());
        let zero = |_| 0;
        assert!(compare(("kvm", &a), ("interp", &b), &zero).is_empty());
        b.exits.push("out 0x80 1 00".into());
        let d = compare(("kvm", &a), ("interp", &b), &zero);
        assert_eq!(d.rows.len(), 1);
        assert_eq!(d.rows[0].field, "exit #0");
    }
}
