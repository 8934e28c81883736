//! Generating cases: proptest strategies of plain numbers, realized into programs with iced-x86.
//!
//! A [`Spec`] is numbers only (registers, flags, segment choices, instruction picks and operand
//! choices, data words), so proptest can shrink it toward zeros: fewer instructions, the first
//! table entries, register 0, small immediates. [`realize`] turns a spec into a [`Case`]
//! deterministically: each pick selects an instruction form the interpreter implements (or a
//! snippet: REP string ops with a small count, port I/O, PUSHF/POPF, control-register moves),
//! each operand choice a register, an immediate, a forward branch target, or a memory operand
//! — mostly a pointer register aimed at the data page, sometimes RIP-relative, MMIO, or a
//! random register so the fault paths run too. Flags an instruction leaves undefined are
//! redefined (`cmp eax, eax`) before any instruction reads them, so the two runs can only
//! differ in what the architecture defines. The program ends with `out 0xf4, al`.

use std::collections::BTreeMap;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Encoder, EncodingKind, Formatter,
    Instruction, InstructionBlock, IntelFormatter, Mnemonic, OpCodeOperandKind as K, OpKind, Register,
    RflagsBits,
};
use proptest::prelude::*;

use super::case::{hex_bytes, Case, FuzzMode, CASE_FORMAT};
use super::layout::{data_selectors, CODE_ADDR, DATA_ADDR, STACK16_TOP, STACK_TOP, USER_STACK_TOP};
use super::table::{snippet, table, SNIPPETS};

/// One instruction slot: which form (`pick`), operand choices and prefix choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InsnSpec {
    /// Selects an instruction form or a snippet.
    pub pick: u16,
    /// Operand choices, one per operand.
    pub ops: [u64; 3],
    /// Prefix choices (segment override, LOCK).
    pub extra: u8,
}

/// A generated program before realization: only numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The mode the program runs in.
    pub mode: FuzzMode,
    /// Per GPR: kind (pointer, small, random, edge value) and value.
    pub regs: Vec<(u8, u64)>,
    /// RFLAGS choice bits.
    pub flags: u64,
    /// DS, ES, FS, GS choices.
    pub segs: [u8; 4],
    /// FS and GS base choices (long mode).
    pub bases: [u64; 2],
    /// The instructions.
    pub insns: Vec<InsnSpec>,
    /// Data words.
    pub data: Vec<u64>,
}

/// Number of 8-byte words of random data at [`DATA_ADDR`].
pub const DATA_WORDS: usize = 64;

/// The strategy of programs in `mode` with 1 to `max_insns` instructions.
pub fn spec_strategy(mode: FuzzMode, max_insns: usize) -> impl Strategy<Value = Spec> {
    let insn = (any::<u16>(), any::<[u64; 3]>(), any::<u8>()).prop_map(|(pick, ops, extra)| InsnSpec {
        pick,
        ops,
        extra,
    });
    // Instructions first: proptest shrinks a tuple in order, and fewer instructions matter most.
    (
        prop::collection::vec(insn, 1..=max_insns.max(1)),
        any::<u64>(),
        any::<[u8; 4]>(),
        any::<[u64; 2]>(),
        prop::collection::vec((0u8..4, any::<u64>()), 16),
        prop::collection::vec(any::<u64>(), DATA_WORDS),
    )
        .prop_map(move |(insns, flags, segs, bases, regs, data)| Spec {
            mode,
            regs,
            flags,
            segs,
            bases,
            insns,
            data,
        })
}

/// The IP of the first instruction: an offset in CS 0x800 in real mode, else the linear address.
pub fn code_ip(mode: FuzzMode) -> u64 {
    if mode == FuzzMode::Real {
        0
    } else {
        CODE_ADDR
    }
}

/// Offset of the data page within the default data segment (real mode: DS = 0xA00).
fn data_ptr(mode: FuzzMode) -> u64 {
    if mode == FuzzMode::Real {
        0
    } else {
        DATA_ADDR
    }
}

