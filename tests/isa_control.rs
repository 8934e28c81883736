//! Control and flag instructions: INT n / INT3 / INTO / IRET through handlers of the test's own in
//! real, protected and long mode; CLC STC CMC CLD STD CLI STI; the far-pointer loads LDS LES LFS
//! LGS LSS; HLT; and ARPL and BOUND, which this host's KVM cannot run (SDM-derived expectations).

mod common;

use common::*;
use duet::core::layout::IDT_ADDR;
use duet::fixtures::tables::{gate32, gate64, sel};
use duet::fixtures::{assemble, GuestBuilder, Mode};
use duet::{testing, BackendKind, StopReason};
use iced_x86::code_asm::*;

/// Where the handlers of the test's own vectors are loaded (linear).
const HANDLERS: u64 = 0x60_0000;
const REAL_HANDLERS: u64 = 0x6_0000; // 0x6000:0000

/// Installs handlers for vectors 3 (INT3), 4 (INTO) and 0x41 (INT n): each records its vector in
/// a register (BX += vector, SI = the saved IP/EIP/RIP image) and returns with IRET.
fn install_handlers(b: &mut Batch) {
    let mode = b.mode();
    for (i, v) in [3u8, 4, 0x41].into_iter().enumerate() {
        let (at, bits) = match mode {
            Mode::Real => (REAL_HANDLERS + 0x100 * i as u64, 16),
            Mode::Protected => (HANDLERS + 0x100 * i as u64, 32),
            Mode::Long => (HANDLERS + 0x100 * i as u64, 64),
        };
        let ip = if mode == Mode::Real { at - REAL_HANDLERS } else { at };
        let code = assemble(bits, ip, move |a| {
            match mode {
                Mode::Real => {
                    a.add(bx, i32::from(v))?;
                    a.mov(si, sp)?;
                    a.mov(si, word_ptr(si).ss())?;
                    a.iret()?;
                }
                Mode::Protected => {
                    a.add(ebx, i32::from(v))?;
                    a.mov(esi, dword_ptr(esp))?;
                    a.mov(edi, dword_ptr(esp + 8))?; // EFLAGS image
                    a.iretd()?;
                }
                Mode::Long => {
                    a.add(ebx, i32::from(v))?;
                    a.mov(rsi, qword_ptr(rsp))?;
                    a.mov(rdi, qword_ptr(rsp + 16))?; // RFLAGS image
                    a.iretq()?;
                }
            }
            Ok(())
        })
        .unwrap_or_default();
        let gate: Vec<u8> = match mode {
            Mode::Real => {
                let mut e = ((at - REAL_HANDLERS) as u16).to_le_bytes().to_vec();
                e.extend(((REAL_HANDLERS >> 4) as u16).to_le_bytes());
                e
            }
            // DPL 3 so INT n / INT3 / INTO are allowed at any CPL; the test runs at CPL 0.
            Mode::Protected => gate32(at as u32, sel::CODE32, 3).to_vec(),
            Mode::Long => gate64(at, sel::CODE64, 3, 0).to_vec(),
        };
        let (entry, size) = match mode {
            Mode::Real => (4 * u64::from(v), 4),
            Mode::Protected => (IDT_ADDR + 8 * u64::from(v), 8),
            Mode::Long => (IDT_ADDR + 16 * u64::from(v), 16),
        };
        let _ = size;
        // `data` offsets are DS-relative in real mode (DS base 0x10000).
        let to_off = |linear: u64| if mode == Mode::Real { linear.wrapping_sub(0x1_0000) } else { linear };
        b.patch(to_off(entry), gate);
        b.data(to_off(at), code);
    }
}

fn int_batch(mode: Mode) -> Batch {
    let mut b = Batch::new(&format!("control-int-{mode}"), mode);
    install_handlers(&mut b);
    let bits = b.bits();
    b.case("int 0x41; int3", 0, move |a| {
        set_flags(a, bits, CF | ZF | DF)?;
        a.int(0x41)?;
        a.int3()?;
        Ok(())
    });
    if mode != Mode::Long {
        // INTO traps only with OF = 1 (and is invalid in 64-bit mode).
        b.case("into with OF=0, then OF=1", 0, move |a| {
            set_flags(a, bits, 0)?;
            a.into()?;
            set_flags(a, bits, OF | SF)?;
            a.into()?;
            Ok(())
        });
    }
    b
}

