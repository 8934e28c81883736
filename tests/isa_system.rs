//! System instructions this host's KVM handles: SGDT/SIDT/LGDT/LIDT, SLDT/STR, LAR/LSL/VERR/VERW
//! over every GDT selector, MOV to/from CR0/CR2/CR3/CR4/CR8, SMSW/LMSW/CLTS, RDMSR/WRMSR (STAR,
//! LSTAR, FS/GS base, KERNEL_GS_BASE with SWAPGS, SYSENTER MSRs), INVLPG/WBINVD, CPUID through
//! the shared profile, and RDTSC for monotonicity only (never its value).
//! MOV to/from DR is not implemented by the software CPU ("debug registers" in its crate docs).

mod common;

use common::*;
use duet::core::state::msr;
use duet::fixtures::Mode;
use iced_x86::code_asm::*;

#[test]
fn system_descriptor_tables_and_segment_checks_match_kvm() {
    let mut b = Batch::new("system-tables", Mode::Long);
    let s = scratch(Mode::Long);
    b.case("sgdt; sidt (10-byte images)", 0, move |a| {
        a.sgdt(ptr(s))?;
        a.sidt(ptr(s + 16))?;
        a.mov(rax, qword_ptr(s))?;
        a.movzx(ebx, word_ptr(s + 8))?;
        a.mov(rcx, qword_ptr(s + 16))?;
        a.movzx(edx, word_ptr(s + 24))
    });
    b.case("lgdt/lidt a copy, sgdt/sidt, restore", 0, move |a| {
        a.sgdt(ptr(s))?;
        a.sidt(ptr(s + 16))?;
        a.mov(word_ptr(s + 32), 0x57)?;
        a.mov(rax, 0x1000u64)?;
        a.mov(qword_ptr(s + 34), rax)?;
        a.lgdt(ptr(s + 32))?;
        a.mov(word_ptr(s + 48), 0x7ff)?;
        a.mov(rax, 0x2000u64)?;
        a.mov(qword_ptr(s + 50), rax)?;
        a.lidt(ptr(s + 48))?;
        a.sgdt(ptr(s + 64))?;
        a.sidt(ptr(s + 80))?;
        a.lgdt(ptr(s))?;
        a.lidt(ptr(s + 16))?;
        a.mov(rax, qword_ptr(s + 64))?;
        a.mov(rbx, qword_ptr(s + 80))
    });
    b.case("sldt, str (register and memory forms)", 0, move |a| {
        a.mov(rax, u64::MAX)?;
        a.sldt(ax)?;
        a.mov(rbx, u64::MAX)?;
        a.str(ebx)?;
        a.mov(rcx, u64::MAX)?;
        a.str(rcx)?;
        a.mov(qword_ptr(s), -1)?;
        a.str(word_ptr(s))?;
        a.mov(rdx, qword_ptr(s))
    });
    b.check();
}

