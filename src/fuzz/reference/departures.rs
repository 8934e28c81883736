//! Where QEMU 7.2 TCG, the third opinion, departs from the SDM (or where its machine is not
//! duet's): one typed list, like [`super::super::limits`] for KVM. A difference between QEMU and
//! the software CPU that these explain row by row is QEMU's, not a disagreement.
//!
//! Each entry names the test that shows QEMU still behaves so; `DEVELOPERS.md` ("The QEMU
//! reference is an emulator too") lists the same departures for readers.

use duet_core::layout::ExceptionReport;
use duet_core::state::rflags;
use duet_core::StopReason;
use iced_x86::{Decoder, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, Register};

use crate::fuzz::case::{Case, FuzzMode, Outcome, Parsed};
use crate::fuzz::diff::Row;
use crate::fuzz::outcome::{vector, ExitKind, Field, SegPart, SegReg};

/// What a departure's predicate looks at: the case and the two outcomes.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    /// The case.
    pub case: &'a Case,
    /// Its numbers, parsed (code bytes, and the vendor the code is decoded as).
    pub parsed: &'a Parsed,
    /// QEMU's outcome.
    pub qemu: &'a Outcome,
    /// The software CPU's outcome.
    pub interp: &'a Outcome,
}

/// One documented departure of QEMU from the SDM.
#[derive(Clone, Copy, Debug)]
pub struct Departure {
    /// Short name, shown in verdicts.
    pub name: &'static str,
    /// What QEMU does, and what the SDM (or duet's machine) says instead.
    pub reason: &'static str,
    /// The test that pins QEMU's behaviour (`file::test`).
    pub pinned_by: &'static str,
    /// Whether this departure explains one differing row (QEMU's value on the left).
    pub explains: fn(&Seen<'_>, &Row) -> bool,
}

/// The exception a run stopped with: (vector, error code, faulting RIP).
fn fault(stop: &StopReason) -> Option<(u8, u64, u64)> {
    match stop {
        StopReason::Exception(ExceptionReport { vector, error_code, rip }) => {
            Some((*vector, *error_code, *rip))
        }
        _ => None,
    }
}

impl Seen<'_> {
    /// The case's instructions, decoded from its start (as the generator laid them out).
    fn instructions(&self) -> Vec<Instruction> {
        let ip = crate::fuzz::gen::code_ip(self.case.mode);
        let p = self.parsed;
        Decoder::with_ip(p.mode.bitness(), &p.code, ip, p.decoder_options()).into_iter().collect()
    }

    fn has(&self, pick: impl Fn(&Instruction) -> bool) -> bool {
        self.instructions().iter().any(pick)
    }

    fn state(&self, o: &Outcome, key: Field) -> Option<u64> {
        o.state.get(&key).copied()
    }

    fn long(&self) -> bool {
        matches!(self.case.mode, FuzzMode::Long64 | FuzzMode::Long64Ring3)
    }
}

/// A memory row's address and both values (QEMU's first).
fn memory(row: &Row) -> Option<(u64, u64, u64)> {
    match *row {
        Row::Memory { addr, left, right } => Some((addr, left, right)),
        _ => None,
    }
}

/// A register row's two values (QEMU's first) when the register is `field` and both have one.
fn register(row: &Row, field: Field) -> Option<(u64, u64)> {
    match *row {
        Row::Register { field: f, left: Some(l), right: Some(r) } if f == field => Some((l, r)),
        _ => None,
    }
}

/// The address of the EFLAGS image in the exception frame the fixtures' handler leaves when
/// `o` stopped at an exception: the slot above CS, which its final RSP points at (as
/// `judge::compare_with` reads it).
fn frame_flags_slot(o: &Outcome) -> Option<u64> {
    o.exception()?;
    let get = |f: Field| o.state.get(&f).copied();
    let (rsp, cr0, efer) = (get(Field::RSP)?, get(Field::CR0)?, get(Field::Efer)?);
    let width = if efer & (1 << 10) != 0 {
        8
    } else if cr0 & 1 != 0 {
        4
    } else {
        2
    };
    let sp = if cr0 & 1 == 0 { rsp & 0xffff } else { rsp };
    Some(get(Field::Seg(SegReg::Ss, SegPart::Base)).unwrap_or(0).wrapping_add(sp).wrapping_add(width))
}