#[test]
fn control_int_int3_into_iret_real_mode_match_kvm() {
    int_batch(Mode::Real).check();
}

#[test]
fn control_int_int3_into_iret_protected_and_long_mode_match_the_sdm() {
    // This host's KVM cannot run INT n in protected or long mode (KVM_EXIT_INTERNAL_ERROR), so
    // the expectations are the SDM's: the gate's handler runs (BX += vector), IRET restores
    // RFLAGS (CF ZF DF set by the case), the pushed image is RFLAGS with RF = 0 (SDM Vol. 3A
    // §18.3.1.1, software interrupts) and the saved IP is the next instruction's, inside the code.
    for mode in [Mode::Protected, Mode::Long] {
        for (kind, report, slots) in opinions(&format!("INT n in {mode} mode"), || int_batch(mode)) {
            assert_eq!(report.outcome.stop, StopReason::DebugExit { value: 0 }, "{mode} on {kind}");
            let g = slots[0].regs;
            assert_eq!((g[1], slots[0].flags), (0x41 + 3, CF | ZF | DF), "{mode} on {kind}: int 0x41; int3");
            assert_eq!(g[5] & 0x1_0fff, 0x443, "{mode} on {kind}: RFLAGS image pushed by INT3");
            assert!((0x10_0000..0x20_0000).contains(&g[4]), "{mode} on {kind}: saved RIP {:#x}", g[4]);
            if mode == Mode::Protected {
                let g = slots[1].regs;
                assert_eq!(
                    (g[1], g[5] & 0xfff, slots[1].flags),
                    (4, 0x882, OF | SF),
                    "{mode} on {kind}: into"
                );
            }
        }
    }
}

#[test]
fn control_flag_instructions_and_far_pointer_loads_match_kvm() {
    let mut b = Batch::new("control-flags", Mode::Protected);
    for fin in [0u64, STATUS | DF] {
        for (name, f) in [
            ("clc", CodeAssembler::clc as fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>),
            ("stc", CodeAssembler::stc),
            ("cmc", CodeAssembler::cmc),
            ("cld", CodeAssembler::cld),
            ("std", CodeAssembler::std),
        ] {
            b.case(format!("{name} fl_in={fin:03x}"), 0, move |a| {
                set_flags(a, 32, fin)?;
                f(a)
            });
        }
    }
    b.case("sti; pushfd; cli; pushfd", 0, |a| {
        a.sti()?;
        a.pushfd()?;
        a.cli()?;
        a.pushfd()?;
        a.pop(ebx)?;
        a.pop(eax)
    });
    // LDS/LES/LFS/LGS/LSS: offset into the register, selector into the segment register.
    let s = scratch(Mode::Protected);
    b.case("lds les lfs lgs lss from m16:32", 0, move |a| {
        a.mov(dword_ptr(s), 0x1234_5678)?;
        a.mov(word_ptr(s + 4), i32::from(sel::DATA))?;
        a.lfs(eax, fword_ptr(s))?;
        a.lgs(ebx, fword_ptr(s))?;
        a.les(ecx, fword_ptr(s))?;
        a.mov(edi, esp)?;
        a.mov(dword_ptr(s + 8), 0x7_0000)?;
        a.mov(word_ptr(s + 12), i32::from(sel::DATA))?;
        a.lss(esp, fword_ptr(s + 8))?;
        a.mov(edx, esp)?;
        a.mov(esp, edi)?;
        a.lds(esi, fword_ptr(s))?;
        a.mov(di, fs)?;
        a.movzx(edi, di)
    });
    b.check();
}

#[test]
fn control_hlt_with_interrupts_off_halts() {
    // SDM Vol. 2A HLT: with no interrupt that can arrive, the processor stays halted.
    let guest = GuestBuilder::new(Mode::Long).name("hlt").code(|a| Ok(a.hlt()?)).build().unwrap();
    for kind in testing::select_backends() {
        let r = run(kind, &guest);
        assert_eq!(r.outcome.stop, StopReason::Halted, "{kind}");
        assert_eq!(r.outcome.state.regs.rip, guest.state.regs.rip + 1, "{kind}: RIP after HLT");
    }
}

