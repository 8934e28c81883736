//! Shifts and rotates: SHL SHR SAR ROL ROR RCL RCR with every CL count 0–63 and counts above 63
//! (masked to 5 bits, 6 for 64-bit operands), the `1` and imm8 forms, and SHLD/SHRD; every size.
//!
//! Undefined flags are worked out per case from SDM Vol. 2B "SAL/SAR/SHL/SHR", "RCL/RCR/ROL/ROR",
//! "SHLD", "SHRD": a masked count of 0 changes no flag; OF is defined only for a count of 1; AF is
//! undefined for a nonzero shift count; CF is undefined for SHL/SHR when the count is at least the
//! operand size; SHLD/SHRD with a count above the operand size leave result and flags undefined.

mod common;

use common::*;
use duet::fixtures::Mode;
use iced_x86::{Code, Instruction, Register};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Shl,
    Shr,
    Sar,
    Rol,
    Ror,
    Rcl,
    Rcr,
}

const OPS: [Op; 7] = [Op::Shl, Op::Shr, Op::Sar, Op::Rol, Op::Ror, Op::Rcl, Op::Rcr];

/// The (rm, CL), (rm, 1) and (rm, imm8) codes of `op` at `size`.
fn codes(op: Op, size: u32) -> [Code; 3] {
    use Code::*;
    let t: [[Code; 3]; 4] = match op {
        Op::Shl => [
            [Shl_rm8_CL, Shl_rm8_1, Shl_rm8_imm8],
            [Shl_rm16_CL, Shl_rm16_1, Shl_rm16_imm8],
            [Shl_rm32_CL, Shl_rm32_1, Shl_rm32_imm8],
            [Shl_rm64_CL, Shl_rm64_1, Shl_rm64_imm8],
        ],
        Op::Shr => [
            [Shr_rm8_CL, Shr_rm8_1, Shr_rm8_imm8],
            [Shr_rm16_CL, Shr_rm16_1, Shr_rm16_imm8],
            [Shr_rm32_CL, Shr_rm32_1, Shr_rm32_imm8],
            [Shr_rm64_CL, Shr_rm64_1, Shr_rm64_imm8],
        ],
        Op::Sar => [
            [Sar_rm8_CL, Sar_rm8_1, Sar_rm8_imm8],
            [Sar_rm16_CL, Sar_rm16_1, Sar_rm16_imm8],
            [Sar_rm32_CL, Sar_rm32_1, Sar_rm32_imm8],
            [Sar_rm64_CL, Sar_rm64_1, Sar_rm64_imm8],
        ],
        Op::Rol => [
            [Rol_rm8_CL, Rol_rm8_1, Rol_rm8_imm8],
            [Rol_rm16_CL, Rol_rm16_1, Rol_rm16_imm8],
            [Rol_rm32_CL, Rol_rm32_1, Rol_rm32_imm8],
            [Rol_rm64_CL, Rol_rm64_1, Rol_rm64_imm8],
        ],
        Op::Ror => [
            [Ror_rm8_CL, Ror_rm8_1, Ror_rm8_imm8],
            [Ror_rm16_CL, Ror_rm16_1, Ror_rm16_imm8],
            [Ror_rm32_CL, Ror_rm32_1, Ror_rm32_imm8],
            [Ror_rm64_CL, Ror_rm64_1, Ror_rm64_imm8],
        ],
        Op::Rcl => [
            [Rcl_rm8_CL, Rcl_rm8_1, Rcl_rm8_imm8],
            [Rcl_rm16_CL, Rcl_rm16_1, Rcl_rm16_imm8],
            [Rcl_rm32_CL, Rcl_rm32_1, Rcl_rm32_imm8],
            [Rcl_rm64_CL, Rcl_rm64_1, Rcl_rm64_imm8],
        ],
        Op::Rcr => [
            [Rcr_rm8_CL, Rcr_rm8_1, Rcr_rm8_imm8],
            [Rcr_rm16_CL, Rcr_rm16_1, Rcr_rm16_imm8],
            [Rcr_rm32_CL, Rcr_rm32_1, Rcr_rm32_imm8],
            [Rcr_rm64_CL, Rcr_rm64_1, Rcr_rm64_imm8],
        ],
    };
    t[[8, 16, 32, 64].iter().position(|&s| s == size).unwrap_or(3)]
}

/// Flags the SDM leaves undefined after `op` of a `size`-bit operand by `count` (before masking).
fn undefined(op: Op, size: u32, count: u32) -> u64 {
    let c = count & if size == 64 { 63 } else { 31 };
    if c == 0 {
        return 0; // "If the count is 0, the flags are not affected."
    }
    let of = if c == 1 { 0 } else { OF };
    match op {
        Op::Shl | Op::Shr => of | AF | if c >= size { CF } else { 0 },
        Op::Sar => of | AF,
        // Rotates touch only CF and OF.
        Op::Rol | Op::Ror | Op::Rcl | Op::Rcr => of,
    }
}

/// A value with the sign bit, bit 0 and mixed middle bits set in every size.
fn pattern(size: u32) -> u64 {
    0xb5c3_96e1_8f87_a5c3 & ones(size)
}

const COUNTS_ABOVE_63: [u32; 5] = [64, 65, 95, 127, 255];

