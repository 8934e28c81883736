//! NOP forms, PAUSE, UD2, BOUND and ARPL.

use duet_core::state::rflags::ZF;
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{fault, mask, sext, ud, Cpu, Flow};

/// #BR, the BOUND range exceeded exception.
const BR: u8 = 5;

/// Executes NOP (all encodings, including the multi-byte `0F 1F /0`), PAUSE, UD2, BOUND, ARPL.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        Mnemonic::Nop | Mnemonic::Pause => Ok(()),
        // SDM Vol. 2B UD2: raises #UD, always.
        Mnemonic::Ud2 => Err(ud()),
        Mnemonic::Bound => {
            // SDM Vol. 2A BOUND: #BR unless lower ≤ index ≤ upper (signed); a register bound is #UD.
            if !Cpu::is_mem(ins, 1) {
                return Err(ud());
            }
            let b = cpu.op_bytes(ins, 0);
            let index = sext(cpu.read_op(ins, 0)?, b) as i64;
            let (seg, ea) = cpu.mem_addr(ins, 1);
            let am = mask(crate::operand::addr_bytes(ins, cpu.bitness()));
            let lower = sext(cpu.read_mem(seg, ea, b)?, b) as i64;
            let upper = sext(cpu.read_mem(seg, ea.wrapping_add(u64::from(b)) & am, b)?, b) as i64;
            if index < lower || index > upper {
                return Err(fault(BR));
            }
            Ok(())
        }
        Mnemonic::Arpl => {
            // SDM Vol. 2A ARPL: #UD in real and virtual-8086 mode.
            if !cpu.protected() || cpu.v86() {
                return Err(ud());
            }
            let dest = cpu.read_op(ins, 0)?;
            let src = cpu.read_op(ins, 1)?;
            if dest & 3 < src & 3 {
                cpu.write_op(ins, 0, (dest & !3) | (src & 3))?;
                cpu.set_flag(ZF, true);
            } else {
                cpu.set_flag(ZF, false);
            }
            Ok(())
        }
        _ => Err(form(ins)),
    }
}
