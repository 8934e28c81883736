//! SYSCALL/SYSRET, SYSENTER/SYSEXIT and their MSRs under an Intel and an AMD CPUID profile,
//! whatever the host is (docs/VENDORS.md). Expected values come from the SDM (Vol. 2B SYSCALL,
//! SYSRET, SYSENTER, SYSEXIT; Vol. 4 MSRs) and the AMD64 APM (Vol. 3, the same pages and their
//! pseudo-code); where this host's KVM runs the code on the silicon (ring 3 with flat segments
//! under kvm_pvm) it is compared too, against the profile of the host's vendor. Each KVM half
//! skips out loud without KVM or under `DUET_BACKENDS=interp`.

mod common;

use common::*;
use duet_core::state::ctrl::EFER_SCE;
use duet_core::state::msr;
use duet_core::state::rflags::{CF, FIXED, IF};
use duet_core::{CpuState, GuestMemory, RunOutcome, Segment, StopReason, Vendor};
use iced_x86::code_asm::*;

/// Where the tests put the target of a call or return: a HLT or a short epilogue.
const TARGET: u64 = 0x9000;

fn syscall_msrs(s: &mut CpuState, star: u64) {
    s.sregs.efer |= EFER_SCE;
    s.msrs.insert(msr::STAR, star);
    s.msrs.insert(msr::CSTAR, TARGET);
    s.msrs.insert(msr::LSTAR, 0xa000);
    s.msrs.insert(msr::SFMASK, IF);
}

#[test]
fn syscall_from_compatibility_mode_enters_cstar_on_amd_and_is_ud_on_intel() {
    // SYSCALL at CPL 3 of compatibility mode; STAR[47:32] = 0x30 (64-bit ring-0 code).
    let probe = Probe::new(32, compat_ring3, |a| {
        a.syscall().unwrap();
        a.hlt().unwrap();
    })
    .prep(|mem, s| {
        poke(mem, TARGET, &[0xf4]);
        syscall_msrs(s, 0x0018_0030 << 32);
        s.regs.rflags = FIXED | IF | CF;
    });
    // SDM Vol. 2B SYSCALL: "#UD If … Not in 64-Bit Mode" (the frame holds CS 0x1b, RIP CODE).
    let (out, mem) = probe.interp(Vendor::Intel);
    let t = long_trap(&out, &mem).expect("an exception");
    assert_eq!((t.vector, t.rip, t.cs), (6, CODE, u64::from(sel::UCODE32)));
    // APM Vol. 3 SYSCALL, SYSCALL_LONG_MODE: RCX = next RIP, R11 = RFLAGS, RIP = CSTAR in
    // 64-bit ring-0 code, SS = STAR[47:32] + 8, RFLAGS AND NOT SFMASK.
    let (out, _) = probe.interp(Vendor::Amd);
    let (r, s) = (&out.state.regs, &out.state.sregs);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!((r.rip, r.rcx, r.r11), (TARGET + 1, CODE + 2, FIXED | IF | CF));
    assert_eq!(r.rflags & (IF | CF), CF, "IF masked by SFMASK");
    assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl, s.ss.selector, s.ss.dpl), (0x30, true, 0, 0x38, 0));
    probe.check_on_kvm("syscall from compatibility mode", |o, m| {
        let (r, s) = (&o.state.regs, &o.state.sregs);
        format!(
            "{:?} {:?} {:#x} {:#x} {:#x} {:#x}",
            o.stop,
            long_trap(o, m),
            r.rip,
            r.rcx,
            s.cs.selector,
            s.ss.selector
        )
    });
}

