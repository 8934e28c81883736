//! Mode switches: real → protected by a far jump, protected → long mode by CR0.PG with
//! EFER.LME (SDM Vol. 3A §10.9 and §10.8.5), far calls and returns, IRET to ring 3.

mod common;

use common::*;
use duet_core::state::ctrl;
use duet_core::{CpuMode, StopReason};
use iced_x86::code_asm::*;

const PM32: u64 = CODE + 0x100;
const LM64: u64 = CODE + 0x200;
const GDTR: u64 = 0x900;

#[test]
fn far_jumps_switch_real_to_protected_to_long_mode() {
    let real = asm(16, |a| {
        a.cli().unwrap();
        a.lgdt(ptr(GDTR)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(sel::CODE32, PM32 as u32).unwrap();
    });
    let pm = asm(32, |a| {
        a.mov(ax, u32::from(sel::DATA)).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, STACK as u32).unwrap();
        a.mov(al, b'P' as u32).unwrap();
        a.out(0xe9, al).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, ctrl::CR4_PAE as u32).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PT as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, ctrl::EFER_LME as u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, ctrl::CR0_PG as u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(sel::CODE64, LM64 as u32).unwrap();
    });
    let lm = asm(64, |a| {
        a.mov(al, b'L' as u32).unwrap();
        a.out(0xe9, al).unwrap();
        a.mov(rbx, 0x1122_3344_5566_7788u64).unwrap();
        a.push(rbx).unwrap();
        a.pop(rcx).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&real);
    let _ = long64(&mem); // GDT and identity-mapped page tables
    let s = real_mode(&mem);
    poke(&mem, PM32, &pm);
    poke(&mem, LM64, &lm);
    let mut gdtr = ((gdt().len() * 8 - 1) as u16).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&(GDT as u32).to_le_bytes());
    poke(&mem, GDTR, &gdtr);
    let (out, console) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    assert_eq!(console.text(), b"PL");
    assert_eq!(out.state.mode(), CpuMode::Long64);
    // SDM Vol. 3A §10.8.5: setting CR0.PG with EFER.LME = 1 sets EFER.LMA.
    assert_ne!(out.state.sregs.efer & ctrl::EFER_LMA, 0);
    assert_eq!(out.state.regs.rcx, 0x1122_3344_5566_7788);
    assert_eq!(out.state.regs.rsp, STACK);
    assert_eq!(out.state.sregs.cs.selector, sel::CODE64);
}