fn fault_frame_rf(s: &Seen<'_>, row: &Row) -> bool {
    let Some((addr, qemu, interp)) = memory(row) else { return false };
    let Some(slot) = frame_flags_slot(s.interp) else { return false };
    // RF is EFLAGS bit 16: where it lands in this word depends on where the image starts.
    let rf = (i128::from(slot) - i128::from(addr)) * 8 + 16;
    let Ok(rf) = u32::try_from(rf) else { return false };
    let Some(rf_bit) = 1u64.checked_shl(rf) else { return false };
    // Flags the program may leave undefined can differ in the same image (the comparison masks
    // them only where RF does not differ too).
    let undef = (crate::fuzz::judge::static_undefined(s.parsed) | s.interp.rflags_undefined) & rflags::STATUS;
    let undef = if rf >= 16 { undef << (rf - 16) } else { undef >> (16 - rf) };
    let diff = qemu ^ interp;
    interp & rf_bit != 0 && diff & rf_bit != 0 && diff & !(rf_bit | undef) == 0
}

/// The segment register and kind of each memory access of `i` (explicit and implicit).
fn accesses(i: &Instruction) -> Vec<(Register, OpAccess)> {
    let mut f = InstructionInfoFactory::new();
    f.info(i).used_memory().iter().map(|m| (m.segment(), m.access())).collect()
}

/// Whether the software CPU's segment `seg` (its final hidden part) may fault an access that
/// QEMU lets through: null, a limit below 4 GiB, expand-down, or read-only for a write.
fn checked_segment(o: &Outcome, seg: Register, access: OpAccess) -> bool {
    let reg = match seg {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::DS => SegReg::Ds,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => return false,
    };
    let get = |part: SegPart| o.state.get(&Field::Seg(reg, part)).copied();
    let (Some(limit), Some(attr)) = (get(SegPart::Limit), get(SegPart::Attributes)) else { return true };
    let (code, type_) = (attr & 0x8 != 0, attr & 0xf);
    let write = !matches!(access, OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess);
    limit != 0xffff_ffff || (!code && type_ & 0x4 != 0) || (write && (code || type_ & 0x2 == 0))
}

fn segment_checks(s: &Seen<'_>, _: &Row) -> bool {
    let Some((v, 0, at)) = fault(&s.interp.stop) else { return false };
    if s.long() || !matches!(v, vector::GP | vector::SS) || s.qemu.stop == s.interp.stop {
        return false;
    }
    let insns = s.instructions();
    let Some(i) = insns.iter().find(|i| i.ip() == at) else { return false };
    accesses(i).into_iter().any(|(seg, access)| checked_segment(s.interp, seg, access))
}

fn no_duet_devices(s: &Seen<'_>, _: &Row) -> bool {
    s.interp.exits.iter().any(|e| matches!(e.kind, ExitKind::MmioRead | ExitKind::MmioWrite | ExitKind::In))
}

/// The instruction at `at` when QEMU stopped there with #UD.
fn qemu_ud_at(s: &Seen<'_>) -> Option<Instruction> {
    let (vector::UD, _, at) = fault(&s.qemu.stop)? else { return None };
    s.instructions().into_iter().find(|i| i.ip() == at)
}

fn test_alias_ud(s: &Seen<'_>, _: &Row) -> bool {
    use iced_x86::Code;
    qemu_ud_at(s).is_some_and(|i| {
        matches!(
            i.code(),
            Code::Test_rm8_imm8_F6r1
                | Code::Test_rm16_imm16_F7r1
                | Code::Test_rm32_imm32_F7r1
                | Code::Test_rm64_imm32_F7r1
        )
    })
}

