//! Conditions: SETcc, CMOVcc (16/32/64-bit) and Jcc for all 16 conditions under all 32
//! combinations of CF PF ZF SF OF; LOOP/LOOPE/LOOPNE and JCXZ/JECXZ/JRCXZ with their count
//! register's edge values, with and without the address-size override.

mod common;

use common::*;
use duet::fixtures::Mode;
use iced_x86::code_asm::*;
use iced_x86::{Code, IcedError, Instruction, Register};

/// Condition names in encoding order (SDM Vol. 1 Appendix B, Table B-1).
const CC: [&str; 16] =
    ["o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g"];

const SETCC: [Code; 16] = [
    Code::Seto_rm8,
    Code::Setno_rm8,
    Code::Setb_rm8,
    Code::Setae_rm8,
    Code::Sete_rm8,
    Code::Setne_rm8,
    Code::Setbe_rm8,
    Code::Seta_rm8,
    Code::Sets_rm8,
    Code::Setns_rm8,
    Code::Setp_rm8,
    Code::Setnp_rm8,
    Code::Setl_rm8,
    Code::Setge_rm8,
    Code::Setle_rm8,
    Code::Setg_rm8,
];

const CMOV64: [Code; 16] = [
    Code::Cmovo_r64_rm64,
    Code::Cmovno_r64_rm64,
    Code::Cmovb_r64_rm64,
    Code::Cmovae_r64_rm64,
    Code::Cmove_r64_rm64,
    Code::Cmovne_r64_rm64,
    Code::Cmovbe_r64_rm64,
    Code::Cmova_r64_rm64,
    Code::Cmovs_r64_rm64,
    Code::Cmovns_r64_rm64,
    Code::Cmovp_r64_rm64,
    Code::Cmovnp_r64_rm64,
    Code::Cmovl_r64_rm64,
    Code::Cmovge_r64_rm64,
    Code::Cmovle_r64_rm64,
    Code::Cmovg_r64_rm64,
];

const CMOV32: [Code; 16] = [
    Code::Cmovo_r32_rm32,
    Code::Cmovno_r32_rm32,
    Code::Cmovb_r32_rm32,
    Code::Cmovae_r32_rm32,
    Code::Cmove_r32_rm32,
    Code::Cmovne_r32_rm32,
    Code::Cmovbe_r32_rm32,
    Code::Cmova_r32_rm32,
    Code::Cmovs_r32_rm32,
    Code::Cmovns_r32_rm32,
    Code::Cmovp_r32_rm32,
    Code::Cmovnp_r32_rm32,
    Code::Cmovl_r32_rm32,
    Code::Cmovge_r32_rm32,
    Code::Cmovle_r32_rm32,
    Code::Cmovg_r32_rm32,
];

const CMOV16: [Code; 16] = [
    Code::Cmovo_r16_rm16,
    Code::Cmovno_r16_rm16,
    Code::Cmovb_r16_rm16,
    Code::Cmovae_r16_rm16,
    Code::Cmove_r16_rm16,
    Code::Cmovne_r16_rm16,
    Code::Cmovbe_r16_rm16,
    Code::Cmova_r16_rm16,
    Code::Cmovs_r16_rm16,
    Code::Cmovns_r16_rm16,
    Code::Cmovp_r16_rm16,
    Code::Cmovnp_r16_rm16,
    Code::Cmovl_r16_rm16,
    Code::Cmovge_r16_rm16,
    Code::Cmovle_r16_rm16,
    Code::Cmovg_r16_rm16,
];

/// Emits `j<cc> target`.
fn jcc(a: &mut CodeAssembler, cc: usize, t: CodeLabel) -> Result<(), IcedError> {
    match cc {
        0 => a.jo(t),
        1 => a.jno(t),
        2 => a.jb(t),
        3 => a.jae(t),
        4 => a.je(t),
        5 => a.jne(t),
        6 => a.jbe(t),
        7 => a.ja(t),
        8 => a.js(t),
        9 => a.jns(t),
        10 => a.jp(t),
        11 => a.jnp(t),
        12 => a.jl(t),
        13 => a.jge(t),
        14 => a.jle(t),
        _ => a.jg(t),
    }
}

/// The flags word of combination `k` (bit 0 CF, 1 PF, 2 ZF, 3 SF, 4 OF).
fn combo(k: u32) -> u64 {
    [CF, PF, ZF, SF, OF].iter().enumerate().filter(|(i, _)| k & (1 << i) != 0).fold(0, |f, (_, b)| f | b)
}