#[test]
fn syscall_saves_rflags_with_rf_clear_on_both_vendors() {
    // An IRETQ to ring 3 with RF = 1 in the image, onto a SYSCALL: AMD64 APM Vol. 3 SYSCALL saves
    // "R11.q = RFLAGS // with rf cleared"; Intel clears RF "at the start of the instruction" (SDM
    // Vol. 3B §18.3.1.1) before "R11 ← RFLAGS". (This host's KVM leaves SYSCALL from ring 3 at
    // CPL 3, DEVELOPERS.md: the manuals decide.)
    use duet_core::state::rflags::RF;
    let probe = Probe::new(64, long64, |a| {
        a.push(i32::from(sel::UDATA)).unwrap();
        a.push(STACK as i32).unwrap();
        a.push((RF | FIXED | CF) as i32).unwrap();
        a.push(i32::from(sel::UCODE64)).unwrap();
        a.push(TARGET as i32).unwrap();
        a.iretq().unwrap();
    })
    .prep(|mem, s| {
        poke(mem, TARGET, &[0x0f, 0x05]); // syscall
        poke(mem, 0xa000, &[0xf4]);
        syscall_msrs(s, 0x0018_0030 << 32);
    });
    for v in Vendor::MODELLED {
        let (out, _) = probe.interp(v);
        assert_eq!(out.stop, StopReason::Halted, "{v}");
        assert_eq!((out.state.regs.rip, out.state.regs.r11), (0xa001, FIXED | CF), "{v}");
    }
}

#[test]
fn syscall_outside_long_mode_jumps_to_star_eip_on_amd_and_is_ud_on_intel() {
    // SYSCALL in 32-bit protected mode at CPL 0 and in real mode; STAR[31:0] is the target EIP.
    let star = (0x0018_0008 << 32) | TARGET;
    for (name, state) in [("protected", protected32 as fn(&GuestMemory) -> CpuState), ("real", real_mode)] {
        let probe = Probe::new(if name == "real" { 16 } else { 32 }, state, |a| {
            a.syscall().unwrap();
            a.hlt().unwrap();
        })
        .prep(move |mem, s| {
            poke(mem, TARGET, &[0xf4]);
            syscall_msrs(s, star);
            s.regs.rflags = FIXED | IF | CF;
        });
        let (out, _) = probe.interp(Vendor::Intel);
        let ud = if name == "real" {
            out.state.regs.rip == STUBS + 6 * 8 + 4
        } else {
            stub_vector(&out.state) == Some(6)
        };
        assert!(ud, "{name}: SDM Vol. 2B SYSCALL: #UD outside 64-bit mode");
        // APM Vol. 3 SYSCALL, SYSCALL_LEGACY_MODE (its exception table: #UD only for EFER.SCE = 0
        // or no SYSCALL support, in real, virtual-8086 and protected mode alike; QEMU's
        // helper_syscall runs it in real mode too): ECX = next EIP, EIP = STAR[31:0], CS/SS flat
        // 32-bit ring-0 from STAR[47:32], VM, IF and RF cleared, the other flags kept.
        let (out, _) = probe.interp(Vendor::Amd);
        let (r, s) = (&out.state.regs, &out.state.sregs);
        assert_eq!(out.stop, StopReason::Halted, "{name}");
        assert_eq!((r.rip, r.rcx, r.rflags & (IF | CF)), (TARGET + 1, CODE + 2, CF), "{name}");
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.base, s.cs.limit),
            (0x08, true, false, 0, 0xffff_ffff)
        );
        assert_eq!((s.ss.selector, s.ss.dpl, s.ss.db), (0x10, 0, true), "{name}");
        if name == "protected" {
            // kvm_pvm runs legacy protected mode through KVM's instruction emulator, whose
            // em_syscall follows the guest's vendor: a second opinion, not the silicon. (For
            // real mode that emulator answers #UD, against the APM; it is not asked.)
            probe.check_on_kvm("syscall in protected mode", |o, _| {
                let (r, s) = (&o.state.regs, &o.state.sregs);
                format!(
                    "{:?} {:?} {:#x} {:#x} {:#x} {:#x}",
                    o.stop,
                    stub_vector(&o.state),
                    r.rip,
                    r.rcx,
                    s.cs.selector,
                    s.ss.selector
                )
            });
        }
    }
}