/// A register row where QEMU holds the low 32 bits of the software CPU's value (bits 63:32
/// cleared) after a BSF/BSR with a 32-bit destination under an AMD profile.
fn bsf_zero_source_amd(s: &Seen<'_>, row: &Row) -> bool {
    let amd = s.parsed.vendor == duet_core::Vendor::Amd;
    let bsf32 = |i: &Instruction| {
        matches!(i.mnemonic(), Mnemonic::Bsf | Mnemonic::Bsr) && i.op0_register().size() == 4
    };
    let Row::Register { field: Field::Gpr(_), left: Some(q), right: Some(i) } = *row else { return false };
    amd && s.long() && q == i & 0xffff_ffff && s.has(bsf32)
}

/// The #GP of an INT n through a gate it may not use in IA-32e mode: QEMU's error code counts
/// 16-byte gates (vector × 16 + 2), the SDM's holds the vector in the selector index (vector × 8
/// + 2, IDT flag set). Explains the stop and the words that hold the two error codes.
fn int_gp_error_code(s: &Seen<'_>, row: &Row) -> bool {
    let (Some((vector::GP, e1, a1)), Some((vector::GP, e2, a2))) =
        (fault(&s.qemu.stop), fault(&s.interp.stop))
    else {
        return false;
    };
    let ours = a1 == a2 && s.long() && e2 & 0b111 == 0b010 && e1 == (e2 >> 3) * 16 + 2;
    ours && match *row {
        Row::Stop { .. } => true,
        Row::Memory { left, right, .. } => (left, right) == (e1, e2),
        _ => false,
    }
}

/// A null selector loaded into FS or GS in 64-bit mode under an AMD profile without
/// NullSelectorClearsBase: QEMU clears the base whatever the vendor, the AMD part keeps it.
fn null_selector_base_amd(s: &Seen<'_>, row: &Row) -> bool {
    let Row::Register {
        field: Field::Seg(seg @ (SegReg::Fs | SegReg::Gs), SegPart::Base),
        left: Some(0),
        right: Some(b),
    } = *row
    else {
        return false;
    };
    let null = s.interp.state.get(&Field::Seg(seg, SegPart::Selector)).is_some_and(|sel| sel & !3 == 0);
    s.parsed.vendor == duet_core::Vendor::Amd && s.long() && null && b != 0
}

/// CR4.OSFXSR (bit 9) and OSXMMEXCPT (bit 10) set on the software CPU and silently clear in QEMU.
fn cr4_osfxsr_dropped(_: &Seen<'_>, row: &Row) -> bool {
    const SSE_BITS: u64 = (1 << 9) | (1 << 10);
    register(row, Field::Cr(4)).is_some_and(|(q, i)| q & SSE_BITS == 0 && (q ^ i) & !SSE_BITS == 0)
}

fn fence_ud(s: &Seen<'_>, _: &Row) -> bool {
    qemu_ud_at(s)
        .is_some_and(|i| matches!(i.mnemonic(), Mnemonic::Lfence | Mnemonic::Mfence | Mnemonic::Sfence))
}

fn int1_ud(s: &Seen<'_>, _: &Row) -> bool {
    qemu_ud_at(s).is_some_and(|i| i.mnemonic() == Mnemonic::Int1) && s.interp.raised(vector::DB)
}

fn rmw_pf_read(s: &Seen<'_>, _: &Row) -> bool {
    let (Some((vector::PF, e1, a1)), Some((vector::PF, e2, a2))) =
        (fault(&s.qemu.stop), fault(&s.interp.stop))
    else {
        return false;
    };
    let rmw = |i: &Instruction| {
        accesses(i).iter().any(|(_, a)| matches!(a, OpAccess::ReadWrite | OpAccess::ReadCondWrite))
    };
    a1 == a2 && e2 == e1 | 2 && e1 & 2 == 0 && s.instructions().iter().any(|i| i.ip() == a1 && rmw(i))
}