#[test]
fn system_control_registers_and_msrs_match_kvm() {
    let mut b = Batch::new("system-cr-msr", Mode::Long);
    b.case("mov from cr0 cr2 cr3 cr4 cr8", 0, |a| {
        a.mov(rax, cr0)?;
        a.mov(rbx, cr3)?;
        a.mov(rcx, cr4)?;
        a.mov(rdx, cr2)?;
        a.mov(rsi, cr8)
    });
    b.case("mov to cr2, cr8, cr4 (PGE|OSFXSR) and back", 0, |a| {
        a.mov(rax, 0xffff_8000_1234_5678u64)?;
        a.mov(cr2, rax)?;
        a.mov(rbx, cr2)?;
        a.mov(eax, 5)?;
        a.mov(cr8, rax)?;
        a.mov(rcx, cr8)?;
        a.xor(eax, eax)?;
        a.mov(cr8, rax)?;
        a.mov(rax, cr4)?;
        a.mov(rsi, rax)?;
        a.or(eax, 0x280)?;
        a.mov(cr4, rax)?;
        a.mov(rdx, cr4)?;
        a.mov(cr4, rsi)?;
        a.mov(rdi, cr3)?;
        a.mov(cr3, rdi)?; // reloading CR3 flushes the TLB
        a.xor(eax, eax)
    });
    b.case("smsw; lmsw sets MP|TS, cannot clear PE; clts", 0, |a| {
        a.mov(rax, u64::MAX)?;
        a.smsw(eax)?;
        a.mov(rbx, u64::MAX)?;
        a.smsw(bx)?;
        a.mov(cx, 0x000a)?; // MP|TS, PE clear
        a.lmsw(cx)?;
        a.mov(rdx, cr0)?;
        a.clts()?;
        a.mov(rsi, cr0)?;
        a.and(esi, 0xffff)?;
        a.mov(ecx, 0)
    });
    for (name, index, value) in [
        ("STAR", msr::STAR, 0x0023_0010_dead_beefu64),
        ("LSTAR", msr::LSTAR, 0xffff_8000_0000_1000),
        ("CSTAR", msr::CSTAR, 0x1234_5678),
        ("SYSENTER_CS", msr::SYSENTER_CS, 0x10),
        ("SYSENTER_ESP", msr::SYSENTER_ESP, 0x7_0000),
        ("SYSENTER_EIP", msr::SYSENTER_EIP, 0x10_0000),
        ("KERNEL_GS_BASE", msr::KERNEL_GS_BASE, 0x5_0000),
    ] {
        b.case(format!("wrmsr/rdmsr {name}"), 0, move |a| {
            a.mov(ecx, index)?;
            a.rdmsr()?;
            a.mov(esi, eax)?;
            a.mov(edi, edx)?;
            a.mov(eax, value as u32)?;
            a.mov(edx, (value >> 32) as u32)?;
            a.wrmsr()?;
            a.xor(eax, eax)?;
            a.xor(edx, edx)?;
            a.rdmsr()?;
            a.mov(rbx, rdx)?;
            a.shl(rbx, 32)?;
            a.or(rbx, rax)?;
            // Restore the old value.
            a.mov(eax, esi)?;
            a.mov(edx, edi)?;
            a.wrmsr()
        });
    }
    b.case("rdmsr EFER, APIC_BASE", 0, |a| {
        a.mov(ecx, msr::EFER)?;
        a.rdmsr()?;
        a.mov(ebx, eax)?;
        a.mov(ecx, msr::APIC_BASE)?;
        a.rdmsr()?;
        a.and(eax, !0xfffu32 as i32)?; // the base only; BSP/enable bits are compared too
        a.mov(esi, eax)
    });
    let s = scratch(Mode::Long);
    b.case("FS/GS base MSRs address fs:/gs:, SWAPGS exchanges GS base", 0, move |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(s + 0x40), rax)?;
        a.mov(rax, 0x99aa_bbcc_ddee_ff00u64)?;
        a.mov(qword_ptr(s + 0x80), rax)?;
        a.mov(ecx, msr::FS_BASE)?;
        a.mov(eax, (s + 0x40) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, msr::KERNEL_GS_BASE)?;
        a.mov(eax, (s + 0x80) as u32)?;
        a.wrmsr()?;
        a.mov(rbx, qword_ptr(0).fs())?;
        a.swapgs()?;
        a.mov(rsi, qword_ptr(0).gs())?;
        a.swapgs()?;
        a.mov(ecx, msr::KERNEL_GS_BASE)?;
        a.rdmsr()?;
        a.mov(edi, eax)?;
        a.mov(ecx, msr::FS_BASE)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, msr::KERNEL_GS_BASE)?;
        a.wrmsr()?;
        a.xor(ecx, ecx)
    });
    b.case("invlpg; wbinvd", 0, move |a| {
        a.invlpg(ptr(s))?;
        a.wbinvd()?;
        a.mov(rax, qword_ptr(s + 0x40))
    });
    b.check();
}

#[test]
fn system_rdtsc_is_monotonic_and_cpuid_follows_the_profile() {
    // CPUID values depend on the host (the profile keeps its vendor string), so this batch is
    // compared KVM against the software CPU but its snapshot holds only host-independent facts.
    let mut b = Batch::new("system-tsc-cpuid", Mode::Long);
    b.case("rdtsc twice: second > first, EDX:EAX upper halves of RAX/RDX clear", 0, |a| {
        a.mov(rax, u64::MAX)?;
        a.mov(rdx, u64::MAX)?;
        a.rdtsc()?;
        a.mov(rsi, rax)?;
        a.or(rsi, rdx)?;
        a.shr(rsi, 32)?; // 0: RDTSC clears the upper halves (SDM Vol. 2B RDTSC)
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(rbx, rax)?;
        for _ in 0..8 {
            a.nop()?;
        }
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.cmp(rax, rbx)?;
        a.seta(cl)?;
        a.movzx(ecx, cl)?;
        a.xor(eax, eax)?;
        a.xor(ebx, ebx)?;
        a.xor(edx, edx)
    });
    // CPUID.0: max leaf >= 1; CPUID.1: EDX bit 5 (MSR) and bit 4 (TSC) are set on any x86-64 the
    // profile describes, and CPUID.80000001H:EDX bit 29 (LM) is set. Stored as booleans.
    b.case("cpuid leaf facts", 0, |a| {
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.cmp(eax, 1)?;
        a.setae(sil)?;
        a.mov(eax, 1)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.and(edx, 0x30)?;
        a.mov(edi, edx)?;
        a.mov(eax, 0x8000_0001u32)?;
        a.cpuid()?;
        a.shr(edx, 29)?;
        a.and(edx, 1)?;
        a.xor(eax, eax)?;
        a.xor(ebx, ebx)?;
        a.xor(ecx, ecx)
    });
    b.check();
}