#[test]
fn enabling_paging_with_lme_but_no_pae_is_gp() {
    let code = asm(32, |a| {
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, ctrl::EFER_LME as u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, ctrl::CR0_PG as u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    // Stub of vector 13 halted: push imm32 + hlt.
    assert_eq!(out.state.regs.rip, STUBS + 13 * 8 + 6);
    assert_eq!(out.state.sregs.efer & ctrl::EFER_LMA, 0);
}

#[test]
fn far_call_and_retf_in_protected_mode() {
    let target = CODE + 0x80;
    let code = asm(32, |a| {
        a.call_far(sel::CODE32, target as u32).unwrap();
        a.mov(ebx, 0x55).unwrap();
        a.hlt().unwrap();
    });
    let sub = asm(32, |a| {
        a.mov(ecx, dword_ptr(esp + 4)).unwrap();
        a.retf().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, target, &sub);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted);
    // CALL far pushed CS then EIP: [esp+4] is the old CS.
    assert_eq!(out.state.regs.rcx, u64::from(sel::CODE32));
    assert_eq!(out.state.regs.rbx, 0x55);
    assert_eq!(out.state.regs.rsp, STACK);
}

#[test]
fn real_mode_call_ret_loop_and_string_copy() {
    let code = asm(16, |a| {
        let mut f = a.create_label();
        let mut top = a.create_label();
        a.mov(cx, 5).unwrap();
        a.xor(ax, ax).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(f).unwrap();
        a.loop_(top).unwrap();
        // Copy 4 bytes from 0x9000 to 0x9100 with REP MOVSB.
        a.mov(si, 0x9000).unwrap();
        a.mov(di, 0x9100).unwrap();
        a.mov(cx, 4).unwrap();
        a.cld().unwrap();
        a.rep().movsb().unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        a.add(ax, 3).unwrap();
        a.ret().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, 0x9000, b"duet");
    let s = real_mode(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax & 0xffff, 15);
    assert_eq!(out.state.regs.rcx & 0xffff, 0);
    assert_eq!((out.state.regs.rsi & 0xffff, out.state.regs.rdi & 0xffff), (0x9004, 0x9104));
    assert_eq!(peek32(&mem, 0x9100).to_le_bytes(), *b"duet");
}

#[test]
fn repne_scasb_stops_at_the_match() {
    let code = asm(32, |a| {
        a.mov(edi, 0x9000).unwrap();
        a.mov(ecx, 100).unwrap();
        a.mov(al, 0).unwrap();
        a.cld().unwrap();
        a.repne().scasb().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, 0x9000, b"hello\0");
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    // Six bytes scanned (the NUL included): EDI one past it, ECX = 100 − 6, ZF = 1.
    assert_eq!(out.state.regs.rdi, 0x9006);
    assert_eq!(out.state.regs.rcx, 94);
    assert_ne!(out.state.regs.rflags & duet_core::state::rflags::ZF, 0);
}

#[test]
fn enter_with_nesting_level_copies_the_display() {
    let code = asm(32, |a| {
        a.mov(ebp, 0x6_ff00).unwrap();
        a.mov(dword_ptr(0x6_fefc), 0xaaaa).unwrap();
        a.enter(8, 2).unwrap();
        a.mov(esi, esp).unwrap();
        a.mov(edi, ebp).unwrap();
        a.leave().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    // SDM Vol. 2A ENTER, level 2: old EBP, one copied frame pointer, then the new frame pointer.
    assert_eq!(
        (peek32(&mem, 0x6_fffc), peek32(&mem, 0x6_fff8), peek32(&mem, 0x6_fff4)),
        (0x6_ff00, 0xaaaa, 0x6_fffc)
    );
    assert_eq!((out.state.regs.rdi, out.state.regs.rsi), (0x6_fffc, 0x6_ffec));
    // LEAVE undoes it.
    assert_eq!((out.state.regs.rbp, out.state.regs.rsp), (0x6_ff00, STACK));
}

#[test]
fn long_mode_call_ret_push_pop_use_eight_byte_slots() {
    let code = asm(64, |a| {
        let mut f = a.create_label();
        a.push(-2).unwrap(); // imm8 sign-extended to 64 bits
        a.pop(rbx).unwrap();
        a.call(f).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        a.mov(rcx, qword_ptr(rsp)).unwrap();
        a.mov(rdx, rsp).unwrap();
        a.ret().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    let (out, _) = run(mem, &s);
    let call_len = asm(64, |a| {
        a.push(-2).unwrap();
        a.pop(rbx).unwrap();
        a.call(CODE + 0x40).unwrap();
    })
    .len() as u64;
    assert_eq!(out.state.regs.rbx, u64::MAX - 1);
    assert_eq!(out.state.regs.rcx, CODE + call_len);
    assert_eq!(out.state.regs.rdx, STACK - 8);
    assert_eq!(out.state.regs.rsp, STACK);
}

#[test]
fn call_gate_to_ring0_switches_stack_and_copies_a_parameter() {
    let user_at = CODE + 0x80;
    let handler = CODE + 0x100;
    let gate_sel: u16 = 0x48 | 3;
    let code = asm(32, |a| {
        a.mov(ax, u32::from(sel::UDATA)).unwrap();
        a.mov(ds, ax).unwrap();
        a.push(u32::from(sel::UDATA)).unwrap();
        a.push(0x5_0000).unwrap();
        a.push(0x2).unwrap();
        a.push(u32::from(sel::UCODE32)).unwrap();
        a.push(user_at as u32).unwrap();
        a.iretd().unwrap();
    });
    let user = asm(32, |a| {
        a.push(0x1234).unwrap();
        a.call_far(gate_sel, 0).unwrap();
        a.mov(ebx, eax).unwrap();
        a.ud2().unwrap();
    });
    let kernel = asm(32, |a| {
        a.mov(eax, dword_ptr(esp + 8)).unwrap();
        a.mov(ecx, dword_ptr(esp + 4)).unwrap();
        a.mov(edx, dword_ptr(esp + 12)).unwrap();
        a.mov(esi, dword_ptr(esp + 16)).unwrap();
        a.retf_1(4).unwrap();
    });
    let mem = memory(&code);
    poke(&mem, user_at, &user);
    poke(&mem, handler, &kernel);
    let mut s = protected32(&mem);
    // 32-bit call gate (type 0xC), DPL 3, one parameter, to CODE32:handler (SDM Vol. 3A Figure 5-8).
    let gate = (handler & 0xffff)
        | (u64::from(sel::CODE32) << 16)
        | (1 << 32)
        | (0xc << 40)
        | (3 << 45)
        | (1 << 47)
        | ((handler >> 16) << 48);
    poke(&mem, GDT + 0x48, &gate.to_le_bytes());
    s.sregs.gdt.limit = 10 * 8 - 1;
    let (out, _) = run(mem.clone(), &s);
    let r = out.state.regs;
    // In the handler: [ESP] EIP, [+4] CS, [+8] the copied parameter, [+12] ESP, [+16] SS.
    assert_eq!(
        (r.rbx, r.rcx, r.rdx, r.rsi),
        (0x1234, u64::from(sel::UCODE32), 0x5_0000 - 4, u64::from(sel::UDATA))
    );
    // RETF 4 went back to ring 3 and dropped the parameter; UD2 then faulted from ring 3.
    assert_eq!(r.rip, STUBS + 6 * 8 + 6);
    let frame = |i: u64| peek32(&mem, r.rsp + 4 * i);
    assert_eq!((frame(2), frame(4), frame(5)), (u32::from(sel::UCODE32), 0x5_0000, u32::from(sel::UDATA)));
}

#[test]
fn return_to_real_mode_from_a_32bit_segment() {
    let real_at = 0x9000u64;
    let code = asm(32, |a| {
        a.mov(eax, cr0).unwrap();
        a.and(eax, !1u32).unwrap();
        a.mov(cr0, eax).unwrap();
        // Still running with the cached 32-bit CS: this far JMP has a 32-bit offset.
        a.jmp_far(0, real_at as u32).unwrap();
    });
    let real = asm(16, |a| {
        a.mov(ax, 0x1234).unwrap(); // decoded as 16-bit code after the real-mode CS load
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, real_at, &real);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    assert_eq!(out.state.mode(), CpuMode::Real);
    assert_eq!(out.state.regs.rax & 0xffff, 0x1234);
    assert_eq!(out.state.regs.rip, real_at + real.len() as u64);
    assert!(!out.state.sregs.cs.db);
}