/// SDM Vol. 2A ARPL: if dest.RPL < src.RPL then dest.RPL := src.RPL, ZF := 1 else ZF := 0.
fn arpl(dest: u16, src: u16) -> (u16, bool) {
    if dest & 3 < src & 3 {
        ((dest & !3) | (src & 3), true)
    } else {
        (dest, false)
    }
}

#[test]
fn control_arpl_and_bound_match_the_sdm() {
    let pairs = [
        (0x10u16, 0x13u16),
        (0x13, 0x10),
        (0x12, 0x11),
        (0xfffc, 0x0003),
        (0x0001, 0x0002),
        (0x0003, 0x0003),
    ];
    let s = scratch(Mode::Protected);
    let batch = || {
        let mut b = Batch::new("control-arpl-bound", Mode::Protected);
        for (d, src) in pairs {
            b.case(format!("arpl {d:#x},{src:#x}"), 0, move |a| {
                a.mov(eax, 0xabcd_0000 | u32::from(d))?;
                a.mov(ecx, u32::from(src))?;
                set_flags(a, 32, 0)?;
                a.arpl(ax, cx)
            });
        }
        // BOUND with the index inside the bounds (signed, inclusive) does nothing.
        for (i, lo, hi) in [(5i32, 0i32, 10i32), (0, 0, 0), (-3, -5, -1), (10, 0, 10)] {
            b.case(format!("bound {i} in [{lo},{hi}]"), 0, move |a| {
                a.mov(dword_ptr(s), lo)?;
                a.mov(dword_ptr(s + 4), hi)?;
                a.mov(eax, i)?;
                a.bound(eax, qword_ptr(s))?;
                a.mov(ebx, 1)
            });
        }
        b
    };
    for kind in testing::select_backends() {
        let (report, slots) = batch().run_on(kind);
        if let (BackendKind::Kvm, StopReason::CannotRun(why)) = (kind, &report.outcome.stop) {
            eprintln!("skipped: kvm: ARPL/BOUND: this host's KVM cannot run them ({why}); the SDM decides");
            continue;
        }
        assert_eq!(report.outcome.stop, StopReason::DebugExit { value: 0 }, "{kind}");
        for (i, (d, src)) in pairs.iter().enumerate() {
            let (r, z) = arpl(*d, *src);
            let got = (slots[i].rax(), slots[i].flags & ZF);
            assert_eq!(
                got,
                (0xabcd_0000 | u64::from(r), if z { ZF } else { 0 }),
                "{kind}: arpl {d:#x},{src:#x}"
            );
        }
        for slot in &slots[pairs.len()..] {
            assert_eq!(slot.regs[1], 1, "{kind}: BOUND in range must fall through");
        }
    }
    // Out of bounds: #BR (vector 5), a fault at the BOUND (SDM Vol. 2A BOUND; Vol. 3A §6.15).
    for (i, lo, hi) in [(11i32, 0i32, 10i32), (-1, 0, 10), (-6, -5, -1)] {
        let guest = GuestBuilder::new(Mode::Protected)
            .name("bound-out")
            .code(move |a| {
                a.mov(dword_ptr(s), lo)?;
                a.mov(dword_ptr(s + 4), hi)?;
                a.mov(eax, i)?;
                a.bound(eax, qword_ptr(s))?;
                duet::fixtures::asm::exit(a, 1)
            })
            .build()
            .unwrap();
        for kind in testing::select_backends() {
            let r = run(kind, &guest);
            match &r.outcome.stop {
                StopReason::CannotRun(why) if kind == BackendKind::Kvm => {
                    eprintln!("skipped: kvm: BOUND out of range: this host's KVM cannot run it ({why}); the SDM decides");
                }
                StopReason::Exception(e) => assert_eq!((e.vector, e.error_code), (5, 0), "{kind}: bound {i}"),
                other => panic!("{kind}: bound {i} in [{lo},{hi}]: {other}"),
            }
        }
    }
}
