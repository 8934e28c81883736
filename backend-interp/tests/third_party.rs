//! Regressions from third-party guests (issue 11), each under both vendors' profiles, for none of
//! these differs by vendor: POP SS moving SP at the width of the stack it popped from, ENTER's
//! frame pointers at the operand size, LEAVE, the RSP that IA-32e event delivery saves from a
//! 16-bit stack, SALC, and INT1. Expected values come from QEMU 7.2 TCG (the same guests run
//! under duet's QEMU reference while these fixes were made) and the SDM sections cited; this
//! host's KVM runs 16-bit stacks through its instruction emulator, and is compared only where
//! that emulator is right.

mod common;

use common::*;
use duet_core::{CpuState, GuestMemory, RunOutcome, Segment, StopReason, Vendor};
use iced_x86::code_asm::*;

/// Ring-0 16-bit data segment (B = 0), base 0, limit 0xFFFF, added after the common GDT.
const DATA16: u16 = 0x48;
/// Ring-3 16-bit data segment, base 0, limit 0xFFFF.
const UDATA16: u16 = 0x50 | 3;

/// Adds [`DATA16`] and [`UDATA16`] to the GDT and loads SS with `stack_sel` (one of them).
fn stack16(mem: &GuestMemory, s: &mut CpuState, stack_sel: u16) {
    let d = |dpl| Segment { limit: 0xffff, type_: 3, s: true, dpl, present: true, ..Segment::default() };
    poke(mem, GDT + u64::from(DATA16), &d(0).to_descriptor().to_le_bytes());
    poke(mem, GDT + u64::from(UDATA16 & !3), &d(3).to_descriptor().to_le_bytes());
    s.sregs.gdt.limit = 0x57;
    let dpl = (stack_sel & 3) as u8;
    s.sregs.ss = Segment { selector: stack_sel, ..d(dpl) };
}

/// Runs `probe` under both profiles and checks that they agree, returning the Intel run.
fn both(
    probe: &Probe,
    what: &str,
    view: impl Fn(&RunOutcome, &GuestMemory) -> String,
) -> (RunOutcome, std::sync::Arc<GuestMemory>) {
    let (a, am) = probe.interp(Vendor::Amd);
    let (i, im) = probe.interp(Vendor::Intel);
    assert_eq!(view(&i, &im), view(&a, &am), "{what}: the vendors must agree");
    (i, im)
}

#[test]
fn pop_ss_moves_sp_at_the_width_of_the_stack_it_popped_from() {
    // 32-bit code, SS a 16-bit stack (B = 0) with ESP = 0x2FFFC, popping DATA (B = 1). SDM Vol. 2B
    // POP, Operation: "IF StackAddrSize = 16 … SP ← SP + 4" (or + 2): SP wraps to 0 and
    // ESP[31:16] stays, so ESP = 0x2_0000 (QEMU; an 80386). It was 0x3_0000: the new SS's
    // width was used. A 16-bit POP SS (66 17) from ESP = 0x2FFFE ends the same way.
    for (name, prefix, sp0) in [("o32 pop ss", None, 0x2fffcu64), ("o16 pop ss", Some(0x66u8), 0x2fffe)] {
        let probe = Probe::new(32, protected32, move |a| {
            if let Some(p) = prefix {
                a.db(&[p]).unwrap();
            }
            a.pop(ss).unwrap();
            a.hlt().unwrap();
        })
        .prep(move |mem, s| {
            stack16(mem, s, DATA16);
            s.regs.rsp = sp0;
            poke(mem, sp0 & 0xffff, &u32::from(sel::DATA).to_le_bytes());
        });
        let view = |o: &RunOutcome, _: &GuestMemory| {
            format!("{:?} {:#x} {:#x}", o.stop, o.state.regs.rsp, o.state.sregs.ss.selector)
        };
        let (out, _) = both(&probe, name, view);
        assert_eq!(
            (out.stop, out.state.regs.rsp, out.state.sregs.ss.selector),
            (StopReason::Halted, 0x2_0000, sel::DATA),
            "{name}"
        );
        // KVM's emulator pops at the old stack's width too (em_pop_sreg); kvm_pvm runs this
        // protected-mode guest through it.
        probe.check_on_kvm(name, view);
    }
}