fn ist_null_ss(s: &Seen<'_>, row: &Row) -> bool {
    let ss_row = matches!(row, Row::Register { field: Field::Seg(SegReg::Ss, _), .. });
    s.long()
        && ss_row
        && s.interp.exception().is_some()
        && s.state(s.qemu, Field::Seg(SegReg::Ss, SegPart::Selector)) == Some(0)
}

fn ss_noncanonical_gp(s: &Seen<'_>, _: &Row) -> bool {
    let (Some((vector::GP, e1, a1)), Some((vector::SS, e2, a2))) =
        (fault(&s.qemu.stop), fault(&s.interp.stop))
    else {
        return false;
    };
    s.long() && (e1, a1) == (e2, a2)
}

fn flags_only(row: &Row, bits: u64) -> bool {
    register(row, Field::Rflags).is_some_and(|(q, i)| (q ^ i) & !bits == 0)
}

fn blsi_cf(s: &Seen<'_>, row: &Row) -> bool {
    flags_only(row, rflags::CF) && s.has(|i| i.mnemonic() == Mnemonic::Blsi)
}

fn adx_32(s: &Seen<'_>, row: &Row) -> bool {
    let adx32 = |i: &Instruction| {
        matches!(i.mnemonic(), Mnemonic::Adcx | Mnemonic::Adox) && i.op0_register().size() == 4
    };
    flags_only(row, rflags::CF | rflags::OF) && s.has(adx32)
}

fn syscall_rflags(s: &Seen<'_>, row: &Row) -> bool {
    matches!(row, Row::Register { field: Field::Rflags, .. }) && s.has(|i| i.mnemonic() == Mnemonic::Syscall)
}

fn pae_pdpte_bit5(s: &Seen<'_>, row: &Row) -> bool {
    let Some((addr, qemu, interp)) = memory(row) else { return false };
    let (Some(cr3), Some(cr4), Some(efer)) =
        (s.state(s.interp, Field::Cr(3)), s.state(s.interp, Field::Cr(4)), s.state(s.interp, Field::Efer))
    else {
        return false;
    };
    let table = cr3 & !0x1f;
    cr4 & (1 << 5) != 0
        && efer & (1 << 10) == 0
        && (table..table + 32).contains(&addr)
        && qemu ^ interp == 1 << 5
}

fn amd_ext_leaf_mirror(s: &Seen<'_>, row: &Row) -> bool {
    // Leaf 1 EDX bits AMD repeats in leaf 0x8000_0001 EDX (AMD64 APM Vol. 3, CPUID Fn8000_0001_EDX).
    const MIRROR: u64 = 0x0183_f3ff;
    register(row, Field::Gpr(2)).is_some_and(|(q, i)| (q ^ i) & !MIRROR == 0)
        && s.has(|i| i.mnemonic() == Mnemonic::Cpuid)
}