fn shift_batch(size: u32) -> Batch {
    let mut b = Batch::new(&format!("shift-{size}"), Mode::Long);
    for op in OPS {
        let [cl_form, one_form, imm_form] = codes(op, size);
        let values: Vec<u64> =
            if op == Op::Sar { vec![pattern(size), pattern(size) >> 1] } else { vec![pattern(size)] };
        let carries: &[u64] = if matches!(op, Op::Rcl | Op::Rcr) { &[0, CF] } else { &[STATUS] };
        for v in values {
            for &fin in carries {
                for count in (0..64).chain(COUNTS_ABOVE_63) {
                    let ins = Instruction::with2(cl_form, reg(size, 0), Register::CL).unwrap();
                    b.case(
                        format!("{op:?}{} {v:#x},cl={count} fl_in={fin:x}", sz(size)).to_lowercase(),
                        undefined(op, size, count),
                        move |a| {
                            load(a, 64, 0, with_garbage(size, 64, v))?;
                            load(a, 64, 1, u64::from(count))?;
                            set_flags(a, 64, fin)?;
                            a.add_instruction(ins)
                        },
                    );
                }
                let one = Instruction::with2(one_form, reg(size, 0), 1).unwrap();
                b.case(
                    format!("{op:?}{} {v:#x},1 fl_in={fin:x}", sz(size)).to_lowercase(),
                    undefined(op, size, 1),
                    move |a| {
                        load(a, 64, 0, with_garbage(size, 64, v))?;
                        set_flags(a, 64, fin)?;
                        a.add_instruction(one)
                    },
                );
                for count in [0u32, 1, 2, size - 1, size, 31, 33, 63, 200] {
                    let ins = Instruction::with2(imm_form, reg(size, 0), count).unwrap();
                    b.case(
                        format!("{op:?}{} {v:#x},imm={count} fl_in={fin:x}", sz(size)).to_lowercase(),
                        undefined(op, size, count),
                        move |a| {
                            load(a, 64, 0, with_garbage(size, 64, v))?;
                            set_flags(a, 64, fin)?;
                            a.add_instruction(ins)
                        },
                    );
                }
            }
        }
    }
    b
}

#[test]
fn shift_8bit_every_count_matches_kvm() {
    shift_batch(8).check();
}

#[test]
fn shift_16bit_every_count_matches_kvm() {
    shift_batch(16).check();
}

#[test]
fn shift_32bit_every_count_matches_kvm() {
    shift_batch(32).check();
}

#[test]
fn shift_64bit_every_count_matches_kvm() {
    shift_batch(64).check();
}

#[test]
fn shift_double_shld_shrd_every_count_matches_kvm() {
    use Code::*;
    let mut b = Batch::new("shift-double", Mode::Long);
    let forms = [
        ("shld", 16, Shld_rm16_r16_CL, Shld_rm16_r16_imm8),
        ("shld", 32, Shld_rm32_r32_CL, Shld_rm32_r32_imm8),
        ("shld", 64, Shld_rm64_r64_CL, Shld_rm64_r64_imm8),
        ("shrd", 16, Shrd_rm16_r16_CL, Shrd_rm16_r16_imm8),
        ("shrd", 32, Shrd_rm32_r32_CL, Shrd_rm32_r32_imm8),
        ("shrd", 64, Shrd_rm64_r64_CL, Shrd_rm64_r64_imm8),
    ];
    for (name, size, cl_form, imm_form) in forms {
        let (dst, src) = (pattern(size), 0x6d2b_1e4f_3a59_c807 & ones(size));
        for count in (0..64).chain(COUNTS_ABOVE_63) {
            let c = count & if size == 64 { 63 } else { 31 };
            // SDM Vol. 2B SHLD/SHRD: "If the count is greater than the operand size, the result
            // is undefined" (and so are SF, ZF, AF, PF, CF, OF); AF is undefined for any count > 0.
            let result_undefined = c > size;
            let undef = if result_undefined {
                STATUS
            } else if c == 0 {
                0
            } else if c == 1 {
                AF
            } else {
                AF | OF
            };
            for (form, imm) in [(cl_form, false), (imm_form, true)] {
                if imm && !(count < 4 || count == size - 1 || count == size || count == 63 || count == 64) {
                    continue;
                }
                let ins = if imm {
                    Instruction::with3(form, reg(size, 0), reg(size, 3), count).unwrap()
                } else {
                    Instruction::with3(form, reg(size, 0), reg(size, 3), Register::CL).unwrap()
                };
                let label = format!(
                    "{name}{} {dst:#x},{src:#x},{}{count}{}",
                    sz(size),
                    if imm { "imm=" } else { "cl=" },
                    if result_undefined { " (result undefined)" } else { "" }
                );
                b.case(label, undef, move |a| {
                    load(a, 64, 0, with_garbage(size, 64, dst))?;
                    load(a, 64, 3, with_garbage(size, 64, src))?;
                    load(a, 64, 1, u64::from(count))?;
                    set_flags(a, 64, STATUS)?;
                    a.add_instruction(ins)?;
                    if result_undefined {
                        load(a, 64, 0, 0)?;
                    }
                    Ok(())
                });
            }
        }
    }
    b.check();
}
