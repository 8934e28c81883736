//! The instruction forms a program draws from, and how an [`InsnSpec`]'s numbers fill them.

use std::sync::OnceLock;

use iced_x86::{Code, CodeSize, Encoder, Instruction, Mnemonic, OpCodeOperandKind as K, OpKind, Register};

use duet_core::cpuid::CpuidProfile;

use super::case::FuzzMode;
use super::gen::{decode_one, legacy, supported_kind, InsnSpec, Item};
use super::layout::DATA_ADDR;

/// Mnemonics never drawn from the table, with why: returns to junk addresses run off into
/// random memory (they appear in snippets only, paired with their call), and time-dependent
/// reads are host-specific (see `judge::HOST_SPECIFIC`).
const EXCLUDED: &[Mnemonic] = &[
    Mnemonic::Ret,
    Mnemonic::Retf,
    Mnemonic::Iret,
    Mnemonic::Iretd,
    Mnemonic::Iretq,
    Mnemonic::Sysret,
    Mnemonic::Sysretq,
    Mnemonic::Sysexit,
    Mnemonic::Sysexitq,
    Mnemonic::Rdtsc,
    Mnemonic::Rdtscp,
    Mnemonic::Rdpmc,
    // POPF pops whatever is on the stack, TF included (see judge::HOST_SPECIFIC); the
    // PUSH imm / POPF snippet covers it with TF clear.
    Mnemonic::Popf,
    Mnemonic::Popfd,
    Mnemonic::Popfq,
    Mnemonic::Rdrand,
    Mnemonic::Rdseed,
    // Dozens of reserved hint-NOP forms would crowd the table (a few NOP r/m forms stay).
    Mnemonic::Reservednop,
];

/// Forms whose result the SDM leaves undefined for counts the generator cannot bound
/// (a 16-bit SHLD/SHRD by CL greater than 16); the immediate forms get a count of at most 16.
const UNDEFINED_FORMS: &[Code] = &[Code::Shld_rm16_r16_CL, Code::Shrd_rm16_r16_CL];

/// Whether `m` needs a CPUID feature that `p` does not enumerate (the interpreter then raises #UD,
/// or runs LZCNT/TZCNT as BSR/BSF, as the SDM says for a part without the feature).
pub fn profile_lacks(m: Mnemonic, p: &CpuidProfile) -> bool {
    use super::profile::{has, Feature};
    let need = match m {
        Mnemonic::Popcnt => Feature::Popcnt,
        Mnemonic::Lzcnt => Feature::Abm,
        Mnemonic::Tzcnt
        | Mnemonic::Andn
        | Mnemonic::Bextr
        | Mnemonic::Blsi
        | Mnemonic::Blsmsk
        | Mnemonic::Blsr => Feature::Bmi1,
        Mnemonic::Bzhi
        | Mnemonic::Mulx
        | Mnemonic::Pdep
        | Mnemonic::Pext
        | Mnemonic::Rorx
        | Mnemonic::Sarx
        | Mnemonic::Shlx
        | Mnemonic::Shrx => Feature::Bmi2,
        Mnemonic::Adcx | Mnemonic::Adox => Feature::Adx,
        Mnemonic::Movbe => Feature::Movbe,
        Mnemonic::Cmpxchg16b => Feature::Cx16,
        Mnemonic::Rdtscp => Feature::Rdtscp,
        Mnemonic::Rdfsbase | Mnemonic::Rdgsbase | Mnemonic::Wrfsbase | Mnemonic::Wrgsbase => {
            Feature::Fsgsbase
        }
        Mnemonic::Xgetbv | Mnemonic::Xsetbv => {
            return !p.has_leaf1_ecx(duet_core::cpuid::leaf1_ecx::XSAVE);
        }
        _ => return false,
    };
    !has(p, need)
}

/// Whether `code` belongs in the table of `mode`.
///
/// Two host-specific exclusions (see `judge::HOST_SPECIFIC`): in ring 3 no instruction whose
/// CPUID feature the shared profile lacks — ring-3 code may run natively on the host CPU, which
/// executes it whatever CPUID the guest sees (ring 0 keeps them: the #UD, or LZCNT/TZCNT as
/// BSR/BSF, is tested there) — and in 64-bit code no near branch with an operand-size prefix
/// (Intel ignores the prefix, AMD truncates RIP to 16 bits: vendor-specific), nor in 32-bit code.
fn eligible_in(code: Code, mode: FuzzMode, profile: &CpuidProfile) -> bool {
    let bits = mode.bitness();
    if !eligible(code, bits) {
        return false;
    }
    if mode.cpl() == 3 && profile_lacks(code.mnemonic(), profile) {
        return false;
    }
    // 16-bit branches outside 16-bit code truncate (E/R)IP to 16 bits: in 64-bit code that is
    // vendor-specific, in 32-bit code it sends the program to a target the generator did not place.
    !(bits != 16 && code.op_code().op_kinds().iter().any(|k| matches!(k, K::br16_1 | K::br16_2)))
}

