//! MUL, IMUL (one, two and three operands), DIV, IDIV over every size and edge operands, and the
//! divide error (#DE) for a zero divisor and a quotient that does not fit, in every mode.
//!
//! Undefined flags come from iced-x86 per instruction (SDM Vol. 2A/2B MUL, IMUL: SF ZF AF PF
//! undefined; DIV, IDIV: all six undefined).

mod common;

use common::*;
use duet::fixtures::{GuestBuilder, Mode};
use duet::{compare, testing, StopReason};
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, Register};

const SIZES: [u32; 4] = [8, 16, 32, 64];

fn idx(size: u32) -> usize {
    SIZES.iter().position(|&s| s == size).unwrap_or(3)
}

fn sext(v: u64, size: u32) -> i128 {
    let s = 128 - size;
    (i128::from(v) << s) >> s
}

/// Loads the double-width dividend `hi:lo` (AH:AL for bytes, else RDX:RAX) and the divisor in RCX.
fn load_dividend(
    a: &mut CodeAssembler,
    size: u32,
    hi: u64,
    lo: u64,
    divisor: u64,
) -> Result<(), iced_x86::IcedError> {
    if size == 8 {
        load(a, 64, 0, with_garbage(16, 64, (hi << 8) | lo))?;
    } else {
        load(a, 64, 0, with_garbage(size, 64, lo))?;
        load(a, 64, 2, with_garbage(size, 64, hi))?;
    }
    load(a, 64, 1, with_garbage(size, 64, divisor))
}

#[test]
fn muldiv_mul_and_imul_every_size_match_kvm() {
    let mul = [Code::Mul_rm8, Code::Mul_rm16, Code::Mul_rm32, Code::Mul_rm64];
    let imul1 = [Code::Imul_rm8, Code::Imul_rm16, Code::Imul_rm32, Code::Imul_rm64];
    let imul2 = [Code::Imul_r16_rm16, Code::Imul_r32_rm32, Code::Imul_r64_rm64];
    let imul3 = [Code::Imul_r16_rm16_imm8, Code::Imul_r32_rm32_imm8, Code::Imul_r64_rm64_imm8];
    let imul3w = [Code::Imul_r16_rm16_imm16, Code::Imul_r32_rm32_imm32, Code::Imul_r64_rm64_imm32];
    let mut b = Batch::new("muldiv-mul", Mode::Long);
    for size in SIZES {
        for x in edges(size) {
            for y in edges(size) {
                for (name, code) in [("mul", mul[idx(size)]), ("imul", imul1[idx(size)])] {
                    let ins = Instruction::with1(code, reg(size, 1)).unwrap();
                    b.case(format!("{name}{} {x:#x}*{y:#x}", sz(size)), undefined_of(&ins), move |a| {
                        load(a, 64, 0, with_garbage(size, 64, x))?;
                        load(a, 64, 1, with_garbage(size, 64, y))?;
                        load(a, 64, 2, 0x1111_2222_3333_4444)?;
                        a.add_instruction(ins)
                    });
                }
                if size > 8 {
                    let ins = Instruction::with2(imul2[idx(size) - 1], reg(size, 0), reg(size, 1)).unwrap();
                    b.case(format!("imul{} r,r {x:#x}*{y:#x}", sz(size)), undefined_of(&ins), move |a| {
                        load(a, 64, 0, with_garbage(size, 64, x))?;
                        load(a, 64, 1, with_garbage(size, 64, y))?;
                        a.add_instruction(ins)
                    });
                }
            }
            if size > 8 {
                for imm in [-128i32, -1, 0, 1, 127] {
                    let ins =
                        Instruction::with3(imul3[idx(size) - 1], reg(size, 0), reg(size, 1), imm).unwrap();
                    b.case(format!("imul{} r,r,imm8 {x:#x}*{imm}", sz(size)), undefined_of(&ins), move |a| {
                        load(a, 64, 1, with_garbage(size, 64, x))?;
                        a.add_instruction(ins)
                    });
                }
                let wide = if size == 16 { 0x7fff } else { 0x7fff_ffff };
                for imm in [-wide - 1, wide, 0x1234] {
                    let ins =
                        Instruction::with3(imul3w[idx(size) - 1], reg(size, 0), reg(size, 1), imm).unwrap();
                    b.case(
                        format!("imul{} r,r,imm {x:#x}*{imm:#x}", sz(size)),
                        undefined_of(&ins),
                        move |a| {
                            load(a, 64, 1, with_garbage(size, 64, x))?;
                            a.add_instruction(ins)
                        },
                    );
                }
            }
        }
    }
    b.check();
}

