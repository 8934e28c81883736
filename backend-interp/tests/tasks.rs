//! Hardware task switches (SDM Vol. 3A §8.3): CALL to a TSS and IRET back through the link,
//! and an exception delivered through a task gate with its error code on the new task's stack;
//! and the other legacy protected-mode task environment, virtual-8086 mode (Chapter 20).

mod common;

use common::*;
use duet_core::state::{ctrl, rflags};
use duet_core::{CpuState, GuestMemory, Segment, StopReason};
use iced_x86::code_asm::*;

const TSS_B: u64 = 0x700;
const TSS_B_SEL: u16 = 0x48;
const TASK_B: u64 = CODE + 0x100;

/// Writes TSS B (32-bit, available) whose task starts at `TASK_B` with flat ring-0 segments.
fn setup_task_b(mem: &GuestMemory, s: &mut CpuState) {
    let desc = Segment { base: TSS_B, limit: 0x67, type_: 0x9, present: true, ..Segment::default() };
    poke(mem, GDT + u64::from(TSS_B_SEL), &desc.to_descriptor().to_le_bytes());
    s.sregs.gdt.limit = 10 * 8 - 1;
    // The running task's TSS descriptor is busy, as LTR leaves it.
    let a = peek64(mem, GDT + u64::from(sel::TSS)) | (2 << 40);
    poke(mem, GDT + u64::from(sel::TSS), &a.to_le_bytes());
    let w = |o: u64, v: u32| poke(mem, TSS_B + o, &v.to_le_bytes());
    w(0x20, TASK_B as u32); // EIP
    w(0x24, 0x2); // EFLAGS
    w(0x38, 0x6_0000); // ESP
    for (i, sel) in [sel::DATA, sel::CODE32, sel::DATA, sel::DATA, sel::DATA, sel::DATA].iter().enumerate() {
        w(0x48 + 4 * i as u64, u32::from(*sel)); // ES, CS, SS, DS, FS, GS
    }
}