/// Whether `code` belongs in the table of code size `bits`.
fn eligible(code: Code, bits: u32) -> bool {
    if !legacy(code) {
        return false;
    }
    let op = code.op_code();
    let in_mode = match bits {
        16 => op.mode16(),
        32 => op.mode32(),
        _ => op.mode64(),
    };
    let m = code.mnemonic();
    if !in_mode || !duet_interp::is_implemented(m) || EXCLUDED.contains(&m) || UNDEFINED_FORMS.contains(&code)
    {
        return false;
    }
    let kinds = op.op_kinds();
    // Indirect and far jumps and calls go to junk addresses; only relative forms are drawn.
    if matches!(m, Mnemonic::Jmp | Mnemonic::Call)
        && !kinds
            .iter()
            .any(|k| matches!(k, K::br16_1 | K::br32_1 | K::br64_1 | K::br16_2 | K::br32_4 | K::br64_4))
    {
        return false;
    }
    // PUSH Sreg wider than 16 bits leaves the slot's upper bytes implementation-specific.
    if m == Mnemonic::Push
        && op.operand_size() > 16
        && kinds.iter().any(|k| matches!(k, K::es | K::cs | K::ss | K::ds | K::fs | K::gs))
    {
        return false;
    }
    kinds.iter().all(|&k| supported_kind(k))
}

/// The table of instruction forms for `mode`, in iced `Code` order. It depends on the mode and,
/// in ring 3, on this process's shared CPUID profile (`crate::backends::shared_cpuid_profile`).
pub fn table(mode: FuzzMode) -> &'static [Code] {
    static TABLES: [OnceLock<Vec<Code>>; 6] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    let i = FuzzMode::ALL.iter().position(|&m| m == mode).unwrap_or(0);
    TABLES[i].get_or_init(|| {
        let profile = crate::backends::shared_cpuid_profile();
        Code::values().filter(|&c| eligible_in(c, mode, &profile)).collect()
    })
}

/// GPR `i` of the width `size` (1, 2, 4, 8 bytes) in code of `bits`.
fn gpr(bits: u32, size: u32, i: u64) -> Register {
    let n = if bits == 64 { 16 } else { 8 };
    let i = (i % n) as usize;
    match size {
        // iced order: AL CL DL BL AH CH DH BH SPL BPL SIL DIL R8L … R15L.
        1 if bits == 64 && i >= 4 => reg_at(Register::SPL, i - 4),
        1 => reg_at(Register::AL, i),
        2 => reg_at(Register::AX, i),
        4 => reg_at(Register::EAX, i),
        _ => reg_at(Register::RAX, i),
    }
}

fn reg_at(base: Register, i: usize) -> Register {
    Register::try_from(base as usize + i).unwrap_or(base)
}