#[test]
fn sysret_outside_64_bit_mode_returns_to_32_bit_code_with_if_set_on_amd() {
    // SYSRET at CPL 0 of 32-bit protected mode and of compatibility mode (CS 0x08 is 32-bit
    // code, so under long mode it is compatibility mode). The target reads its flags.
    let compat_ring0 = |mem: &GuestMemory| {
        let mut s = long64(mem);
        s.sregs.cs = Segment::from_descriptor(sel::CODE32, gdt()[1]);
        s
    };
    for (name, state) in
        [("protected", protected32 as fn(&GuestMemory) -> CpuState), ("compatibility", compat_ring0)]
    {
        let probe = Probe::new(32, state, |a| {
            a.sysret().unwrap();
            a.hlt().unwrap();
        })
        .prep(|mem, s| {
            // pushfd; pop ebx; hlt (a #GP at CPL 3)
            poke(mem, TARGET, &[0x9c, 0x5b, 0xf4]);
            syscall_msrs(s, 0x0018_0008 << 32);
            s.regs.rcx = TARGET;
            s.regs.r11 = FIXED | CF;
            s.regs.rflags = FIXED;
        });
        // SDM Vol. 2B SYSRET: "#UD If not in 64-Bit Mode".
        let (out, _) = probe.interp(Vendor::Intel);
        assert_eq!(stub_vector(&out.state), Some(6), "{name}");
        // APM Vol. 3 SYSRET, SYSRET_NON_64BIT_MODE: CS = STAR[63:48] | 3 as 32-bit code, EIP =
        // ECX, SS selector STAR[63:48] + 8 with RPL 3, RFLAGS.IF = 1 (R11 is not used), CPL 3.
        let (out, mem) = probe.interp(Vendor::Amd);
        let t = if name == "protected" { prot_trap(&out, &mem) } else { long_trap(&out, &mem) };
        let t = t.expect("HLT at CPL 3 raises #GP");
        assert_eq!((t.vector, t.rip, t.cs, t.ss), (13, TARGET + 2, 0x1b, 0x23), "{name}");
        assert_eq!(out.state.regs.rbx & (IF | CF), IF, "{name}: IF set, R11's CF not loaded");
    }
}

#[test]
fn sysretq_to_a_non_canonical_rip_faults_at_cpl_0_on_intel_and_at_cpl_3_on_amd() {
    let probe = Probe::new(64, long64, |a| {
        a.sysretq().unwrap();
    })
    .prep(|_, s| {
        syscall_msrs(s, 0x0028_0030 << 32);
        s.regs.rcx = 0x8000_0000_0000_0000;
        s.regs.r11 = FIXED;
    });
    // SDM Vol. 2B SYSRET: "#GP(0) If … RCX contains a non-canonical address" — raised by SYSRET
    // itself, at CPL 0 (the frame holds the ring-0 CS and the SYSRET's RIP).
    let (out, mem) = probe.interp(Vendor::Intel);
    let t = long_trap(&out, &mem).expect("#GP");
    assert_eq!((t.vector, t.error, t.rip, t.cs), (13, Some(0), CODE, u64::from(sel::CODE64)));
    // APM Vol. 3 SYSRET checks no canonical form: it returns to CPL 3, and fetching at the
    // non-canonical RIP raises #GP(0) there (the frame holds the user CS and that RIP).
    let (out, mem) = probe.interp(Vendor::Amd);
    let t = long_trap(&out, &mem).expect("#GP");
    assert_eq!((t.vector, t.error, t.rip, t.cs), (13, Some(0), 0x8000_0000_0000_0000, 0x3b));
}

