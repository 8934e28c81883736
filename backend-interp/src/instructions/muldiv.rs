//! MUL, IMUL (one-, two- and three-operand forms), DIV and IDIV with #DE (SDM Vol. 2A/2B).

use duet_core::state::rflags::{CF, OF};
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{fault, mask, sext, vector, Cpu, Flow};
use crate::flags;

/// Writes the double-width result of a one-operand multiply/divide: AX for bytes, else rDX:rAX.
fn set_pair(cpu: &mut Cpu, b: u32, lo: u64, hi: u64) {
    if b == 1 {
        cpu.set_gpr_sized(0, 2, (lo & 0xff) | ((hi & 0xff) << 8));
    } else {
        cpu.set_gpr_sized(0, b, lo);
        cpu.set_gpr_sized(2, b, hi);
    }
}

/// The dividend of a one-operand divide: AX for bytes, else rDX:rAX.
fn dividend(cpu: &Cpu, b: u32) -> u128 {
    if b == 1 {
        u128::from(cpu.gpr_sized(0, 2))
    } else {
        (u128::from(cpu.gpr_sized(2, b)) << (b * 8)) | u128::from(cpu.gpr_sized(0, b))
    }
}

/// MUL/IMUL flags: CF = OF = `overflow`; SF/ZF/PF (undefined) from the low half.
fn set_mul_flags(cpu: &mut Cpu, low: u64, b: u32, overflow: bool) {
    let f = flags::szp(low, b) | if overflow { CF | OF } else { 0 };
    cpu.set_status(f);
}

/// Executes a multiply or divide.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    let bits = |b: u32| b * 8;
    match (m, ins.op_count()) {
        (Mnemonic::Mul, 1) => {
            let b = crate::cpu::width(cpu.op_bytes(ins, 0));
            let src = cpu.read_op(ins, 0)?;
            let p = u128::from(cpu.gpr_sized(0, b)) * u128::from(src);
            let (lo, hi) = ((p as u64) & mask(b), ((p >> bits(b)) as u64) & mask(b));
            set_pair(cpu, b, lo, hi);
            set_mul_flags(cpu, lo, b, hi != 0);
            Ok(())
        }
        (Mnemonic::Imul, 1) => {
            let b = crate::cpu::width(cpu.op_bytes(ins, 0));
            let src = sext(cpu.read_op(ins, 0)?, b) as i64;
            let p = i128::from(sext(cpu.gpr_sized(0, b), b) as i64) * i128::from(src);
            let lo = (p as u64) & mask(b);
            let hi = ((p >> bits(b)) as u64) & mask(b);
            set_pair(cpu, b, lo, hi);
            set_mul_flags(cpu, lo, b, i128::from(sext(lo, b) as i64) != p);
            Ok(())
        }
        (Mnemonic::Imul, 2 | 3) => {
            let b = crate::cpu::width(cpu.op_bytes(ins, 0));
            let (x, y) = if ins.op_count() == 2 {
                (cpu.read_op(ins, 0)?, cpu.read_op(ins, 1)?)
            } else {
                (cpu.read_op(ins, 1)?, cpu.read_op(ins, 2)?)
            };
            let p = i128::from(sext(x, b) as i64) * i128::from(sext(y, b) as i64);
            let lo = (p as u64) & mask(b);
            cpu.write_op(ins, 0, lo)?;
            set_mul_flags(cpu, lo, b, i128::from(sext(lo, b) as i64) != p);
            Ok(())
        }
        (Mnemonic::Div, 1) => {
            let b = crate::cpu::width(cpu.op_bytes(ins, 0));
            let d = u128::from(cpu.read_op(ins, 0)?);
            if d == 0 {
                return Err(fault(vector::DE));
            }
            let n = dividend(cpu, b);
            let q = n / d;
            if q > u128::from(mask(b)) {
                return Err(fault(vector::DE));
            }
            set_pair(cpu, b, q as u64, (n % d) as u64);
            Ok(())
        }
        (Mnemonic::Idiv, 1) => {
            let b = crate::cpu::width(cpu.op_bytes(ins, 0));
            let d = i128::from(sext(cpu.read_op(ins, 0)?, b) as i64);
            if d == 0 {
                return Err(fault(vector::DE));
            }
            let raw = dividend(cpu, b);
            // Sign-extend the 2×width dividend.
            let w = 2 * bits(b);
            let n = if w >= 128 { raw as i128 } else { ((raw << (128 - w)) as i128) >> (128 - w) };
            let (q, r) = match (n.checked_div(d), n.checked_rem(d)) {
                (Some(q), Some(r)) => (q, r),
                _ => return Err(fault(vector::DE)),
            };
            let max = i128::from(mask(b) >> 1);
            if q > max || q < -max - 1 {
                return Err(fault(vector::DE));
            }
            set_pair(cpu, b, (q as u64) & mask(b), (r as u64) & mask(b));
            Ok(())
        }
        _ => Err(form(ins)),
    }
}
