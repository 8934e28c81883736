//! Bit instructions: BT BTS BTR BTC (register, imm8 and memory bit-string forms with negative
//! and far offsets) and BSF/BSR over 16/32/64-bit operands, including a zero source.
//!
//! POPCNT, LZCNT, TZCNT and BMI1/BMI2 are not implemented by the software CPU (see
//! docs/COVERAGE.md), so they have no test here yet.

mod common;

use common::*;
use duet::fixtures::Mode;
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, MemoryOperand, Register};

const SIZES: [u32; 3] = [16, 32, 64];

fn idx(size: u32) -> usize {
    SIZES.iter().position(|&s| s == size).unwrap_or(2)
}

/// (name, [rm16_r16 …], [rm16_imm8 …]) of BT, BTS, BTR, BTC.
const BT: [(&str, [Code; 3], [Code; 3]); 4] = [
    (
        "bt",
        [Code::Bt_rm16_r16, Code::Bt_rm32_r32, Code::Bt_rm64_r64],
        [Code::Bt_rm16_imm8, Code::Bt_rm32_imm8, Code::Bt_rm64_imm8],
    ),
    (
        "bts",
        [Code::Bts_rm16_r16, Code::Bts_rm32_r32, Code::Bts_rm64_r64],
        [Code::Bts_rm16_imm8, Code::Bts_rm32_imm8, Code::Bts_rm64_imm8],
    ),
    (
        "btr",
        [Code::Btr_rm16_r16, Code::Btr_rm32_r32, Code::Btr_rm64_r64],
        [Code::Btr_rm16_imm8, Code::Btr_rm32_imm8, Code::Btr_rm64_imm8],
    ),
    (
        "btc",
        [Code::Btc_rm16_r16, Code::Btc_rm32_r32, Code::Btc_rm64_r64],
        [Code::Btc_rm16_imm8, Code::Btc_rm32_imm8, Code::Btc_rm64_imm8],
    ),
];

fn pattern(size: u32) -> u64 {
    0xb5c3_96e1_8f87_a5c3 & ones(size)
}

fn abs(addr: u64) -> MemoryOperand {
    MemoryOperand::new(Register::None, Register::None, 1, addr as i64, 4, false, Register::None)
}

#[test]
fn bits_bt_family_register_and_immediate_forms_match_kvm() {
    let mut b = Batch::new("bits-bt-reg", Mode::Long);
    for (name, rr, ri) in BT {
        for size in SIZES {
            // Register destination: the offset is taken modulo the operand size (SDM Vol. 2A BT).
            for off in [0u64, 1, 7, u64::from(size) - 1, u64::from(size), u64::from(size) + 3, 127, u64::MAX]
            {
                let ins = Instruction::with2(rr[idx(size)], reg(size, 0), reg(size, 1)).unwrap();
                b.case(format!("{name}{} r,r off={off:#x}", sz(size)), undefined_of(&ins), move |a| {
                    load(a, 64, 0, with_garbage(size, 64, pattern(size)))?;
                    load(a, 64, 1, with_garbage(size, 64, off))?;
                    set_flags(a, 64, STATUS)?;
                    a.add_instruction(ins)
                });
            }
            for imm in [0u32, 5, size - 1, size + 2, 255] {
                let ins = Instruction::with2(ri[idx(size)], reg(size, 0), imm).unwrap();
                b.case(format!("{name}{} r,imm={imm}", sz(size)), undefined_of(&ins), move |a| {
                    load(a, 64, 0, with_garbage(size, 64, pattern(size)))?;
                    set_flags(a, 64, 0)?;
                    a.add_instruction(ins)
                });
            }
        }
    }
    b.check();
}

#[test]
fn bits_bt_family_memory_bit_strings_match_kvm() {
    // With a memory operand and a register offset, the offset addresses a bit string: it may be
    // negative or beyond the operand (SDM Vol. 2A BT, "bit base"/"bit offset", Figure 3-2).
    let mut b = Batch::new("bits-bt-mem", Mode::Long);
    let base = scratch(Mode::Long) + 0x100;
    let bytes: Vec<u8> = (0..0x300u32).map(|i| (i.wrapping_mul(0x9d) ^ 0x5a) as u8).collect();
    b.data(scratch(Mode::Long), bytes.clone());
    for (name, rr, ri) in BT {
        for size in SIZES {
            for off in [0i64, 13, -1, -9, -200, 63, 64, 100, 1000, 0x7ff] {
                let ins = Instruction::with2(rr[idx(size)], abs(base), reg(size, 1)).unwrap();
                // The quadword holding the addressed bit, read back after the instruction.
                let byte = base.wrapping_add_signed(off.div_euclid(8)) & !7;
                let bytes = bytes.clone();
                b.case(format!("{name}{} [m],r off={off}", sz(size)), undefined_of(&ins), move |a| {
                    // Restore the bit string, then run.
                    for (i, q) in bytes.chunks(8).enumerate() {
                        let v = u64::from_le_bytes(q.try_into().unwrap_or_default());
                        a.mov(rax, v)?;
                        a.mov(qword_ptr(base - 0x100 + 8 * i as u64), rax)?;
                    }
                    a.mov(rax, 0u64)?;
                    load(a, 64, 1, off as u64)?;
                    set_flags(a, 64, STATUS)?;
                    a.add_instruction(ins)?;
                    a.mov(rsi, qword_ptr(byte))?;
                    Ok(())
                });
            }
            // imm8 with memory: the offset is taken modulo the operand size, no bit string.
            for imm in [3u32, size + 3] {
                let ins = Instruction::with2(ri[idx(size)], abs(base), imm).unwrap();
                b.case(format!("{name}{} [m],imm={imm}", sz(size)), undefined_of(&ins), move |a| {
                    a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
                    a.mov(qword_ptr(base), rax)?;
                    set_flags(a, 64, 0)?;
                    a.add_instruction(ins)?;
                    a.mov(rsi, qword_ptr(base))?;
                    Ok(())
                });
            }
        }
    }
    b.check();
}

#[test]
fn bits_bsf_bsr_every_size_and_zero_source_match_kvm() {
    let mut b = Batch::new("bits-scan", Mode::Long);
    let forms = [
        ("bsf", [Code::Bsf_r16_rm16, Code::Bsf_r32_rm32, Code::Bsf_r64_rm64]),
        ("bsr", [Code::Bsr_r16_rm16, Code::Bsr_r32_rm32, Code::Bsr_r64_rm64]),
    ];
    for (name, codes) in forms {
        for size in SIZES {
            let mut values = edges(size);
            values.extend([2, 0x10, 1 << (size - 2), 0x100 & ones(size)]);
            for v in values {
                let ins = Instruction::with2(codes[idx(size)], reg(size, 0), reg(size, 1)).unwrap();
                // SDM Vol. 2A BSF/BSR: a zero source sets ZF and leaves the destination undefined.
                let label =
                    format!("{name}{} {v:#x}{}", sz(size), if v == 0 { " (dest undefined)" } else { "" });
                b.case(label, undefined_of(&ins), move |a| {
                    load(a, 64, 0, 0x7777_7777_7777_7777)?;
                    load(a, 64, 1, with_garbage(size, 64, v))?;
                    set_flags(a, 64, STATUS)?;
                    a.add_instruction(ins)?;
                    if v == 0 {
                        a.mov(rax, 0u64)?;
                    }
                    Ok(())
                });
            }
        }
    }
    b.check();
}
