//! ALU instructions with exact flags: ADD ADC SUB SBB CMP AND OR XOR TEST INC DEC NEG NOT, every
//! operand size, edge operands, register, high-byte, memory and immediate forms; KVM against the
//! software CPU, only the flags iced-x86 reports undefined (AF after logic ops) masked.

mod common;

use common::*;
use duet::fixtures::Mode;
use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, Register};

const SIZES: [u32; 4] = [8, 16, 32, 64];

/// (name, [rm8_r8, rm16_r16, rm32_r32, rm64_r64]) of the two-operand ALU instructions.
const BINARY: [(&str, [Code; 4]); 9] = [
    ("add", [Code::Add_rm8_r8, Code::Add_rm16_r16, Code::Add_rm32_r32, Code::Add_rm64_r64]),
    ("adc", [Code::Adc_rm8_r8, Code::Adc_rm16_r16, Code::Adc_rm32_r32, Code::Adc_rm64_r64]),
    ("sub", [Code::Sub_rm8_r8, Code::Sub_rm16_r16, Code::Sub_rm32_r32, Code::Sub_rm64_r64]),
    ("sbb", [Code::Sbb_rm8_r8, Code::Sbb_rm16_r16, Code::Sbb_rm32_r32, Code::Sbb_rm64_r64]),
    ("cmp", [Code::Cmp_rm8_r8, Code::Cmp_rm16_r16, Code::Cmp_rm32_r32, Code::Cmp_rm64_r64]),
    ("and", [Code::And_rm8_r8, Code::And_rm16_r16, Code::And_rm32_r32, Code::And_rm64_r64]),
    ("or", [Code::Or_rm8_r8, Code::Or_rm16_r16, Code::Or_rm32_r32, Code::Or_rm64_r64]),
    ("xor", [Code::Xor_rm8_r8, Code::Xor_rm16_r16, Code::Xor_rm32_r32, Code::Xor_rm64_r64]),
    ("test", [Code::Test_rm8_r8, Code::Test_rm16_r16, Code::Test_rm32_r32, Code::Test_rm64_r64]),
];

/// (name, [rm8, rm16, rm32, rm64]) of the one-operand ALU instructions.
const UNARY: [(&str, [Code; 4]); 4] = [
    ("inc", [Code::Inc_rm8, Code::Inc_rm16, Code::Inc_rm32, Code::Inc_rm64]),
    ("dec", [Code::Dec_rm8, Code::Dec_rm16, Code::Dec_rm32, Code::Dec_rm64]),
    ("neg", [Code::Neg_rm8, Code::Neg_rm16, Code::Neg_rm32, Code::Neg_rm64]),
    ("not", [Code::Not_rm8, Code::Not_rm16, Code::Not_rm32, Code::Not_rm64]),
];

fn size_index(size: u32) -> usize {
    SIZES.iter().position(|&s| s == size).unwrap_or(3)
}

/// `op dst, src` on registers A and C of `size`, with `cf` as the incoming carry.
fn binary_case(b: &mut Batch, name: &str, code: Code, size: u32, x: u64, y: u64, cf: bool) {
    let ins = Instruction::with2(code, reg(size, 0), reg(size, 1)).unwrap();
    let bits = b.bits();
    b.case(format!("{name}{} {x:#x},{y:#x} cf={}", sz(size), u8::from(cf)), undefined_of(&ins), move |a| {
        load(a, bits, 0, with_garbage(size, bits, x))?;
        load(a, bits, 1, with_garbage(size, bits, y))?;
        set_flags(a, bits, if cf { CF } else { 0 })?;
        a.add_instruction(ins)
    });
}

fn binary_batch(size: u32) -> Batch {
    let mut b = Batch::new(&format!("alu-binary-{size}"), Mode::Long);
    for (name, codes) in BINARY {
        let code = codes[size_index(size)];
        for x in edges(size) {
            for y in edges(size) {
                binary_case(&mut b, name, code, size, x, y, false);
                if matches!(name, "adc" | "sbb") {
                    binary_case(&mut b, name, code, size, x, y, true);
                }
            }
        }
    }
    b
}

#[test]
fn alu_binary_8bit_matches_kvm() {
    binary_batch(8).check();
}

#[test]
fn alu_binary_16bit_matches_kvm() {
    binary_batch(16).check();
}

#[test]
fn alu_binary_32bit_matches_kvm() {
    binary_batch(32).check();
}

#[test]
fn alu_binary_64bit_matches_kvm() {
    binary_batch(64).check();
}

