//! The one list of what this host's KVM (nested `kvm_pvm`) cannot decide, and of results that
//! depend on the host rather than the architecture: each entry names itself and gives the
//! reason (SDM section, DEVELOPERS.md, the corpus case that pins it). The judge counts a case
//! one of these explains as undecided, never as a divergence, and never drops it.

use std::collections::BTreeSet;

use duet_core::state::rflags;
use duet_core::StateDiff;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, Register};

use super::case::{parse_hex, Case, FuzzMode, Outcome};

/// A known limit of this host's hardware backend: cases it matches are not decided by KVM here.
#[derive(Clone, Copy, Debug)]
pub struct HostLimit {
    /// Short name.
    pub name: &'static str,
    /// Why KVM cannot decide it here (DEVELOPERS.md, `duet doctor --kvm-selfcheck`).
    pub reason: &'static str,
    /// Whether the limit applies to an instruction (given the one decoded before it, if any).
    pub(super) applies: fn(FuzzMode, &Instruction, Option<&Instruction>) -> bool,
}

/// Every known limit of nested `kvm_pvm` KVM (DEVELOPERS.md), in one place.
pub const KVM_PVM_LIMITS: &[HostLimit] = &[
    HostLimit {
        name: "bcd-arpl-bound",
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
        reason: "a real-mode INT n never completes (SDM Vol. 3A §21.1.4 says it vectors through the IVT)",
        applies: |m, i, _| m == FuzzMode::Real && is_soft_int(i),
    },
    HostLimit {
        name: "ring3-int",
        reason:
            "INT n from ring 3 through a DPL-3 gate triple-faults (SDM Vol. 3A §6.12: delivered at CPL 0)",
        applies: |m, i, _| m == FuzzMode::Long64Ring3 && is_soft_int(i),
    },
    HostLimit {
        name: "pvm-emulation-failure",
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
        reason: "RDFSBASE, RDGSBASE, WRFSBASE and WRGSBASE run under kvm_pvm although CR4.FSGSBASE = 0 (SDM Vol. 2B RDFSBASE: #UD)",
        applies: |_, i, _| {
            matches!(i.mnemonic(), Mnemonic::Rdfsbase | Mnemonic::Rdgsbase | Mnemonic::Wrfsbase | Mnemonic::Wrgsbase)
        },
    },
    HostLimit {
        name: "ring3-selectors",
        reason: "in 64-bit ring 3, kvm_pvm shows the data segment selectors as 0 (MOV r/m, Sreg and PUSH Sreg read 0, not the loaded selector)",
        applies: |m, i, _| {
            m == FuzzMode::Long64Ring3
                && (matches!(i.code(), iced_x86::Code::Mov_rm16_Sreg | iced_x86::Code::Mov_r32m16_Sreg | iced_x86::Code::Mov_r64m16_Sreg)
                    || (matches!(i.mnemonic(), Mnemonic::Push) && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register()))
        },
    },
    HostLimit {
        name: "msrs",
        reason: "kvm_pvm returns 0 for RDMSR of MSRs it does not know and drops such WRMSRs instead of #GP(0) (SDM Vol. 2B RDMSR/WRMSR), even with kvm.ignore_msrs=N",
        applies: |_, i, _| matches!(i.mnemonic(), Mnemonic::Rdmsr | Mnemonic::Wrmsr),
    },
    HostLimit {
        name: "enter-operand-size",
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
        reason: "ENTER with a nesting level above 0 is an emulation failure under kvm_pvm in ring 0 and a wrong #UD in ring 3 (SDM Vol. 2A ENTER: it copies the frame pointers; DEVELOPERS.md)",
        applies: |_, i, _| i.mnemonic() == Mnemonic::Enter && i.immediate8_2nd() % 32 != 0,
    },
    HostLimit {
        name: "int-n-protected",
        reason: "INT n, INT3 and INTO in protected and long mode: kvm_pvm fails to emulate them (KVM_EXIT_INTERNAL_ERROR) or raises #GP instead of delivering through the gate (SDM Vol. 2A INT n; DEVELOPERS.md)",
        applies: |m, i, _| m != FuzzMode::Real && is_soft_int(i),
    },
    HostLimit {
        name: "invalid-encodings",
        reason: "byte sequences iced-x86 decodes as invalid (reserved encodings, #UD on Intel parts, SDM Vol. 2 Appendix A) may execute on this AMD host, where kvm_pvm runs the code natively (vendor-specific decoding of reserved opcodes)",
        applies: |_, i, _| i.code() == iced_x86::Code::INVALID,
    },
    HostLimit {
        name: "aad-aam",
        reason: "KVM's instruction emulator (16-bit code under kvm_pvm) sets AAD's and AAM's SF, ZF, PF from AX/EAX instead of AL (SDM Vol. 2A AAD, AAM; DEVELOPERS.md)",
        applies: |_, i, _| matches!(i.mnemonic(), Mnemonic::Aad | Mnemonic::Aam),
    },
    HostLimit {
        name: "int1",
        reason: "INT1 (ICEBP) is an emulation failure in ring 0 and #UD in ring 3 (SDM Vol. 3A §6.15 / Vol. 2A INT1: #DB through gate 1 without a DPL check)",
        applies: |_, i, _| i.mnemonic() == Mnemonic::Int1,
    },
    HostLimit {
        name: "store-system-register-to-memory",
        reason: "STR, SLDT, SMSW, SGDT, SIDT and MOV Sreg (REX.W) to memory are emulated by kvm_pvm: it reads the destination first (an extra MMIO read) and with REX.W writes 8 bytes (SDM Vol. 2B STR: a 16-bit store regardless of operand size)",
        applies: |_, i, _| {
            (matches!(i.mnemonic(), Mnemonic::Str | Mnemonic::Sldt | Mnemonic::Smsw | Mnemonic::Sgdt | Mnemonic::Sidt)
                || i.code() == iced_x86::Code::Mov_r64m16_Sreg)
                && i.op0_kind() == iced_x86::OpKind::Memory
        },
    },
    HostLimit {
        name: "cmpxchg-r32-ring0",
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
        reason: "the guest's CPUID shows the host's leaves 1, 7 and 0xD under kvm_pvm, not the profile given with KVM_SET_CPUID2 (DEVELOPERS.md)",
        applies: |_, i, _| i.mnemonic() == Mnemonic::Cpuid,
    },
    HostLimit {
        name: "cr4-feature-bits",
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
        reason: "without MOVBE in the profile the answer is #UD before any memory access (SDM Vol. 2B MOVBE, Exceptions; the software CPU decodes then faults); kvm_pvm's emulator translates the memory operand first and sets the paging-structure accessed bits",
        applies: |m, i, _| m.cpl() == 0 && i.mnemonic() == Mnemonic::Movbe,
    },
    HostLimit {
        name: "ring3-segment-loads",
        reason: "in 64-bit ring 3, kvm_pvm does not show a data segment register loaded with a null selector by MOV Sreg, POP Sreg or LFS/LGS/LSS (the old selector stays visible), and LDT selectors resolve against kvm_pvm's own LDT, not the guest's LDTR (SDM Vol. 2B MOV/POP/LDS: a null selector is loaded; a TI = 1 selector with an invalid LDTR is #GP(selector))",
        applies: |m, i, _| {
            m == FuzzMode::Long64Ring3
                && ((i.mnemonic() == Mnemonic::Mov && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register())
                    || (i.mnemonic() == Mnemonic::Pop && i.op0_kind() == iced_x86::OpKind::Register && i.op0_register().is_segment_register())
                    || matches!(i.mnemonic(), Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss))
        },
    },
    HostLimit {
        name: "ring3-syscall",
        reason: "SYSCALL from ring 3 stays at CPL 3 (SDM Vol. 2B SYSCALL: CPL 0)",
        applies: |m, i, _| m == FuzzMode::Long64Ring3 && i.mnemonic() == Mnemonic::Syscall,
    },
];

