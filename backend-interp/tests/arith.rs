//! Arithmetic, logic, shift, multiply/divide and bit instructions: results and status flags
//! against values worked out from the SDM's "Operation" and "Flags Affected" sections.

mod common;

use common::*;
use duet_core::state::rflags::{AF, CF, OF, PF, SF, STATUS, ZF};
use duet_core::{CpuState, StopReason};
use iced_x86::code_asm::*;

/// Runs `f` as 64-bit code followed by HLT; returns the final state.
fn run64(f: impl FnOnce(&mut CodeAssembler)) -> CpuState {
    let code = asm(64, |a| {
        f(a);
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted, "{:?}", out.stop);
    assert_eq!(out.state.regs.rip, CODE + code.len() as u64, "stopped early");
    out.state
}

fn status(s: &CpuState) -> u64 {
    s.regs.rflags & STATUS
}

#[test]
fn add_adc_flags_at_sign_boundaries() {
    // 0x7f + 1 = 0x80: OF (two positives give a negative), SF, AF (carry out of bit 3);
    // 0x80 has one bit set, so PF = 0.
    let s = run64(|a| {
        a.mov(al, 0x7f).unwrap();
        a.add(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0x80, OF | SF | AF));
    // 0xff + 1 = 0x100: CF, ZF, PF (zero has even parity), AF.
    let s = run64(|a| {
        a.mov(al, -1).unwrap();
        a.add(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0, CF | ZF | PF | AF));
    // ADC with CF = 1: 0x7f + 0 + 1 = 0x80.
    let s = run64(|a| {
        a.mov(al, 0x7f).unwrap();
        a.stc().unwrap();
        a.adc(al, 0).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0x80, OF | SF | AF));
}

#[test]
fn sub_sbb_flags_at_sign_boundaries() {
    // 0x80 - 1 = 0x7f: OF (negative minus positive gives positive), AF (borrow into bit 3);
    // 0x7f has seven bits set: PF = 0.
    let s = run64(|a| {
        a.mov(al, -128).unwrap();
        a.sub(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0x7f, OF | AF));
    // 0 - 1 = 0xff: CF (borrow), SF, AF, PF (eight bits set).
    let s = run64(|a| {
        a.mov(al, 0).unwrap();
        a.sub(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0xff, CF | SF | AF | PF));
    // SBB with CF = 1: 0 - 0 - 1 = 0xffff_ffff (32-bit), and the upper half of RAX is cleared.
    let s = run64(|a| {
        a.mov(rax, -1i64).unwrap();
        a.mov(eax, 0).unwrap();
        a.stc().unwrap();
        a.sbb(eax, 0).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s)), (0xffff_ffff, CF | SF | AF | PF));
}

#[test]
fn inc_dec_keep_cf_and_neg_sets_it() {
    let s = run64(|a| {
        a.stc().unwrap();
        a.mov(al, -1).unwrap();
        a.inc(al).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0, CF | ZF | PF | AF));
    // NEG 0x80: result 0x80, CF = (src ≠ 0), OF (−(−128) overflows), SF.
    let s = run64(|a| {
        a.mov(al, -128).unwrap();
        a.neg(al).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (0x80, CF | OF | SF));
}

#[test]
fn logic_clears_cf_of_and_32bit_writes_zero_extend() {
    let s = run64(|a| {
        a.mov(rbx, -1i64).unwrap();
        a.stc().unwrap();
        a.and(ebx, 0xf0).unwrap();
    });
    // 0xf0 has four bits set: PF = 1; CF and OF cleared.
    assert_eq!((s.regs.rbx, status(&s)), (0xf0, PF));
}

#[test]
fn shl_count_zero_and_masked_count_change_nothing() {
    let s = run64(|a| {
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.mov(cl, 0).unwrap();
        a.stc().unwrap();
        a.shl(eax, cl).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s)), (0x8000_0000, CF));
    // 32 & 0x1f = 0 for a 32-bit operand (SDM Vol. 2B SAL/SAR/SHL/SHR: count masked to 5 bits).
    let s = run64(|a| {
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.mov(cl, 32).unwrap();
        a.stc().unwrap();
        a.shl(eax, cl).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s)), (0x8000_0000, CF));
    // 33 masks to 1: 0x8000_0001 << 1 = 2, CF = old bit 31, OF = MSB(result) XOR CF = 1.
    let s = run64(|a| {
        a.mov(eax, 0x8000_0001u32).unwrap();
        a.mov(cl, 33).unwrap();
        a.shl(eax, cl).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s) & !AF), (2, CF | OF));
}

#[test]
fn shifts_by_one_and_width_minus_one() {
    // SHL by 1: 0x8000_0000 → 0, CF = 1, OF = 0 XOR 1 = 1, ZF, PF.
    let s = run64(|a| {
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.shl(eax, 1).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s) & !AF), (0, CF | OF | ZF | PF));
    // SHL by 31: 1 → 0x8000_0000, CF = bit 1 of the source = 0 (OF undefined for count > 1).
    let s = run64(|a| {
        a.mov(eax, 1).unwrap();
        a.shl(eax, 31).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s) & !(AF | OF)), (0x8000_0000, SF | PF));
    // SAR by 31: 0x8000_0000 → 0xffff_ffff, CF = bit 30 = 0.
    let s = run64(|a| {
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.sar(eax, 31).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s) & !(AF | OF)), (0xffff_ffff, SF | PF));
    // SHR by 1 of 0x81 (8-bit): 0x40, CF = 1, OF = MSB of the original = 1.
    let s = run64(|a| {
        a.mov(al, -127).unwrap();
        a.shr(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s) & !AF), (0x40, CF | OF));
}