const EDGES: [u64; 14] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// The initial value of a GPR from its kind and value choice.
fn reg_value(mode: FuzzMode, index: usize, kind: u8, v: u64) -> u64 {
    let wide = mode.bitness() == 64;
    let stack = match mode {
        FuzzMode::Real | FuzzMode::Prot16 => STACK16_TOP,
        FuzzMode::Prot32Ring3 | FuzzMode::Long64Ring3 => USER_STACK_TOP,
        _ => STACK_TOP,
    };
    // RSP points at the stack; RBX, RSI and RDI always point at the data, so memory operands work.
    let kind = match index {
        4 => return stack - 0x80,
        3 | 6 | 7 => 0,
        _ => kind,
    };
    let x = match kind {
        0 => data_ptr(mode) + (v % 512),
        1 => v % 256,
        2 => v,
        _ => EDGES[(v % EDGES.len() as u64) as usize],
    };
    if wide {
        x
    } else {
        x & 0xffff_ffff
    }
}

/// Realizes `spec` into a runnable case (deterministic: the same spec gives the same case).
pub fn realize(spec: &Spec) -> Case {
    let mode = spec.mode;
    let mut regs = BTreeMap::new();
    for (i, name) in duet_core::Regs::GPR_NAMES.iter().enumerate() {
        let (k, v) = spec.regs.get(i).copied().unwrap_or((1, 0));
        let val = reg_value(mode, i, k, v);
        if val != 0 {
            regs.insert(name.to_string(), format!("{val:#x}"));
        }
    }
    // Status flags, IF and DF; IOPL stays 0 (see judge::HOST_SPECIFIC), so in ring 3 port I/O
    // and the final OUT raise #GP — a fixed end point all the same.
    let flags = spec.flags & 0x8d5 | (spec.flags & (1 << 10)) | (spec.flags & (1 << 9));
    let mut segments = BTreeMap::new();
    for (i, name) in ["ds", "es", "fs", "gs"].iter().enumerate() {
        let c = spec.segs[i];
        let v = if mode == FuzzMode::Real {
            match c % 4 {
                0 => DATA_ADDR >> 4,
                1 => 0,
                2 => CODE_ADDR >> 4,
                _ => spec.bases[i % 2] & 0xffff,
            }
        } else {
            let sels = data_selectors(mode);
            u64::from(sels[usize::from(c) % sels.len()])
        };
        segments.insert(name.to_string(), format!("{v:#x}"));
    }
    if mode.bitness() == 64 {
        for (i, name) in ["fs.base", "gs.base"].iter().enumerate() {
            let b = spec.bases[i];
            let v = match b % 4 {
                0 => 0,
                1 => DATA_ADDR,
                2 => b & 0xffff_fff8,
                _ => (((b >> 2) << 16) as i64 >> 16) as u64, // canonical
            };
            segments.insert(name.to_string(), format!("{v:#x}"));
        }
    }
    let code = assemble(mode, &spec.insns);
    let data: Vec<u8> = spec.data.iter().flat_map(|w| w.to_le_bytes()).collect();
    Case {
        format: CASE_FORMAT,
        mode,
        note: String::new(),
        regs,
        // Ring-3 cases start with IF = 1: kvm_pvm runs ring 3 with interrupts on whatever the
        // guest set, and PUSHF there shows IF = 1 (limits.rs `ring3-eflags-if-nt-ac`); at CPL 3
        // with IOPL 0 the program cannot change IF, so nothing else depends on it.
        rflags: format!("{:#x}", flags | 2 | if mode.cpl() == 3 { 0x200 } else { 0 }),
        segments,
        disasm: disassemble(mode, &code),
        code: hex_bytes(&code),
        data: hex_bytes(&data),
        cpuid: None,
        expected: None,
    }
}

/// An instruction with, for a branch, the slot it goes to.
#[derive(Clone, Debug)]
pub(super) struct Item {
    pub ins: Instruction,
    pub target: Option<usize>,
}

/// The end of every program: `out 0xf4, al` (the debug exit) — same bytes in every mode.
pub const END_MARKER: [u8; 2] = [0xe6, 0xf4];

/// Decodes `bytes` as one instruction of `bitness`.
pub(super) fn decode_one(bitness: u32, bytes: &[u8]) -> Option<Instruction> {
    let ins = Decoder::new(bitness, bytes, DecoderOptions::NONE).decode();
    (!ins.is_invalid()).then_some(ins)
}