#[test]
fn sysret_leaves_ss_hidden_part_on_amd_and_loads_a_flat_ss_on_intel() {
    // Ring 0 of 64-bit mode with a null SS (as after an interrupt from ring 3), SYSRET to
    // compatibility mode, where the first stack access needs a usable SS.
    let probe = Probe::new(64, long64, |a| {
        a.sysret().unwrap();
    })
    .prep(|mem, s| {
        // push eax; hlt
        poke(mem, TARGET, &[0x50, 0xf4]);
        syscall_msrs(s, 0x0018_0030 << 32);
        s.regs.rcx = TARGET;
        s.regs.r11 = FIXED;
        s.sregs.ss = Segment { selector: 0, unusable: true, ..Segment::default() };
    });
    // SDM Vol. 2B SYSRET: SS gets fixed flat ring-3 parts: the push works, HLT raises #GP.
    let (out, mem) = probe.interp(Vendor::Intel);
    assert_eq!(long_trap(&out, &mem).map(|t| (t.vector, t.rip)), Some((13, TARGET + 1)));
    // APM Vol. 3 SYSRET: "SS.sel = MSR_STAR.SYSRET_CS + 8 … SS base, limit, attributes
    // unchanged" (Linux: X86_BUG_SYSRET_SS_ATTRS): SS stays unusable, the push is #SS(0).
    let (out, mem) = probe.interp(Vendor::Amd);
    assert_eq!(long_trap(&out, &mem).map(|t| (t.vector, t.error, t.rip)), Some((12, Some(0), TARGET)));
}

#[test]
fn sysenter_in_compatibility_mode_enters_64_bit_code_on_intel_and_is_ud_on_amd() {
    // SYSENTER_EIP/ESP above 4 GiB (PDPT entry 4 aliases the first GiB).
    let probe = Probe::new(32, compat_ring3, |a| {
        a.sysenter().unwrap();
    })
    .prep(|mem, s| {
        poke(mem, PT + 0x1000 + 4 * 8, &((PT + 0x2000) | 7).to_le_bytes());
        // mov rbx, rsp; hlt
        poke(mem, TARGET, &[0x48, 0x89, 0xe3, 0xf4]);
        s.msrs.insert(msr::SYSENTER_CS, u64::from(sel::CODE64));
        s.msrs.insert(msr::SYSENTER_EIP, 0x1_0000_0000 | TARGET);
        s.msrs.insert(msr::SYSENTER_ESP, 0x1_0007_0000);
    });
    // SDM Vol. 2B SYSENTER: in IA-32e mode CS gets L = 1 and RIP/RSP all 64 bits of the MSRs.
    let (out, _) = probe.interp(Vendor::Intel);
    let (r, s) = (&out.state.regs, &out.state.sregs);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!((r.rip, r.rbx), (0x1_0000_0000 | (TARGET + 4), 0x1_0007_0000));
    assert_eq!((s.cs.selector, s.cs.l, s.ss.selector), (sel::CODE64, true, sel::CODE64 + 8));
    // APM Vol. 3 SYSENTER: "This instruction is valid only in legacy mode": #UD.
    let (out, mem) = probe.interp(Vendor::Amd);
    assert_eq!(long_trap(&out, &mem).map(|t| (t.vector, t.rip)), Some((6, CODE)));
    probe
        .check_on_kvm("sysenter in compatibility mode", |o, m| format!("{:?} {:?}", o.stop, long_trap(o, m)));
}

#[test]
fn sysexit_in_long_mode_is_ud_on_amd() {
    let probe = Probe::new(64, long64, |a| {
        a.sysexit().unwrap();
    })
    .prep(|mem, s| {
        poke(mem, TARGET, &[0xf4]);
        s.msrs.insert(msr::SYSENTER_CS, 0x08);
        s.regs.rdx = TARGET;
        s.regs.rcx = 0x7_0000;
    });
    // SDM Vol. 2B SYSEXIT: to compatibility mode, CS = SYSENTER_CS + 16 | 3, EIP = EDX.
    let (out, mem) = probe.interp(Vendor::Intel);
    let t = long_trap(&out, &mem).expect("HLT at CPL 3 raises #GP");
    assert_eq!((t.vector, t.rip, t.cs, t.rsp), (13, TARGET, 0x1b, 0x7_0000));
    // APM Vol. 3 SYSEXIT: "An invalid-opcode exception occurs if this instruction is used in
    // long mode".
    let (out, mem) = probe.interp(Vendor::Amd);
    assert_eq!(long_trap(&out, &mem).map(|t| (t.vector, t.rip)), Some((6, CODE)));
}