/// One ENTER or LEAVE case: its bytes, the stack (16- or 32-bit), ESP and EBP before it, and
/// QEMU's EBP and ESP after it.
struct Frame {
    name: &'static str,
    bytes: &'static [u8],
    stack16: bool,
    before: (u64, u64),
    after: (u64, u64),
}

#[test]
fn enter_takes_frame_pointers_at_the_operand_size_on_any_stack() {
    // SDM Vol. 2A ENTER, Operation: FrameTemp ← ESP (32-bit operand) or SP (16-bit) after the
    // first push, each copied frame pointer and the final push at the operand size, rBP ←
    // FrameTemp at the operand size. With o32 on a 16-bit stack at ESP = 0x1FFFE the frame
    // pointer is 0x0001FFFA, not 0x0000FFFA (the issue-11 guest; an 80386 test ROM agrees). The
    // final rSP moves at the stack's width, as QEMU and Bochs have it (the SDM's pseudo-code
    // keys that step on the operand size too). Every expected value is QEMU 7.2's.
    let cases = [
        Frame {
            name: "o32 enter 8, 0 / s16",
            bytes: &[0xc8, 8, 0, 0],
            stack16: true,
            before: (0x1fffe, 0x1fff0),
            after: (0x1fffa, 0x1fff2),
        },
        Frame {
            name: "o32 enter 8, 4 / s16",
            bytes: &[0xc8, 8, 0, 4],
            stack16: true,
            before: (0x1fffe, 0x1fff0),
            after: (0x1fffa, 0x1ffe2),
        },
        Frame {
            name: "o32 enter 16, 0 / s16, SP wraps",
            bytes: &[0xc8, 0x10, 0, 0],
            stack16: true,
            before: (0x20006, 0x1fff0),
            after: (0x20002, 0x2fff2),
        },
        Frame {
            name: "o16 enter 8, 2 / s16",
            bytes: &[0x66, 0xc8, 8, 0, 2],
            stack16: true,
            before: (0x1fffe, 0x1fff0),
            after: (0x1fffc, 0x1fff0),
        },
        Frame {
            name: "o16 enter 16, 0 / s32",
            bytes: &[0x66, 0xc8, 0x10, 0, 0],
            stack16: false,
            before: (0x10002, 0x2fff0),
            after: (0x20000, 0xfff0),
        },
        Frame {
            name: "o16 enter 8, 3 / s32",
            bytes: &[0x66, 0xc8, 8, 0, 3],
            stack16: false,
            before: (0x10002, 0xfff8),
            after: (0, 0xfff2),
        },
    ];
    for c in cases {
        let (bytes, s16, (sp0, bp0)) = (c.bytes, c.stack16, c.before);
        let probe = Probe::new(32, protected32, move |a| {
            a.db(bytes).unwrap();
            a.hlt().unwrap();
        })
        .prep(move |mem, s| {
            if s16 {
                stack16(mem, s, DATA16);
            }
            s.regs.rsp = sp0;
            s.regs.rbp = bp0;
        });
        let view = |o: &RunOutcome, m: &GuestMemory| {
            format!("{:x?} {:x?}", (o.state.regs.rbp, o.state.regs.rsp), peek64(m, 0xfff0))
        };
        let (out, mem) = both(&probe, c.name, view);
        assert_eq!((out.state.regs.rbp, out.state.regs.rsp), c.after, "{}", c.name);
        if c.name.starts_with("o32 enter 8, 4") {
            // The old EBP, the three copied frame pointers (from EBP - 4 … - 12 over zeroed
            // memory) and FrameTemp, each a dword, from SP = 0xFFFA down (QEMU).
            assert_eq!(peek32(&mem, 0xfffa), 0x1fff0);
            assert_eq!(peek32(&mem, 0xffea), 0x1fffa, "the pushed frame pointer");
        }
    }
}

