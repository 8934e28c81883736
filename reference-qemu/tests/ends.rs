//! How runs end under QEMU (deadline, triple fault, debug exit from a ROM guest), what the
//! guest sees of CPUID, and start states the entry stub refuses rather than approximate.

mod common;

use std::time::Duration;

use duet_core::layout::LOAD_ADDR;
use duet_core::state::msr;
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuidProfile, StopReason};

/// IA32_PAT after RESET (SDM Vol. 3A §13.12.4).
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
use duet_fixtures::{GuestBuilder, Mode};
use duet_qemu::QemuError;
use iced_x86::code_asm::*;

#[test]
fn endless_loop_ends_at_the_deadline_in_the_loop() {
    if !common::qemu_available() {
        return;
    }
    let guest = GuestBuilder::new(Mode::Long)
        .code(|a| {
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.jmp(l)?;
            Ok(())
        })
        .build()
        .unwrap();
    let r = duet_qemu::run(&guest, &CpuidProfile::baseline(), Duration::from_millis(300)).unwrap();
    assert_eq!(r.outcome.stop, StopReason::Deadline);
    assert_eq!(r.outcome.state.regs.rip, LOAD_ADDR, "stopped inside `jmp $`");
    assert_eq!(r.outcome.backend, "qemu");
}

#[test]
fn exception_without_idt_is_a_triple_fault_shutdown() {
    if !common::qemu_available() {
        return;
    }
    // SDM Vol. 3A §6.15 (#DF): #UD cannot be delivered through an empty IDT (#GP), nor can the
    // #DF that follows: the processor shuts down.
    let guest = GuestBuilder::new(Mode::Protected)
        .code(|a| Ok(a.ud2()?))
        .with_state(|s| s.sregs.idt.limit = 0)
        .build()
        .unwrap();
    let r = common::run(&guest).unwrap();
    assert_eq!(r.outcome.stop, StopReason::Shutdown);
    // After a shutdown the MSRs stay unread, and a note says so.
    assert!(r.outcome.state.msrs.is_empty());
    assert!(r.notes.iter().any(|n| n.contains("after a shutdown")), "{:?}", r.notes);
}

#[test]
fn rom_guest_starts_at_the_reset_vector_through_qemus_reset() {
    if !common::qemu_available() {
        return;
    }
    let mut rom = vec![0u8; 64 << 10];
    // At F000:FFF0: mov al, 'B'; out 0xe9, al; mov al, 5; out 0xf4, al; cli; hlt
    rom[0xfff0..0xfffa].copy_from_slice(&[0xb0, b'B', 0xe6, 0xe9, 0xb0, 5, 0xe6, 0xf4, 0xfa, 0xf4]);
    let guest = GuestBuilder::bios(rom).build().unwrap();
    let r = common::run(&guest).unwrap();
    assert_eq!(r.outcome.stop, StopReason::DebugExit { value: 5 });
    assert_eq!(r.console_text(), "B");
    let s = &r.outcome.state;
    // RIP right after the OUT, CS base still the RESET one (SDM Vol. 3A §10.1.4).
    assert_eq!((s.sregs.cs.base, s.regs.rip), (0xffff_0000, 0xfff8));
}

#[test]
fn post_code_is_the_last_byte_written_to_port_0x80() {
    if !common::qemu_available() {
        return;
    }
    let guest = duet_fixtures::find("pio-loop").unwrap().guest().unwrap();
    let r = common::run(&guest).unwrap();
    // The loop writes 0..999; 999 = 0x3e7.
    assert_eq!(r.post_code, Some(0xe7));
}

/// Where the CPUID guest stores EAX..EDX of each leaf.
const CPUID_OUT: u64 = 0x20_0000;
const LEAVES: [u32; 5] = [0, 1, 7, 0x8000_0001, 0x8000_0008];

#[test]
fn cpuid_leaves_match_the_profile_except_what_qemu_computes() {
    if !common::qemu_available() {
        return;
    }
    let guest = GuestBuilder::new(Mode::Long)
        .code(|a| {
            a.mov(rdi, CPUID_OUT)?;
            for leaf in LEAVES {
                a.mov(eax, leaf)?;
                a.xor(ecx, ecx)?;
                a.cpuid()?;
                for r in [eax, ebx, ecx, edx] {
                    a.mov(dword_ptr(rdi), r)?;
                    a.add(rdi, 4)?;
                }
            }
            a.cli()?;
            Ok(a.hlt()?)
        })
        .build()
        .unwrap();
    let profile = CpuidProfile::baseline();
    let r = common::run(&guest).unwrap();
    assert_eq!(r.outcome.stop, StopReason::Halted);
    for (i, leaf) in LEAVES.into_iter().enumerate() {
        let mut b = [0u8; 16];
        r.memory.read_slice(&mut b, GuestAddress(CPUID_OUT + 16 * i as u64)).unwrap();
        let got: Vec<u32> = b.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut want = profile.lookup(leaf, 0).to_vec();
        let mut got = got;
        match leaf {
            // QEMU puts the number of logical processors (EBX[23:16]) only when above one.
            1 => (got[1], want[1]) = (got[1] & !0x00ff_0000, want[1] & !0x00ff_0000),
            // QEMU repeats the leaf 1 signature in EAX; the profile (and Intel) return 0.
            0x8000_0001 => (got[0], want[0]) = (0, 0),
            _ => {}
        }
        assert_eq!(got, want, "leaf {leaf:#x}: EAX..EDX");
    }
}

