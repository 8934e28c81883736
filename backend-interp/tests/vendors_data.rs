//! Vendor differences in data movement and debugging under an Intel and an AMD CPUID profile,
//! whatever the host is (docs/VENDORS.md): REP string instructions with a zero count, BSF/BSR
//! with a zero source, null selector loads, PUSH of a segment register, and code breakpoints in
//! a MOV SS shadow. Where this host's KVM runs the code on the silicon (64-bit and compatibility
//! ring 3 with flat segments under kvm_pvm) it is compared against the profile of the host's
//! vendor; each KVM half skips out loud without KVM or under `DUET_BACKENDS=interp`.

mod common;

use common::*;
use duet_core::cpuid::ext_leaf21;
use duet_core::state::rflags::ZF;
use duet_core::{CpuidEntry, GuestMemory, RunOutcome, StopReason, Vendor};
use iced_x86::code_asm::*;

/// Bits above the low 32 of each register the string tests start with.
const HIGH: u64 = 0x1_0000_0000;

#[test]
fn rep_string_with_a_zero_count_writes_its_32_bit_registers_back_only_on_intel() {
    // 64-bit ring 3, address size 32 (67h), ECX = 0 with bits 63:32 of RCX, RSI, RDI set.
    // Intel: RCX = 0; MOVS truncates RSI and RDI to 32 bits, STOS RDI (KVM arch/x86/kvm/
    // emulate.c `string_registers_quirk`, "Intel CPUs mask the counter and pointers … when ECX
    // is zero"; the issue-11 Intel host). AMD leaves all three (this host's silicon, below).
    let forms: [(&str, u8, bool, bool); 5] = [
        ("movsb", 0xa4, true, true),
        ("stosb", 0xaa, false, true),
        ("lodsb", 0xac, false, false),
        ("cmpsb", 0xa6, false, false),
        ("scasb", 0xae, false, false),
    ];
    for (name, op, cut_si, cut_di) in forms {
        let probe = Probe::new(64, long64_ring3, move |a| {
            a.db(&[0x67, 0xf3, op]).unwrap();
            a.hlt().unwrap();
        })
        .prep(|_, s| {
            s.regs.rcx = HIGH;
            s.regs.rsi = HIGH | 0x20_0000;
            s.regs.rdi = HIGH | 0x20_0100;
        });
        let regs = |out: &RunOutcome| (out.state.regs.rcx, out.state.regs.rsi, out.state.regs.rdi);
        let low = |v: u64, cut: bool| if cut { v & 0xffff_ffff } else { v };
        let (intel, _) = probe.interp(Vendor::Intel);
        assert_eq!(
            regs(&intel),
            (0, low(HIGH | 0x20_0000, cut_si), low(HIGH | 0x20_0100, cut_di)),
            "{name} on Intel"
        );
        let (amd, _) = probe.interp(Vendor::Amd);
        assert_eq!(regs(&amd), (HIGH, HIGH | 0x20_0000, HIGH | 0x20_0100), "{name} on AMD");
        probe.check_on_kvm(name, |o, _| format!("{:x?}", regs(o)));
    }
}

#[test]
fn bsf_and_bsr_with_a_zero_source_keep_the_destination_on_amd_and_zero_extend_it_on_intel() {
    // ZF = 1 on both (SDM Vol. 2A BSF/BSR). AMD64 APM Vol. 3: the destination is unchanged;
    // Intel writes it back at the operand size (Linux arch/x86/include/asm/bitops.h, on ffs:
    // "the top 32 bits will be cleared"), which only a 32-bit destination can show.
    const OLD: u64 = 0x1234_5678_9abc_def0;
    type Emit = fn(&mut CodeAssembler);
    let forms: [(&str, Emit, u64); 5] = [
        ("bsf r32", |a| a.bsf(eax, ebx).unwrap(), OLD & 0xffff_ffff),
        ("bsr r32", |a| a.bsr(eax, ebx).unwrap(), OLD & 0xffff_ffff),
        ("bsf r32, m32", |a| a.bsf(eax, dword_ptr(0x20_0000)).unwrap(), OLD & 0xffff_ffff),
        ("bsr r64", |a| a.bsr(rax, rbx).unwrap(), OLD),
        ("bsf r16", |a| a.bsf(ax, bx).unwrap(), OLD),
    ];
    for (name, emit, intel) in forms {
        let probe = Probe::new(64, long64_ring3, move |a| {
            a.mov(rax, OLD).unwrap();
            a.xor(ebx, ebx).unwrap();
            emit(a);
            a.hlt().unwrap();
        });
        let view = |o: &RunOutcome| (o.state.regs.rax, o.state.regs.rflags & ZF);
        assert_eq!(view(&probe.interp(Vendor::Intel).0), (intel, ZF), "{name} on Intel");
        assert_eq!(view(&probe.interp(Vendor::Amd).0), (OLD, ZF), "{name} on AMD");
        probe.check_on_kvm(name, |o, _| format!("{:x?}", view(o)));
    }
}

