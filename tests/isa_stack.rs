//! Stack: PUSH/POP forms (registers, RSP itself, immediates, memory, segment registers, 16-bit
//! pushes), PUSHF/POPF, PUSHA/POPA, ENTER (nesting levels) / LEAVE, near CALL/RET (with imm16)
//! and far CALL/RETF in real, protected and long mode. Stack memory is part of the compared RAM.

mod common;

use common::*;
use duet::fixtures::{assemble, Mode};
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, MemoryOperand, Register};

/// Where the far-call targets are loaded (linear): 64-bit, 32-bit, and 16-bit at 0x6000:0000.
const FAR64: u64 = 0x60_0100;
const FAR32: u64 = 0x60_0000;
const FAR16: u64 = 0x6_0000;

fn abs(addr: u64) -> MemoryOperand {
    MemoryOperand::new(Register::None, Register::None, 1, addr as i64, 4, false, Register::None)
}

#[test]
fn stack_long_mode_push_pop_enter_call_match_kvm() {
    let mut b = Batch::new("stack-64", Mode::Long);
    let s = scratch(Mode::Long);
    b.case("push imm8 -1, push imm32 0x80000000, push 16-bit imm", 0, |a| {
        a.add_instruction(Instruction::with1(Code::Pushq_imm8, -1)?)?;
        a.add_instruction(Instruction::with1(Code::Pushq_imm32, i32::MIN)?)?;
        a.add_instruction(Instruction::with1(Code::Push_imm16, 0x8001)?)?;
        a.mov(rdi, rsp)?;
        a.mov(rax, qword_ptr(rsp))?;
        a.mov(rbx, qword_ptr(rsp + 8))?;
        a.mov(rcx, qword_ptr(rsp + 16))
    });
    b.case("push/pop r64, r16, mem; push rsp; pop rsp", 0, move |a| {
        a.mov(rax, 0x1111_2222_3333_4444u64)?;
        a.push(rax)?;
        a.push(ax)?;
        a.mov(qword_ptr(s), rax)?;
        a.push(qword_ptr(s))?;
        a.pop(rbx)?;
        a.pop(cx)?;
        a.pop(qword_ptr(s + 8))?;
        a.mov(rdx, qword_ptr(s + 8))?;
        a.push(rsp)?; // pushes RSP as it was before the push
        a.pop(rsi)?;
        a.push(0x6000)?;
        a.pop(rsp)?; // RSP gets the popped value
        a.mov(rdi, rsp)?;
        a.mov(rsp, duet::core::layout::STACK_TOP)
    });
    b.case("push/pop fs, gs", 0, |a| {
        // Whether PUSH Sreg writes 2 or 8 bytes is implementation-specific (SDM Vol. 2B PUSH:
        // "either a zero-extended value is pushed ... or ... a 16-bit move"): zero the slots first.
        a.mov(qword_ptr(rsp - 8), 0)?;
        a.mov(qword_ptr(rsp - 16), 0)?;
        a.push(fs)?;
        a.push(gs)?;
        a.mov(rax, qword_ptr(rsp))?;
        a.push(0)?;
        a.pop(gs)?;
        a.mov(bx, gs)?;
        a.pop(fs)?;
        a.pop(fs)?;
        a.mov(cx, fs)?;
        a.mov(rdi, rsp)
    });
    for image in [0x2u64, 0x8d7, 0x24_4cd7, 0x4_0cd7] {
        b.case(format!("popfq {image:#x}; pushfq"), 0, move |a| {
            a.mov(rax, image)?;
            a.push(rax)?;
            a.popfq()?;
            a.pushfq()?;
            a.pop(rbx)?;
            a.push(2)?;
            a.popfq()
        });
    }
    // Nesting level 0 only; above 0: `stack_enter_nesting_levels_match_the_sdm` (this host's KVM
    // cannot run them).
    {
        let level = 0u32;
        b.case(format!("enter 0x18,{level}; leave"), 0, move |a| {
            // A chain of frame pointers for the nesting levels to copy.
            a.mov(rbp, STACK_TOP_MINUS_0X100)?;
            a.mov(rax, 0xaaaa_0000u64)?;
            a.mov(qword_ptr(rbp - 8), rax)?;
            a.mov(qword_ptr(rbp - 16), rbp)?;
            a.mov(qword_ptr(rbp - 24), rax)?;
            a.enter(0x18, level)?;
            a.mov(rsi, rbp)?;
            a.mov(rdi, rsp)?;
            a.mov(rax, qword_ptr(rsp + 0x18))?;
            a.mov(rbx, qword_ptr(rbp - 8))?;
            a.leave()?;
            a.mov(rcx, rsp)?;
            a.mov(rdx, rbp)
        });
    }
    b.case("call near; ret; ret imm16", 0, |a| {
        let (mut f, mut g, mut done) = (a.create_label(), a.create_label(), a.create_label());
        a.call(f)?;
        a.mov(rsi, rsp)?;
        a.push(1)?;
        a.push(2)?;
        a.call(g)?;
        a.mov(rdi, rsp)?;
        a.jmp(done)?;
        a.set_label(&mut f)?;
        a.mov(rax, qword_ptr(rsp))?;
        a.ret()?;
        a.set_label(&mut g)?;
        a.mov(rbx, qword_ptr(rsp + 8))?;
        a.ret_1(16)?;
        a.set_label(&mut done)
    });
    // m16:32, which both vendors decode: the REX.W form (m16:64) is Intel's only, AMD ignores
    // REX.W there (backend-interp/tests/vendors_decode.rs, docs/VENDORS.md).
    b.case("call far m16:32; retfd", 0, move |a| {
        a.mov(dword_ptr(s), FAR64 as u32)?;
        a.mov(word_ptr(s + 4), i32::from(duet::fixtures::tables::sel::CODE64))?;
        a.add_instruction(Instruction::with1(Code::Call_m1632, abs(s))?)?;
        a.mov(rdi, rsp)
    });
    let far = assemble(64, FAR64, |a| {
        a.mov(ebx, dword_ptr(rsp))?;
        a.mov(edx, dword_ptr(rsp + 4))?;
        a.mov(rsi, rsp)?;
        a.add_instruction(Instruction::with(Code::Retfd))?;
        Ok(())
    })
    .unwrap();
    b.data(FAR64, far);
    b.check();
}

