//! Exception delivery: #DE, #PF error codes and CR2, #UD, #GP, double and triple fault, INT n.
//! The test IDTs send every vector to a stub that pushes the vector number and halts, so the
//! frame the CPU pushed sits right above it on the stack.

mod common;

use common::*;
use duet_core::{CpuState, GuestMemory, StopReason};
use iced_x86::code_asm::*;

/// Halted at the end of the stub for `vector` (protected/long mode stub: push imm32 (5) + hlt).
fn assert_in_stub(s: &CpuState, vector: u64) {
    assert_eq!(s.regs.rip, STUBS + vector * 8 + 6, "expected the stub of vector {vector}");
}

/// The 32-bit stack words from ESP upwards.
fn stack32(mem: &GuestMemory, s: &CpuState, n: usize) -> Vec<u32> {
    (0..n).map(|i| peek32(mem, (s.regs.rsp & 0xffff_ffff) + 4 * i as u64)).collect()
}

#[test]
fn div_by_zero_raises_de_through_the_idt() {
    let mut div_at = 0;
    let code = asm(32, |a| {
        a.xor(edx, edx).unwrap();
        a.mov(eax, 1).unwrap();
        a.xor(ecx, ecx).unwrap();
        div_at = 9; // XOR (2) + MOV r32, imm32 (5) + XOR (2) before DIV
        a.div(ecx).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted);
    assert_in_stub(&out.state, 0);
    // #DE is a fault without an error code: [vector, EIP of DIV, CS, EFLAGS] (SDM Vol. 3A §6.12.1).
    let st = stack32(&mem, &out.state, 4);
    assert_eq!(st[0], 0);
    assert_eq!(u64::from(st[1]), CODE + div_at);
    assert_eq!(st[2], u32::from(sel::CODE32));
    // A fault pushes RF = 1 in the EFLAGS image (SDM Vol. 3A §18.3.1.1).
    assert_ne!(st[3] & (1 << 16), 0);
    assert_eq!(out.state.regs.rsp, STACK - 16);
}

#[test]
fn div_overflow_in_real_mode_uses_the_ivt() {
    // AX = 0x1000 / BL = 1: quotient 0x1000 does not fit AL → #DE (SDM Vol. 2A DIV).
    let code = asm(16, |a| {
        a.mov(ax, 0x1000).unwrap();
        a.mov(bl, 1).unwrap();
        a.div(bl).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    let (out, _) = run(mem.clone(), &s);
    // Real-mode stub: push imm16 (3 bytes) + hlt.
    assert_eq!(out.state.regs.rip, STUBS + 4);
    let top = out.state.regs.rsp;
    let w = |o: u64| peek32(&mem, top + o) & 0xffff;
    // [vector, IP of DIV, CS, FLAGS] (SDM Vol. 3A §20.1.4).
    assert_eq!((w(0), u64::from(w(2)), w(4)), (0, CODE + 5, 0));
    assert_eq!(out.state.regs.rflags & duet_core::state::rflags::IF, 0);
}

#[test]
fn page_fault_on_write_to_not_present_page() {
    let code = asm(32, |a| {
        a.mov(dword_ptr(0x30_0010), 1).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = paging32(&mem, protected32(&mem));
    set_pte32(&mem, 0x30_0000, 0);
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 14);
    let st = stack32(&mem, &out.state, 3);
    // Error code: P = 0 (not present), W/R = 1 (write), U/S = 0 (supervisor) (SDM Vol. 3A §4.7).
    assert_eq!((st[0], st[1], u64::from(st[2])), (14, 0b010, CODE));
    assert_eq!(out.state.sregs.cr2, 0x30_0010);
}

#[test]
fn page_fault_on_user_read_of_supervisor_page() {
    let user_stack = 0x5_0000u32;
    let user_at = CODE + 0x100;
    let code = asm(32, |a| {
        // DS must be usable at ring 3, or IRET nulls it (SDM Vol. 2A IRET, "RETURN-TO-OUTER-PRIVILEGE-LEVEL").
        a.mov(ax, sel::UDATA as u32).unwrap();
        a.mov(ds, ax).unwrap();
        // IRETD to ring 3: SS, ESP, EFLAGS, CS, EIP.
        a.push(u32::from(sel::UDATA)).unwrap();
        a.push(user_stack).unwrap();
        a.push(0x2).unwrap();
        a.push(u32::from(sel::UCODE32)).unwrap();
        a.push(user_at as u32).unwrap();
        a.iretd().unwrap();
    });
    let user = asm(32, |a| {
        a.mov(eax, dword_ptr(0x30_1008)).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, user_at, &user);
    let s = paging32(&mem, protected32(&mem));
    set_pte32(&mem, 0x30_1000, 0x30_1000 | 3); // present, writable, supervisor
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 14);
    // Privilege change: the frame is on the ring-0 stack from the TSS (ESP0 = STACK0):
    // [vector, error, EIP, CS, EFLAGS, ESP, SS].
    let st = stack32(&mem, &out.state, 7);
    assert_eq!(out.state.regs.rsp, STACK0 - 28);
    // Error code: P = 1 (protection), W/R = 0 (read), U/S = 1 (user).
    assert_eq!((st[0], st[1]), (14, 0b101));
    assert_eq!(u64::from(st[2]), user_at);
    assert_eq!((st[3], st[5], st[6]), (u32::from(sel::UCODE32), user_stack, u32::from(sel::UDATA)));
    assert_eq!(out.state.sregs.cr2, 0x30_1008);
    assert_eq!(out.state.cpl(), 0);
}

#[test]
fn ud2_raises_ud_and_bad_selector_raises_gp_with_its_index() {
    let code = asm(32, |a| {
        a.ud2().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 6);
    assert_eq!(u64::from(stack32(&mem, &out.state, 2)[1]), CODE);

    // Selector 0x1230 lies beyond the GDT limit: #GP(selector & 0xfffc) (SDM Vol. 2B MOV).
    let code = asm(32, |a| {
        a.mov(ax, 0x1233).unwrap();
        a.mov(ds, ax).unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 13);
    assert_eq!(stack32(&mem, &out.state, 2), vec![13, 0x1230]);
}

#[test]
fn fault_delivering_gp_becomes_double_fault() {
    let code = asm(32, |a| {
        a.mov(ax, 0x1233).unwrap();
        a.mov(ds, ax).unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    // Mark the #GP gate not present: #NP while delivering #GP → #DF (SDM Vol. 3A Table 6-5).
    let gate = peek64(&mem, IDT + 13 * 8) & !(1 << 47);
    poke(&mem, IDT + 13 * 8, &gate.to_le_bytes());
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 8);
    // #DF pushes error code 0 and the EIP of the instruction that faulted first.
    assert_eq!(stack32(&mem, &out.state, 3), vec![8, 0, (CODE + 4) as u32]);
}

#[test]
fn exception_with_empty_idt_triple_faults() {
    let code = asm(32, |a| {
        a.ud2().unwrap();
    });
    let mem = memory(&code);
    let mut s = protected32(&mem);
    s.sregs.idt.limit = 0;
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Shutdown);
}

#[test]
fn int_n_and_int3_push_the_next_eip() {
    let code = asm(32, |a| {
        a.int(0x40).unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 0x40);
    assert_eq!(u64::from(stack32(&mem, &out.state, 2)[1]), CODE + 2);
    let code = asm(32, |a| {
        a.int3().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 3);
    let st = stack32(&mem, &out.state, 4);
    assert_eq!(u64::from(st[1]), CODE + 1);
    // INT3 is a trap: RF is pushed as it was, 0.
    assert_eq!(st[3] & (1 << 16), 0);
}

#[test]
fn long_mode_non_canonical_access_is_gp_with_aligned_frame() {
    let code = asm(64, |a| {
        a.mov(rax, 0x0000_8000_0000_0000u64).unwrap();
        a.mov(rbx, qword_ptr(rax)).unwrap();
    });
    let mem = memory(&code);
    let mut s = long64(&mem);
    s.regs.rsp = STACK - 8; // misaligned: delivery aligns RSP to 16 first (SDM Vol. 3A §6.14.2)
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 13);
    let q = |i: u64| peek64(&mem, out.state.regs.rsp + 8 * i);
    // [vector, error 0, RIP, CS, RFLAGS, RSP, SS]
    assert_eq!((q(0), q(1), q(2), q(3)), (13, 0, CODE + 10, u64::from(sel::CODE64)));
    assert_eq!(q(5), STACK - 8);
    assert_eq!(out.state.regs.rsp, STACK - 16 - 7 * 8);
}

#[test]
fn instruction_longer_than_15_bytes_is_gp() {
    // Fifteen operand-size prefixes before NOP: 16 bytes in all.
    let mut code = vec![0x66; 15];
    code.push(0x90);
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_in_stub(&out.state, 13);
    assert_eq!(stack32(&mem, &out.state, 3), vec![13, 0, CODE as u32]);
}

#[test]
fn long_mode_fault_frame_has_rf_set_and_trap_frame_not() {
    // SDM Vol. 3A §18.3.1.1: the RFLAGS image a fault pushes has RF = 1, in IA-32e mode too
    // (KVM agrees: the `fault-long` fixture). Frame above the stub's vector: RIP, CS, RFLAGS.
    for (fault, vector) in [(true, 6u64), (false, 3)] {
        let code = asm(64, |a| {
            if fault {
                a.ud2().unwrap();
            } else {
                a.int3().unwrap();
            }
        });
        let mem = memory(&code);
        let s = long64(&mem);
        let (out, _) = run(mem.clone(), &s);
        assert_eq!(stub_vector(&out.state), Some(vector));
        let pushed = peek64(&mem, out.state.regs.rsp + 24);
        assert_eq!(pushed & (1 << 16) != 0, fault, "vector {vector}: RFLAGS image {pushed:#x}");
    }
}