#[test]
fn push_sreg_writes_a_word_at_32_bits_and_a_zero_extended_qword_at_64() {
    // SDM Vol. 2B PUSH: at 64 bits the selector is pushed zero-extended; at 32 bits recent parts
    // "perform a 16-bit move, leaving the upper portion of the stack location unmodified". This
    // AMD host's silicon does the same (compatibility-mode ring 3 under kvm_pvm, below), so no
    // vendor differs here; the slot is filled with AAh first.
    let probe32 = Probe::new(32, compat_ring3, |a| {
        a.mov(dword_ptr(esp - 4), 0xaaaa_aaaau32).unwrap();
        a.push(ds).unwrap();
        a.mov(ebx, dword_ptr(esp)).unwrap();
        a.hlt().unwrap();
    });
    for v in Vendor::MODELLED {
        assert_eq!(probe32.interp(v).0.state.regs.rbx, 0xaaaa_0000 | u64::from(sel::UDATA), "{v}");
    }
    probe32.check_on_kvm("o32 push ds", |o, _| format!("{:#x}", o.state.regs.rbx));
    let probe64 = Probe::new(64, long64_ring3, |a| {
        a.mov(rax, u64::MAX).unwrap();
        a.mov(qword_ptr(rsp - 8), rax).unwrap();
        a.push(fs).unwrap();
        a.mov(rbx, qword_ptr(rsp)).unwrap();
        a.hlt().unwrap();
    });
    for v in Vendor::MODELLED {
        assert_eq!(probe64.interp(v).0.state.regs.rbx, u64::from(sel::UDATA), "{v}");
    }
    // kvm_pvm does not give ring 3 the guest's FS selector (it pushes 0), so only the six upper
    // bytes, which the zero extension writes, are compared.
    probe64.check_on_kvm("push fs", |o, _| format!("{:#x}", o.state.regs.rbx >> 16));
}

/// What a null selector load leaves in FS: (the qword read through FS after it, FS.base, FS
/// unusable), run from 64-bit ring 3 with FS.base = 0x20_0000 and distinct qwords at 0 and there.
fn null_fs(load: fn(&mut CodeAssembler)) -> Probe {
    Probe::new(64, long64_ring3, move |a| {
        a.xor(eax, eax).unwrap();
        load(a);
        a.mov(rbx, qword_ptr(0).fs()).unwrap();
        a.hlt().unwrap();
    })
    .prep(|mem, s| {
        poke(mem, 0, &0x0000_0000_0bad_f00du64.to_le_bytes());
        poke(mem, 0x20_0000, &0x1122_3344_5566_7788u64.to_le_bytes());
        s.sregs.fs.base = 0x20_0000;
    })
}