/// Encodes the program: slots realized, flags fixed up, branches resolved, end marker last.
fn assemble(mode: FuzzMode, insns: &[InsnSpec]) -> Vec<u8> {
    let bits = mode.bitness();
    let n = insns.len();
    let table = table(mode);
    let mut slots: Vec<Vec<Item>> = insns
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let choice = usize::from(s.pick);
            if choice % 8 == 7 || table.is_empty() {
                snippet(mode, (choice / 8) % SNIPPETS, s, i, n)
            } else {
                super::table::instruction(mode, table[(choice / 8) % table.len()], s, i, n)
                    .into_iter()
                    .collect()
            }
        })
        .collect();
    slots.push(decode_one(bits, &END_MARKER).map(|ins| Item { ins, target: None }).into_iter().collect());
    fix_flags(mode, &mut slots);
    // Labels are small so they fit the branch width of 16-bit code too.
    let label = |slot: usize| 0x1000u64 + (slot as u64) * 64;
    let mut list = Vec::new();
    for (si, slot) in slots.iter().enumerate() {
        for (j, item) in slot.iter().enumerate() {
            let mut ins = item.ins;
            ins.set_ip(label(si) + j as u64);
            if let Some(t) = item.target {
                let t = label(t.min(slots.len() - 1));
                match bits {
                    16 => ins.set_near_branch16(t as u16),
                    32 => ins.set_near_branch32(t as u32),
                    _ => ins.set_near_branch64(t),
                }
            }
            list.push(ins);
        }
    }
    let ip = code_ip(mode);
    let mut code =
        match BlockEncoder::encode(bits, InstructionBlock::new(&list, ip), BlockEncoderOptions::NONE) {
            Ok(r) => r.code_buffer,
            // A block that does not encode (a branch form the block encoder cannot stretch): the
            // program without its branches, which always encodes.
            Err(_) => {
                let mut out = Vec::new();
                let mut enc = Encoder::new(bits);
                for ins in
                    list.iter().filter(|i| !i.is_jcc_short_or_near() && i.op0_kind() != OpKind::NearBranch16)
                {
                    if enc.encode(ins, ip + out.len() as u64).is_ok() {
                        out.extend(enc.take_buffer());
                    }
                }
                out.extend(END_MARKER);
                out
            }
        };
    // Never executed by KVM or the interpreter (the OUT ends the run); the QEMU reference
    // needs the convention's `cli; hlt` after the debug exit to read the state there.
    code.extend(END_TAIL);
    code
}

/// What follows the end marker: `cli; hlt` (duet-fixtures' `exit_al` convention).
pub const END_TAIL: [u8; 2] = [0xfa, 0xf4];

/// Status flags (iced bits) each slot may leave undefined, redefined before a reader.
fn fix_flags(mode: FuzzMode, slots: &mut [Vec<Item>]) {
    const STATUS: u32 =
        RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;
    let mut undef = 0u32;
    let mut at_target = vec![0u32; slots.len() + 1];
    for (si, slot) in slots.iter_mut().enumerate() {
        undef |= at_target[si];
        let mut i = 0;
        while i < slot.len() {
            let ins = slot[i].ins;
            let reads = match ins.mnemonic() {
                Mnemonic::Pushf
                | Mnemonic::Pushfd
                | Mnemonic::Pushfq
                | Mnemonic::Int
                | Mnemonic::Int3
                | Mnemonic::Into
                | Mnemonic::Int1
                | Mnemonic::Syscall => STATUS,
                // At CPL 3 with IOPL 0 port I/O raises #GP, whose frame holds FLAGS: the program's
                // final `out 0xf4` there must not push undefined flags.
                Mnemonic::In
                | Mnemonic::Out
                | Mnemonic::Insb
                | Mnemonic::Insw
                | Mnemonic::Insd
                | Mnemonic::Outsb
                | Mnemonic::Outsw
                | Mnemonic::Outsd
                    if mode.cpl() == 3 =>
                {
                    STATUS
                }
                _ => ins.rflags_read() & STATUS,
            };
            if reads & undef != 0 {
                if let Some(cmp) = defining(mode) {
                    slot.insert(i, Item { ins: cmp, target: None });
                    i += 1;
                }
                undef = 0;
            }
            // A REP string instruction or a shift by CL may run zero times and then defines
            // nothing: the flags an earlier instruction left undefined stay undefined.
            let by_cl = ins.op_count() > 1
                && ins.op_kind(ins.op_count() - 1) == OpKind::Register
                && ins.op_register(ins.op_count() - 1) == Register::CL
                && is_shift_or_rotate(ins.mnemonic());
            let defines = if ins.has_rep_prefix() || ins.has_repne_prefix() || by_cl {
                0
            } else {
                ins.rflags_modified()
            };
            undef = (undef & !defines) | ins.rflags_undefined();
            // OF of a shift or rotate by an immediate count other than 1 (after masking) is
            // undefined (SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR: "otherwise, it is
            // undefined"), even when an 8/16-bit RCL/RCR count reduces to 0 (iced does not say so).
            if is_shift_or_rotate(ins.mnemonic()) && !by_cl {
                let last = ins.op_count() - 1;
                let mask =
                    if ins.op0_register().size() == 8 || ins.memory_size().size() == 8 { 0x3f } else { 0x1f };
                if ins.op_kind(last) == OpKind::Immediate8 && u64::from(ins.immediate8()) & mask != 1 {
                    undef |= RflagsBits::OF;
                }
            }
            undef &= STATUS;
            if let Some(t) = slot[i].target {
                if let Some(x) = at_target.get_mut(t) {
                    *x |= undef;
                }
            }
            i += 1;
        }
    }
}