/// SYSCALL/SYSRET outside 64-bit mode (vendor-specific, see below).
fn legacy_syscall(m: FuzzMode, i: &Instruction) -> bool {
    m.bitness() != 64 && matches!(i.mnemonic(), Mnemonic::Syscall | Mnemonic::Sysret | Mnemonic::Sysretq)
}

/// Instructions whose results are host-specific on any host (see [`HOST_SPECIFIC`]): the
/// generator never draws them, but a branch into the middle of another instruction can reach
/// their bytes; such a case is undecided everywhere.
pub const HOST_SPECIFIC_LIMITS: &[HostLimit] = &[HostLimit {
    name: "time-stamp-counter",
    reason: "RDTSC, RDTSCP and RDPMC read time or counters: the two runs happen at different times",
    applies: |_, i, _| matches!(i.mnemonic(), Mnemonic::Rdtsc | Mnemonic::Rdtscp | Mnemonic::Rdpmc),
}, HostLimit {
    name: "syscall-sysret-outside-64-bit",
    reason: "SYSCALL and SYSRET outside 64-bit mode are vendor-specific: AMD parts run them in legacy and compatibility mode when EFER.SCE = 1 (AMD64 APM Vol. 3), Intel parts raise #UD (SDM Vol. 2B SYSCALL/SYSRET); the software CPU implements the Intel behaviour whatever the profile's vendor (open: AMD legacy-mode SYSCALL/SYSRET)",
    applies: |m, i, _| legacy_syscall(m, i),
}];