/// A memory operand from choice `m` (see the module doc of `gen`).
fn memory(ins: &mut Instruction, mode: FuzzMode, m: u64) {
    let bits = mode.bitness();
    let disp8 = i64::from((m >> 8) as u8 as i8);
    let form = m % 16;
    let (base, index, scale, disp, dsize): (Register, Register, u32, i64, u32) = if bits == 16 {
        let combos = [
            (Register::BX, Register::None),
            (Register::SI, Register::None),
            (Register::DI, Register::None),
            (Register::BX, Register::SI),
            (Register::BX, Register::DI),
            (Register::BP, Register::SI),
            (Register::BP, Register::DI),
            (Register::BP, Register::None),
        ];
        match form {
            0..=8 => {
                let (b, x) = combos[((m >> 4) % 3) as usize];
                (b, x, 1, disp8, 1)
            }
            9 | 13..=15 => {
                let (b, x) = combos[((m >> 4) % 8) as usize];
                (b, x, 1, disp8, 1)
            }
            10 | 11 => {
                (Register::None, Register::None, 1, (DATA_ADDR as i64 & 0xffff) + ((m >> 8) % 512) as i64, 2)
            }
            _ => (Register::EBX, Register::None, 1, disp8, 1),
        }
    } else {
        let wide = bits == 64;
        let size = if wide { 8 } else { 4 };
        let ptrs = [3u64, 6, 7];
        match form {
            0..=8 => (gpr(bits, size, ptrs[((m >> 4) % 3) as usize]), Register::None, 1, disp8, 1),
            9 => {
                let x = (m >> 16) % if wide { 16 } else { 8 };
                let x = if x == 4 { 5 } else { x };
                (
                    gpr(bits, size, ptrs[((m >> 4) % 3) as usize]),
                    gpr(bits, size, x),
                    1 << ((m >> 20) % 4),
                    disp8,
                    1,
                )
            }
            10 if wide => (Register::RIP, Register::None, 1, (DATA_ADDR + (m >> 8) % 512) as i64, 8),
            10 => (Register::None, Register::None, 1, (DATA_ADDR + (m >> 8) % 512) as i64, 4),
            11 => {
                let mmio = 0xd000_0000i64 + ((m >> 8) & 0xff8) as i64;
                (Register::None, Register::None, 1, mmio, 4)
            }
            12 if wide => (gpr(32, 4, ptrs[((m >> 4) % 3) as usize]), Register::None, 1, disp8, 1),
            12 => (Register::BX, Register::SI, 1, disp8, 1),
            _ => (gpr(bits, size, (m >> 4) % if wide { 16 } else { 8 }), Register::None, 1, disp8, 1),
        }
    };
    ins.set_memory_base(base);
    ins.set_memory_index(index);
    ins.set_memory_index_scale(scale);
    ins.set_memory_displacement64(disp as u64);
    ins.set_memory_displ_size(if disp == 0 && dsize == 1 && base != Register::None { 0 } else { dsize });
}