const STACK_TOP_MINUS_0X100: u64 = duet::core::layout::STACK_TOP - 0x100;

#[test]
fn stack_protected_mode_pusha_enter_far_call_match_kvm() {
    let mut b = Batch::new("stack-32", Mode::Protected);
    b.case("pushad; popad (ESP image skipped)", 0, |a| {
        for (r, v) in [(eax, 1u32), (ecx, 2), (edx, 3), (ebx, 4), (ebp, 6), (esi, 7), (edi, 8)] {
            a.mov(r, v)?;
        }
        a.pushad()?;
        a.mov(dword_ptr(esp + 12), 0x1234)?; // the ESP image: POPAD ignores it
        a.mov(dword_ptr(esp + 28), 0x55)?; // EAX image
        a.popad()?;
        a.mov(esi, esp)
    });
    b.case("pushaw; popaw", 0, |a| {
        a.mov(eax, 0xaaaa_1111u32)?;
        a.mov(ebx, 0xbbbb_2222u32)?;
        a.add_instruction(Instruction::with(Code::Pushaw))?;
        a.mov(word_ptr(esp + 14), 0x99)?;
        a.add_instruction(Instruction::with(Code::Popaw))?;
        a.mov(edi, esp)
    });
    b.case("push/pop ds es ss; push imm8", 0, |a| {
        a.push(ds)?;
        a.push(es)?;
        a.push(ss)?;
        a.push(-2)?;
        a.mov(eax, dword_ptr(esp))?;
        a.mov(ebx, dword_ptr(esp + 4))?;
        a.pop(ecx)?;
        a.pop(ss)?;
        a.pop(es)?;
        a.pop(ds)?;
        a.mov(edi, esp)
    });
    {
        let level = 0u32;
        b.case(format!("enter 8,{level}; leave"), 0, move |a| {
            a.mov(ebp, 0x7_fe00)?;
            a.mov(dword_ptr(ebp - 4), 0x1111)?;
            a.mov(dword_ptr(ebp - 8), 0x2222)?;
            a.mov(dword_ptr(ebp - 12), 0x3333)?;
            a.enter(8, level)?;
            a.mov(esi, ebp)?;
            a.mov(edi, esp)?;
            a.mov(eax, dword_ptr(esp + 8))?;
            a.leave()?;
            a.mov(ecx, esp)?;
            a.mov(edx, ebp)
        });
    }
    b.case("call far ptr16:32; retf 8", 0, |a| {
        a.push(0x11)?;
        a.push(0x22)?;
        a.add_instruction(Instruction::with_far_branch(
            Code::Call_ptr1632,
            duet::fixtures::tables::sel::CODE32,
            FAR32 as u32,
        )?)?;
        a.mov(edi, esp)
    });
    let far = assemble(32, FAR32, |a| {
        a.mov(ebx, dword_ptr(esp))?;
        a.mov(edx, dword_ptr(esp + 4))?;
        a.mov(ecx, dword_ptr(esp + 8))?;
        a.mov(esi, esp)?;
        a.retf_1(8)?;
        Ok(())
    })
    .unwrap();
    b.data(FAR32, far);
    b.check();
}

