//! Legacy and system instructions: BCD adjust (the SDM's own examples), PUSHAD/POPAD, SHLD/SHRD,
//! LDS, CMPXCHG8B, BOUND, and a SYSCALL/SYSRET round trip into ring 3.

mod common;

use common::*;
use duet_core::state::rflags::{AF, CF, PF, SF, STATUS, ZF};
use duet_core::state::{ctrl, msr};
use duet_core::StopReason;
use iced_x86::code_asm::*;

#[test]
fn daa_and_das_match_the_sdm_examples() {
    // SDM Vol. 2A DAA example: 79H + 35H = AEH, DAA → 14H with CF = AF = 1, PF = 1.
    let code = asm(32, |a| {
        a.mov(al, 0x79).unwrap();
        a.mov(bl, 0x35).unwrap();
        a.add(al, bl).unwrap();
        a.daa().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.state.regs.rax & 0xff, 0x14);
    assert_eq!(out.state.regs.rflags & (STATUS & !duet_core::state::rflags::OF), CF | AF | PF);
    // SDM Vol. 2A DAS example: 35H − 47H = EEH, DAS → 88H with SF, AF, PF, CF.
    let code = asm(32, |a| {
        a.mov(al, 0x35).unwrap();
        a.mov(bl, 0x47).unwrap();
        a.sub(al, bl).unwrap();
        a.das().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.state.regs.rax & 0xff, 0x88);
    assert_eq!(out.state.regs.rflags & (STATUS & !duet_core::state::rflags::OF), SF | AF | PF | CF);
}

#[test]
fn aaa_aam_aad_adjust_unpacked_bcd() {
    // AAA after 8 + 5 = 0DH: AX ← AX + 106H → AH = 1, AL = 3 (SDM Vol. 2A AAA).
    // AAM on 3 × 7 = 21 → AH = 2, AL = 1; AAD back → AL = 21.
    let code = asm(16, |a| {
        a.mov(ax, 8).unwrap();
        a.add(al, 5).unwrap();
        a.aaa().unwrap();
        a.mov(bx, ax).unwrap();
        a.mov(al, 21).unwrap();
        a.aam(10).unwrap();
        a.mov(cx, ax).unwrap();
        a.aad(10).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.state.regs.rbx & 0xffff, 0x0103);
    assert_eq!(out.state.regs.rcx & 0xffff, 0x0201);
    assert_eq!(out.state.regs.rax & 0xffff, 21);
    assert_eq!(out.state.regs.rflags & ZF, 0);
}

#[test]
fn pushad_popad_round_trip_and_store_the_original_esp() {
    let code = asm(32, |a| {
        for (i, r) in [eax, ecx, edx, ebx, ebp, esi, edi].into_iter().enumerate() {
            a.mov(r, 0x100 + i as u32).unwrap();
        }
        a.pushad().unwrap();
        a.mov(ebx, dword_ptr(esp + 12)).unwrap(); // the ESP slot (SDM Vol. 2B PUSHA)
        a.mov(dword_ptr(0x9000), ebx).unwrap();
        a.xor(eax, eax).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.xor(edi, edi).unwrap();
        a.popad().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(u64::from(peek32(&mem, 0x9000)), STACK);
    let r = out.state.regs;
    assert_eq!(
        (r.rax, r.rcx, r.rdx, r.rbx, r.rbp, r.rsi, r.rdi),
        (0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106)
    );
    assert_eq!(r.rsp, STACK);
}

#[test]
fn shld_shrd_and_cmpxchg8b() {
    let code = asm(64, |a| {
        a.mov(rax, 1u64).unwrap();
        a.mov(rbx, 0x8000_0000_0000_0000u64).unwrap();
        a.shld(rax, rbx, 63).unwrap();
        a.mov(dx, 0x1234).unwrap();
        a.mov(cx, 0xabcd).unwrap();
        a.shrd(dx, cx, 4).unwrap();
        // CMPXCHG8B: EDX:EAX = memory → store ECX:EBX, ZF = 1.
        a.mov(qword_ptr(0x9000), 7).unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(r9, rdx).unwrap();
        a.mov(eax, 7).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(ebx, 0x5555).unwrap();
        a.mov(ecx, 0x6666).unwrap();
        a.cmpxchg8b(qword_ptr(0x9000)).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    let (out, _) = run(mem.clone(), &s);
    // SHLD: bit 63 from bit 0 of RAX, bits 62..0 from RBX's top 63 bits.
    assert_eq!(out.state.regs.r8, 0xc000_0000_0000_0000);
    // SHRD 0x1234 by 4 filling from 0xabcd: 0xd123.
    assert_eq!(out.state.regs.r9 & 0xffff, 0xd123);
    assert_eq!(peek64(&mem, 0x9000), 0x6666_0000_5555);
    assert_ne!(out.state.regs.rflags & ZF, 0);
}

#[test]
fn lds_loads_offset_and_selector_and_bound_raises_br() {
    let code = asm(32, |a| {
        a.lds(esi, fword_ptr(0x9000)).unwrap();
        a.mov(eax, 5).unwrap();
        a.bound(eax, qword_ptr(0x9010)).unwrap(); // 0 ≤ 5 ≤ 10: no fault
        a.mov(eax, 11).unwrap();
        a.bound(eax, qword_ptr(0x9010)).unwrap(); // 11 > 10: #BR (vector 5)
    });
    let mem = memory(&code);
    poke(&mem, 0x9000, &[0x78, 0x56, 0x34, 0x12, sel::DATA as u8, 0]);
    poke(&mem, 0x9010, &[0, 0, 0, 0, 10, 0, 0, 0]);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.state.regs.rsi, 0x1234_5678);
    assert_eq!(out.state.sregs.ds.selector, sel::DATA);
    assert_eq!(out.state.regs.rip, STUBS + 5 * 8 + 6);
}

#[test]
fn syscall_and_sysret_switch_rings() {
    let handler = CODE + 0x100;
    let code = asm(64, |a| {
        let wr = |a: &mut CodeAssembler, m: u32, v: u64| {
            a.mov(ecx, m).unwrap();
            a.mov(eax, v as u32).unwrap();
            a.mov(edx, (v >> 32) as u32).unwrap();
            a.wrmsr().unwrap();
        };
        // STAR[47:32] = kernel CS 0x30, STAR[63:48] = 0x28 (SYSRET: CS 0x38|3, SS 0x30|3).
        wr(a, msr::STAR, (0x28 << 48) | (0x30 << 32));
        wr(a, msr::LSTAR, handler);
        wr(a, msr::SFMASK, 0x200);
        wr(a, msr::EFER, ctrl::EFER_SCE | ctrl::EFER_LME | ctrl::EFER_LMA);
        a.syscall().unwrap();
        // Back here at ring 3: UD2 faults into the ring-0 stub with a stack switch.
        a.ud2().unwrap();
    });
    let kernel = asm(64, |a| {
        a.mov(r12, rcx).unwrap();
        a.mov(r13, r11).unwrap();
        a.mov(r11, 0x202u64).unwrap();
        a.sysretq().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, handler, &kernel);
    let s = long64(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    let st = &out.state;
    let ud2_at = CODE + code.len() as u64 - 2;
    // RCX held the return RIP (the UD2), R11 the RFLAGS at SYSCALL.
    assert_eq!(st.regs.r12, ud2_at);
    assert_eq!(st.regs.r13 & 0x200, 0);
    assert_eq!(st.regs.rip, STUBS + 6 * 8 + 6);
    let q = |i: u64| peek64(&mem, st.regs.rsp + 8 * i);
    // [vector, RIP, CS, RFLAGS, RSP, SS]: from ring 3 with the selectors SYSRET built.
    assert_eq!((q(0), q(1), q(2)), (6, ud2_at, 0x3b));
    assert_eq!(q(3) & 0x200, 0x200, "SYSRET loaded RFLAGS from R11");
    assert_eq!(q(5), 0x33);
    assert_eq!(st.regs.rsp, STACK0 - 6 * 8);
}

#[test]
fn lar_lsl_verr_verw_query_descriptors() {
    let code = asm(32, |a| {
        a.mov(ecx, u32::from(sel::DATA)).unwrap();
        a.lsl(eax, ecx).unwrap();
        a.lar(ebx, ecx).unwrap();
        a.setz(dl).unwrap();
        a.mov(ecx, u32::from(sel::CODE32)).unwrap();
        a.verr(cx).unwrap();
        a.setz(dh).unwrap();
        a.verw(cx).unwrap();
        a.setz(ch).unwrap(); // CX was 0x0008: CH becomes 0 (ZF = 0: code is never writable)
        a.xor(esi, esi).unwrap();
        a.mov(edi, 0x1234).unwrap();
        a.lsl(edi, esi).unwrap(); // null selector: ZF = 0, EDI kept
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    let r = out.state.regs;
    // Flat data descriptor 0x00cf_9300_0000_ffff: byte-scaled limit 4 GiB − 1; access rights are
    // bits 23:8 of its high dword masked with 0x00f0ff00 (SDM Vol. 2A LAR).
    assert_eq!(r.rax, 0xffff_ffff);
    assert_eq!(r.rbx, 0x00c0_9300);
    assert_eq!(r.rdx & 0xffff, 0x0101);
    assert_eq!((r.rcx >> 8) & 0xff, 0);
    assert_eq!(r.rdi, 0x1234);
    assert_eq!(r.rflags & ZF, 0);
}

#[test]
fn trap_flag_raises_db_after_the_next_instruction() {
    let prefix = |a: &mut CodeAssembler| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x100).unwrap();
        a.popfd().unwrap(); // TF was clear when POPFD began: no trap after it
        a.nop().unwrap(); // traps after this one
    };
    let len = asm(32, prefix).len() as u64;
    let code = asm(32, |a| {
        prefix(a);
        a.nop().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.state.regs.rip, STUBS + 8 + 6, "halted in the #DB stub");
    let top = out.state.regs.rsp;
    // [vector 1, EIP after the NOP, CS, EFLAGS with TF]; delivery cleared TF.
    assert_eq!(u64::from(peek32(&mem, top + 4)), CODE + len);
    assert_ne!(peek32(&mem, top + 12) & 0x100, 0);
    assert_eq!(out.state.regs.rflags & 0x100, 0);
}

#[test]
fn debug_registers_store_values_with_fixed_bits() {
    let code = asm(32, |a| {
        a.mov(eax, 0x1234_5678).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(ebx, dr0).unwrap();
        a.mov(eax, 0xffff_ffffu32).unwrap();
        a.mov(dr7, eax).unwrap();
        a.mov(ecx, dr7).unwrap();
        a.xor(eax, eax).unwrap();
        a.mov(dr6, eax).unwrap();
        a.mov(edx, dr6).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted, "{}", out.stop);
    let r = out.state.regs;
    assert_eq!(r.rbx, 0x1234_5678);
    // DR7: bits 11, 12, 14, 15 read 0 and bit 10 reads 1; DR6: bits 4–11 and 16–31 read 1
    // (SDM Vol. 3A §18.2.4, §18.2.6).
    assert_eq!(r.rcx, 0xffff_ffff & !((1 << 11) | (1 << 12) | (1 << 14) | (1 << 15)));
    assert_eq!(r.rdx, 0xffff_0ff0);
}