/// Fills `code`'s operands from `s`; `None` when the result does not encode.
pub fn instruction(mode: FuzzMode, code: Code, s: &InsnSpec, slot: usize, n: usize) -> Option<Item> {
    let bits = mode.bitness();
    let mut ins = Instruction::default();
    ins.set_code(code);
    ins.set_code_size(match bits {
        16 => CodeSize::Code16,
        32 => CodeSize::Code32,
        _ => CodeSize::Code64,
    });
    let mut target = None;
    let mut has_mem = false;
    let mut imm_seen = false;
    for (i, &k) in code.op_code().op_kinds().iter().enumerate() {
        let v = s.ops.get(i).copied().unwrap_or(0);
        let i = i as u32;
        let reg = |ins: &mut Instruction, r: Register| {
            ins.set_op_kind(i, OpKind::Register);
            ins.set_op_register(i, r);
        };
        let size = match k {
            K::r8_or_mem | K::r8_reg | K::r8_opcode => 1,
            K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode => 2,
            K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode => 4,
            _ => 8,
        };
        match k {
            K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem if v % 4 != 0 => {
                ins.set_op_kind(i, OpKind::Memory);
                memory(&mut ins, mode, v >> 2);
                has_mem = true;
            }
            K::mem => {
                ins.set_op_kind(i, OpKind::Memory);
                memory(&mut ins, mode, v);
                has_mem = true;
            }
            K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => {
                reg(&mut ins, gpr(bits, size, v >> 2))
            }
            K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode => reg(&mut ins, gpr(bits, size, v)),
            // MOV CS, m16 is #UD; AMD parts read the memory operand first (a #PF can win), Intel
            // parts do not: vendor-specific, so only the register form loads CS.
            K::seg_reg if i == 0 && s.ops.get(1).is_some_and(|o| o % 4 != 0) && v % 6 == 1 => {
                reg(&mut ins, Register::DS)
            }
            K::seg_reg => reg(&mut ins, reg_at(Register::ES, (v % 6) as usize)),
            K::es => reg(&mut ins, Register::ES),
            K::cs => reg(&mut ins, Register::CS),
            K::ss => reg(&mut ins, Register::SS),
            K::ds => reg(&mut ins, Register::DS),
            K::fs => reg(&mut ins, Register::FS),
            K::gs => reg(&mut ins, Register::GS),
            K::al => reg(&mut ins, Register::AL),
            K::cl => reg(&mut ins, Register::CL),
            K::ax => reg(&mut ins, Register::AX),
            K::dx => reg(&mut ins, Register::DX),
            K::eax => reg(&mut ins, Register::EAX),
            K::rax => reg(&mut ins, Register::RAX),
            K::imm8 if imm_seen => {
                ins.set_op_kind(i, OpKind::Immediate8_2nd);
                ins.set_immediate8_2nd(v as u8);
            }
            K::imm8 if matches!(code, Code::Shld_rm16_r16_imm8 | Code::Shrd_rm16_r16_imm8) => {
                // SDM Vol. 2B SHLD/SHRD: a count above the operand size leaves the result undefined.
                ins.set_op_kind(i, OpKind::Immediate8);
                ins.set_immediate8((v % 17) as u8);
            }
            K::imm8 => {
                ins.set_op_kind(i, OpKind::Immediate8);
                ins.set_immediate8(v as u8);
            }
            K::imm8_const_1 => {
                ins.set_op_kind(i, OpKind::Immediate8);
                ins.set_immediate8(1);
            }
            K::imm8sex16 => {
                ins.set_op_kind(i, OpKind::Immediate8to16);
                ins.set_immediate8to16(v as i8 as i16);
            }
            K::imm8sex32 => {
                ins.set_op_kind(i, OpKind::Immediate8to32);
                ins.set_immediate8to32(v as i8 as i32);
            }
            K::imm8sex64 => {
                ins.set_op_kind(i, OpKind::Immediate8to64);
                ins.set_immediate8to64(v as i8 as i64);
            }
            K::imm16 => {
                ins.set_op_kind(i, OpKind::Immediate16);
                ins.set_immediate16(v as u16);
            }
            K::imm32 => {
                ins.set_op_kind(i, OpKind::Immediate32);
                ins.set_immediate32(v as u32);
            }
            K::imm32sex64 => {
                ins.set_op_kind(i, OpKind::Immediate32to64);
                ins.set_immediate32to64(v as i32 as i64);
            }
            K::imm64 => {
                ins.set_op_kind(i, OpKind::Immediate64);
                ins.set_immediate64(v);
            }
            K::br16_1 | K::br16_2 => {
                ins.set_op_kind(i, OpKind::NearBranch16);
                target = Some(slot + 1 + (v % 4) as usize);
            }
            K::br32_1 | K::br32_4 => {
                ins.set_op_kind(i, OpKind::NearBranch32);
                target = Some(slot + 1 + (v % 4) as usize);
            }
            K::br64_1 | K::br64_4 => {
                ins.set_op_kind(i, OpKind::NearBranch64);
                target = Some(slot + 1 + (v % 4) as usize);
            }
            _ => return None,
        }
        if matches!(k, K::imm8 | K::imm16 | K::imm32 | K::imm8sex16 | K::imm8sex32 | K::imm8sex64) {
            imm_seen = true;
        }
    }
    if has_mem {
        let seg = [
            Register::None,
            Register::None,
            Register::None,
            Register::None,
            Register::ES,
            Register::FS,
            Register::GS,
            Register::SS,
        ];
        ins.set_segment_prefix(seg[usize::from(s.extra >> 3) % 8]);
        if s.extra & 0x40 != 0 && code.op_code().can_use_lock_prefix() && ins.op0_kind() == OpKind::Memory {
            ins.set_has_lock_prefix(true);
        }
    }
    let target = target.map(|t| t.min(n));
    if target.is_none() {
        // Checked here so one bad operand choice costs one instruction, not the block.
        Encoder::new(bits).encode(&ins, super::gen::code_ip(mode)).ok()?;
    }
    Some(Item { ins, target })
}

/// Number of snippet kinds.
pub const SNIPPETS: usize = 5;

/// Bytes of string instructions: (opcode, takes REPNE too).
const STRINGS: [(u8, bool); 14] = [
    (0xa4, false), // movsb
    (0xa5, false), // movs w/d/q
    (0xa6, true),  // cmpsb
    (0xa7, true),  // cmps
    (0xaa, false), // stosb
    (0xab, false), // stos
    (0xac, false), // lodsb
    (0xad, false), // lods
    (0xae, true),  // scasb
    (0xaf, true),  // scas
    (0x6c, false), // insb
    (0x6d, false), // ins w/d
    (0x6e, false), // outsb
    (0x6f, false), // outs w/d
];

fn decoded(bits: u32, bytes: &[u8]) -> Vec<Item> {
    decode_one(bits, bytes).map(|ins| Item { ins, target: None }).into_iter().collect()
}