#[test]
fn stack_real_mode_far_call_and_pusha_match_kvm() {
    let mut b = Batch::new("stack-16", Mode::Real);
    b.case("call far ptr16:16; retf", 0, |a| {
        a.add_instruction(Instruction::with_far_branch(Code::Call_ptr1616, (FAR16 >> 4) as u16, 0)?)?;
        a.mov(di, sp)
    });
    b.case("pusha; popa", 0, |a| {
        a.mov(ax, 0x1111)?;
        a.mov(bp, 0x6666)?;
        a.pusha()?;
        a.mov(si, sp)?;
        a.mov(bx, word_ptr(si + 14).ss())?;
        a.popa()?;
        a.mov(cx, sp)
    });
    b.case("pushf/popf, push/pop ds", 0, |a| {
        a.mov(ax, 0x0cd7)?;
        a.push(ax)?;
        a.popf()?;
        a.pushf()?;
        a.pop(bx)?;
        a.push(ds)?;
        a.pop(es)?;
        a.mov(cx, es)
    });
    let far = assemble(16, 0, |a| {
        a.mov(bx, sp)?;
        a.mov(si, word_ptr(bx).ss())?;
        a.mov(dx, word_ptr(bx + 2).ss())?;
        a.retf()?;
        Ok(())
    })
    .unwrap();
    // `data` takes DS-relative offsets in real mode: DS base is 0x10000.
    b.data(FAR16 - 0x1_0000, far);
    b.check();
}

/// SDM Vol. 2A ENTER, Operation: the frame a nesting level `level` > 0 builds, for a `bytes`-wide
/// stack starting at RSP = `rsp0`, RBP = `rbp0`, with `mem(a)` the stack's initial contents.
/// Returns (RBP after, RSP after, the values pushed from FrameTemp downwards).
fn enter_model(
    bytes: u64,
    rsp0: u64,
    rbp0: u64,
    alloc: u64,
    level: u32,
    mem: impl Fn(u64) -> u64,
) -> (u64, u64, Vec<u64>) {
    let level = u64::from(level % 32);
    let mut pushed = vec![rbp0]; // Push(RBP); FrameTemp := RSP
    let frame_temp = rsp0 - bytes;
    let mut walk = rbp0;
    for _ in 1..level {
        walk -= bytes;
        pushed.push(mem(walk));
    }
    if level > 0 {
        pushed.push(frame_temp);
    }
    let new_top = rsp0 - bytes * pushed.len() as u64 - alloc;
    (frame_temp, new_top, pushed)
}

