//! The host limits recognised from the two outcomes of a case (a state, not an instruction,
//! triggers them), each scoped to the hosts it was verified on.

use std::collections::BTreeSet;

use duet_core::state::{ctrl, rflags};
use iced_x86::{Decoder, Instruction, Mnemonic, Register};

use super::super::case::{FuzzMode, Outcome, Parsed};
use super::super::diff::{Diff, Row};
use super::super::layout::{CODE_ADDR, RAM_SIZE};
use super::super::outcome::{vector, Exit, ExitKind, Field, TableReg};
use super::{is_soft_int, Hosts, OutcomeLimit, PVM_AMD, PVM_INTEL};

/// Every known limit of `kvm_pvm` recognised from the outcomes (kvm, interp), in one place.
pub const KVM_PVM_OUTCOME_LIMITS: &[OutcomeLimit] = &[
    OutcomeLimit {
        name: "16-bit-stack-esp-upper",
        hosts: Hosts::Only(PVM_AMD),
        reason: "an exception delivered on a 16-bit stack (SS.B = 0: real mode, a 16-bit SS, or one the program loaded or reached by clearing CR0.PE) with ESP[31:16] ≠ 0: kvm_pvm uses or clears the upper half of ESP (shutdown, or ESP[31:16] = 0 after the handler runs); the pushes use SP and leave ESP[31:16] alone (SDM Vol. 3A §6.12.1, Vol. 1 §6.2.3 stack-address size; Vol. 2A INT n Operation; QEMU agrees; fixtures/corpus/regressions/prot16-fault-on-16bit-stack.json)",
        applies: |p, kvm, interp, _| {
            let upper = |o: &Outcome| (o.reg(Field::RSP) >> 16) & 0xffff;
            // Also a frame that wrapped SP through 0 (SP near the top of the 64 KiB segment).
            let top = |o: &Outcome| o.memory.keys().any(|a| (0xff00..0x1_0000).contains(a));
            let wrapped = kvm.shut_down() && (interp.reg(Field::RSP) & 0xffff >= 0xff00 || top(interp));
            // A 16-bit stack from the start, or one the program made: a 16-bit SS loaded in 32-bit
            // code, or real mode entered by clearing CR0.PE (kvm_pvm then clears ESP[31:16]).
            use super::super::outcome::{SegPart, SegReg};
            let ss_16 = |o: &Outcome| {
                o.state.get(&Field::Seg(SegReg::Ss, SegPart::Attributes)).is_some_and(|a| a & 0x4000 == 0)
            };
            let real = |o: &Outcome| o.state.get(&Field::CR0).is_some_and(|cr0| cr0 & ctrl::CR0_PE == 0);
            let sixteen = matches!(p.mode, FuzzMode::Real | FuzzMode::Prot16)
                || (p.mode.bitness() == 32 && [kvm, interp].into_iter().any(|o| ss_16(o) || real(o)));
            let delivered = |o: &Outcome| o.exception().is_some() || o.shut_down();
            sixteen && (delivered(interp) || delivered(kvm)) && (upper(interp) != 0 || upper(kvm) != 0 || wrapped)
        },
    },
    OutcomeLimit {
        name: "push-sp-1-real-mode",
        hosts: Hosts::Only(PVM_AMD),
        reason: "a push (PUSH, or an exception frame) with SP = 1, 3 or 5 in real mode: the processor shuts down (SDM Vol. 2B PUSH, Description: #SS, then #SS while delivering it, #DF, a third #SS, shutdown); kvm_pvm's emulator wraps SP and writes past the segment (fixtures/corpus/regressions/push-sp1-real-mode-shutdown.json)",
        applies: |p, kvm, interp, _| {
            let sp = interp.reg(Field::RSP) & 0xffff;
            // SP = 1, 3 or 5: the frame's words straddle offset 0xFFFF (SDM Vol. 2B PUSHA,
            // Real-Address Mode Exceptions: shutdown for these SP values).
            p.mode == FuzzMode::Real && interp.shut_down() && !kvm.shut_down() && sp % 2 == 1 && sp < 6
        },
    },
    OutcomeLimit {
        name: "real-mode-ivt-limit",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm ignores the IDTR limit in real mode; a vector beyond it is #GP, and with the #GP and #DF vectors beyond it too the processor shuts down (SDM Vol. 2A INT n, REAL-ADDRESS-MODE; QEMU agrees; fixtures/corpus/regressions/ivt-limit-after-garbage-lidt.json)",
        applies: |p, kvm, interp, _| {
            p.mode == FuzzMode::Real
                && interp.shut_down()
                && !kvm.shut_down()
                && interp.reg(Field::Table(TableReg::Idtr, false)) < 0x3ff
        },
    },
    OutcomeLimit {
        name: "event-delivery-through-mmio",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm shuts the guest down when delivering an event needs MMIO (an IDT/IVT moved there by a garbage LIDT, or an exception frame pushed to a stack there); the software CPU reads and writes such structures through the bus (HOST_SPECIFIC: descriptor tables in MMIO)",
        applies: |_, kvm, interp, _| {
            let beyond = |o: &Outcome, t: TableReg| {
                o.reg(Field::Table(t, true)).saturating_add(o.reg(Field::Table(t, false))) >= RAM_SIZE
            };
            let tables = [kvm, interp].iter().any(|o| beyond(o, TableReg::Idtr) || beyond(o, TableReg::Gdtr));
            let frame_to_mmio = {
                let vis = |o: &Outcome| o.exits.iter().filter(|e| e.kind != ExitKind::MmioRead).cloned().collect::<Vec<_>>();
                let (k, i) = (vis(kvm), vis(interp));
                let n = k.iter().zip(&i).take_while(|(x, y)| x == y).count();
                i.get(n).is_some_and(|e| e.kind == ExitKind::MmioWrite)
            };
            (kvm.shut_down() || interp.shut_down()) && (tables || (kvm.shut_down() && frame_to_mmio))
        },
    },
    OutcomeLimit {
        name: "mmio-write-order-and-size",
        hosts: Hosts::Only(PVM_AMD),
        reason: "KVM's emulator performs the port reads of a REP INS to MMIO before the MMIO writes (and repeats a port read when an element straddles RAM and MMIO), merges MMIO writes into wider ones, and of a PUSHA/ENTER frame in MMIO writes only part; each element is one read and one write, in order, on the silicon (SDM Vol. 2A INS, Vol. 2B PUSHA)",
        applies: |p, kvm, interp, d| {
            let ports = |o: &Outcome| -> Vec<Exit> {
                let mut v: Vec<Exit> =
                    o.exits.iter().filter(|e| matches!(e.kind, ExitKind::In | ExitKind::Out)).cloned().collect();
                v.dedup();
                v
            };
            // Every byte an MMIO write stored, by address.
            let bytes = |o: &Outcome| -> BTreeSet<(u64, u8)> {
                let writes = o.exits.iter().filter(|e| e.kind == ExitKind::MmioWrite);
                writes.flat_map(|e| e.data.iter().enumerate().map(|(i, &v)| (e.addr + i as u64, v))).collect()
            };
            let multi_push = has(p, |i| matches!(i.mnemonic(), Mnemonic::Pusha | Mnemonic::Pushad | Mnemonic::Enter));
            let (bk, bi) = (bytes(kvm), bytes(interp));
            d.rows.iter().all(|r| matches!(r, Row::Exit { .. }))
                && ports(kvm) == ports(interp)
                && (bk == bi || (multi_push && bk.is_subset(&bi)))
        },
    },
    OutcomeLimit {
        name: "rep-string-modifying-itself",
        hosts: Hosts::Only(PVM_AMD),
        reason: "a REP string instruction that overwrites its own code: whether the rest of its iterations see the change is model-specific (SDM Vol. 3A §11.6); KVM's emulator finishes the instruction, the software CPU re-fetches",
        applies: |p, kvm, interp, _| {
            let start = CODE_ADDR;
            let end = start + p.code.len() as u64;
            let touches = |o: &Outcome| o.memory.keys().any(|&a| a + 8 > start && a < end);
            let rep = has(p, |i| i.is_string_instruction() && (i.has_rep_prefix() || i.has_repne_prefix()));
            rep && (touches(kvm) || touches(interp))
        },
    },
    OutcomeLimit {
        name: "rep-cmps-scas-fault-flags",
        hosts: Hosts::Only(PVM_AMD),
        reason: "a REPE/REPNE CMPS or SCAS that faults after some iterations: kvm_pvm's emulator leaves the flags as before the instruction; the completed iterations' flags stand (SDM Vol. 2B REP: registers reflect the point of the exception)",
        applies: |p, kvm, interp, d| {
            let cmps = has(p, |i| {
                (i.has_rep_prefix() || i.has_repne_prefix())
                    && matches!(
                        i.mnemonic(),
                        Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq
                            | Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq
                    )
            });
            cmps && kvm.stop == interp.stop
                && kvm.exception().is_some()
                && d.rows.iter().all(|r| matches!(r, Row::Register { field: Field::Rflags, .. } | Row::Memory { .. }))
        },
    },
    OutcomeLimit {
        name: "ins-port-read-before-fault",
        hosts: Hosts::Only(PVM_AMD),
        reason: "an INS whose destination faults (e.g. a null ES): kvm_pvm's emulator performs the port read before it checks the destination; the software CPU checks ES:(E)DI first. SDM Vol. 2A INS does not order the input against the destination's segment check, so this host does not decide it",
        applies: |_, kvm, interp, d| {
            kvm.stop == interp.stop
                && (kvm.exception().is_some() || kvm.shut_down())
                && d.rows.iter().all(|r| matches!(r, Row::Exit { .. }))
                && kvm.exits.len() > interp.exits.len()
                && kvm.exits.starts_with(&interp.exits)
                && kvm.exits[interp.exits.len()..].iter().all(|e| e.kind == ExitKind::In)
        },
    },
    OutcomeLimit {
        name: "ring3-eflags-if-nt-ac",
        hosts: Hosts::Only(PVM_AMD),
        reason: "at CPL 3 kvm_pvm virtualises EFLAGS: PUSHF stores IF = 1 while the guest runs with IF = 0 (kvm_pvm runs ring 3 with interrupts on), and POPF drops NT and AC; SDM Vol. 2B PUSHF stores EFLAGS as it is, and POPF at CPL 3 writes NT (only IOPL, IF (CPL > IOPL), VIP, VIF, VM and RF are kept)",
        applies: |p, kvm, interp, d| {
            p.mode.cpl() == 3 && only_flag_bits(d, &[rflags::IF, rflags::NT, rflags::AC], undefined(kvm, interp))
        },
    },
    OutcomeLimit {
        name: "ltr-lldt-error-code",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm reports #GP(0) where LTR or LLDT of an LDT selector (or one beyond the GDT) is #GP(selector) (SDM Vol. 2A LLDT, Vol. 2B LTR, Protected Mode Exceptions)",
        applies: |p, kvm, interp, _| {
            let has_ltr = has(p, |i| matches!(i.mnemonic(), Mnemonic::Ltr | Mnemonic::Lldt));
            let (Some(k), Some(i)) = (kvm.exception(), interp.exception()) else { return false };
            has_ltr && k.vector == vector::GP && k.error_code == 0 && i.vector == vector::GP && i.error_code != 0 && k.rip == i.rip
        },
    },
    OutcomeLimit {
        name: "single-step-trap",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm does not deliver the single-step #DB after a POPF sets TF, or delivers it an instruction late (HOST_SPECIFIC: the generator never sets TF, but a POPF from a stack in MMIO pops the recorder's pattern); SDM Vol. 3A §18.3.1.4",
        applies: |_, kvm, interp, _| {
            // No #DB on KVM, or one at another instruction (kvm_pvm steps one too far).
            interp.raised(vector::DB) || kvm.raised(vector::DB) || kvm.reg(Field::Rflags) & rflags::TF != 0
        },
    },
    OutcomeLimit {
        name: "access-wrapping-past-4g",
        hosts: Hosts::Only(PVM_AMD),
        reason: "a 2-, 4- or 8-byte access that wraps past 4 GiB in a segment with a 4 GiB limit (a stack pointer that wrapped through 0): it may or may not fault, implementation-specific (SDM Vol. 3A §5.3); kvm_pvm wraps (an MMIO access across 0xFFFFFFFF), the software CPU faults (HOST_SPECIFIC)",
        applies: |p, kvm, interp, _| {
            // KVM touched the last bytes below 4 GiB (it splits a wrapping access into an MMIO
            // part there and a RAM part at 0), and a stack pointer sits within 8 bytes of 0.
            let top = kvm.exits.iter().any(|e| {
                matches!(e.kind, ExitKind::MmioRead | ExitKind::MmioWrite)
                    && e.addr >= 0xffff_fff8
                    && e.addr + e.data.len() as u64 >= 1 << 32
            });
            let low_sp = |o: &Outcome| o.reg(Field::RSP) & 0xffff_ffff < 8;
            let faulted = |o: &Outcome| o.raised(vector::GP) || o.raised(vector::SS) || o.shut_down();
            p.mode.bitness() != 64 && top && (low_sp(kvm) || low_sp(interp) || faulted(interp) || faulted(kvm))
        },
    },
    OutcomeLimit {
        name: "alignment-check-without-cr0-am",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm runs guest code with the host's CR0.AM = 1, so EFLAGS.AC at CPL 3 raises #AC for a misaligned access although the guest's CR0.AM = 0 (SDM Vol. 3A §6.15, Interrupt 17: alignment checking needs CR0.AM = 1, EFLAGS.AC = 1 and CPL 3)",
        applies: |_, kvm, _, _| kvm.raised(vector::AC) && kvm.reg(Field::CR0) & ctrl::CR0_AM == 0,
    },
    OutcomeLimit {
        name: "pusha-partial-frame",
        hosts: Hosts::Only(PVM_AMD),
        reason: "a PUSHA whose frame leaves the stack segment: the SDM raises #SS(0) when the starting or ending stack address is outside the limit (Vol. 2B PUSHA, Exceptions; real mode: SP = 7, 9, 11, 13, 15), before writing; kvm_pvm's emulator writes the first words, then faults (fixtures/corpus/regressions/pusha-faults-before-writing.json)",
        applies: |p, kvm, interp, d| {
            let pusha = has(p, |i| matches!(i.mnemonic(), Mnemonic::Pusha | Mnemonic::Pushad));
            pusha
                && kvm.stop == interp.stop
                && kvm.raised(vector::SS)
                && d.rows.iter().all(|r| matches!(r, Row::Memory { .. }))
        },
    },
    OutcomeLimit {
        name: "popa-from-mmio",
        hosts: Hosts::Only(PVM_AMD),
        reason: "POPA/POPAD whose frame lies (partly) in MMIO: kvm_pvm's emulator reads the words from the wrong addresses (each further from the last) and leaves ESP beyond the frame; the frame is 8 consecutive words or dwords (SDM Vol. 2B POPA)",
        applies: |p, kvm, interp, _| {
            let popa = has(p, |i| matches!(i.mnemonic(), Mnemonic::Popa | Mnemonic::Popad));
            let reads = |o: &Outcome| o.exits.iter().filter(|e| e.kind == ExitKind::MmioRead).cloned().collect::<Vec<_>>();
            popa && !reads(kvm).is_empty() && reads(kvm) != reads(interp)
        },
    },
    OutcomeLimit {
        name: "int-n-protected-reached",
        hosts: Hosts::Only(PVM_AMD),
        reason: "as host limit `int-n-protected`, for an INT n/INT3/INTO the program reached by jumping into the middle of another instruction (both runs stop at it): kvm_pvm raises #UD or #GP where the gate decides (SDM Vol. 2A INT n)",
        applies: |p, kvm, interp, _| {
            let (Some(a), Some(b)) = (kvm.exception(), interp.exception()) else { return false };
            p.mode != FuzzMode::Real && a.rip == b.rip && instruction_at(p, a.rip).is_some_and(|i| is_soft_int(&i))
        },
    },
    OutcomeLimit {
        name: "ignored-segment-prefix-ring0",
        hosts: Hosts::Only(PVM_AMD),
        reason: "in 64-bit mode ES, CS and DS overrides are ignored (SDM Vol. 1 §3.3.7.1), so a non-canonical RSP/RBP-based reference still uses SS and is #SS(0) (SDM Vol. 3A §6.15), as the silicon does in ring 3 here (fixtures/corpus/regressions/es-prefix-noncanonical-rbp-is-ss-fault.json); in ring 0 kvm_pvm's instruction emulator applies the ignored prefix and raises #GP(0)",
        applies: |p, kvm, interp, _| {
            let (Some(k), Some(i)) = (kvm.exception(), interp.exception()) else { return false };
            p.mode == FuzzMode::Long64
                && k.rip == i.rip
                && k.vector == vector::GP
                && i.vector == vector::SS
                && instruction_at(p, k.rip).is_some_and(|i| {
                    matches!(i.segment_prefix(), Register::ES | Register::CS | Register::DS)
                        && matches!(i.memory_base(), Register::RSP | Register::RBP | Register::ESP | Register::EBP)
                })
        },
    },
    OutcomeLimit {
        name: "eflags-ac",
        hosts: Hosts::Only(PVM_AMD),
        reason: "kvm_pvm does not keep EFLAGS.AC set by the guest (a POPF of a value with AC, e.g. a stack in MMIO, where reads return a pattern): RFLAGS and the exception frame's EFLAGS lack it; SDM Vol. 2B POPF: AC is written at any CPL (see HOST_SPECIFIC: the generator itself never sets AC)",
        applies: |_, kvm, interp, d| {
            only_flag_bits(d, &[rflags::AC], undefined(kvm, interp))
                && kvm.reg(Field::Rflags) & rflags::AC == 0
                && interp.reg(Field::Rflags) & rflags::AC != 0
        },
    },
    OutcomeLimit {
        name: "paging-structures-written",
        hosts: Hosts::Only(PVM_AMD),
        reason: "the program wrote an entry of the live paging structures (a stack or data access that lands on the identity map's tables) without INVLPG or a CR3 load: whether later accesses use the old translation from the TLB, and when the accessed bits are set again, is model-specific (SDM Vol. 3A §4.10.2, §4.10.4.2); kvm_pvm re-walks, the software CPU keeps its TLB",
        applies: |p, kvm, interp, _| {
            let tables = duet_core::layout::PAGE_TABLES_ADDR..duet_core::layout::PAGE_TABLES_ADDR + 6 * 4096;
            let Ok(base) = super::super::layout::base_image(p.mode) else { return false };
            let img = super::super::layout::initial_image(&base, p);
            let initial = |a: u64| {
                img.get(a as usize..a as usize + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            };
            // A change beyond the accessed and dirty bits (0x60) is a write by the program.
            let wrote = |o: &Outcome| o.memory.iter().any(|(&a, &v)| tables.contains(&a) && (v ^ initial(a)) & !0x60 != 0);
            let paging = |o: &Outcome| o.reg(Field::CR0) & ctrl::CR0_PG != 0;
            (paging(kvm) || paging(interp)) && (wrote(kvm) || wrote(interp))
        },
    },
    OutcomeLimit {
        name: "null-selector-clears-base",
        hosts: Hosts::Only(PVM_AMD),
        reason: "a null selector loaded into FS or GS in 64-bit mode: an AMD part without NullSelectorClearsBase (CPUID 0x8000_0021 EAX bit 6) keeps the old base (Linux `detect_null_seg_behavior`, X86_BUG_NULL_SEG; docs/VENDORS.md), and the shared profile does not enumerate the bit because kvm_pvm hides leaf 0x8000_0021; this host's silicon (family 19h) has the feature and clears the base",
        applies: |p, kvm, interp, d| {
            use super::super::outcome::{SegPart, SegReg};
            let cleared = |seg: SegReg| {
                let null = interp.reg(Field::Seg(seg, SegPart::Selector)) & !3 == 0;
                let base = Field::Seg(seg, SegPart::Base);
                null && kvm.reg(base) == 0 && interp.reg(base) != 0
            };
            // The base itself, or what the program did through it: after a shutdown only the
            // exits are compared, but both runs' final states still show the two bases.
            p.mode.bitness() == 64 && !d.rows.is_empty() && (cleared(SegReg::Fs) || cleared(SegReg::Gs))
        },
    },
    OutcomeLimit {
        name: "sysenter-intel-pvm",
        hosts: Hosts::Only(PVM_INTEL),
        reason: "SYSENTER with IA32_SYSENTER_CS[15:2] = 0 is #GP(0) on an Intel part (SDM Vol. 2B SYSENTER, Operation and Protected Mode Exceptions); kvm_pvm on an Intel host raises #UD instead (found by `duet fuzz --seed 7` in long64-ring3; fixtures/corpus/regressions/sysenter-cs-zero-intel-gp.json)",
        applies: |p, kvm, interp, _| {
            let (Some(k), Some(i)) = (kvm.exception(), interp.exception()) else { return false };
            k.vector == vector::UD
                && i.vector == vector::GP
                && i.error_code == 0
                && k.rip == i.rip
                && instruction_at(p, k.rip).is_some_and(|i| i.mnemonic() == Mnemonic::Sysenter)
        },
    },
];

/// Whether every row of `d` is RFLAGS or a memory word (a pushed FLAGS image) differing in exactly
/// one of `bits`.
///
/// Status flags either side reports undefined (`undef`) may differ alongside.
pub fn only_flag_bits(d: &Diff, bits: &[u64], undef: u64) -> bool {
    let allowed = bits.iter().fold(0, |a, b| a | b) | (undef & rflags::STATUS);
    !d.rows.is_empty()
        && d.rows.iter().all(|r| {
            let Some(diff) = r.xor() else { return false };
            let lane = |k: u64| {
                diff & !(allowed << (16 * k)) == 0 && bits.iter().any(|&b| diff & (b << (16 * k)) != 0)
            };
            match r {
                Row::Memory { .. } => (0..4).any(lane),
                Row::Register { field: Field::Rflags, .. } => lane(0),
                _ => false,
            }
        })
}

fn undefined(kvm: &Outcome, interp: &Outcome) -> u64 {
    kvm.rflags_undefined | interp.rflags_undefined
}

/// Whether some instruction of the program (decoded from its start) satisfies `f`.
fn has(p: &Parsed, f: impl Fn(&Instruction) -> bool) -> bool {
    p.decodings()
        .into_iter()
        .any(|o| Decoder::with_ip(p.mode.bitness(), &p.code, 0, o).into_iter().any(|i| f(&i)))
}

/// The instruction of the program at `rip` (as the code is decoded from there).
fn instruction_at(p: &Parsed, rip: u64) -> Option<Instruction> {
    let ip = super::super::gen::code_ip(p.mode);
    let rest = p.code.get(usize::try_from(rip.checked_sub(ip)?).ok()?..)?;
    Decoder::with_ip(p.mode.bitness(), rest, rip, p.decoder_options()).into_iter().next()
}