#[test]
fn leave_moves_sp_at_the_stack_width_and_pops_at_the_operand_size() {
    // SDM Vol. 2B LEAVE: "IF StackAddressSize = 16 THEN SP ← BP", then rBP ← Pop() at the operand
    // size (QEMU agrees on both cases).
    let cases = [
        Frame {
            name: "o32 leave / s16",
            bytes: &[0xc9],
            stack16: true,
            before: (0x1234, 0x3fff0),
            after: (0x8765_4321, 0xfff4),
        },
        Frame {
            name: "o16 leave / s32",
            bytes: &[0x66, 0xc9],
            stack16: false,
            before: (0x1234, 0xfff0),
            after: (0x4321, 0xfff2),
        },
    ];
    for c in cases {
        let (bytes, s16, (sp0, bp0)) = (c.bytes, c.stack16, c.before);
        let probe = Probe::new(32, protected32, move |a| {
            a.db(bytes).unwrap();
            a.hlt().unwrap();
        })
        .prep(move |mem, s| {
            if s16 {
                stack16(mem, s, DATA16);
            }
            poke(mem, 0xfff0, &0x8765_4321u32.to_le_bytes());
            s.regs.rsp = sp0;
            s.regs.rbp = bp0;
        });
        let view = |o: &RunOutcome, _: &GuestMemory| format!("{:x?}", (o.state.regs.rbp, o.state.regs.rsp));
        let (out, _) = both(&probe, c.name, view);
        assert_eq!((out.state.regs.rbp, out.state.regs.rsp), c.after, "{}", c.name);
    }
}

#[test]
fn ia32e_event_delivery_saves_all_of_rsp_from_a_16_bit_stack() {
    // Compatibility-mode ring 3 on a 16-bit stack with ESP = 0x1FFF2: the #GP of HLT saves
    // RSP = 0x1FFF2 in its 64-bit frame (SDM Vol. 3A §6.14.2 pushes SS:RSP in 64-bit form;
    // QEMU's do_interrupt64 pushes env->regs[R_ESP]; KVM agrees). It saved 0xFFF2.
    let probe = Probe::new(32, compat_ring3, |a| {
        a.hlt().unwrap();
    })
    .prep(|mem, s| {
        stack16(mem, s, UDATA16);
        s.regs.rsp = 0x1fff2;
    });
    let view = |o: &RunOutcome, m: &GuestMemory| format!("{:x?}", long_trap(o, m));
    let (out, mem) = both(&probe, "hlt in ring 3", view);
    let t = long_trap(&out, &mem).expect("#GP");
    assert_eq!((t.vector, t.rsp, t.ss), (13, 0x1fff2, u64::from(UDATA16)));
    probe.check_on_kvm("hlt in ring 3", view);
}

#[test]
fn salc_sets_al_from_cf_outside_64_bit_mode_and_is_ud_in_64_bit_mode() {
    // SALC (D6): AL ← FFh if CF else 00h, flags unchanged; undocumented by the manuals, run by
    // Intel and AMD parts (QEMU, Bochs) outside 64-bit mode, #UD in it. This host's silicon
    // agrees in compatibility and 64-bit mode (ring 3, below).
    let salc = |bits: u32, state: fn(&GuestMemory) -> CpuState| {
        Probe::new(bits, state, |a| {
            a.mov(eax, 0x1155).unwrap();
            a.stc().unwrap();
            a.db(&[0xd6]).unwrap();
            a.mov(ebx, eax).unwrap();
            a.clc().unwrap();
            a.db(&[0xd6]).unwrap();
            a.pushfd().unwrap();
            a.pop(ecx).unwrap();
            a.hlt().unwrap();
        })
    };
    let view = |o: &RunOutcome, m: &GuestMemory| {
        let r = &o.state.regs;
        format!(
            "{:x?} {:x?}",
            (r.rax & 0xffff, r.rbx & 0xffff, r.rcx & 0x8d5),
            long_trap(o, m).map(|t| t.vector)
        )
    };
    for (name, bits, state) in [
        ("compatibility", 32, compat_ring3 as fn(&GuestMemory) -> CpuState),
        ("protected", 32, protected32),
        ("real", 16, real_mode),
    ] {
        let (out, _) = both(&salc(bits, state), name, view);
        let r = &out.state.regs;
        assert_eq!(
            (r.rax & 0xffff, r.rbx & 0xffff, r.rcx & 0x8d5),
            (0x1100, 0x11ff, 0),
            "{name}: CF clear after CLC, no flag set by SALC"
        );
    }
    let probe64 = Probe::new(64, long64_ring3, |a| {
        a.db(&[0xd6]).unwrap();
        a.hlt().unwrap();
    });
    let (out, mem) = both(&probe64, "64-bit", view);
    assert_eq!(long_trap(&out, &mem).map(|t| (t.vector, t.rip)), Some((6, CODE)));
    for (name, probe) in [("compatibility", salc(32, compat_ring3)), ("64-bit", probe64)] {
        probe.check_on_kvm(name, view);
    }
}