/// A snippet: a short fixed shape with random parts (`kind` < [`SNIPPETS`]).
pub fn snippet(mode: FuzzMode, kind: usize, s: &InsnSpec, slot: usize, n: usize) -> Vec<Item> {
    let bits = mode.bitness();
    let [a, b, c] = s.ops;
    // `mov ecx, imm32` (B9 id) is valid in every mode; in 16-bit code it needs the 66 prefix.
    let mov_ecx = |v: u32| {
        let mut bytes = if bits == 16 { vec![0x66] } else { vec![] };
        bytes.push(0xb9);
        bytes.extend(v.to_le_bytes());
        decoded(bits, &bytes)
    };
    match kind {
        // REP string instruction with a small count.
        0 => {
            let (op, repne) = STRINGS[(a % STRINGS.len() as u64) as usize];
            let mut bytes = Vec::new();
            match (b >> 8) % 4 {
                1 => bytes.push(0x66),
                2 if bits == 64 && op & 1 == 1 && op >= 0xa0 => bytes.push(0x48),
                _ => {}
            }
            match (b >> 12) % 3 {
                0 => bytes.insert(0, 0xf3),
                1 if repne => bytes.insert(0, 0xf2),
                _ => {}
            }
            bytes.push(op);
            let mut v = mov_ecx((b % 9) as u32);
            v.extend(decoded(bits, &bytes));
            v
        }
        // Port I/O through DX (mov edx, port; in/out of 1, 2 or 4 bytes).
        1 => {
            let ports = [0x80u32, 0xe9, 0x3f8, 0x60, (c & 0xffff) as u32];
            let port = ports[(a % 5) as usize];
            let mut bytes = if bits == 16 { vec![0x66] } else { vec![] };
            bytes.push(0xba);
            bytes.extend(port.to_le_bytes());
            let mut v = decoded(bits, &bytes);
            let op = [0xecu8, 0xed, 0xee, 0xef][(b % 4) as usize];
            let io: Vec<u8> = if (b >> 2) % 2 == 1 { vec![0x66, op] } else { vec![op] };
            v.extend(decoded(bits, &io));
            v
        }
        // Flags through the stack: push imm32; popf (may set TF, DF, IOPL, AC …).
        2 => {
            let mut bytes = if bits == 16 { vec![0x66] } else { vec![] };
            bytes.push(0x68);
            // TF, VM and AC stay clear: see judge::HOST_SPECIFIC.
            bytes.extend(((a as u32) & !0x0006_0100).to_le_bytes());
            let mut v = decoded(bits, &bytes);
            let popf: Vec<u8> = if bits == 16 { vec![0x66, 0x9d] } else { vec![0x9d] };
            v.extend(decoded(bits, &popf));
            v
        }
        // Call the next slot and pop the return address (what position-independent code does).
        3 => {
            let call = match bits {
                16 => Instruction::with_branch(Code::Call_rel16, 0),
                32 => Instruction::with_branch(Code::Call_rel32_32, 0),
                _ => Instruction::with_branch(Code::Call_rel32_64, 0),
            };
            let pop: &[u8] = &[0x58 + (b % 8) as u8];
            let mut v: Vec<Item> =
                call.ok().map(|ins| Item { ins, target: Some((slot + 1).min(n)) }).into_iter().collect();
            v.extend(decoded(bits, pop));
            v
        }
        // Control registers: read CRn and write it back changed (TLB flush, mode bits, #GP).
        _ => {
            let cr = [0u8, 3, 4, 0][(a % 4) as usize];
            let modrm = |cr: u8| 0xc0 | (cr << 3);
            let mut v = decoded(bits, &[0x0f, 0x20, modrm(cr)]);
            let flip: u32 = match (b % 4, cr) {
                (0, _) => 0,
                (1, 0) => 1 << 16,                // WP
                (2, 0) => 1 << 18,                // AM
                (1, 4) => 1 << 7,                 // PGE
                (2, 4) => 1 << 9,                 // OSFXSR
                (_, _) => 1 << ((c % 31) as u32), // anything but PG, mostly #GP
            };
            let mut x = vec![0x35];
            x.extend(flip.to_le_bytes());
            if bits == 16 {
                x.insert(0, 0x66);
            }
            v.extend(decoded(bits, &x));
            v.extend(decoded(bits, &[0x0f, 0x22, modrm(cr)]));
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undocumented_instructions_the_silicon_runs_are_drawn() {
        // SALC (D6) runs outside 64-bit mode and is #UD in it, where iced-x86 decodes no SALC;
        // INT1 (F1) runs in every mode. Both execute on Intel and AMD parts, so the generator
        // draws them like any implemented instruction.
        for mode in FuzzMode::ALL {
            let t = table(mode);
            assert_eq!(t.contains(&Code::Salc), mode.bitness() != 64, "SALC in {}", mode.name());
            assert!(t.contains(&Code::Int1), "INT1 in {}", mode.name());
        }
    }
}
