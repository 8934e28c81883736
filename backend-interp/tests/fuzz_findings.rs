//! Interpreter fixes for divergences the differential fuzzer found (fixtures/corpus): the W/R
//! bit of a read-modify-write's page fault, the write of a zero-count shift, CMPXCHG with a
//! register destination, TZCNT/LZCNT on profiles with and without them, and PS in a PDPTE
//! without 1-GByte pages. Each test cites the SDM section and the corpus case.

mod common;

use std::time::Duration;

use common::*;
use duet_core::state::rflags::{CF, FIXED, ZF};
use duet_core::{CpuidProfile, StopReason};
use iced_x86::code_asm::*;

/// PDE 1 of `long64`'s identity map: linear 2–4 MiB as one 2 MiB page.
const PDE1: u64 = PT + 0x2000 + 8;

/// Runs 64-bit ring-0 code on the baseline profile after `prep` edits memory and state.
fn run64(
    code: impl FnOnce(&mut CodeAssembler),
    prep: impl FnOnce(&duet_core::GuestMemory, &mut duet_core::CpuState),
) -> (duet_core::RunOutcome, std::sync::Arc<duet_core::GuestMemory>) {
    run64_on(&CpuidProfile::baseline(), code, prep)
}

fn run64_on(
    profile: &CpuidProfile,
    code: impl FnOnce(&mut CodeAssembler),
    prep: impl FnOnce(&duet_core::GuestMemory, &mut duet_core::CpuState),
) -> (duet_core::RunOutcome, std::sync::Arc<duet_core::GuestMemory>) {
    let bytes = asm(64, |a| {
        code(a);
        a.hlt().unwrap();
    });
    let mem = memory(&bytes);
    let mut s = long64(&mem);
    prep(&mem, &mut s);
    let (out, _) = run_profile(mem.clone(), &s, profile, Duration::from_secs(5), |_| {});
    (out, mem)
}

/// The #PF error code pushed by the stub frame, or `None` when the run did not end in #PF.
fn pf_error(out: &duet_core::RunOutcome, mem: &duet_core::GuestMemory) -> Option<u64> {
    (stub_vector(&out.state) == Some(14)).then(|| peek64(mem, out.state.regs.rsp + 8))
}

#[test]
fn read_modify_write_page_faults_report_a_write() {
    // SDM Vol. 3A §4.7: W/R = 1 when the access causing the fault was a write; the first access
    // of a read-modify-write is made with write intent, and KVM reports 0x2 for CMPXCHG m8
    // (fixtures/corpus rmw-page-fault-write-bit.json). CMP and BT only read: 0x0.
    type Emit = fn(&mut CodeAssembler);
    let cases: [(&str, Emit, u64); 9] = [
        ("cmpxchg", |a| a.cmpxchg(byte_ptr(rbx), cl).unwrap(), 2),
        ("add", |a| a.add(dword_ptr(rbx), 1).unwrap(), 2),
        ("shl", |a| a.shl(dword_ptr(rbx), 3).unwrap(), 2),
        ("rol cl=0", |a| a.rol(byte_ptr(rbx), cl).unwrap(), 2),
        ("xchg", |a| a.xchg(qword_ptr(rbx), rax).unwrap(), 2),
        ("xadd", |a| a.xadd(word_ptr(rbx), ax).unwrap(), 2),
        ("bts", |a| a.bts(dword_ptr(rbx), ecx).unwrap(), 2),
        ("cmp", |a| a.cmp(dword_ptr(rbx), 1).unwrap(), 0),
        ("bt", |a| a.bt(dword_ptr(rbx), ecx).unwrap(), 0),
    ];
    for (name, emit, want) in cases {
        let (out, mem) = run64(
            |a| {
                a.mov(rbx, 0x20_0000u64).unwrap();
                a.xor(ecx, ecx).unwrap();
                emit(a);
            },
            |mem, _| poke(mem, PDE1, &0u64.to_le_bytes()),
        );
        assert_eq!(pf_error(&out, &mem), Some(want), "{name}");
        assert_eq!(out.state.sregs.cr2, 0x20_0000, "{name}");
    }
    // A present read-only page at CPL 0 with CR0.WP: P | W for the RMW, nothing for CMP.
    let (out, mem) = run64(
        |a| {
            a.mov(rbx, 0x20_0000u64).unwrap();
            a.cmp(dword_ptr(rbx), 1).unwrap();
            a.inc(dword_ptr(rbx)).unwrap();
        },
        |mem, s| {
            poke(mem, PDE1, &((1u64 << 21) | 0x85).to_le_bytes());
            s.sregs.cr0 |= duet_core::state::ctrl::CR0_WP;
        },
    );
    assert_eq!(pf_error(&out, &mem), Some(3));
}