/// WRMSR `index` with EDX:EAX = `value`, then RDMSR into EDX:EAX; HLT.
fn wrmsr_rdmsr(index: u32, value: u64) -> Probe {
    Probe::new(64, long64, move |a| {
        a.mov(ecx, index).unwrap();
        a.mov(eax, value as u32).unwrap();
        a.mov(edx, (value >> 32) as u32).unwrap();
        a.wrmsr().unwrap();
        a.xor(eax, eax).unwrap();
        a.xor(edx, edx).unwrap();
        a.rdmsr().unwrap();
        a.hlt().unwrap();
    })
}

/// EDX:EAX after the run, or the exception vector it stopped in.
fn msr_result(out: &RunOutcome) -> Result<u64, u64> {
    match stub_vector(&out.state) {
        Some(v) => Err(v),
        None => Ok((out.state.regs.rdx << 32) | (out.state.regs.rax & 0xffff_ffff)),
    }
}

#[test]
fn sysenter_eip_and_esp_hold_64_bits_on_intel_and_32_on_amd() {
    // Intel: 64-bit MSRs that must be canonical (SDM Vol. 4 Table 2-2, "#GP if not canonical"
    // in Vol. 2B WRMSR). AMD keeps 32 bits and ignores the rest (KVM arch/x86/kvm/x86.c
    // `__kvm_set_msr`: "#GP if non-canonical address is written on Intel but not on AMD (which
    // ignores the top 32-bits…)"; svm.c stores `(u32)data`). This host's kvm_pvm keeps the
    // MSRs in software (it reads back 0x7fff_1234_5678), so it cannot decide.
    for (index, value, intel, amd) in [
        (msr::SYSENTER_EIP, 0x7fff_1234_5678, Ok(0x7fff_1234_5678), Ok(0x1234_5678)),
        (msr::SYSENTER_ESP, 0x8000_0000_1234_5678, Err(13), Ok(0x1234_5678)),
    ] {
        let probe = wrmsr_rdmsr(index, value);
        assert_eq!(msr_result(&probe.interp(Vendor::Intel).0), intel, "{index:#x} on Intel");
        assert_eq!(msr_result(&probe.interp(Vendor::Amd).0), amd, "{index:#x} on AMD");
    }
    // A state loaded with a 64-bit value keeps what the vendor's register holds.
    let probe = Probe::new(64, long64, |a| a.hlt().unwrap()).prep(|_, s| {
        s.msrs.insert(msr::SYSENTER_EIP, 0xffff_ffff_8000_1234);
    });
    let eip = |v| probe.interp(v).0.state.msrs.get(&msr::SYSENTER_EIP).copied();
    assert_eq!((eip(Vendor::Intel), eip(Vendor::Amd)), (Some(0xffff_ffff_8000_1234), Some(0x8000_1234)));
}

#[test]
fn tsc_aux_high_bits_are_reserved_on_intel_and_ignored_on_amd() {
    // Intel: IA32_TSC_AUX bits 63:32 are reserved, #GP(0) (SDM Vol. 4 Table 2-2). AMD ignores
    // them and reads them as 0 (KVM arch/x86/kvm/x86.c `kvm_set_msr_common`: "Current AMD CPUs
    // completely ignore bits 63:32"). This host's KVM offers no RDTSCP to the guest, so its
    // WRMSR is #GP whatever the value: it cannot decide.
    let probe = wrmsr_rdmsr(msr::TSC_AUX, 0x1_0000_0005);
    assert_eq!(msr_result(&probe.interp(Vendor::Intel).0), Err(13));
    assert_eq!(msr_result(&probe.interp(Vendor::Amd).0), Ok(5));
    // RDTSCP returns the 32 bits kept in ECX.
    let probe = Probe::new(64, long64, |a| {
        a.mov(ecx, msr::TSC_AUX).unwrap();
        a.mov(eax, 7).unwrap();
        a.mov(edx, 0xffff_ffffu32).unwrap();
        a.wrmsr().unwrap();
        a.rdtscp().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(probe.interp(Vendor::Amd).0.state.regs.rcx, 7);
}