#[test]
fn a_null_selector_load_keeps_the_base_on_amd_and_clears_it_on_intel() {
    // Intel: the register gets a "NULL segment descriptor" (SDM Vol. 2B MOV, Operation): base 0.
    // AMD keeps the hidden base (Linux arch/x86/kernel/cpu/common.c detect_null_seg_behavior,
    // X86_BUG_NULL_SEG) unless it enumerates NullSelectorClearsBase (Fn8000_0021 EAX bit 6). In
    // 64-bit mode FS-relative reads show it. MOV, POP and LFS load the same way.
    type Load = fn(&mut CodeAssembler);
    let loads: [(&str, Load); 3] = [
        ("mov fs", |a| a.mov(fs, ax).unwrap()),
        ("pop fs", |a| {
            a.push(rax).unwrap();
            a.pop(fs).unwrap();
        }),
        ("lfs", |a| {
            a.mov(qword_ptr(rsp - 16), rax).unwrap();
            a.lfs(ecx, fword_ptr(rsp - 16)).unwrap();
        }),
    ];
    let mut clears = vendor_profile(Vendor::Amd);
    for e in clears.entries.iter_mut().filter(|e| e.function == 0x8000_0000) {
        e.eax = ext_leaf21::LEAF;
    }
    clears.entries.push(CpuidEntry {
        function: ext_leaf21::LEAF,
        index: 0,
        indexed: false,
        eax: ext_leaf21::EAX_NULL_SEL_CLR_BASE,
        ebx: 0,
        ecx: 0,
        edx: 0,
    });
    let view = |o: &RunOutcome| (o.state.regs.rbx, o.state.sregs.fs.base, o.state.sregs.fs.unusable);
    for (name, load) in loads {
        let probe = null_fs(load);
        assert_eq!(view(&probe.interp(Vendor::Intel).0), (0x0bad_f00d, 0, true), "{name} on Intel");
        assert_eq!(
            view(&probe.interp(Vendor::Amd).0),
            (0x1122_3344_5566_7788, 0x20_0000, true),
            "{name} on AMD"
        );
        assert_eq!(view(&probe.interp_with(&clears).0), (0x0bad_f00d, 0, true), "{name} on AMD, clears base");
    }
    // This host's silicon (family 19h) clears the base, as parts with NullSelectorClearsBase
    // do, though the bit is hidden from its VM; an older AMD part keeps it. (kvm_pvm does not
    // report the null selector in ring 3, so only the FS-relative read is compared.)
    let Some(kvm) = kvm_backend() else { return };
    let (k, _) = null_fs(loads[0].1).kvm(&kvm);
    let read = k.state.regs.rbx;
    match kvm_vendor(&kvm) {
        Vendor::Amd => assert!([0x0bad_f00d, 0x1122_3344_5566_7788].contains(&read), "KVM read {read:#x}"),
        _ => assert_eq!(read, 0x0bad_f00d, "KVM on an Intel host"),
    }
    println!(
        "this host's silicon {} the FS base on a null selector load",
        if read == 0x0bad_f00d { "clears" } else { "keeps" }
    );
}

#[test]
fn a_null_ss_loads_only_at_cpl_below_3_with_rpl_equal_to_cpl_on_both_vendors() {
    // SDM Vol. 2B MOV: in 64-bit mode a null selector may be loaded into SS at CPL < 3 when its
    // RPL equals CPL; otherwise #GP(0). The APM (Vol. 3 MOV) has the same rule: no difference.
    for (name, state, selector, ok) in [
        ("ring 0, RPL 0", long64 as fn(&GuestMemory) -> duet_core::CpuState, 0u32, true),
        ("ring 0, RPL 1", long64, 1, false),
        ("ring 3, RPL 3", long64_ring3, 3, false),
    ] {
        let probe = Probe::new(64, state, move |a| {
            a.mov(eax, selector).unwrap();
            a.mov(ss, ax).unwrap();
            a.nop().unwrap();
            a.hlt().unwrap();
        });
        for v in Vendor::MODELLED {
            let (o, m) = probe.interp(v);
            let loaded = (o.state.sregs.ss.selector, o.state.sregs.ss.unusable);
            if ok {
                assert_eq!((o.stop, loaded), (StopReason::Halted, (selector as u16, true)), "{name} on {v}");
            } else {
                assert_eq!(
                    long_trap(&o, &m).map(|t| (t.vector, t.error)),
                    Some((13, Some(0))),
                    "{name} on {v}"
                );
            }
        }
    }
}

/// 64-bit ring 0: an execute breakpoint (DR0, DR7.G0) on the instruction after `shadow`; the run
/// halts with RBX = 7 when nothing is delivered, else in the #DB stub.
fn breakpoint_after(shadow: fn(&mut CodeAssembler)) -> Probe {
    Probe::new(64, long64, move |a| {
        let mut target = a.create_label();
        a.lea(rax, ptr(target)).unwrap();
        a.mov(dr0, rax).unwrap();
        a.mov(eax, 0x402).unwrap();
        a.mov(dr7, rax).unwrap();
        shadow(a);
        a.set_label(&mut target).unwrap();
        a.nop().unwrap();
        a.mov(ebx, 7).unwrap();
        a.hlt().unwrap();
    })
}