#[test]
fn alu_unary_all_sizes_match_kvm() {
    let mut b = Batch::new("alu-unary", Mode::Long);
    for (name, codes) in UNARY {
        for size in SIZES {
            let ins = Instruction::with1(codes[size_index(size)], reg(size, 0)).unwrap();
            for x in edges(size) {
                // INC/DEC keep CF (SDM Vol. 2A INC, DEC): run both with CF clear and set.
                for cf in [false, true] {
                    b.case(
                        format!("{name}{} {x:#x} cf={}", sz(size), u8::from(cf)),
                        undefined_of(&ins),
                        move |a| {
                            load(a, 64, 0, with_garbage(size, 64, x))?;
                            set_flags(a, 64, if cf { STATUS } else { 0 })?;
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
fn alu_high_byte_memory_and_immediate_forms_match_kvm() {
    let mut b = Batch::new("alu-forms", Mode::Long);
    let s = scratch(Mode::Long);
    // High-byte registers: AH, CH, DH, BH are encodings 4–7 without REX.
    for (name, codes) in BINARY {
        let ins = Instruction::with2(codes[0], Register::AH, Register::CH).unwrap();
        for (x, y) in [(0x7f, 1), (0x80, 0xff), (0, 0), (0xff, 0xff)] {
            b.case(format!("{name} ah,ch {x:#x},{y:#x}"), undefined_of(&ins), move |a| {
                a.mov(rax, 0x1111_2222_3333_0044u64 | (x << 8))?;
                a.mov(rcx, 0x5555_6666_7777_0088u64 | (y << 8))?;
                a.add_instruction(ins)
            });
        }
    }
    // Memory destinations (read-modify-write) and memory sources, every size.
    for (name, codes) in BINARY {
        for size in SIZES {
            let code = codes[size_index(size)];
            let mem = iced_x86::MemoryOperand::new(
                Register::None,
                Register::None,
                1,
                s as i64,
                4,
                false,
                Register::None,
            );
            let ins = Instruction::with2(code, mem, reg(size, 1)).unwrap();
            for (x, y) in
                [(ones(size), 1), (1u64 << (size - 1), 1u64 << (size - 1)), (0x1234 & ones(size), 0x4321)]
            {
                b.case(format!("{name}{} [mem],r {x:#x},{y:#x}", sz(size)), undefined_of(&ins), move |a| {
                    a.mov(rax, x)?;
                    a.mov(qword_ptr(s), rax)?;
                    a.mov(rcx, y)?;
                    set_flags(a, 64, CF)?;
                    a.add_instruction(ins)?;
                    a.mov(rax, qword_ptr(s))
                });
            }
        }
    }
    // Immediates: imm8 and imm32 are sign-extended to the operand size (SDM Vol. 2A ADD).
    let imm_cases: Vec<(Code, Register, &str, u64, i32)> = vec![
        (Code::Add_rm64_imm8, Register::RAX, "add rax,imm8", 1, -1),
        (Code::Add_rm64_imm32, Register::RAX, "add rax,imm32", 0, -0x8000_0000),
        (Code::Sub_rm32_imm8, Register::EAX, "sub eax,imm8", 0, 0x7f),
        (Code::Cmp_rm16_imm8, Register::AX, "cmp ax,imm8", 0x8000, -128),
        (Code::And_rm64_imm32, Register::RAX, "and rax,imm32", u64::MAX, -2),
        (Code::Or_rm8_imm8, Register::AL, "or al,imm8", 0x0f, 0x70),
        (Code::Xor_rm32_imm32, Register::EAX, "xor eax,imm32", 0xffff_ffff, 0x7fff_ffff),
        (Code::Adc_AL_imm8, Register::AL, "adc al,imm8", 0xff, 0),
        (Code::Sbb_RAX_imm32, Register::RAX, "sbb rax,imm32", 0, 0),
        (Code::Test_rm64_imm32, Register::RAX, "test rax,imm32", 0x8000_0000_0000_0000, -1),
        (Code::Test_AL_imm8, Register::AL, "test al,imm8", 0x80, 0x80),
    ];
    for (code, r, label, x, imm) in imm_cases {
        let ins = Instruction::with2(code, r, imm).unwrap();
        b.case(format!("{label} {x:#x},{imm:#x} cf=1"), undefined_of(&ins), move |a| {
            a.mov(rax, x)?;
            set_flags(a, 64, CF)?;
            a.add_instruction(ins)
        });
    }
    b.check();
}

#[test]
fn alu_32bit_protected_mode_matches_kvm() {
    // The same 32-bit operations in protected mode (no REX, 0x40–0x4F are INC/DEC r32 there).
    let mut b = Batch::new("alu-protected", Mode::Protected);
    for (name, codes) in BINARY {
        for x in [0u64, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff] {
            binary_case(&mut b, name, codes[2], 32, x, 0x8000_0001, true);
        }
    }
    for (code, name) in
        [(Code::Inc_r32, "inc"), (Code::Dec_r32, "dec"), (Code::Inc_r16, "inc"), (Code::Dec_r16, "dec")]
    {
        let r = if matches!(code, Code::Inc_r16 | Code::Dec_r16) { Register::AX } else { Register::EAX };
        let ins = Instruction::with1(code, r).unwrap();
        for x in [0u64, 0x7fff, 0x8000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff] {
            b.case(format!("{name} {r:?} (short form) {x:#x}"), undefined_of(&ins), move |a| {
                a.mov(eax, x as u32)?;
                set_flags(a, 32, CF)?;
                a.add_instruction(ins)
            });
        }
    }
    b.check();
}