#[test]
fn system_cpuid_returns_the_shared_profile() {
    use duet::{testing, BackendKind, StopReason};
    // The values are the profile's (host-dependent: no snapshot): CPUID on each backend must
    // return `shared_cpuid_profile().lookup(leaf, subleaf)`, the one table both are given.
    let leaves =
        [(0u32, 0u32), (1, 0), (7, 0), (0xd, 0), (0x8000_0000, 0), (0x8000_0001, 0), (0x8000_0008, 0)];
    let batch = || {
        let mut c = Batch::new("system-cpuid-raw", Mode::Long);
        for (leaf, sub) in leaves {
            c.case(format!("cpuid {leaf:#x}.{sub}"), 0, move |a| {
                a.mov(eax, leaf)?;
                a.mov(ecx, sub)?;
                a.cpuid()
            });
        }
        c
    };
    let profile = duet::shared_cpuid_profile();
    for kind in testing::select_backends() {
        let (report, slots) = batch().run_on(kind);
        assert_eq!(report.outcome.stop, StopReason::DebugExit { value: 0 }, "{kind}");
        let mut bad = Vec::new();
        for ((leaf, sub), slot) in leaves.iter().zip(&slots) {
            let mut want = profile.lookup(*leaf, *sub);
            let g = slot.regs;
            let got = [g[0] as u32, g[1] as u32, g[2] as u32, g[3] as u32];
            if *leaf == 1 {
                // EBX[31:24] is the initial APIC ID of the vCPU, set by the backend.
                want[1] = (want[1] & 0x00ff_ffff) | (got[1] & 0xff00_0000);
            }
            if got != want {
                bad.push(format!("{leaf:#x}.{sub}: got {got:08x?}, profile {want:08x?}"));
            }
        }
        if kind == BackendKind::Kvm && !bad.is_empty() {
            eprintln!(
                "skipped: kvm: known defect of this host's KVM (the guest sees the host's CPUID, not the one KVM_SET_CPUID2 gave it): {}",
                bad.join("; ")
            );
            continue;
        }
        assert!(bad.is_empty(), "{kind}: CPUID differs from the shared profile:\n{}", bad.join("\n"));
    }
}

/// SDM Vol. 2A LAR, LSL, VERR, VERW at CPL 0 in 64-bit mode, for `sel` in the builder's GDT:
/// (LAR dest or None, LSL dest or None, VERR, VERW). LAR's bits 19:16 are undefined: left out.
fn segment_checks_model(sel: u32) -> (Option<u64>, Option<u64>, bool, bool) {
    let gdt = duet::fixtures::tables::gdt(true);
    let (index, rpl) = ((sel >> 3) as usize, u64::from(sel & 3));
    let limit = 8 * gdt.len() as u32 - 1;
    // Null selector, LDT (TI = 1, no LDT loaded) or past the GDT limit: every check fails.
    if index == 0 || sel & 4 != 0 || (sel & !7) + 7 > limit {
        return (None, None, false, false);
    }
    let d = gdt[index];
    let (typ, s, dpl, g) = ((d >> 40) & 0xf, (d >> 44) & 1 == 1, (d >> 45) & 3, (d >> 55) & 1 == 1);
    let conforming_code = s && typ & 0xc == 0xc;
    // Visible at CPL 0 and at the selector's RPL, unless conforming code.
    let visible = conforming_code || dpl >= rpl; // DPL >= CPL (0) always holds
                                                 // Valid system types in IA-32e mode: LAR 2, 9, B, C (Table 3-53); LSL 2, 9, B (Table 3-56).
    let lar_ok = visible && (s || matches!(typ, 0x2 | 0x9 | 0xb | 0xc));
    let lsl_ok = visible && (s || matches!(typ, 0x2 | 0x9 | 0xb));
    let raw_limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let lsl = if g { (raw_limit << 12) | 0xfff } else { raw_limit };
    let verr = visible && s && (typ & 0x8 == 0 || typ & 0x2 != 0);
    let verw = visible && s && typ & 0xa == 0x2;
    (lar_ok.then_some((d >> 32) & 0x00f0_ff00), lsl_ok.then_some(lsl), verr, verw)
}