#[test]
fn stack_enter_nesting_levels_match_the_sdm() {
    use duet::StopReason;
    let top = duet::core::layout::STACK_TOP;
    for (mode, level) in [
        (Mode::Long, 1u32),
        (Mode::Long, 2),
        (Mode::Long, 3),
        (Mode::Long, 31),
        (Mode::Long, 33),
        (Mode::Protected, 1),
        (Mode::Protected, 2),
        (Mode::Protected, 4),
    ] {
        let bytes = if mode == Mode::Long { 8 } else { 4 };
        let rbp0 = top - 0x100;
        // Initial stack contents below RBP: a marker, a saved frame pointer, a marker.
        let init =
            [(rbp0 - bytes, 0xaaaa_0000u64), (rbp0 - 2 * bytes, rbp0), (rbp0 - 3 * bytes, 0xaaaa_0001)];
        let mem = |a: u64| init.iter().find(|(x, _)| *x == a).map_or(0, |(_, v)| *v);
        let (want_bp, want_sp, pushed) = enter_model(bytes, top, rbp0, 0x18, level, mem);
        let (n, copy) = (pushed.len(), scratch(mode));
        let batch = || {
            let mut b = Batch::new("stack-enter", mode);
            b.case(format!("enter 0x18,{level}"), 0, move |a| {
                if bytes == 8 {
                    a.mov(rbp, rbp0)?;
                    for (at, v) in init {
                        a.mov(rax, v)?;
                        a.mov(qword_ptr(at), rax)?;
                    }
                } else {
                    a.mov(ebp, rbp0 as u32)?;
                    for (at, v) in init {
                        a.mov(dword_ptr(at), v as u32)?;
                    }
                }
                a.mov(eax, 0)?;
                a.enter(0x18, level)?;
                // Copy the frame to scratch before LEAVE and the harness reuse the stack.
                for k in 0..n as u64 {
                    if bytes == 8 {
                        a.mov(rax, qword_ptr(rsp + (0x18 + 8 * k) as i32))?;
                        a.mov(qword_ptr(copy + 8 * k), rax)?;
                    } else {
                        a.mov(eax, dword_ptr(esp + (0x18 + 4 * k) as i32))?;
                        a.mov(dword_ptr(copy + 4 * k), eax)?;
                    }
                }
                if bytes == 8 {
                    a.mov(rsi, rbp)?;
                    a.mov(rdi, rsp)?;
                    a.leave()?;
                    a.mov(rcx, rsp)?;
                    a.mov(rdx, rbp)
                } else {
                    a.mov(esi, ebp)?;
                    a.mov(edi, esp)?;
                    a.leave()?;
                    a.mov(ecx, esp)?;
                    a.mov(edx, ebp)
                }
            });
            b
        };
        for (kind, report, slots) in opinions(&format!("enter with nesting level {level} ({mode})"), batch) {
            assert_eq!(
                report.outcome.stop,
                StopReason::DebugExit { value: 0 },
                "{mode} level {level} on {kind}"
            );
            let g = slots[0].regs;
            // After LEAVE: RSP = FrameTemp + width, RBP = the saved RBP.
            assert_eq!(
                (g[4], g[5], g[2], g[3]),
                (want_bp, want_sp, want_bp + bytes, rbp0),
                "{mode} level {level} on {kind}: rbp, rsp after ENTER, rsp, rbp after LEAVE"
            );
            let raw = read_mem(&report, copy, pushed.len() * bytes as usize);
            let got: Vec<u64> = raw
                .chunks(bytes as usize)
                .map(|c| c.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b)))
                .rev()
                .collect();
            assert_eq!(got, pushed, "{mode} level {level} on {kind}: the frame ENTER built");
        }
    }
}