#[test]
fn zero_count_shifts_of_memory_still_write() {
    // A masked count of 0 changes no value and no flag (SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/
    // ROL/ROR), but hardware performs the write: the dirty bit of the page is set (SDM Vol. 3A
    // §4.8; KVM in fixtures/corpus rol-cl-zero-ram-dirty-bit.json).
    type Emit = fn(&mut CodeAssembler);
    let cases: [(&str, Emit); 5] = [
        ("rol cl", |a| a.rol(byte_ptr(rbx + 0x21), cl).unwrap()),
        ("shl cl", |a| a.shl(dword_ptr(rbx), cl).unwrap()),
        ("sar 0x20", |a| a.sar(byte_ptr(rbx), 0x20).unwrap()),
        ("rcr 0x40 (64-bit)", |a| a.rcr(qword_ptr(rbx), 0x40).unwrap()),
        ("shld 0", |a| a.shld(dword_ptr(rbx), eax, 0).unwrap()),
    ];
    for (name, emit) in cases {
        let (out, mem) = run64(
            |a| {
                a.mov(rbx, 0x20_0100u64).unwrap();
                a.mov(ecx, 0x20).unwrap();
                emit(a);
            },
            |mem, s| {
                poke(mem, 0x20_0100, &0x1234_5678u64.to_le_bytes());
                s.regs.rflags = FIXED | CF;
            },
        );
        assert_eq!(out.stop, StopReason::Halted, "{name}");
        assert_eq!(peek64(&mem, 0x20_0100), 0x1234_5678, "{name}: value unchanged");
        assert_eq!(out.state.regs.rflags & CF, CF, "{name}: flags unchanged");
        assert_eq!(peek64(&mem, PDE1) & 0x60, 0x60, "{name}: accessed and dirty");
    }
    // A zero-count shift of a register changes nothing either; a read leaves D clear.
    let (_, mem) = run64(
        |a| {
            a.mov(rbx, 0x20_0100u64).unwrap();
            a.mov(eax, dword_ptr(rbx)).unwrap();
        },
        |_, _| {},
    );
    assert_eq!(peek64(&mem, PDE1) & 0x60, 0x20);
}

#[test]
fn failed_cmpxchg_leaves_a_register_destination_whole() {
    // SDM Vol. 2A CMPXCHG: on failure the accumulator is loaded from the destination; a
    // register destination is not written, so R14 keeps its upper half, while EAX is loaded and
    // zero-extended (KVM in fixtures/corpus cmpxchg-r32-fail-upper-half.json).
    let (out, _) = run64(
        |a| a.cmpxchg(r14d, eax).unwrap(),
        |_, s| {
            s.regs.r14 = 0x43e1_ba4e_f6a3_b185;
            s.regs.rax = 0xffff_ffff_0000_0001;
        },
    );
    assert_eq!(out.state.regs.r14, 0x43e1_ba4e_f6a3_b185);
    assert_eq!(out.state.regs.rax, 0xf6a3_b185);
    assert_eq!(out.state.regs.rflags & ZF, 0);
    // On success the destination is written (zero-extended) and RAX is left alone.
    let (out, _) = run64(
        |a| a.cmpxchg(r14d, ecx).unwrap(),
        |_, s| {
            s.regs.r14 = 0x43e1_ba4e_0000_0007;
            s.regs.rax = 0xffff_ffff_0000_0007;
            s.regs.rcx = 0x5555_5555_0000_0009;
        },
    );
    assert_eq!((out.state.regs.r14, out.state.regs.rax), (9, 0xffff_ffff_0000_0007));
    // A failing memory destination is written back with its own value: the page gets dirty.
    let (out, mem) = run64(
        |a| {
            a.mov(rbx, 0x20_0100u64).unwrap();
            a.cmpxchg(dword_ptr(rbx), ecx).unwrap();
        },
        |mem, s| {
            poke(mem, 0x20_0100, &5u32.to_le_bytes());
            s.regs.rax = 6;
        },
    );
    assert_eq!((out.state.regs.rax, peek32(&mem, 0x20_0100)), (5, 5));
    assert_eq!(peek64(&mem, PDE1) & 0x40, 0x40);
}

