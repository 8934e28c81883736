//! Block chaining and the dedicated near CALL/RET handlers: a block that ends in a near branch
//! goes on at its target's block only within the same linear code page; guest writes to code,
//! single-step traps and code breakpoints are seen at the chain points as between blocks.

mod common;

use common::*;
use duet_core::StopReason;
use iced_x86::code_asm::*;

/// A near JMP into the next linear page follows that page's own mapping (here not the next
/// physical page): chaining never carries a translation across pages.
#[test]
fn a_branch_into_the_next_page_follows_its_translation() {
    // 0x8000: xor eax, eax; jmp short 0x8010 (chains within the page)
    // 0x8010: jmp near 0x9000 (the next page: linear 0x9000 maps physical 0x20000)
    let mut code = vec![0x31, 0xc0, 0xeb, 0x0c];
    code.resize(0x10, 0x90);
    let rel = 0x9000u32 - (0x8010 + 5);
    code.push(0xe9);
    code.extend_from_slice(&rel.to_le_bytes());
    let mem = memory(&code);
    let state = paging32(&mem, protected32(&mem));
    set_pte32(&mem, 0x9000, 0x2_0000 | 7);
    // mov eax, n; hlt — 1 where the mapping leads, 2 at the physical page after the code's.
    poke(&mem, 0x2_0000, &[0xb8, 1, 0, 0, 0, 0xf4]);
    poke(&mem, 0x9000, &[0xb8, 2, 0, 0, 0, 0xf4]);
    let (out, _) = run(mem, &state);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax, 1);
    assert_eq!(out.state.regs.rip, 0x9006);
}

/// A CALL to code the guest has just rewritten (reached through a chained JNZ and a chained
/// CALL) runs the new bytes.
#[test]
fn a_branch_into_code_the_guest_rewrote_runs_the_new_code() {
    const F: u64 = 0x8100;
    let code = asm(32, |a| {
        a.mov(ebx, 0u32).unwrap();
        a.mov(esi, 3u32).unwrap();
        a.mov(ebp, F as u32).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.call(F).unwrap();
        a.add(ebx, eax).unwrap();
        // F's `mov eax, imm32`: imm += 1 (a write to cached code, in the loop's own page).
        a.inc(byte_ptr(ebp + 1)).unwrap();
        a.dec(esi).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    // F: mov eax, 1; ret
    poke(&mem, F, &[0xb8, 1, 0, 0, 0, 0xc3]);
    let state = protected32(&mem);
    let (out, _) = run(mem, &state);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rbx, 1 + 2 + 3);
    assert_eq!(out.state.regs.rsp, STACK);
}

/// POPF setting TF before a run of chainable JMPs: the single-step trap follows the first JMP
/// (SDM Vol. 3A §18.3.1.4), as it would without chaining.
#[test]
fn tf_set_before_chained_jumps_traps_after_the_first() {
    const A: u64 = 0x8100;
    const B: u64 = 0x8180;
    let code = asm(32, |a| {
        a.mov(ecx, 50u32).unwrap();
        // A chained loop first, so the run is in block mode when TF comes on.
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x100).unwrap();
        a.popfd().unwrap();
        a.jmp(A).unwrap();
    });
    let mem = memory(&code);
    // A: jmp B (EB 7E); B: hlt
    poke(&mem, A, &[0xeb, (B - A - 2) as u8]);
    poke(&mem, B, &[0xf4]);
    let state = protected32(&mem);
    let (out, _) = run(mem.clone(), &state);
    assert_eq!(stub_vector(&out.state), Some(1), "{:#x}", out.state.regs.rip);
    // The stub pushed the vector above the frame: EIP, CS, EFLAGS.
    let top = out.state.regs.rsp;
    assert_eq!(u64::from(peek32(&mem, top + 4)), A);
    assert_eq!(out.state.regs.rcx, 0);
}

/// A code breakpoint armed after a chained loop is taken at the branch target it names, before
/// that instruction runs (a fault, SDM Vol. 3A §18.3.1.1).
#[test]
fn a_code_breakpoint_on_a_branch_target_is_taken() {
    const T: u64 = 0x8200;
    let code = asm(32, |a| {
        a.xor(edx, edx).unwrap();
        a.mov(ecx, 50u32).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.mov(eax, T as u32).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(eax, 1u32).unwrap(); // L0, execute, 1 byte
        a.mov(dr7, eax).unwrap();
        let mut next = a.create_label();
        a.jmp(next).unwrap();
        a.set_label(&mut next).unwrap();
        a.jmp(T).unwrap();
    });
    let mem = memory(&code);
    // T: mov edx, 5; hlt
    poke(&mem, T, &[0xba, 5, 0, 0, 0, 0xf4]);
    let state = protected32(&mem);
    let (out, _) = run(mem.clone(), &state);
    assert_eq!(stub_vector(&out.state), Some(1), "{:#x}", out.state.regs.rip);
    assert_eq!(u64::from(peek32(&mem, out.state.regs.rsp + 4)), T);
    assert_eq!(out.state.regs.rdx, 0, "the instruction at the breakpoint did not run");
}

/// The dedicated near CALL/RET handlers keep the operand size of the encoding: in real mode an
/// O32 CALL pushes 4 bytes and an O32 RET pops them; RET imm16 releases its bytes.
#[test]
fn near_call_and_ret_keep_operand_size_and_release_bytes() {
    // 0x8000: push word 0x1234; call 0x8100 (16-bit); o32 call 0x8200; hlt
    let mut code = vec![0x68, 0x34, 0x12];
    code.push(0xe8);
    code.extend_from_slice(&(0x8100u16.wrapping_sub(0x8003 + 3)).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xe8]);
    code.extend_from_slice(&(0x8200u32.wrapping_sub(0x8006 + 6)).to_le_bytes());
    code.push(0xf4);
    let mem = memory(&code);
    // 0x8100: mov ax, 7; ret 2 (drops the pushed word)
    poke(&mem, 0x8100, &[0xb8, 7, 0, 0xc2, 2, 0]);
    // 0x8200: mov bx, [esp] via sp: mov bp, sp; mov ebx, [bp]; o32 ret
    poke(&mem, 0x8200, &[0x89, 0xe5, 0x66, 0x8b, 0x5e, 0x00, 0x66, 0xc3]);
    let state = real_mode(&mem);
    let (out, _) = run(mem, &state);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax & 0xffff, 7);
    assert_eq!(out.state.regs.rbx & 0xffff_ffff, 0x800c, "O32 CALL pushed a 4-byte return address");
    assert_eq!(out.state.regs.rsp & 0xffff, 0x7000);
    assert_eq!(out.state.regs.rip, 0x800d);
}