/// `cmp eax, eax`: defines all six status flags.
fn defining(mode: FuzzMode) -> Option<Instruction> {
    let _ = mode;
    Instruction::with2(Code::Cmp_r32_rm32, Register::EAX, Register::EAX).ok()
}

/// One line per instruction: address, bytes, Intel syntax.
pub fn disassemble(mode: FuzzMode, code: &[u8]) -> Vec<String> {
    let ip = code_ip(mode);
    let mut dec = Decoder::with_ip(mode.bitness(), code, ip, DecoderOptions::NONE);
    let mut fmt = IntelFormatter::new();
    let mut out = Vec::new();
    let mut ins = Instruction::default();
    while dec.can_decode() {
        dec.decode_out(&mut ins);
        let start = (ins.ip() - ip) as usize;
        let bytes = code.get(start..start + ins.len()).unwrap_or(&[]);
        let mut text = String::new();
        fmt.format(&ins, &mut text);
        out.push(format!("{:04x}: {:<30} {text}", ins.ip(), hex_bytes(bytes)));
    }
    out
}

/// Whether `code` is a legacy-encoded, decodable form (the table's first filter).
pub(super) fn legacy(code: Code) -> bool {
    code.op_code().encoding() == EncodingKind::Legacy && code.op_code().is_instruction()
}

/// Operand kinds the realizer fills.
pub(super) fn supported_kind(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r64_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_rm
            | K::r16_opcode
            | K::r32_reg
            | K::r32_rm
            | K::r32_opcode
            | K::r64_reg
            | K::r64_rm
            | K::r64_opcode
            | K::seg_reg
            | K::es
            | K::cs
            | K::ss
            | K::ds
            | K::fs
            | K::gs
            | K::al
            | K::cl
            | K::ax
            | K::dx
            | K::eax
            | K::rax
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm8sex64
            | K::imm16
            | K::imm32
            | K::imm32sex64
            | K::imm64
            | K::mem
            | K::br16_1
            | K::br32_1
            | K::br64_1
            | K::br16_2
            | K::br32_4
            | K::br64_4
    )
}

/// SAL/SAR/SHL/SHR, ROL/ROR/RCL/RCR and SHLD/SHRD: their OF is defined only for a count of 1
/// (SDM Vol. 2B, each instruction's Flags Affected), and a count of 0 changes no flag.
pub(crate) fn is_shift_or_rotate(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Shl
            | Mnemonic::Shr
            | Mnemonic::Sal
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    )
}

#[cfg(test)]
mod tests {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    use super::*;

    #[test]
    fn realized_programs_end_with_the_debug_exit_and_decode() {
        let mut runner = TestRunner::deterministic();
        for mode in FuzzMode::ALL {
            for _ in 0..50 {
                let spec = spec_strategy(mode, 12).new_tree(&mut runner).unwrap().current();
                let case = realize(&spec);
                let code = super::super::case::parse_bytes(&case.code).unwrap();
                assert!(code.ends_with(&[END_MARKER, END_TAIL].concat()), "{mode}: {:?}", case.disasm);
                assert_eq!(realize(&spec), case, "realization is deterministic");
                assert!(!case.disasm.is_empty());
            }
        }
    }
}