#[test]
fn rotates_touch_only_cf_and_of() {
    // CMP sets ZF and PF; ROL 0x80,1 = 0x01 keeps them and sets CF = 1, OF = 0 XOR 1.
    let s = run64(|a| {
        a.cmp(eax, eax).unwrap();
        a.mov(al, -128).unwrap();
        a.rol(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s)), (1, ZF | PF | CF | OF));
    // RCR 1,1 with CF = 1: 0x80, CF = 1, OF = MSB(dest) 0 XOR old CF 1.
    let s = run64(|a| {
        a.mov(al, 1).unwrap();
        a.stc().unwrap();
        a.rcr(al, 1).unwrap();
    });
    assert_eq!((s.regs.rax & 0xff, status(&s) & (CF | OF)), (0x80, CF | OF));
}

#[test]
fn mul_imul_div_idiv_results() {
    // 0xffff_ffff_ffff_ffff × 2 = 0x1_ffff_ffff_ffff_fffe: RDX = 1, CF = OF = 1.
    let s = run64(|a| {
        a.mov(rax, -1i64).unwrap();
        a.mov(rbx, 2i64).unwrap();
        a.mul(rbx).unwrap();
    });
    assert_eq!((s.regs.rax, s.regs.rdx), (0xffff_ffff_ffff_fffe, 1));
    assert_eq!(status(&s) & (CF | OF), CF | OF);
    // IMUL −2 × 3 = −6 fits: CF = OF = 0.
    let s = run64(|a| {
        a.mov(eax, -2).unwrap();
        a.mov(ecx, 3).unwrap();
        a.imul_2(eax, ecx).unwrap();
    });
    assert_eq!((s.regs.rax, status(&s) & (CF | OF)), (0xffff_fffa, 0));
    // IDIV −7 / 2 truncates toward zero: quotient −3, remainder −1.
    let s = run64(|a| {
        a.mov(eax, -7).unwrap();
        a.cdq().unwrap();
        a.mov(ecx, 2).unwrap();
        a.idiv(ecx).unwrap();
    });
    assert_eq!((s.regs.rax, s.regs.rdx), (0xffff_fffd, 0xffff_ffff));
    // DIV 16-bit: 0x0001_0005 / 0x10 = 0x1000 rem 5.
    let s = run64(|a| {
        a.mov(dx, 1).unwrap();
        a.mov(ax, 5).unwrap();
        a.mov(cx, 0x10).unwrap();
        a.div(cx).unwrap();
    });
    assert_eq!((s.regs.rax & 0xffff, s.regs.rdx & 0xffff), (0x1000, 5));
}

#[test]
fn bit_scan_test_and_exchange_instructions() {
    let s = run64(|a| {
        a.mov(eax, 0x0000_0f00).unwrap();
        a.bsf(ebx, eax).unwrap();
        a.bsr(ecx, eax).unwrap();
        a.mov(edx, 0x10).unwrap();
        a.bts(edx, 0).unwrap();
    });
    assert_eq!((s.regs.rbx, s.regs.rcx, s.regs.rdx), (8, 11, 0x11));
    assert_eq!(status(&s) & (CF | ZF), 0, "BTS saw bit 0 clear, BSR source non-zero");
    // CMPXCHG: equal → dest = src, ZF = 1; XADD: dest = sum, src = old dest; BSWAP.
    let s = run64(|a| {
        a.mov(eax, 5).unwrap();
        a.mov(ebx, 5).unwrap();
        a.mov(ecx, 9).unwrap();
        a.cmpxchg(ebx, ecx).unwrap();
        a.mov(esi, 0x1122_3344).unwrap();
        a.bswap(esi).unwrap();
        a.mov(edi, 3).unwrap();
        a.mov(edx, 4).unwrap();
        a.xadd(edi, edx).unwrap();
    });
    assert_eq!(s.regs.rbx, 9);
    assert_eq!(s.regs.rsi, 0x4433_2211);
    assert_eq!((s.regs.rdi, s.regs.rdx), (7, 3));
}

#[test]
fn setcc_cmovcc_and_sign_extension() {
    let s = run64(|a| {
        a.mov(eax, 1).unwrap();
        a.cmp(eax, 2).unwrap(); // 1 < 2: CF = 1, SF ≠ OF
        a.setb(bl).unwrap();
        a.setg(cl).unwrap();
        a.mov(edx, 7).unwrap();
        a.mov(esi, 9).unwrap();
        a.cmovl(edx, esi).unwrap();
        a.mov(al, -1).unwrap();
        a.movsx(rdi, al).unwrap();
        a.movzx(r8d, al).unwrap();
        a.mov(r9d, -5).unwrap();
        a.movsxd(r9, r9d).unwrap();
    });
    assert_eq!((s.regs.rbx & 0xff, s.regs.rcx & 0xff), (1, 0));
    assert_eq!(s.regs.rdx, 9);
    assert_eq!((s.regs.rdi, s.regs.r8), (u64::MAX, 0xff));
    assert_eq!(s.regs.r9, (-5i64) as u64);
}

#[test]
fn undefined_flags_follow_the_last_writer() {
    // SDM Vol. 2B MUL: "The SF, ZF, AF, and PF flags are undefined."
    let code = asm(64, |a| {
        a.mov(eax, 3).unwrap();
        a.mul(eax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.undefined_rflags, SF | ZF | AF | PF);
    // A later ADD defines all six again.
    let code = asm(64, |a| {
        a.mul(eax).unwrap();
        a.add(eax, 1).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.undefined_rflags, 0);
}