/// QEMU 7.2's departures, in the order they are tried on each differing row.
pub const QEMU_DEPARTURES: &[Departure] = &[
    Departure {
        name: "fault-frame-rf",
        reason: "QEMU pushes RF = 0 in the EFLAGS image of a fault-class exception; the SDM pushes 1 \
                 (Vol. 3A §18.3.1.1)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: fault_frame_rf,
    },
    Departure {
        name: "segment-checks",
        reason: "QEMU does not test segment limits and access rights at every memory access (its \
                 documentation says so); the SDM faults an access through a null selector, beyond \
                 the limit or against the type with #GP(0) or #SS(0) (Vol. 3A §5.3, §5.4)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: segment_checks,
    },
    Departure {
        name: "no-duet-devices",
        reason: "QEMU has none of duet's devices: its unassigned memory reads 0 and drops writes and \
                 its unassigned ports read all ones, where duet's recorder returns a pattern (not \
                 architectural either way)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: no_duet_devices,
    },
    Departure {
        name: "test-alias-ud",
        reason: "QEMU raises #UD for TEST encoded as F6 /1 or F7 /1, which Intel and AMD processors \
                 (and iced-x86) decode as TEST (the SDM's opcode map, Vol. 2D Table A-6, leaves \
                 group 3 /1 blank)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: test_alias_ud,
    },
    Departure {
        name: "bsf-zero-source-amd",
        reason: "QEMU writes the destination of a BSF/BSR with a zero source back at the operand size \
                 (a 32-bit one in 64-bit mode loses bits 63:32), as Intel parts do, whatever the \
                 vendor; an AMD part leaves the destination unchanged (AMD64 APM Vol. 3 BSF/BSR; \
                 docs/VENDORS.md)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: bsf_zero_source_amd,
    },
    Departure {
        name: "int-gp-error-code-64",
        reason: "in IA-32e mode QEMU reports the #GP of an INT n through a gate it may not use (DPL < \
                 CPL) with error code vector × 16 + 2; the SDM's error code holds the vector in the \
                 selector index, vector × 8 + 2 with the IDT flag (Vol. 3A §6.13, §6.12.1.1)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: int_gp_error_code,
    },
    Departure {
        name: "null-selector-base-amd",
        reason: "QEMU clears the FS/GS base when a null selector is loaded in 64-bit mode whatever the \
                 vendor; an AMD part without NullSelectorClearsBase keeps it (docs/VENDORS.md)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: null_selector_base_amd,
    },
    Departure {
        name: "cr4-osfxsr-dropped",
        reason: "QEMU silently clears CR4.OSFXSR and CR4.OSXMMEXCPT when its CPU model lacks FXSR/SSE; \
                 the SDM lists neither among the bits a MOV to CR4 may refuse for a missing feature \
                 (Vol. 3A §2.5), and KVM (whose reserved-CR4 list follows CPUID for the others) and \
                 the software CPU keep them",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: cr4_osfxsr_dropped,
    },
    Departure {
        name: "fence-cpuid-check",
        reason: "QEMU raises #UD for LFENCE and MFENCE when its CPU model lacks SSE2, and for SFENCE \
                 without SSE, as the SDM's exception lists say; the silicon executes them whatever \
                 CPUID the guest sees (KVM here, ring 3 running natively), and the software CPU \
                 follows the silicon until duet's profile offers SSE (issue 13)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: fence_ud,
    },
    Departure {
        name: "int1-ud",
        reason: "QEMU 7.2 raises #UD for INT1/ICEBP (F1); the SDM delivers #DB (Vol. 2A INT n/INTO/\
                 INT3/INT1)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: int1_ud,
    },
    Departure {
        name: "rmw-pf-read",
        reason: "QEMU reports the #PF of a read-modify-write destination as a read (error code W/R = \
                 0): it loads before it stores; the access is a write (SDM Vol. 3A §4.7, W/R)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: rmw_pf_read,
    },
    Departure {
        name: "ist-null-ss",
        reason: "QEMU loads a null SS when it delivers through an IST gate without a privilege change; \
                 the SDM keeps SS (Vol. 2A INT n, IA-32e mode)",
        pinned_by: "tests/three_opinions.rs::interp_agrees_with_qemu_on_every_fixture (fault-long)",
        explains: ist_null_ss,
    },
    Departure {
        name: "ss-noncanonical-gp",
        reason: "QEMU raises #GP(0) for a non-canonical reference through SS in 64-bit mode; the SDM \
                 raises #SS(0) (Vol. 3A §6.15)",
        pinned_by: "tests/three_opinions.rs::qemu_departures_still_hold",
        explains: ss_noncanonical_gp,
    },
    Departure {
        name: "blsi-cf",
        reason: "QEMU sets BLSI's CF for a zero source; the SDM sets CF when the source is not zero \
                 (Vol. 2A BLSI)",
        pinned_by: "tests/isa_bmi.rs::bmi_popcnt_lzcnt_tzcnt_bmi1_bmi2_adx_match_the_sdm",
        explains: blsi_cf,
    },
    Departure {
        name: "adx-32-carry",
        reason: "QEMU's 32-bit ADCX/ADOX miss the carry out of bit 31 (CF/OF stay clear); the SDM \
                 takes the carry out of the operand size (Vol. 2A ADCX, ADOX)",
        pinned_by: "tests/isa_bmi.rs::bmi_popcnt_lzcnt_tzcnt_bmi1_bmi2_adx_match_the_sdm",
        explains: adx_32,
    },
    Departure {
        name: "syscall-rflags",
        reason: "after QEMU's SYSCALL, RFLAGS is not RFLAGS AND NOT IA32_FMASK (SDM Vol. 2B SYSCALL)",
        pinned_by: "tests/isa_exceptions.rs::exceptions_syscall_from_ring3_enters_lstar_at_cpl0",
        explains: syscall_rflags,
    },
    Departure {
        name: "pae-pdpte-bit5",
        reason: "QEMU sets bit 5 of a PAE PDPTE, which is reserved there and never written by \
                 hardware (SDM Vol. 3A §4.4.1, Table 4-8)",
        pinned_by: "tests/three_opinions.rs::interp_agrees_with_qemu_on_every_fixture (paging-pae)",
        explains: pae_pdpte_bit5,
    },
    Departure {
        name: "amd-ext-leaf-mirror",
        reason: "QEMU's AuthenticAMD model repeats leaf 1 EDX bits in CPUID 0x8000_0001 EDX beyond the \
                 profile that KVM and the software CPU present",
        pinned_by: "tests/three_opinions.rs::interp_agrees_with_qemu_on_every_fixture (cpuid-msr)",
        explains: amd_ext_leaf_mirror,
    },
];