#[test]
fn muldiv_div_and_idiv_every_size_match_kvm() {
    let div = [Code::Div_rm8, Code::Div_rm16, Code::Div_rm32, Code::Div_rm64];
    let idiv = [Code::Idiv_rm8, Code::Idiv_rm16, Code::Idiv_rm32, Code::Idiv_rm64];
    let mut b = Batch::new("muldiv-div", Mode::Long);
    for size in SIZES {
        let m = ones(size);
        for x in edges(size) {
            for y in edges(size).into_iter().filter(|&y| y != 0) {
                // Unsigned: hi = 0, and hi = divisor − 1 (the largest quotient that fits).
                for hi in [0, y - 1] {
                    let ins = Instruction::with1(div[idx(size)], reg(size, 1)).unwrap();
                    b.case(format!("div{} {hi:#x}:{x:#x}/{y:#x}", sz(size)), undefined_of(&ins), move |a| {
                        load_dividend(a, size, hi, x, y)?;
                        a.add_instruction(ins)
                    });
                }
                // Signed: the dividend sign-extended from x, and a wide dividend hi:lo = 1:x.
                for hi in [if sext(x, size) < 0 { m } else { 0 }, 1] {
                    let dividend = (sext(hi, size) << size) | i128::from(x);
                    let q = dividend / sext(y, size);
                    let half = 1i128 << (size - 1);
                    if q < -half || q >= half {
                        continue; // #DE: tested below
                    }
                    let ins = Instruction::with1(idiv[idx(size)], reg(size, 1)).unwrap();
                    b.case(format!("idiv{} {hi:#x}:{x:#x}/{y:#x}", sz(size)), undefined_of(&ins), move |a| {
                        load_dividend(a, size, hi, x, y)?;
                        a.add_instruction(ins)
                    });
                }
            }
        }
    }
    b.check();
}

/// One guest whose first instruction is `ins` with RAX/RCX/RDX preset; it must raise #DE there.
fn divide_error(mode: Mode, ins: Instruction, a_: u64, c_: u64, d_: u64) {
    let guest = GuestBuilder::new(mode)
        .code(move |a| {
            a.add_instruction(ins)?;
            duet::fixtures::asm::exit(a, 1)
        })
        .with_state(move |s| {
            s.regs.rax = a_;
            s.regs.rcx = c_;
            s.regs.rdx = d_;
        })
        .build()
        .unwrap();
    let entry = guest.state.regs.rip;
    let mut reports = Vec::new();
    for kind in testing::select_backends() {
        let r = run(kind, &guest);
        // SDM Vol. 3A §6.15 "Interrupt 0—Divide Error Exception (#DE)": a fault, no error code,
        // the saved instruction pointer points at the DIV/IDIV.
        match &r.outcome.stop {
            StopReason::Exception(e) => {
                assert_eq!((e.vector, e.error_code, e.rip), (0, 0, entry), "{mode} {ins} on {kind}")
            }
            other => panic!("{mode} {ins} on {kind}: expected #DE, got {other}"),
        }
        reports.push(r);
    }
    if let [kvm, interp] = &reports[..] {
        let diff = compare(kvm, interp);
        assert!(diff.is_empty(), "{mode} {ins}: KVM and the software CPU differ:\n{diff}");
    }
}

#[test]
fn muldiv_divide_error_on_zero_divisor_and_overflow_in_every_mode() {
    let w = |code: Code, r: Register| Instruction::with1(code, r).unwrap();
    // Zero divisor, every size (long mode).
    divide_error(Mode::Long, w(Code::Div_rm8, Register::CL), 0x1234, 0, 0);
    divide_error(Mode::Long, w(Code::Div_rm16, Register::CX), 0x1234, 0, 0);
    divide_error(Mode::Long, w(Code::Idiv_rm32, Register::ECX), 0x1234, 0, 0);
    divide_error(Mode::Long, w(Code::Idiv_rm64, Register::RCX), 0x1234, 0, 0);
    // Quotient too large: unsigned hi >= divisor; signed most-negative / -1 (SDM Vol. 2A DIV, IDIV).
    divide_error(Mode::Long, w(Code::Div_rm8, Register::CL), 0x0200, 2, 0);
    divide_error(Mode::Long, w(Code::Div_rm64, Register::RCX), 0, 5, 5);
    divide_error(Mode::Long, w(Code::Idiv_rm8, Register::CL), 0xff80, 0xff, 0);
    divide_error(Mode::Long, w(Code::Idiv_rm16, Register::CX), 0x8000, 0xffff, 0xffff);
    divide_error(Mode::Long, w(Code::Idiv_rm64, Register::RCX), 1 << 63, u64::MAX, u64::MAX);
    // Positive quotient of exactly 2^(n-1) does not fit a signed result either.
    divide_error(Mode::Long, w(Code::Idiv_rm32, Register::ECX), 0x8000_0000, 1, 0);
    // Other modes deliver #DE through their IDT / IVT.
    divide_error(Mode::Protected, w(Code::Div_rm32, Register::ECX), 7, 0, 0);
    divide_error(Mode::Protected, w(Code::Idiv_rm32, Register::ECX), 0x8000_0000, 0xffff_ffff, 0xffff_ffff);
    divide_error(Mode::Real, w(Code::Div_rm16, Register::CX), 7, 0, 0);
    divide_error(Mode::Real, w(Code::Div_rm8, Register::CL), 0xffff, 1, 0);
}