#[test]
fn cond_setcc_cmovcc_jcc_all_conditions_and_flag_combinations_match_kvm() {
    let mut b = Batch::new("cond-all", Mode::Long);
    for cc in 0..16 {
        for k in 0..32 {
            let flags = combo(k);
            b.case(format!("{} flags={flags:03x}", CC[cc]), 0, move |a| {
                let (mut taken, mut done) = (a.create_label(), a.create_label());
                a.mov(rax, 0x1111_1111_1111_11ffu64)?;
                a.mov(rbx, 0x2222_2222_2222_2222u64)?;
                a.mov(rcx, 0x3333_3333_3333_3333u64)?;
                a.mov(rsi, 0x4444_4444_4444_4444u64)?;
                a.mov(rdi, 0x5555_5555_5555_5555u64)?;
                set_flags(a, 64, flags)?;
                a.add_instruction(Instruction::with1(SETCC[cc], Register::AL)?)?;
                a.add_instruction(Instruction::with2(CMOV64[cc], Register::RBX, Register::RCX)?)?;
                // A 32-bit CMOV writes its destination's upper half with zeros even when false.
                a.add_instruction(Instruction::with2(CMOV32[cc], Register::ESI, Register::ECX)?)?;
                a.add_instruction(Instruction::with2(CMOV16[cc], Register::DI, Register::CX)?)?;
                jcc(a, cc, taken)?;
                a.mov(edx, 2)?;
                a.jmp(done)?;
                a.set_label(&mut taken)?;
                a.mov(edx, 1)?;
                a.set_label(&mut done)?;
                Ok(())
            });
        }
    }
    b.check();
}

#[test]
fn cond_jcc_near_and_backward_forms_match_kvm() {
    // rel32 forms: a taken branch over more than 127 bytes.
    let mut b = Batch::new("cond-near", Mode::Long);
    for (cc, name) in CC.iter().enumerate() {
        for k in [0u32, 31, 5, 26] {
            let flags = combo(k);
            b.case(format!("{name} near flags={flags:03x}"), 0, move |a| {
                let (mut taken, mut done) = (a.create_label(), a.create_label());
                set_flags(a, 64, flags)?;
                jcc(a, cc, taken)?;
                a.mov(edx, 2)?;
                a.jmp(done)?;
                a.db(&[0x90; 200])?;
                a.set_label(&mut taken)?;
                a.mov(edx, 1)?;
                a.set_label(&mut done)?;
                Ok(())
            });
        }
    }
    b.check();
}

/// Which loop instruction a case runs.
#[derive(Clone, Copy, Debug)]
enum LoopOp {
    Loop,
    Loope,
    Loopne,
    Jrcxz,
}

/// A loop instruction (with the 0x67 address-size prefix when `a32`: ECX instead of RCX, SDM
/// Vol. 2A LOOP/LOOPcc and Jcc) branching back while counting iterations in EBX (at most 5),
/// from RCX = `count` and ZF = `zf`.
fn loop_case(b: &mut Batch, op: LoopOp, a32: bool, count: u64, zf: bool) {
    let name = format!("{op:?}{}", if a32 { " a32" } else { "" }).to_lowercase();
    b.case(format!("{name} rcx={count:#x} zf={}", u8::from(zf)), 0, move |a| {
        let (mut top, mut out) = (a.create_label(), a.create_label());
        a.mov(rcx, count)?;
        a.set_label(&mut top)?;
        a.inc(ebx)?;
        a.cmp(ebx, 5)?;
        a.je(out)?;
        set_flags(a, 64, if zf { ZF } else { 0 })?;
        if a32 {
            // The prefix becomes part of the next instruction; its rel8 is unchanged.
            a.db(&[0x67])?;
        }
        match op {
            LoopOp::Loop => a.loop_(top)?,
            LoopOp::Loope => a.loope(top)?,
            LoopOp::Loopne => a.loopne(top)?,
            LoopOp::Jrcxz => a.jrcxz(top)?,
        }
        a.set_label(&mut out)?;
        Ok(())
    });
}

#[test]
fn cond_loop_and_jrcxz_with_count_edges_match_kvm() {
    let mut b = Batch::new("cond-loop", Mode::Long);
    for op in [LoopOp::Loop, LoopOp::Loope, LoopOp::Loopne, LoopOp::Jrcxz] {
        for a32 in [false, true] {
            for count in [0u64, 1, 2, 3, 0x1_0000_0000, 0x1_0000_0002, u64::MAX] {
                for zf in [false, true] {
                    loop_case(&mut b, op, a32, count, zf);
                }
            }
        }
    }
    b.check();
}