#[test]
fn lzcnt_and_tzcnt_counts_and_flags() {
    // SDM Vol. 2A LZCNT, Vol. 2B TZCNT: count of the operand size; CF = (source = 0), ZF =
    // (result = 0). LZCNT ax of 0x0099 is 8 (KVM in fixtures/corpus lzcnt-16bit-count.json).
    let go = |p: &CpuidProfile, emit: fn(&mut CodeAssembler), acc: u64, flags: u64| {
        let (out, _) = run64_on(p, emit, |_, s| {
            s.regs.rax = acc;
            s.regs.r12 = 0x99;
            s.regs.rflags = FIXED | flags;
        });
        (out.state.regs.rax, out.state.regs.rflags & (CF | ZF))
    };
    let base = CpuidProfile::baseline();
    let lz: fn(&mut CodeAssembler) = |a| a.lzcnt(ax, r12w).unwrap();
    let tz: fn(&mut CodeAssembler) = |a| a.tzcnt(ax, ax).unwrap();
    assert_eq!(go(&base, lz, 0xa1f6, 0), (8, 0));
    assert_eq!(go(&base, tz, 0x9a5d, CF), (0, ZF));
    assert_eq!(go(&base, tz, 0xffff_0000, 0), (0xffff_0010, CF));
    // Without the feature they run as BSR/BSF (SDM: "Description"); CF, undefined there, is
    // cleared, as this host's KVM emulator does (fixtures/corpus tzcnt-flags.json).
    let no_abm = without(&base, 0x8000_0001, 2, duet_core::cpuid::ext_leaf1::ECX_ABM);
    let no_bmi1 = without(&base, 7, 1, duet_core::cpuid::leaf7_ebx::BMI1);
    assert_eq!(go(&no_abm, lz, 0xa1f6, CF), (7, 0));
    assert_eq!(go(&no_bmi1, tz, 0x9a5d, CF | ZF), (0, 0));
    assert_eq!(go(&no_bmi1, tz, 0x10000, CF), (0x10000, ZF));
}

#[test]
fn pdpte_ps_is_reserved_without_1gb_pages() {
    // SDM Vol. 3A §4.5.4 (Table 4-16): PS in a PDPTE maps a 1-GByte page only when
    // CPUID.80000001H:EDX.Page1GB[26] = 1; else it is a reserved bit: #PF with P | RSVD (the
    // baseline profile does not enumerate it; KVM faults in fixtures/corpus
    // pdpte-ps-without-1g-pages.json).
    let code = |a: &mut CodeAssembler| {
        a.mov(rbx, 0x4000_9000u64).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
    };
    let map = |mem: &duet_core::GuestMemory, _: &mut duet_core::CpuState| {
        poke(mem, PT + 0x1000 + 8, &0x83u64.to_le_bytes());
        poke(mem, 0x9000, &0xfeed_f00du32.to_le_bytes());
    };
    let (out, mem) = run64(code, map);
    assert_eq!(pf_error(&out, &mem), Some(0b1001));
    assert_eq!(out.state.sregs.cr2, 0x4000_9000);
    let gb = with(&CpuidProfile::baseline(), 0x8000_0001, 3, 1 << 26);
    let (out, _) = run64_on(&gb, code, map);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax, 0xfeed_f00d);
}

