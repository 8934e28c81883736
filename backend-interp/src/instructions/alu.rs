//! ADD/ADC/SUB/SBB/CMP/AND/OR/XOR/TEST/INC/DEC/NEG/NOT with exact status flags.

use duet_core::state::rflags::CF;
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{Cpu, Flow};
use crate::flags;

/// Executes an arithmetic/logic instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    let b = cpu.op_bytes(ins, 0);
    let a = cpu.read_op(ins, 0)?;
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