#[test]
fn start_states_the_stub_cannot_produce_are_refused() {
    // No QEMU needed: the refusal comes before QEMU starts.
    let base = || GuestBuilder::new(Mode::Protected).code(|a| Ok(a.hlt()?));
    let odd_cs = base().with_state(|s| s.sregs.cs.base = 0x1000).build().unwrap();
    let err = common::run(&odd_cs).unwrap_err();
    assert!(matches!(&err, QemuError::Unsupported(m) if m.contains("cs hidden part")), "{err}");
    let real =
        GuestBuilder::new(Mode::Real).code(|a| Ok(a.hlt()?)).with_state(|s| s.sregs.ds.limit = 0xffff_ffff);
    let err = common::run(&real.build().unwrap()).unwrap_err();
    assert!(matches!(&err, QemuError::Unsupported(m) if m.contains("real-mode ds")), "{err}");
    let window = base().load(0xf_fff0, vec![0x90; 16]).build().unwrap();
    let err = common::run(&window).unwrap_err();
    assert!(matches!(&err, QemuError::Unsupported(m) if m.contains("0xfff00")), "{err}");
    let trap = base().with_state(|s| s.regs.rflags |= duet_core::state::rflags::TF).build().unwrap();
    assert!(matches!(common::run(&trap), Err(QemuError::Unsupported(_))));
    let ring3 = base().with_state(|s| s.sregs.cs.dpl = 3).build().unwrap();
    assert!(matches!(common::run(&ring3), Err(QemuError::Unsupported(_))));
    // Long mode: the guest's page tables must map the stub at 0xfffc_0000 to itself; clearing
    // the PDPTE for 3–4 GiB (PDPT at PAGE_TABLES_ADDR + 0x1000, entry 3) removes that.
    let pdpte3 = duet_core::layout::PAGE_TABLES_ADDR + 0x1000 + 3 * 8;
    let unmapped =
        GuestBuilder::new(Mode::Long).code(|a| Ok(a.hlt()?)).patch(pdpte3, vec![0u8; 8]).build().unwrap();
    let err = common::run(&unmapped).unwrap_err();
    assert!(matches!(&err, QemuError::Unsupported(m) if m.contains("identity-map")), "{err}");
    let fpu = base().with_state(|s| s.fpu.0[0] = 0x7e).build().unwrap();
    let err = common::run(&fpu).unwrap_err();
    assert!(matches!(&err, QemuError::Unsupported(m) if m.contains("FNINIT")), "{err}");
}

#[test]
fn the_stub_leaves_guest_memory_as_loaded() {
    if !common::qemu_available() {
        return;
    }
    for mode in [Mode::Real, Mode::Protected, Mode::Long] {
        let guest = GuestBuilder::new(mode)
            .code(|a| {
                a.cli()?;
                Ok(a.hlt()?)
            })
            .build()
            .unwrap();
        let r = common::run(&guest).unwrap();
        assert_eq!(r.outcome.stop, StopReason::Halted, "{mode}");
        // The start state came through: only RIP moved (past CLI; HLT).
        let mut want = guest.state.clone();
        want.regs.rip += 2;
        // The tracked MSRs read back at their RESET values: IA32_PAT = 0x0007_0406_0007_0406
        // (SDM Vol. 3A §13.12.4), the others 0.
        want.msrs = duet_core::state::TRACKED_MSRS
            .iter()
            .map(|&i| (i, if i == msr::PAT { PAT_RESET } else { 0 }))
            .collect();
        let mask = duet_core::DiffMask { rflags_undefined: 0, ignore_fpu: true };
        let mut diff = duet_core::StateDiff::states(("start", &want), ("qemu", &r.outcome.state), &mask);
        // All of RAM (reset-code window, GDT with the TSS descriptor, stack) is as loaded.
        let before = guest.build_memory().unwrap();
        if mode == Mode::Long {
            // SDM Vol. 3A §4.8: fetching CLI; HLT at LOAD_ADDR sets the accessed flag (bit 5) in
            // the PML4E, PDPTE and PDE used (entry 0 of each table of the identity map).
            for table in 0..3 {
                let at = GuestAddress(duet_core::layout::PAGE_TABLES_ADDR + table * 0x1000);
                let e: u64 = before.read_obj(at).unwrap();
                before.write_obj(e | 0x20, at).unwrap();
            }
        }
        diff.memory(&before, &r.memory, 0, guest.ram_size);
        assert!(diff.is_empty(), "{mode}:\n{diff}");
    }
}