#[test]
fn zero_count_shifts_and_strings_keep_undefined_flags_undefined() {
    use duet_core::state::rflags::{AF, OF};
    // SDM Vol. 2B SAL/SAR/SHL/SHR: AF is undefined after a non-zero count, and "if the count is
    // 0, the flags are not affected"; a REP string instruction with RCX = 0 runs no iteration
    // and writes no flag (fixtures/corpus undefined-af-survives-zero-count-cmps.json). So AF
    // stays undefined through both, and OF is undefined after a count other than 1.
    let (out, _) = run64(
        |a| {
            a.shl(al, 0x41).unwrap(); // masked count 1: AF undefined, OF defined
            a.xor(ecx, ecx).unwrap(); // defines OF, SF, ZF, PF, CF; AF undefined (SDM XOR)
            a.shl(al, 0x40).unwrap(); // masked count 0: no flag written
            a.repe().cmpsb().unwrap(); // RCX = 0: no iteration
        },
        |_, _| {},
    );
    assert_eq!(out.stop, StopReason::Halted, "{:?}", out.stop);
    assert_eq!(out.undefined_rflags & (AF | OF), AF, "undefined {:#x}", out.undefined_rflags);
    let (out, _) = run64(
        |a| {
            a.mov(cl, 3).unwrap();
            a.rcl(eax, cl).unwrap(); // count 3: OF undefined (SDM Vol. 2B RCL)
        },
        |_, _| {},
    );
    assert_ne!(out.undefined_rflags & OF, 0, "undefined {:#x}", out.undefined_rflags);
}

#[test]
fn delivery_through_an_idt_in_unbacked_memory_ends_without_mmio_exits() {
    // An IDT in unbacked memory reads as all ones during delivery (as paging-structure reads
    // do): gate selector 0xffff lies beyond the GDT limit, so #UD's delivery raises #GP, that
    // one #DF, and #DF's own failure shuts the CPU down (SDM Vol. 3A §6.15, Table 6-5) — rather
    // than asking for the same MMIO read until the deadline.
    let (out, _) = run64(
        |a| a.ud2().unwrap(),
        |_, s| {
            s.sregs.idt.base = 0xd000_0000;
            s.sregs.idt.limit = 0xfff;
        },
    );
    assert_eq!(out.stop, StopReason::Shutdown, "{:?}", out.stop);
    assert!(out.exits <= 2, "{} exits", out.exits);
}

#[test]
fn an_operand_read_in_parts_faults_when_any_part_leaves_the_real_mode_segment() {
    // A pseudo-descriptor (LGDT/LIDT), a far pointer (JMP/CALL m16:16) and BOUND's pair of bounds
    // are each one operand: at offset 0xFFFE of a 64 KiB real-mode segment it runs past the limit,
    // and the SDM's real-address-mode exceptions give #SS for SS and #GP for the other segments
    // (SDM Vol. 2A LGDT/LIDT, JMP, BOUND); the parts must not wrap to offset 0. KVM raised #SS for
    // `lgdt [bp-6Eh]` with BP = 0x6C (fuzz seed 1, real case 77000;
    // fixtures/corpus/regressions/lgdt-operand-past-the-real-mode-limit.json).
    type Emit = fn(&mut CodeAssembler);
    let cases: [(&str, Emit, u64); 4] = [
        ("lgdt [bp-2] (SS)", |a| a.lgdt(ptr(bp - 2)).unwrap(), 12),
        ("lidt [bx-2] (DS)", |a| a.lidt(ptr(bx - 2)).unwrap(), 13),
        ("jmp far [bx-2] (DS)", |a| a.jmp(dword_ptr(bx - 2)).unwrap(), 13),
        ("bound ax, [bx-2] (DS)", |a| a.bound(ax, dword_ptr(bx - 2)).unwrap(), 13),
    ];
    for (what, emit, vector) in cases {
        let bytes = asm(16, |a| {
            a.xor(bp, bp).unwrap();
            a.xor(bx, bx).unwrap();
            emit(a);
            a.hlt().unwrap();
        });
        let mem = memory(&bytes);
        let s = real_mode(&mem);
        let (out, _) = run(mem.clone(), &s);
        // The real-mode stubs push the vector and halt: it is the word at SS:SP.
        let pushed = u64::from(peek32(&mem, out.state.regs.rsp & 0xffff) & 0xffff);
        assert_eq!(pushed, vector, "{what}: {:?}", out.stop);
    }
}