/// A known limit of this host's hardware backend recognised from the two outcomes (a state, not
/// an instruction, triggers it): a divergence it matches is counted as undecided, never dropped.
#[derive(Clone, Copy, Debug)]
pub struct OutcomeLimit {
    /// Short name.
    pub name: &'static str,
    /// Why KVM cannot decide it here, and what the SDM says.
    pub reason: &'static str,
    pub(super) applies: fn(&Case, &Outcome, &Outcome, &StateDiff) -> bool,
}

fn reg(o: &Outcome, name: &str) -> u64 {
    o.state.get(name).and_then(|v| parse_hex(v)).unwrap_or(0)
}

/// Every known limit of `kvm_pvm` recognised from the outcomes (kvm, interp), in one place.
pub const KVM_PVM_OUTCOME_LIMITS: &[OutcomeLimit] = &[
    OutcomeLimit {
        name: "16-bit-stack-esp-upper",
        reason: "an exception delivered on a 16-bit stack (SS.B = 0, real mode or a 16-bit SS) with ESP[31:16] ≠ 0: kvm_pvm uses or clears the upper half of ESP (shutdown, or ESP[31:16] = 0 after the handler runs); the pushes use SP and leave ESP[31:16] alone (SDM Vol. 3A §6.12.1, Vol. 1 §6.2.3 stack-address size; Vol. 2A INT n Operation; QEMU agrees; fixtures/corpus/regressions/prot16-fault-on-16bit-stack.json)",
        applies: |c, kvm, interp, _| {
            let m = c.mode;
            let upper = |o: &Outcome| (reg(o, "rsp") >> 16) & 0xffff;
            // Also a frame that wrapped SP through 0 (SP near the top of the 64 KiB segment).
            let top = |o: &Outcome| o.memory.keys().filter_map(|k| parse_hex(k)).any(|a| (0xff00..0x1_0000).contains(&a));
            let wrapped = kvm.stop == "shutdown" && (reg(interp, "rsp") & 0xffff >= 0xff00 || top(interp));
            matches!(m, FuzzMode::Real | FuzzMode::Prot16)
                && (interp.stop.starts_with("exception") || interp.stop == "shutdown")
                && (upper(interp) != 0 || upper(kvm) != 0 || wrapped)
        },
    },
    OutcomeLimit {
        name: "push-sp-1-real-mode",
        reason: "a push (PUSH, or an exception frame) with SP = 1, 3 or 5 in real mode: the processor shuts down (SDM Vol. 2B PUSH, Description: #SS, then #SS while delivering it, #DF, a third #SS, shutdown); kvm_pvm's emulator wraps SP and writes past the segment (fixtures/corpus/regressions/push-sp1-real-mode-shutdown.json)",
        applies: |c, kvm, interp, _| {
            let sp = reg(interp, "rsp") & 0xffff;
            // SP = 1, 3 or 5: the frame's words straddle offset 0xFFFF (SDM Vol. 2B PUSHA,
            // Real-Address Mode Exceptions: shutdown for these SP values).
            c.mode == FuzzMode::Real && interp.stop == "shutdown" && kvm.stop != "shutdown" && sp % 2 == 1 && sp < 6
        },
    },
    OutcomeLimit {
        name: "real-mode-ivt-limit",
        reason: "kvm_pvm ignores the IDTR limit in real mode; a vector beyond it is #GP, and with the #GP and #DF vectors beyond it too the processor shuts down (SDM Vol. 2A INT n, REAL-ADDRESS-MODE; QEMU agrees; fixtures/corpus/regressions/ivt-limit-after-garbage-lidt.json)",
        applies: |c, kvm, interp, _| {
            c.mode == FuzzMode::Real && interp.stop == "shutdown" && kvm.stop != "shutdown" && reg(interp, "idtr.limit") < 0x3ff
        },
    },
    OutcomeLimit {
        name: "event-delivery-through-mmio",
        reason: "kvm_pvm shuts the guest down when delivering an event needs MMIO (an IDT/IVT moved there by a garbage LIDT, or an exception frame pushed to a stack there); the software CPU reads and writes such structures through the bus (HOST_SPECIFIC: descriptor tables in MMIO)",
        applies: |_, kvm, interp, _| {
            let beyond = |o: &Outcome, t: &str| {
                reg(o, &format!("{t}.base")).saturating_add(reg(o, &format!("{t}.limit"))) >= super::layout::RAM_SIZE
            };
            let tables = beyond(interp, "idtr") || beyond(interp, "gdtr") || beyond(kvm, "idtr") || beyond(kvm, "gdtr");
            let frame_to_mmio = {
                let vis = |o: &Outcome| -> Vec<String> {
                    o.exits.iter().filter(|e| !e.starts_with("mmio-read")).cloned().collect()
                };
                let (k, i) = (vis(kvm), vis(interp));
                let n = k.iter().zip(&i).take_while(|(x, y)| x == y).count();
                i.get(n).is_some_and(|e| e.starts_with("mmio-write"))
            };
            (kvm.stop == "shutdown" || interp.stop == "shutdown") && (tables || (kvm.stop == "shutdown" && frame_to_mmio))
        },
    },
    OutcomeLimit {
        name: "mmio-write-order-and-size",
        reason: "KVM's emulator performs the port reads of a REP INS to MMIO before the MMIO writes (and repeats a port read when an element straddles RAM and MMIO), merges MMIO writes into wider ones, and of a PUSHA/ENTER frame in MMIO writes only part; each element is one read and one write, in order, on the silicon (SDM Vol. 2A INS, Vol. 2B PUSHA)",
        applies: |c, kvm, interp, d| {
            let ports = |o: &Outcome| -> Vec<String> {
                o.exits.iter().filter(|e| !e.starts_with("mmio")).cloned().collect()
            };
            // Every byte an MMIO write stored, by address.
            let bytes = |o: &Outcome| -> BTreeSet<(u64, u8)> {
                let mut set = BTreeSet::new();
                for e in o.exits.iter().filter(|e| e.starts_with("mmio-write")) {
                    let f: Vec<&str> = e.split_whitespace().collect();
                    let (Some(a), Some(b)) = (f.get(1).and_then(|a| parse_hex(a)), f.get(3)) else { continue };
                    for (i, v) in super::case::parse_bytes(b).unwrap_or_default().into_iter().enumerate() {
                        set.insert((a + i as u64, v));
                    }
                }
                set
            };
            let mut pk = ports(kvm);
            let mut pi = ports(interp);
            pk.dedup();
            pi.dedup();
            let multi_push = super::case::parse_bytes(&c.code).is_some_and(|code| {
                Decoder::with_ip(c.mode.bitness(), &code, 0, DecoderOptions::NONE)
                    .into_iter()
                    .any(|i| matches!(i.mnemonic(), Mnemonic::Pusha | Mnemonic::Pushad | Mnemonic::Enter))
            });
            let (bk, bi) = (bytes(kvm), bytes(interp));
            d.rows.iter().all(|r| r.field.starts_with("exit"))
                && pk == pi
                && (bk == bi || (multi_push && bk.is_subset(&bi)))
        },
    },
    OutcomeLimit {
        name: "rep-string-modifying-itself",
        reason: "a REP string instruction that overwrites its own code: whether the rest of its iterations see the change is model-specific (SDM Vol. 3A §11.6); KVM's emulator finishes the instruction, the software CPU re-fetches",
        applies: |c, kvm, interp, _| {
            let Some(code) = super::case::parse_bytes(&c.code) else { return false };
            let start = super::layout::CODE_ADDR;
            let end = start + code.len() as u64;
            let touches = |o: &Outcome| {
                o.memory.keys().filter_map(|k| parse_hex(k)).any(|a| a + 8 > start && a < end)
            };
            let rep = Decoder::with_ip(c.mode.bitness(), &code, 0, DecoderOptions::NONE)
                .into_iter()
                .any(|i| i.is_string_instruction() && (i.has_rep_prefix() || i.has_repne_prefix()));
            rep && (touches(kvm) || touches(interp))
        },
    },
    OutcomeLimit {
        name: "rep-cmps-scas-fault-flags",
        reason: "a REPE/REPNE CMPS or SCAS that faults after some iterations: kvm_pvm's emulator leaves the flags as before the instruction; the completed iterations' flags stand (SDM Vol. 2B REP: registers reflect the point of the exception)",
        applies: |c, kvm, interp, d| {
            let Some(code) = super::case::parse_bytes(&c.code) else { return false };
            let cmps = Decoder::with_ip(c.mode.bitness(), &code, 0, DecoderOptions::NONE).into_iter().any(|i| {
                (i.has_rep_prefix() || i.has_repne_prefix())
                    && matches!(i.mnemonic(), Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq
                        | Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq)
            });
            cmps && kvm.stop == interp.stop
                && kvm.stop.starts_with("exception")
                && d.rows.iter().all(|r| r.field == "rflags" || r.field.starts_with("mem["))
        },
    },
    OutcomeLimit {
        name: "ins-port-read-before-fault",
        reason: "an INS whose destination faults (e.g. a null ES): kvm_pvm's emulator performs the port read before it checks the destination; the software CPU checks ES:(E)DI first. SDM Vol. 2A INS does not order the input against the destination's segment check, so this host does not decide it",
        applies: |_, kvm, interp, d| {
            kvm.stop == interp.stop
                && (kvm.stop.starts_with("exception") || kvm.stop == "shutdown")
                && d.rows.iter().all(|r| r.field.starts_with("exit"))
                && kvm.exits.len() > interp.exits.len()
                && kvm.exits.starts_with(&interp.exits)
                && kvm.exits[interp.exits.len()..].iter().all(|e| e.starts_with("in "))
        },
    },
    OutcomeLimit {
        name: "ring3-eflags-if-nt-ac",
        reason: "at CPL 3 kvm_pvm virtualises EFLAGS: PUSHF stores IF = 1 while the guest runs with IF = 0 (kvm_pvm runs ring 3 with interrupts on), and POPF drops NT and AC; SDM Vol. 2B PUSHF stores EFLAGS as it is, and POPF at CPL 3 writes NT (only IOPL, IF (CPL > IOPL), VIP, VIF, VM and RF are kept)",
        applies: |c, kvm, interp, d| {
            c.mode.cpl() == 3 && only_flag_bits(d, &[rflags::IF, rflags::NT, rflags::AC], undefined(kvm, interp))
        },
    },
    OutcomeLimit {
        name: "ltr-lldt-error-code",
        reason: "kvm_pvm reports #GP(0) where LTR or LLDT of an LDT selector (or one beyond the GDT) is #GP(selector) (SDM Vol. 2A LLDT, Vol. 2B LTR, Protected Mode Exceptions)",
        applies: |c, kvm, interp, _| {
            let Some(code) = super::case::parse_bytes(&c.code) else { return false };
            let has = Decoder::with_ip(c.mode.bitness(), &code, 0, DecoderOptions::NONE)
                .into_iter()
                .any(|i| matches!(i.mnemonic(), Mnemonic::Ltr | Mnemonic::Lldt));
            let at = |o: &Outcome| o.stop.rsplit(" at ").next().map(str::to_string);
            has && kvm.stop.starts_with("exception #GP error 0x0 ")
                && interp.stop.starts_with("exception #GP error ")
                && !interp.stop.starts_with("exception #GP error 0x0 ")
                && at(kvm) == at(interp)
        },
    },
    OutcomeLimit {
        name: "single-step-trap",
        reason: "kvm_pvm does not deliver the single-step #DB after a POPF sets TF, or delivers it an instruction late (HOST_SPECIFIC: the generator never sets TF, but a POPF from a stack in MMIO pops the recorder's pattern); SDM Vol. 3A §18.3.1.4",
        applies: |_, kvm, interp, _| {
            // No #DB on KVM, or one at another instruction (kvm_pvm steps one too far).
            interp.stop.starts_with("exception #DB") || kvm.stop.starts_with("exception #DB") || reg(kvm, "rflags") & rflags::TF != 0
        },
    },
    OutcomeLimit {
        name: "access-wrapping-past-4g",
        reason: "a 2-, 4- or 8-byte access that wraps past 4 GiB in a segment with a 4 GiB limit (a stack pointer that wrapped through 0): it may or may not fault, implementation-specific (SDM Vol. 3A §5.3); kvm_pvm wraps (an MMIO access across 0xFFFFFFFF), the software CPU faults (HOST_SPECIFIC)",
        applies: |c, kvm, interp, _| {
            // KVM touched the last bytes below 4 GiB (it splits a wrapping access into an MMIO
            // part there and a RAM part at 0), and a stack pointer sits within 8 bytes of 0.
            let top = kvm.exits.iter().any(|e| {
                let f: Vec<&str> = e.split_whitespace().collect();
                e.starts_with("mmio")
                    && f.get(1).and_then(|a| parse_hex(a)).zip(f.get(2).and_then(|n| n.parse::<u64>().ok()))
                        .is_some_and(|(a, n)| a >= 0xffff_fff8 && a + n >= 1 << 32)
            });
            let low_sp = |o: &Outcome| reg(o, "rsp") & 0xffff_ffff < 8;
            let faulted = |o: &Outcome| {
                o.stop.starts_with("exception #GP") || o.stop.starts_with("exception #SS") || o.stop == "shutdown"
            };
            c.mode.bitness() != 64 && top && (low_sp(kvm) || low_sp(interp) || faulted(interp) || faulted(kvm))
        },
    },
    OutcomeLimit {
        name: "alignment-check-without-cr0-am",
        reason: "kvm_pvm runs guest code with the host's CR0.AM = 1, so EFLAGS.AC at CPL 3 raises #AC for a misaligned access although the guest's CR0.AM = 0 (SDM Vol. 3A §6.15, Interrupt 17: alignment checking needs CR0.AM = 1, EFLAGS.AC = 1 and CPL 3)",
        applies: |_, kvm, _, _| kvm.stop.starts_with("exception #AC") && reg(kvm, "cr0") & (1 << 18) == 0,
    },
    OutcomeLimit {
        name: "pusha-partial-frame",
        reason: "a PUSHA whose frame leaves the stack segment: the SDM raises #SS(0) when the starting or ending stack address is outside the limit (Vol. 2B PUSHA, Exceptions; real mode: SP = 7, 9, 11, 13, 15), before writing; kvm_pvm's emulator writes the first words, then faults (fixtures/corpus/regressions/pusha-faults-before-writing.json)",
        applies: |c, kvm, interp, d| {
            let pusha = super::case::parse_bytes(&c.code).is_some_and(|code| {
                Decoder::with_ip(c.mode.bitness(), &code, 0, DecoderOptions::NONE)
                    .into_iter()
                    .any(|i| matches!(i.mnemonic(), Mnemonic::Pusha | Mnemonic::Pushad))
            });
            pusha && kvm.stop == interp.stop && kvm.stop.starts_with("exception #SS") && d.rows.iter().all(|r| r.field.starts_with("mem["))
        },
    },
    OutcomeLimit {
        name: "popa-from-mmio",
        reason: "POPA/POPAD whose frame lies (partly) in MMIO: kvm_pvm's emulator reads the words from the wrong addresses (each further from the last) and leaves ESP beyond the frame; the frame is 8 consecutive words or dwords (SDM Vol. 2B POPA)",
        applies: |c, kvm, interp, _| {
            let popa = super::case::parse_bytes(&c.code).is_some_and(|code| {
                Decoder::with_ip(c.mode.bitness(), &code, 0, DecoderOptions::NONE)
                    .into_iter()
                    .any(|i| matches!(i.mnemonic(), Mnemonic::Popa | Mnemonic::Popad))
            });
            let reads = |o: &Outcome| -> Vec<String> {
                o.exits.iter().filter(|e| e.starts_with("mmio-read")).cloned().collect()
            };
            popa && !reads(kvm).is_empty() && reads(kvm) != reads(interp)
        },
    },
    OutcomeLimit {
        name: "int-n-protected-reached",
        reason: "as host limit `int-n-protected`, for an INT n/INT3/INTO the program reached by jumping into the middle of another instruction (both runs stop at it): kvm_pvm raises #UD or #GP where the gate decides (SDM Vol. 2A INT n)",
        applies: |c, kvm, interp, _| {
            let at = |o: &Outcome| o.stop.rsplit(" at ").next().and_then(parse_hex);
            let Some(code) = super::case::parse_bytes(&c.code) else { return false };
            let ip = super::gen::code_ip(c.mode);
            let (Some(a), Some(b)) = (at(kvm), at(interp)) else { return false };
            a == b
                && a >= ip
                && c.mode != FuzzMode::Real
                && code.get((a - ip) as usize..).is_some_and(|rest| {
                    Decoder::with_ip(c.mode.bitness(), rest, a, DecoderOptions::NONE)
                        .into_iter()
                        .next()
                        .is_some_and(|i| is_soft_int(&i))
                })
        },
    },
    OutcomeLimit {
        name: "ignored-segment-prefix-ring0",
        reason: "in 64-bit mode ES, CS and DS overrides are ignored (SDM Vol. 1 §3.3.7.1), so a non-canonical RSP/RBP-based reference still uses SS and is #SS(0) (SDM Vol. 3A §6.15), as the silicon does in ring 3 here (fixtures/corpus/regressions/es-prefix-noncanonical-rbp-is-ss-fault.json); in ring 0 kvm_pvm's instruction emulator applies the ignored prefix and raises #GP(0)",
        applies: |c, kvm, interp, _| {
            let at = |o: &Outcome| o.stop.rsplit(" at ").next().and_then(parse_hex);
            let Some(code) = super::case::parse_bytes(&c.code) else { return false };
            let ip = super::gen::code_ip(c.mode);
            let (Some(a), Some(b)) = (at(kvm), at(interp)) else { return false };
            c.mode == FuzzMode::Long64
                && a == b
                && a >= ip
                && kvm.stop.starts_with("exception #GP")
                && interp.stop.starts_with("exception #SS")
                && code.get((a - ip) as usize..).is_some_and(|rest| {
                    Decoder::with_ip(64, rest, a, DecoderOptions::NONE).into_iter().next().is_some_and(|i| {
                        matches!(i.segment_prefix(), Register::ES | Register::CS | Register::DS)
                            && matches!(i.memory_base(), Register::RSP | Register::RBP | Register::ESP | Register::EBP)
                    })
                })
        },
    },
    OutcomeLimit {
        name: "eflags-ac",
        reason: "kvm_pvm does not keep EFLAGS.AC set by the guest (a POPF of a value with AC, e.g. a stack in MMIO, where reads return a pattern): RFLAGS and the exception frame's EFLAGS lack it; SDM Vol. 2B POPF: AC is written at any CPL (see HOST_SPECIFIC: the generator itself never sets AC)",
        applies: |_, kvm, interp, d| {
            only_flag_bits(d, &[rflags::AC], undefined(kvm, interp))
                && reg(kvm, "rflags") & rflags::AC == 0
                && reg(interp, "rflags") & rflags::AC != 0
        },
    },
    OutcomeLimit {
        name: "paging-structures-written",
        reason: "the program wrote an entry of the live paging structures (a stack or data access that lands on the identity map's tables) without INVLPG or a CR3 load: whether later accesses use the old translation from the TLB, and when the accessed bits are set again, is model-specific (SDM Vol. 3A §4.10.2, §4.10.4.2); kvm_pvm re-walks, the software CPU keeps its TLB",
        applies: |c, kvm, interp, _| {
            let tables = duet_core::layout::PAGE_TABLES_ADDR..duet_core::layout::PAGE_TABLES_ADDR + 6 * 4096;
            let Ok(p) = c.parse("case") else { return false };
            let Ok(base) = super::layout::base_image(c.mode) else { return false };
            let img = super::layout::initial_image(&base, &p);
            let initial = |a: u64| {
                img.get(a as usize..a as usize + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            };
            // A change beyond the accessed and dirty bits (0x60) is a write by the program.
            let wrote = |o: &Outcome| {
                o.memory.iter().any(|(k, v)| {
                    let (Some(a), Some(v)) = (parse_hex(k), parse_hex(v)) else { return false };
                    tables.contains(&a) && (v ^ initial(a)) & !0x60 != 0
                })
            };
            let paging = |o: &Outcome| reg(o, "cr0") & (1 << 31) != 0;
            (paging(kvm) || paging(interp)) && (wrote(kvm) || wrote(interp))
        },
    },
];

/// Whether every row of `d` is RFLAGS or a memory word (a pushed FLAGS image) differing in exactly
/// one of `bits`.
///
/// Status flags either side reports undefined (`undef`) may differ alongside.
fn only_flag_bits(d: &StateDiff, bits: &[u64], undef: u64) -> bool {
    let allowed = bits.iter().fold(0, |a, b| a | b) | (undef & rflags::STATUS);
    !d.rows.is_empty()
        && d.rows.iter().all(|r| {
            let (Some(x), Some(y)) = (parse_hex(&r.left), parse_hex(&r.right)) else { return false };
            let diff = x ^ y;
            let lane = |k: u64| {
                diff & !(allowed << (16 * k)) == 0 && bits.iter().any(|&b| diff & (b << (16 * k)) != 0)
            };
            (r.field.starts_with("mem[") && (0..4).any(lane)) || (r.field == "rflags" && lane(0))
        })
}

fn undefined(kvm: &Outcome, interp: &Outcome) -> u64 {
    parse_hex(&kvm.rflags_undefined).unwrap_or(0) | parse_hex(&interp.rflags_undefined).unwrap_or(0)
}

/// The first outcome limit that explains a divergence between `kvm` and `interp`, if any.
pub fn outcome_limit(
    case: &Case,
    kvm: &Outcome,
    interp: &Outcome,
    diff: &StateDiff,
    limits: &[OutcomeLimit],
) -> Option<OutcomeLimit> {
    limits.iter().find(|l| (l.applies)(case, kvm, interp, diff)).copied()
}

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
