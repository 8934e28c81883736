//! ADD/ADC/SUB/SBB/CMP/AND/OR/XOR/TEST/INC/DEC/NEG/NOT with exact status flags.

use duet_core::state::rflags::CF;
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{Cpu, Flow};
use crate::decode::Decoded;
use crate::flags;

/// Executes an arithmetic/logic instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    let b = cpu.op_bytes(ins, 0);
    // CMP and TEST only read; the others read their memory destination with write intent.
    let a = if matches!(m, Mnemonic::Cmp | Mnemonic::Test) {
        cpu.read_op(ins, 0)?
    } else {
        cpu.read_op_rmw(ins, 0)?
    };
    let cf = cpu.flag(CF);
    let (res, f, write) = match m {
        Mnemonic::Add | Mnemonic::Adc | Mnemonic::Sub | Mnemonic::Sbb | Mnemonic::Cmp => {
            let src = cpu.read_op(ins, 1)?;
            let (r, f) = match m {
                Mnemonic::Add => flags::add(a, src, false, b),
                Mnemonic::Adc => flags::add(a, src, cf, b),
                Mnemonic::Sub | Mnemonic::Cmp => flags::sub(a, src, false, b),
                _ => flags::sub(a, src, cf, b),
            };
            (r, f, m != Mnemonic::Cmp)
        }
        Mnemonic::And | Mnemonic::Or | Mnemonic::Xor | Mnemonic::Test => {
            let src = cpu.read_op(ins, 1)?;
            let r = match m {
                Mnemonic::And | Mnemonic::Test => a & src,
                Mnemonic::Or => a | src,
                _ => a ^ src,
            };
            (r, flags::logic(r, b), m != Mnemonic::Test)
        }
        // INC/DEC leave CF unchanged (SDM Vol. 2A INC, DEC "Flags Affected").
        Mnemonic::Inc => {
            let (r, f) = flags::add(a, 1, false, b);
            (r, (f & !CF) | if cf { CF } else { 0 }, true)
        }
        Mnemonic::Dec => {
            let (r, f) = flags::sub(a, 1, false, b);
            (r, (f & !CF) | if cf { CF } else { 0 }, true)
        }
        // NEG: CF = (source ≠ 0), the other flags as for 0 − source.
        Mnemonic::Neg => {
            let (r, f) = flags::sub(0, a, false, b);
            (r, f, true)
        }
        Mnemonic::Not => {
            return cpu.write_op(ins, 0, !a);
        }
        _ => return Err(form(ins)),
    };
    if write {
        cpu.write_op(ins, 0, res)?;
    }
    cpu.set_status(f);
    Ok(())
}

/// Operations of the fast register forms (const parameters of `rr`, `ri` and `unary`).
pub(crate) mod op {
    pub const ADD: u8 = 0;
    pub const ADC: u8 = 1;
    pub const SUB: u8 = 2;
    pub const SBB: u8 = 3;
    pub const CMP: u8 = 4;
    pub const AND: u8 = 5;
    pub const OR: u8 = 6;
    pub const XOR: u8 = 7;
    pub const TEST: u8 = 8;
    pub const INC: u8 = 9;
    pub const DEC: u8 = 10;
    pub const NEG: u8 = 11;
    pub const NOT: u8 = 12;
}

/// Result and status flags of `OP` on `b`-byte operands: the same flag functions as `exec`.
#[inline(always)]
pub(crate) fn compute<const OP: u8>(cpu: &Cpu, a: u64, src: u64, b: u32) -> (u64, u64) {
    let cf = cpu.flag(CF);
    match OP {
        op::ADD => flags::add(a, src, false, b),
        op::ADC => flags::add(a, src, cf, b),
        op::SUB | op::CMP => flags::sub(a, src, false, b),
        op::SBB => flags::sub(a, src, cf, b),
        op::AND | op::TEST => (a & src, flags::logic(a & src, b)),
        op::OR => (a | src, flags::logic(a | src, b)),
        _ => (a ^ src, flags::logic(a ^ src, b)),
    }
}

/// Whether `OP` writes its destination (CMP and TEST do not).
pub(crate) const fn writes(op: u8) -> bool {
    op != op::CMP && op != op::TEST
}

/// `exec` for a GPR destination and a source value: the same flag functions, no operand decoding.
#[inline(always)]
fn binary<const OP: u8>(cpu: &mut Cpu, d: &Decoded, a: u64, src: u64) -> Flow {
    let b = u32::from(d.ops.bytes);
    let (res, f) = compute::<OP>(cpu, a, src, b);
    if writes(OP) {
        cpu.set_gpr_sized(usize::from(d.ops.r0), b, res);
    }
    cpu.set_status(f);
    Ok(())
}

/// `op r, r` (both GPRs of the same width, neither AH–BH).
pub(crate) fn rr<const OP: u8>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let b = u32::from(d.ops.bytes);
    let a = cpu.gpr_sized(usize::from(d.ops.r0), b);
    let src = cpu.gpr_sized(usize::from(d.ops.r1), b);
    binary::<OP>(cpu, d, a, src)
}

/// `op r, [m]`.
pub(crate) fn rm<const OP: u8>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let b = u32::from(d.ops.bytes);
    let a = cpu.gpr_sized(usize::from(d.ops.r0), b);
    let src = cpu.read_mem(d.ops.mem.seg, cpu.ea_of(&d.ops.mem), b)?;
    binary::<OP>(cpu, d, a, src)
}

/// `op [m], r` (`IMM` false) or `op [m], imm`: read, compute, write back, then the flags (a
/// faulting write leaves them as they were, as `exec` does).
pub(crate) fn mem<const OP: u8, const IMM: bool>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let b = u32::from(d.ops.bytes);
    let (seg, off) = (d.ops.mem.seg, cpu.ea_of(&d.ops.mem));
    // A read-modify-write reads with write intent (W/R = 1 in a #PF; `Cpu::read_mem_rmw`).
    let a = if writes(OP) { cpu.read_mem_rmw(seg, off, b)? } else { cpu.read_mem(seg, off, b)? };
    let src = if IMM { d.ops.imm } else { cpu.gpr_sized(usize::from(d.ops.r1), b) };
    let (res, f) = compute::<OP>(cpu, a, src, b);
    if writes(OP) {
        cpu.write_mem(seg, off, b, res)?;
    }
    cpu.set_status(f);
    Ok(())
}

/// `op r, imm`.
pub(crate) fn ri<const OP: u8>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let a = cpu.gpr_sized(usize::from(d.ops.r0), u32::from(d.ops.bytes));
    binary::<OP>(cpu, d, a, d.ops.imm)
}

/// INC/DEC/NEG/NOT on a GPR.
pub(crate) fn unary<const OP: u8>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let b = u32::from(d.ops.bytes);
    let r = usize::from(d.ops.r0);
    let a = cpu.gpr_sized(r, b);
    let cf = if cpu.flag(CF) { CF } else { 0 };
    let (res, f) = match OP {
        op::INC => {
            let (res, f) = flags::add(a, 1, false, b);
            (res, (f & !CF) | cf)
        }
        op::DEC => {
            let (res, f) = flags::sub(a, 1, false, b);
            (res, (f & !CF) | cf)
        }
        op::NEG => flags::sub(0, a, false, b),
        _ => {
            cpu.set_gpr_sized(r, b, !a);
            return Ok(());
        }
    };
    cpu.set_gpr_sized(r, b, res);
    cpu.set_status(f);
    Ok(())
}