#[test]
fn int1_raises_a_debug_trap_through_a_ring_0_gate_from_any_ring() {
    // SDM Vol. 2A INT n/INTO/INT3/INT1: INT1 (F1) delivers #DB as a trap (the saved RIP is the
    // next instruction) without the gate-DPL check INT n makes, so a DPL-0 gate takes it from
    // ring 3. This host's KVM cannot run INT1 (an emulation failure in ring 0, #UD in ring 3;
    // a named fuzz host limit), so the SDM decides.
    for (name, bits, state) in [
        ("64-bit ring 3", 64, long64_ring3 as fn(&GuestMemory) -> CpuState),
        ("compatibility ring 3", 32, compat_ring3),
        ("64-bit ring 0", 64, long64),
    ] {
        let probe = Probe::new(bits, state, |a| {
            a.int1().unwrap();
            a.hlt().unwrap();
        });
        let view =
            |o: &RunOutcome, m: &GuestMemory| format!("{:x?}", long_trap(o, m).map(|t| (t.vector, t.rip)));
        let (out, mem) = both(&probe, name, view);
        assert_eq!(long_trap(&out, &mem).map(|t| (t.vector, t.rip)), Some((1, CODE + 1)), "{name}");
    }
    // Protected mode, ring 0: the 32-bit frame holds the next EIP too.
    let probe = Probe::new(32, protected32, |a| {
        a.int1().unwrap();
        a.hlt().unwrap();
    });
    let (out, mem) = probe.interp(Vendor::Amd);
    assert_eq!(prot_trap(&out, &mem).map(|t| (t.vector, t.rip)), Some((1, CODE + 1)));
}

#[test]
fn enter_and_leave_with_a_16_bit_operand_in_64_bit_mode_move_only_bp() {
    // 66h ENTER 8, 0 in 64-bit mode: push BP (2 bytes), BP ← SP (bits 63:16 of RBP stay), RSP
    // moves at 64 bits; 66h LEAVE: RSP ← RBP, then BP ← a popped word. This host's silicon
    // (64-bit ring 3, below) decides it, as the SDM's pseudo-code ("RBP ← FrameTemp" in 64-bit
    // mode) does not say how a 16-bit FrameTemp is written.
    let enter = Probe::new(64, long64_ring3, |a| {
        a.db(&[0x66, 0xc8, 8, 0, 0]).unwrap();
        a.hlt().unwrap();
    })
    .prep(|_, s| {
        s.regs.rbp = 0x1234_5678_9abc_def0;
        s.regs.rsp = STACK;
    });
    let leave = Probe::new(64, long64_ring3, |a| {
        a.db(&[0x66, 0xc9]).unwrap();
        a.hlt().unwrap();
    })
    .prep(|mem, s| {
        poke(mem, STACK - 0x10, &0x1111_2222_3333_4444u64.to_le_bytes());
        s.regs.rbp = STACK - 0x10;
        s.regs.rsp = 0x1234;
    });
    let view = |o: &RunOutcome, m: &GuestMemory| {
        format!("{:x?}", (o.state.regs.rbp, long_trap(o, m).map(|t| t.rsp)))
    };
    let cases = [
        ("o16 enter 8, 0", &enter, (0x1234_5678_9abc_fffe, STACK - 2 - 8)),
        ("o16 leave", &leave, (((STACK - 0x10) & !0xffff) | 0x4444, STACK - 0x10 + 2)),
    ];
    for (name, probe, (want_bp, want_sp)) in cases {
        let (out, mem) = both(probe, name, view);
        assert_eq!(
            (out.state.regs.rbp, long_trap(&out, &mem).map(|t| t.rsp)),
            (want_bp, Some(want_sp)),
            "{name}"
        );
        probe.check_on_kvm(name, view);
    }
}