#[test]
fn call_to_tss_and_iret_return_through_the_back_link() {
    let code = asm(32, |a| {
        a.mov(eax, 1).unwrap();
        a.call_far(TSS_B_SEL, 0).unwrap();
        a.mov(ecx, 2).unwrap();
        a.hlt().unwrap();
    });
    let task_b = asm(32, |a| {
        a.mov(dword_ptr(0x9000), 0xb).unwrap();
        a.pushfd().unwrap();
        a.pop(dword_ptr(0x9004)).unwrap();
        a.iretd().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, TASK_B, &task_b);
    let mut s = protected32(&mem);
    setup_task_b(&mem, &mut s);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    // Task B ran with NT set (it was CALLed), and linked back to task A's TSS.
    assert_eq!(peek32(&mem, 0x9000), 0xb);
    assert_ne!(u64::from(peek32(&mem, 0x9004)) & rflags::NT, 0);
    assert_eq!(peek32(&mem, TSS_B) & 0xffff, u32::from(sel::TSS));
    // Back in task A: its registers came back from its TSS, TR is A again, CR0.TS is set.
    let st = &out.state;
    assert_eq!((st.regs.rax, st.regs.rcx), (1, 2));
    assert_eq!(st.sregs.tr.selector, sel::TSS);
    assert_ne!(st.sregs.cr0 & ctrl::CR0_TS, 0);
    // IRET freed task B: its descriptor is available (type 9) again.
    assert_eq!((peek64(&mem, GDT + u64::from(TSS_B_SEL)) >> 40) & 0xf, 0x9);
}

#[test]
fn exception_through_a_task_gate_pushes_the_error_code_on_the_new_stack() {
    let code = asm(32, |a| {
        a.mov(ax, 0x1233).unwrap();
        a.mov(ds, ax).unwrap();
    });
    let task_b = asm(32, |a| {
        a.pop(eax).unwrap();
        a.mov(dword_ptr(0x9000), eax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, TASK_B, &task_b);
    let mut s = protected32(&mem);
    setup_task_b(&mem, &mut s);
    // IDT vector 13: task gate (type 5, present) to TSS B.
    let gate = (u64::from(TSS_B_SEL) << 16) | (0x85 << 40);
    poke(&mem, IDT + 13 * 8, &gate.to_le_bytes());
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    // #GP(0x1230) landed on task B's stack; task A's EIP (the faulting MOV) is in its TSS.
    assert_eq!(peek32(&mem, 0x9000), 0x1230);
    assert_eq!(u64::from(peek32(&mem, TSS + 0x20)), CODE + 4);
    assert_eq!(out.state.sregs.tr.selector, TSS_B_SEL);
    assert_ne!(out.state.regs.rflags & rflags::NT, 0);
    assert_eq!(out.state.regs.rsp, 0x6_0000);
}

#[test]
fn iret_into_virtual_8086_mode_and_a_gp_back_to_ring0() {
    let v86_code = 0x9100u64;
    let code = asm(32, |a| {
        // IRETD frame for virtual-8086 mode: GS, FS, DS, ES, SS, ESP, EFLAGS (VM), CS, EIP.
        for v in [0u32, 0, 0, 0, 0, 0x7000, (rflags::VM | 2) as u32, 0, v86_code as u32] {
            a.push(v).unwrap();
        }
        a.iretd().unwrap();
    });
    let v86 = asm(16, |a| {
        a.mov(ax, 0x900).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(byte_ptr(0x10), 0x5a).unwrap(); // 0x900 × 16 + 0x10
        a.cli().unwrap(); // IOPL 0: #GP(0) (SDM Vol. 3A §20.2.7)
    });
    let cli_ip = v86_code + v86.len() as u64 - 1;
    let mem = memory(&code);
    poke(&mem, v86_code, &v86);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(peek32(&mem, 0x9010) & 0xff, 0x5a);
    let st = &out.state;
    assert_eq!(st.regs.rip, STUBS + 13 * 8 + 6, "halted in the #GP stub");
    // Ring-0 frame from virtual-8086 mode (SDM Vol. 3A Figure 20-2):
    // [vector, error, EIP, CS, EFLAGS, ESP, SS, ES, DS, FS, GS].
    let f: Vec<u32> = (0..11).map(|i| peek32(&mem, st.regs.rsp + 4 * i)).collect();
    assert_eq!((f[0], f[1], u64::from(f[2]), f[3]), (13, 0, cli_ip, 0));
    assert_ne!(u64::from(f[4]) & rflags::VM, 0);
    assert_eq!((f[5], f[6], f[7], f[8]), (0x7000, 0, 0, 0x900));
    // The handler runs in protected mode at ring 0 with null data segments.
    assert_eq!(st.regs.rflags & rflags::VM, 0);
    assert!(st.sregs.ds.unusable);
    assert_eq!(st.cpl(), 0);
}

#[test]
fn call_to_a_16bit_tss_and_iret_back() {
    // SDM Vol. 3A §8.6, Figure 8-11: a 16-bit TSS holds IP, FLAGS, AX…DI, ES, CS, SS, DS and the
    // LDT selector as words; it has no CR3, FS or GS (those stay as they were).
    const TSS16: u64 = 0x780;
    let code = asm(32, |a| {
        a.mov(ax, sel::UDATA as u32).unwrap();
        a.mov(fs, ax).unwrap();
        a.mov(eax, 1).unwrap();
        a.call_far(TSS_B_SEL, 0).unwrap();
        a.mov(ecx, 2).unwrap();
        a.hlt().unwrap();
    });
    let task_b = asm(32, |a| {
        a.mov(dword_ptr(0x9000), eax).unwrap();
        a.pushfd().unwrap();
        a.pop(dword_ptr(0x9004)).unwrap();
        a.mov(dword_ptr(0x9008), fs).unwrap();
        a.mov(dword_ptr(0x900c), esp).unwrap();
        a.mov(esi, 0x1234_5678).unwrap();
        a.iretd().unwrap();
    });
    let iret_end = TASK_B + task_b.len() as u64;
    let mem = memory(&code);
    poke(&mem, TASK_B, &task_b);
    let mut s = protected32(&mem);
    setup_task_b(&mem, &mut s);
    let desc = Segment { base: TSS16, limit: 0x2b, type_: 0x1, present: true, ..Segment::default() };
    poke(&mem, GDT + u64::from(TSS_B_SEL), &desc.to_descriptor().to_le_bytes());
    let w = |o: u64, v: u16| poke(&mem, TSS16 + o, &v.to_le_bytes());
    w(0x0e, TASK_B as u16); // IP
    w(0x10, (rflags::CF | 2) as u16); // FLAGS
    for (i, v) in [0x1111u16, 0x2222, 0x3333, 0x4444, 0x6000, 0x6666, 0x7777, 0x8888].into_iter().enumerate()
    {
        w(0x12 + 2 * i as u64, v); // AX, CX, DX, BX, SP, BP, SI, DI
    }
    for (i, sel) in [sel::DATA, sel::CODE32, sel::DATA, sel::DATA].into_iter().enumerate() {
        w(0x22 + 2 * i as u64, sel); // ES, CS, SS, DS
    }
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    // Task B: EAX from the AX word (upper half zero), FLAGS with CF and NT, FS untouched.
    assert_eq!(peek32(&mem, 0x9000), 0x1111);
    assert_eq!(u64::from(peek32(&mem, 0x9004)) & (rflags::CF | rflags::NT), rflags::CF | rflags::NT);
    assert_eq!(peek32(&mem, 0x9008) & 0xffff, u32::from(sel::UDATA));
    assert_eq!(peek32(&mem, 0x900c), 0x6000);
    // The link names task A; IRET saved B's IP and SI as words and freed its descriptor (type 1).
    assert_eq!(peek32(&mem, TSS16) & 0xffff, u32::from(sel::TSS));
    assert_eq!(u64::from(peek32(&mem, TSS16 + 0x0e) & 0xffff), iret_end);
    assert_eq!(peek32(&mem, TSS16 + 0x1e) & 0xffff, 0x5678);
    assert_eq!((peek64(&mem, GDT + u64::from(TSS_B_SEL)) >> 40) & 0xf, 0x1);
    // Back in task A.
    assert_eq!((out.state.regs.rax, out.state.regs.rcx), (1, 2));
    assert_eq!(out.state.sregs.tr.selector, sel::TSS);
}
