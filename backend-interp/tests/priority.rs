//! Instruction breakpoints (DR0–DR3, DR7) and the priority of simultaneous events on one
//! instruction (SDM Vol. 3A §6.9, Table 6-2): a code breakpoint (priority 7) before a fault on
//! fetching the instruction (8: CS limit, code page fault), and the CS limit before the page
//! fault (segmentation precedes paging, SDM Vol. 3A §5.3). The SDM decides: this host's KVM
//! runs debug registers through its own guest-debug machinery.

mod common;

use common::*;
use duet_core::state::rflags;
use duet_core::{CpuState, GuestMemory};
use iced_x86::code_asm::*;

/// Where a test's #DB handler lives.
const HANDLER: u64 = CODE + 0x800;
/// Where the handler stores DR6, the saved EIP and the saved EFLAGS.
const OUT: u64 = 0x9000;

/// Points IDT vector 1 of the 32-bit test IDT (written by `protected32`) at [`HANDLER`], which counts #DBs in EBX, stores
/// DR6 and the frame's EIP and EFLAGS at [`OUT`], and IRETs.
fn install_db_handler(mem: &GuestMemory) {
    let gate = (HANDLER & 0xffff)
        | (u64::from(sel::CODE32) << 16)
        | (0x8e_u64 << 40)
        | ((HANDLER & 0xffff_0000) << 32);
    poke(mem, IDT + 8, &gate.to_le_bytes());
    let h = asm(32, |a| {
        a.inc(ebx).unwrap();
        a.mov(eax, dr6).unwrap();
        a.mov(dword_ptr(OUT), eax).unwrap();
        a.mov(eax, dword_ptr(esp)).unwrap();
        a.mov(dword_ptr(OUT + 4), eax).unwrap();
        a.mov(eax, dword_ptr(esp + 8)).unwrap();
        a.mov(dword_ptr(OUT + 8), eax).unwrap();
        a.iretd().unwrap();
    });
    poke(mem, HANDLER, &h);
}

/// 32-bit code that arms DR0 as an instruction breakpoint on `at` (DR7.L0, R/W0 = LEN0 = 00),
/// then jumps there.
fn arm_and_jump(at: u64) -> Vec<u8> {
    asm(32, |a| {
        a.mov(eax, at as u32).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(eax, 1).unwrap();
        a.mov(dr7, eax).unwrap();
        a.mov(eax, at as u32).unwrap();
        a.jmp(eax).unwrap();
    })
}

/// The 32-bit stack words from ESP upwards.
fn stack32(mem: &GuestMemory, s: &CpuState, n: u64) -> Vec<u64> {
    (0..n).map(|i| u64::from(peek32(mem, s.regs.rsp + 4 * i))).collect()
}

#[test]
fn code_breakpoint_is_a_fault_taken_once_thanks_to_rf() {
    let target = CODE + 0x100;
    let mem = memory(&arm_and_jump(target));
    poke(
        &mem,
        target,
        &asm(32, |a| {
            a.inc(ecx).unwrap();
            a.hlt().unwrap();
        }),
    );
    let s = protected32(&mem);
    install_db_handler(&mem);
    let (out, _) = run(mem.clone(), &s);
    // One #DB before INC ran (a fault: saved EIP = the INC, RF = 1 in the image, SDM Vol. 3A
    // §18.3.1.1), then IRET's RF = 1 lets the INC run once; DR6.B0 names DR0 (§18.2.3).
    assert_eq!((out.state.regs.rbx, out.state.regs.rcx), (1, 1));
    assert_eq!(peek32(&mem, OUT) & 0xf, 1);
    assert_eq!(u64::from(peek32(&mem, OUT + 4)), target);
    assert_ne!(u64::from(peek32(&mem, OUT + 8)) & rflags::RF, 0);
    assert_eq!(out.state.regs.rip, target + 2);
    // RF is cleared again once an instruction retires.
    assert_eq!(out.state.regs.rflags & rflags::RF, 0);
}

#[test]
fn single_step_sets_dr6_bs() {
    let code = asm(32, |a| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), rflags::TF as i32).unwrap();
        a.popfd().unwrap();
        a.nop().unwrap(); // the trap comes after this one
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    install_db_handler(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.state.regs.rbx, 1);
    assert_ne!(peek32(&mem, OUT) & (1 << 14), 0, "DR6.BS");
}

#[test]
fn code_breakpoint_wins_over_a_code_page_fault() {
    for armed in [true, false] {
        let target = 0x30_0000u64;
        let mut code = arm_and_jump(target);
        if !armed {
            code = asm(32, |a| {
                a.mov(eax, target as u32).unwrap();
                a.jmp(eax).unwrap();
            });
        }
        let mem = memory(&code);
        let s = paging32(&mem, protected32(&mem));
        set_pte32(&mem, target, 0);
        let (out, _) = run(mem.clone(), &s);
        let st = stack32(&mem, &out.state, 3);
        if armed {
            // #DB (no error code): [vector, EIP, CS].
            assert_eq!(stub_vector(&out.state), Some(1));
            assert_eq!(st[1], target);
        } else {
            assert_eq!(stub_vector(&out.state), Some(14));
            // Error code 0: not present, supervisor, and no I/D without NX paging (§4.7).
            assert_eq!((st[1], st[2]), (0, target));
            assert_eq!(out.state.sregs.cr2, target);
        }
    }
}

#[test]
fn code_breakpoint_wins_over_the_cs_limit_and_the_limit_over_a_page_fault() {
    // CS limit ends just after two NOPs: the fetch after them is beyond it.
    let end = CODE + 0x100;
    for armed in [true, false] {
        let code = asm(32, |a| {
            if armed {
                a.mov(eax, end as u32).unwrap();
                a.mov(dr0, eax).unwrap();
                a.mov(eax, 1).unwrap();
                a.mov(dr7, eax).unwrap();
            }
            a.mov(eax, (end - 2) as u32).unwrap();
            a.jmp(eax).unwrap();
        });
        let mem = memory(&code);
        poke(&mem, end - 2, &[0x90; 4]);
        let mut s = protected32(&mem);
        s.sregs.cs.limit = (end - 1) as u32;
        let (out, _) = run(mem.clone(), &s);
        let st = stack32(&mem, &out.state, 3);
        if armed {
            // #DB (no error code): [vector, EIP, …].
            assert_eq!((stub_vector(&out.state), st[1]), (Some(1), end));
        } else {
            // #GP(0): [vector, error, EIP, …].
            assert_eq!((stub_vector(&out.state), st[1], st[2]), (Some(13), 0, end));
        }
    }
    // An instruction that runs past the CS limit into a not-present page: #GP(0), not #PF.
    let at = 0x30_0ffdu64;
    for limit_hit in [true, false] {
        let mem = memory(&asm(32, |a| {
            a.mov(eax, at as u32).unwrap();
            a.jmp(eax).unwrap();
        }));
        poke(&mem, at, &[0xb8, 1, 2, 3, 4]); // mov eax, imm32 across 0x30_1000
        let mut s = paging32(&mem, protected32(&mem));
        set_pte32(&mem, 0x30_1000, 0);
        if limit_hit {
            s.sregs.cs.limit = 0x30_0fff;
        }
        let (out, _) = run(mem.clone(), &s);
        let st = stack32(&mem, &out.state, 3);
        if limit_hit {
            assert_eq!((stub_vector(&out.state), st[1], st[2]), (Some(13), 0, at));
        } else {
            assert_eq!((stub_vector(&out.state), st[2]), (Some(14), at));
            assert_eq!(out.state.sregs.cr2, 0x30_1000);
        }
    }
}