#[test]
fn msrs_the_guest_wrote_are_read_back() {
    if !common::qemu_available() {
        return;
    }
    let written = [
        (msr::LSTAR, 0xffff_8000_1234_5678u64),
        (msr::STAR, 0x0028_0018_0000_0000),
        (msr::SYSENTER_EIP, 0xabcd),
    ];
    let guest = GuestBuilder::new(Mode::Long)
        .code(move |a| {
            for (index, value) in written {
                a.mov(ecx, index)?;
                a.mov(eax, value as u32)?;
                a.mov(edx, (value >> 32) as u32)?;
                a.wrmsr()?;
            }
            a.mov(r15, 0x1122_3344_5566_7788u64)?;
            a.mov(rax, cr8)?; // CR8 is read back too (0: the profile has no APIC)
            a.cli()?;
            Ok(a.hlt()?)
        })
        .build()
        .unwrap();
    let r = common::run(&guest).unwrap();
    assert_eq!(r.outcome.stop, StopReason::Halted);
    let s = &r.outcome.state;
    for (index, value) in written {
        assert_eq!(s.msrs.get(&index), Some(&value), "MSR {index:#x}");
    }
    assert_eq!(s.msrs.get(&msr::PAT), Some(&PAT_RESET));
    assert_eq!((s.regs.r15, s.sregs.cr8), (0x1122_3344_5566_7788, 0));
    assert!(r.notes.is_empty(), "{:?}", r.notes);
}

#[test]
fn debug_exit_state_is_exact_with_interrupts_on() {
    if !common::qemu_available() {
        return;
    }
    // STI; OUT: duet stops right after the OUT, with IF = 1 and RIP at the CLI that follows.
    let guest = GuestBuilder::new(Mode::Protected)
        .code(|a| {
            a.sti()?;
            a.mov(al, 9)?;
            a.out(0xf4, al)?;
            a.cli()?;
            Ok(a.hlt()?)
        })
        .build()
        .unwrap();
    let r = common::run(&guest).unwrap();
    assert_eq!(r.outcome.stop, StopReason::DebugExit { value: 9 });
    let s = &r.outcome.state;
    // STI (1 byte) + MOV AL, imm8 (2) + OUT imm8, AL (2).
    assert_eq!(s.regs.rip, LOAD_ADDR + 5);
    assert_ne!(s.regs.rflags & duet_core::state::rflags::IF, 0, "IF as the guest left it");
    assert!(r.notes.is_empty(), "{:?}", r.notes);
}

#[test]
fn small_and_odd_ram_sizes_run() {
    if !common::qemu_available() {
        return;
    }
    for ram in [duet_fixtures::MIN_RAM, duet_fixtures::MIN_RAM + 0x1000, 3 << 20] {
        let guest = GuestBuilder::new(Mode::Long)
            .ram_size(ram)
            .load_addr(0x2_0000)
            .code(|a| Ok(a.hlt()?))
            .build()
            .unwrap();
        let r = common::run(&guest).unwrap_or_else(|e| panic!("{ram:#x}: {e}"));
        assert_eq!(r.outcome.stop, StopReason::Halted, "{ram:#x}");
        assert!(
            r.memory.read_obj::<u8>(GuestAddress(ram - 1)).is_ok()
                && r.memory.read_obj::<u8>(GuestAddress(ram)).is_err()
        );
    }
}

#[test]
fn a_feature_tcg_cannot_provide_is_an_error_not_a_smaller_cpu() {
    if !common::qemu_available() {
        return;
    }
    // VMX (leaf 1 ECX bit 5, SDM Vol. 2A Table 3-10) is not emulated by QEMU 7.2's TCG.
    let mut profile = CpuidProfile::baseline();
    if let Some(e) = profile.entries.iter_mut().find(|e| e.function == 1) {
        e.ecx |= 1 << 5;
    }
    let guest = GuestBuilder::new(Mode::Long).code(|a| Ok(a.hlt()?)).build().unwrap();
    let err = duet_qemu::run(&guest, &profile, Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(&err, QemuError::Exited { stderr, .. } | QemuError::Startup { stderr, .. } if stderr.contains("vmx")),
        "{err}"
    );
}