#[test]
fn a_code_breakpoint_after_mov_ss_is_suppressed_on_intel_and_delivered_on_amd() {
    // Intel: "if an instruction breakpoint is placed on an instruction located immediately after
    // a POP SS/MOV SS instruction, the breakpoint will be suppressed as if EFLAGS.RF were 1"
    // (SDM Vol. 3B §18.3.1.1; KVM kvm_is_code_breakpoint_inhibited). AMD delivers it (KVM: "AMD
    // compatible CPUs do not"). The STI shadow suppresses nothing on either.
    type Shadow = fn(&mut CodeAssembler);
    let cases: [(&str, Shadow, bool); 2] = [
        (
            "mov ss",
            |a| {
                a.mov(ax, ss).unwrap();
                a.mov(ss, ax).unwrap();
            },
            true,
        ),
        ("sti", |a| a.sti().unwrap(), false),
    ];
    for (name, shadow, suppressed_on_intel) in cases {
        let probe = breakpoint_after(shadow);
        let db = |o: &RunOutcome| stub_vector(&o.state) == Some(1);
        assert_eq!(db(&probe.interp(Vendor::Intel).0), !suppressed_on_intel, "{name} on Intel");
        assert!(db(&probe.interp(Vendor::Amd).0), "{name} on AMD");
        let (out, _) = probe.interp(Vendor::Intel);
        if suppressed_on_intel {
            assert_eq!((out.stop, out.state.regs.rbx), (StopReason::Halted, 7), "{name}: Intel runs on");
        }
        // kvm_pvm emulates MOV DR and the check: KVM's vendor-aware rule, not the silicon.
        probe.check_on_kvm(name, |o, m| format!("{:?}", long_trap(o, m)));
    }
    // POP SS (#UD in 64-bit mode) in 32-bit protected mode, ring 0.
    let probe = Probe::new(32, protected32, |a| {
        // mov eax, imm32 (5 bytes); mov dr0, eax (3); mov eax, imm32 (5); mov dr7, eax (3);
        // push ss; pop ss (1 each): the NOP is at CODE + 18.
        a.mov(eax, (CODE + 18) as u32).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(eax, 0x402).unwrap();
        a.mov(dr7, eax).unwrap();
        a.push(ss).unwrap();
        a.pop(ss).unwrap();
        a.nop().unwrap();
        a.mov(ebx, 7).unwrap();
        a.hlt().unwrap();
    });
    let db = |o: &RunOutcome| stub_vector(&o.state) == Some(1);
    assert!(!db(&probe.interp(Vendor::Intel).0), "pop ss on Intel");
    assert!(db(&probe.interp(Vendor::Amd).0), "pop ss on AMD");
}

#[test]
fn a_pml4e_with_bit_8_set_is_a_reserved_bit_fault_only_on_amd() {
    // Bit 8 of a PML4E is ignored on Intel (SDM Vol. 3A §4.5, the PML4E format) and reserved on
    // AMD (AMD64 APM Vol. 2 §5.3.3; KVM commit 5ecad245de2a: "Intel ignores it; AMD ignores it
    // in PDEs and PDPEs, but reserves it in PML4Es"). PML4 entry 1 (linear 512 GiB on) maps
    // the same PDPT as entry 0, with bit 8 set in the PML4E or, second case, in the PDPTE it
    // reaches through a second PDPT.
    const FAR: u64 = (1 << 39) + 0x20_0000;
    for (name, pml4e_bit8, pdpte_bit8) in [("PML4E", 0x100u64, 0u64), ("PDPTE", 0, 0x100)] {
        let probe = Probe::new(64, long64, |a| {
            a.mov(rbx, FAR).unwrap();
            a.mov(rax, qword_ptr(rbx)).unwrap();
            a.hlt().unwrap();
        })
        .prep(move |mem, _| {
            // A second PDPT at PT + 0x3000 whose entry 0 points at the PD.
            poke(mem, PT + 0x3000, &((PT + 0x2000) | 7 | pdpte_bit8).to_le_bytes());
            poke(mem, PT + 8, &((PT + 0x3000) | 7 | pml4e_bit8).to_le_bytes());
            poke(mem, 0x20_0000, &0x1234u64.to_le_bytes());
        });
        let view = |o: &RunOutcome, m: &GuestMemory| {
            (o.state.regs.rax, long_trap(o, m).map(|t| (t.vector, t.error)), o.state.sregs.cr2)
        };
        let (o, m) = probe.interp(Vendor::Intel);
        assert_eq!(view(&o, &m), (0x1234, None, 0), "{name} on Intel");
        let (o, m) = probe.interp(Vendor::Amd);
        // A read at CPL 0 hitting a reserved bit: #PF with P | RSVD (SDM Vol. 3A §4.7).
        let want = if name == "PML4E" { (0, Some((14, Some(0x9))), FAR) } else { (0x1234, None, 0) };
        assert_eq!(view(&o, &m), want, "{name} on AMD");
        // kvm_pvm walks the guest's tables in software with KVM's vendor-aware reserved bits.
        probe.check_on_kvm(name, |o, m| format!("{:x?}", view(o, m)));
    }
}