/// The departures that explain every row of `rows`, each row by the first that explains it;
/// `None` when some row is explained by none (or there are no rows).
pub fn explain(seen: &Seen<'_>, rows: &[Row], list: &'static [Departure]) -> Option<Vec<&'static Departure>> {
    let mut used: Vec<&'static Departure> = Vec::new();
    for row in rows {
        let d = list.iter().find(|d| (d.explains)(seen, row))?;
        if !used.iter().any(|u| u.name == d.name) {
            used.push(d);
        }
    }
    (!used.is_empty()).then_some(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::case::{hex_bytes, CASE_FORMAT};

    fn case(mode: FuzzMode, code: &[u8]) -> Case {
        Case {
            format: CASE_FORMAT,
            mode,
            note: String::new(),
            regs: Default::default(),
            rflags: "0x2".into(),
            segments: Default::default(),
            code: hex_bytes(code),
            disasm: Vec::new(),
            data: String::new(),
            cpuid: None,
            expected: None,
        }
    }

    fn exception(vector: u8, rip: u64) -> Outcome {
        Outcome::stopped(StopReason::Exception(ExceptionReport { vector, error_code: 0, rip }))
    }

    fn mem(addr: u64, qemu: u64, interp: u64) -> Row {
        Row::Memory { addr, left: qemu, right: interp }
    }

    #[test]
    fn rf_in_a_frame_near_a_stack_is_explained_and_nothing_else() {
        let c = case(FuzzMode::Long64, &[0x0f, 0x0b]);
        let mut o = exception(vector::UD, 0x8000);
        // The handler stopped with RSP at the frame's CS: RFLAGS is at RSP + 8.
        for (k, v) in [(Field::RSP, 0x7ffe0), (Field::CR0, 0x8000_0011), (Field::Efer, 0x500)] {
            o.state.insert(k, v);
        }
        let s = Seen {
            case: &c,
            parsed: &Parsed::of_code(FuzzMode::Long64, &[0x0f, 0x0b]),
            qemu: &o,
            interp: &o,
        };
        // RF (bit 16) set on the software CPU's side (SDM Vol. 3A §18.3.1.1).
        assert!(fault_frame_rf(&s, &mem(0x7ffe8, 0x246, 0x1_0246)));
        assert!(!fault_frame_rf(&s, &mem(0x7ffe8, 0x1_0246, 0x246)), "QEMU's RF");
        assert!(!fault_frame_rf(&s, &mem(0x7ffe8, 0x246, 0x247)), "CF");
        assert!(!fault_frame_rf(&s, &mem(0x7fff0, 0x246, 0x1_0246)), "not RFLAGS");
        // A frame misaligned by 2: RF lands at bit 32 of the word below.
        o.state.insert(Field::RSP, 0x7ffe2);
        let s = Seen {
            case: &c,
            parsed: &Parsed::of_code(FuzzMode::Long64, &[0x0f, 0x0b]),
            qemu: &o,
            interp: &o,
        };
        assert!(fault_frame_rf(&s, &mem(0x7ffe8, 0, 0x1_0000_0000)));
        let rax = Row::Register { field: Field::Gpr(0), left: Some(1), right: Some(2) };
        assert!(explain(&s, &[rax], QEMU_DEPARTURES).is_none());
    }

    #[test]
    fn segment_checks_explain_a_fault_only_through_a_segment_that_can_fault() {
        // mov eax, es:[eax] faulting with #GP(0) on the software CPU, running on under QEMU.
        let code = [0x26, 0x8b, 0x00];
        let c = case(FuzzMode::Prot32, &code);
        let p = Parsed::of_code(FuzzMode::Prot32, &code);
        let qemu = Outcome::stopped(StopReason::DebugExit { value: 0 });
        let mut interp = exception(vector::GP, 0x8000);
        let r = Row::Stop { left: qemu.stop.clone(), right: interp.stop.clone() };
        // ES null (no hidden part in the outcome): SDM Vol. 3A §5.4.1, #GP(0).
        assert!(segment_checks(&Seen { case: &c, parsed: &p, qemu: &qemu, interp: &interp }, &r));
        // ES flat and writable: the software CPU's #GP(0) has another cause; not QEMU's departure.
        let es = |part| Field::Seg(SegReg::Es, part);
        for (k, v) in
            [(es(SegPart::Limit), 0xffff_ffff), (es(SegPart::Attributes), 0xc093), (es(SegPart::Base), 0)]
        {
            interp.state.insert(k, v);
        }
        assert!(!segment_checks(&Seen { case: &c, parsed: &p, qemu: &qemu, interp: &interp }, &r));
        // A 16-bit limit can fault.
        interp.state.insert(es(SegPart::Limit), 0xffff);
        assert!(segment_checks(&Seen { case: &c, parsed: &p, qemu: &qemu, interp: &interp }, &r));
    }

    #[test]
    fn bsf_zero_source_is_a_departure_only_under_an_amd_profile() {
        // bsf eax, ebx with EBX = 0 (as in fuzz case 375 of seed 1, long64): QEMU zero-extends
        // the old EAX into RAX; the AMD profile keeps all of RAX.
        let code = [0x0f, 0xbc, 0xc3];
        let c = case(FuzzMode::Long64, &code);
        let amd = Parsed { vendor: duet_core::Vendor::Amd, ..Parsed::of_code(FuzzMode::Long64, &code) };
        let o = Outcome::stopped(StopReason::DebugExit { value: 0 });
        let row = Row::Register {
            field: Field::Gpr(0),
            left: Some(0x89ab_cdef),
            right: Some(0x0123_4567_89ab_cdef),
        };
        assert!(bsf_zero_source_amd(&Seen { case: &c, parsed: &amd, qemu: &o, interp: &o }, &row));
        let other = Row::Register {
            field: Field::Gpr(0),
            left: Some(0x89ab_cdee),
            right: Some(0x0123_4567_89ab_cdef),
        };
        assert!(!bsf_zero_source_amd(&Seen { case: &c, parsed: &amd, qemu: &o, interp: &o }, &other));
        // Under an Intel profile the software CPU writes back as QEMU does: no departure.
        let intel = Parsed::of_code(FuzzMode::Long64, &code);
        assert!(!bsf_zero_source_amd(&Seen { case: &c, parsed: &intel, qemu: &o, interp: &o }, &row));
    }
}
