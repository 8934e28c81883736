//! SHL/SAL/SHR/SAR/ROL/ROR/RCL/RCR and SHLD/SHRD with masked counts (flags in `crate::flags::shift`).

use duet_core::state::rflags::{CF, OF, STATUS};
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{Cpu, Flow};
use crate::decode::Decoded;
use crate::flags::{double_shift, shift, ShiftOp};

/// Executes a shift or rotate.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    if matches!(ins.mnemonic(), Mnemonic::Shld | Mnemonic::Shrd) {
        let b = cpu.op_bytes(ins, 0);
        let a = cpu.read_op_rmw(ins, 0)?;
        let src = cpu.read_op(ins, 1)?;
        let count = cpu.read_op(ins, 2)? as u32;
        let out = double_shift(ins.mnemonic() == Mnemonic::Shld, a, src, count, b);
        cpu.flag_effect = Some(flag_effect(ins_masks(ins), count, b, out.flags.is_some()));
        return store(cpu, ins, a, out);
    }
    let op = match ins.mnemonic() {
        Mnemonic::Shl | Mnemonic::Sal => ShiftOp::Shl,
        Mnemonic::Shr => ShiftOp::Shr,
        Mnemonic::Sar => ShiftOp::Sar,
        Mnemonic::Rol => ShiftOp::Rol,
        Mnemonic::Ror => ShiftOp::Ror,
        Mnemonic::Rcl => ShiftOp::Rcl,
        Mnemonic::Rcr => ShiftOp::Rcr,
        _ => return Err(form(ins)),
    };
    let b = cpu.op_bytes(ins, 0);
    let a = cpu.read_op_rmw(ins, 0)?;
    let count = if ins.op_count() > 1 { cpu.read_op(ins, 1)? as u32 } else { 1 };
    let out = shift(op, a, count, cpu.flag(CF), b);
    cpu.flag_effect = Some(flag_effect(ins_masks(ins), count, b, out.flags.is_some()));
    store(cpu, ins, a, out)
}

/// iced-x86's static (written, undefined) RFLAGS masks of `ins`.
fn ins_masks(ins: &Instruction) -> (u64, u64) {
    (crate::flags::from_iced(ins.rflags_modified()), crate::flags::from_iced(ins.rflags_undefined()))
}

/// This execution's (written, undefined) flags: a count that masks to 0 changes no flag, and OF
/// is defined only for a count of 1 (SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR, SHLD/SHRD:
/// "The OF flag is affected only for 1-bit shifts … otherwise, it is undefined").
///
/// An 8- or 16-bit RCL/RCR whose masked count is a multiple of 9 or 17 (tempCOUNT = 0) changes
/// nothing, but its masked count is not 0, so OF is still undefined (SDM Vol. 2B RCL/RCR/ROL/ROR,
/// Flags: "If the masked count is 0, the flags are not affected … otherwise (masked count is
/// greater than 1) the OF flag is undefined").
fn flag_effect((written, undefined): (u64, u64), count: u32, bytes: u32, changed: bool) -> (u64, u64) {
    let masked = count & if crate::cpu::width(bytes) == 8 { 0x3f } else { 0x1f };
    match (changed, masked) {
        (_, 0) => (0, 0),
        (false, _) => (0, OF),
        (true, 1) => (written, undefined & !OF),
        (true, _) => (written, undefined | OF),
    }
}

/// Writes a shift's result and flags; with a zero count the unchanged value is written back.
fn store(cpu: &mut Cpu, ins: &Instruction, a: u64, out: crate::flags::ShiftOut) -> Flow {
    match out.flags {
        Some(f) => {
            cpu.write_op(ins, 0, out.res)?;
            let changed = STATUS & !out.keep;
            cpu.rflags = (cpu.rflags & !changed) | (f & changed);
        }
        // Count 0 (after masking): no value or flag changes (SDM Vol. 2B SAL/SAR/SHL/SHR, RCL/
        // RCR/ROL/ROR: "If the count is 0, the flags are not affected"), but the destination is
        // still written: a 32-bit register is zero-extended in 64-bit mode, and a memory
        // destination gets its write cycle — the hardware sets the page's dirty bit (SDM Vol. 3A
        // §4.8) and an MMIO destination sees the write (KVM, fixtures/corpus
        // rol-cl-zero-ram-dirty-bit.json and shift-count-zero-still-writes.json).
        None => cpu.write_op(ins, 0, a)?,
    }
    Ok(())
}

/// Operations of the fast register forms (const parameters of `ri` and `rcl_count`).
pub(crate) mod op {
    pub const SHL: u8 = 0;
    pub const SHR: u8 = 1;
    pub const SAR: u8 = 2;
    pub const ROL: u8 = 3;
    pub const ROR: u8 = 4;
    pub const RCL: u8 = 5;
    pub const RCR: u8 = 6;
}

const fn shift_op(op: u8) -> ShiftOp {
    match op {
        op::SHL => ShiftOp::Shl,
        op::SHR => ShiftOp::Shr,
        op::SAR => ShiftOp::Sar,
        op::ROL => ShiftOp::Rol,
        op::ROR => ShiftOp::Ror,
        op::RCL => ShiftOp::Rcl,
        _ => ShiftOp::Rcr,
    }
}

/// A shift or rotate of a GPR by `count`, stored as `store` does for a register destination.
#[inline(always)]
fn reg<const OP: u8>(cpu: &mut Cpu, d: &Decoded, count: u32) -> Flow {
    let b = u32::from(d.ops.bytes);
    let r = usize::from(d.ops.r0);
    let a = cpu.gpr_sized(r, b);
    let out = shift(shift_op(OP), a, count, cpu.flag(CF), b);
    cpu.flag_effect = Some(flag_effect((d.written, d.undefined), count, b, out.flags.is_some()));
    cpu.set_gpr_sized(r, b, out.res);
    if let Some(f) = out.flags {
        let changed = STATUS & !out.keep;
        cpu.rflags = (cpu.rflags & !changed) | (f & changed);
    }
    Ok(())
}

/// `shift r, imm8` (and the by-one forms).
pub(crate) fn ri<const OP: u8>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    reg::<OP>(cpu, d, d.ops.imm as u32)
}

/// `shift r, CL`.
pub(crate) fn rcl_count<const OP: u8>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let count = cpu.gpr_sized(1, 1) as u32;
    reg::<OP>(cpu, d, count)
}