#[test]
fn system_lar_lsl_verr_verw_over_every_selector_match_the_sdm() {
    use duet::StopReason;
    // Every GDT slot, RPL 3 on ring-0 and ring-3 segments, and selectors past the limit.
    let sels: Vec<u32> =
        (0u32..0x60).step_by(8).chain([0x13, 0x33, 0x3b, 0x53, 0x5c, 0x60, 0x1000]).collect();
    let batch = || {
        let mut b = Batch::new("system-segment-checks", Mode::Long);
        for &sel in &sels {
            b.case(format!("lar/lsl/verr/verw {sel:#x}"), 0, move |a| {
                a.mov(ecx, sel)?;
                a.mov(rax, 0x1111_1111_1111_1111u64)?;
                a.mov(rbx, 0x2222_2222_2222_2222u64)?;
                a.lar(rax, rcx)?;
                a.setz(dl)?;
                a.lsl(rbx, rcx)?;
                a.setz(dh)?;
                a.verr(cx)?;
                a.setz(sil)?;
                a.verw(cx)?;
                a.setz(dil)?;
                a.xor(ecx, ecx)
            });
        }
        b
    };
    for (kind, report, slots) in opinions("LAR/LSL/VERR/VERW", batch) {
        assert_eq!(report.outcome.stop, StopReason::DebugExit { value: 0 }, "{kind}");
        let mut bad = Vec::new();
        for (&sel, slot) in sels.iter().zip(&slots) {
            let (lar, lsl, verr, verw) = segment_checks_model(sel);
            let g = slot.regs;
            let want = (
                lar.unwrap_or(0x1111_1111_1111_1111) & !0xf_0000,
                lsl.unwrap_or(0x2222_2222_2222_2222),
                u64::from(lar.is_some()) | u64::from(lsl.is_some()) << 8,
                u64::from(verr),
                u64::from(verw),
            );
            let got = (g[0] & !0xf_0000, g[1], g[3], g[4], g[5]);
            if got != want {
                bad.push(format!("{sel:#x}: got {got:x?}, SDM {want:x?}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{kind}: (lar, lsl, zf lar|lsl<<8, verr, verw) differ from SDM Vol. 2A:\n{}",
            bad.join("\n")
        );
    }
}

#[test]
fn system_every_advertised_leaf1_ecx_instruction_executes() {
    // SDM Vol. 2A CPUID, Table 3-10: a set feature bit means the instruction exists. Each
    // advertised one must execute: CMPXCHG16B (equal: m128 := RCX:RBX, ZF = 1), MOVBE (byte
    // swap on load), POPCNT.
    let s = scratch(Mode::Long);
    let profile = duet::shared_cpuid_profile();
    let mut b = Batch::new("system-advertised", Mode::Long);
    let mut want = Vec::new();
    if profile.has_leaf1_ecx(1 << 13) {
        b.case("cmpxchg16b equal", 0, move |a| {
            a.mov(qword_ptr(s), 5)?;
            a.mov(qword_ptr(s + 8), 6)?;
            a.mov(eax, 5)?;
            a.mov(edx, 6)?;
            a.mov(ebx, 7)?;
            a.mov(ecx, 8)?;
            a.cmpxchg16b(xmmword_ptr(s))?;
            a.mov(rsi, qword_ptr(s))?;
            a.mov(rdi, qword_ptr(s + 8))
        });
        want.push((4, 7));
    }
    if profile.has_leaf1_ecx(1 << 22) {
        b.case("movbe", 0, move |a| {
            a.mov(dword_ptr(s), 0x1122_3344)?;
            a.movbe(esi, dword_ptr(s))
        });
        want.push((4, 0x4433_2211));
    }
    if profile.has_leaf1_ecx(1 << 23) {
        b.case("popcnt", 0, |a| {
            a.mov(rcx, 0xf0f0_0000_0000_0001u64)?;
            a.popcnt(rsi, rcx)
        });
        want.push((4, 9));
    }
    let labels = b.labels();
    let guest = b.guest().0;
    for kind in duet::testing::select_backends() {
        let report = run(kind, &guest);
        if let (duet::BackendKind::Kvm, duet::StopReason::CannotRun(why)) = (kind, &report.outcome.stop) {
            eprintln!("skipped: kvm: {labels:?}: this host's KVM cannot run it ({why}); the SDM decides");
            continue;
        }
        assert_eq!(report.outcome.stop, duet::StopReason::DebugExit { value: 0 }, "{kind}");
        let slots = read_slots(&report, Mode::Long, labels.len());
        for (slot, &(reg, value)) in slots.iter().zip(&want) {
            assert_eq!(slot.regs[reg], value, "{kind}");
        }
    }
}
