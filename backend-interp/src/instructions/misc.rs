//! NOP forms, PAUSE and UD2.

use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{ud, Cpu, Flow};

/// Executes NOP (all encodings, including the multi-byte `0F 1F /0`), PAUSE and UD2.
pub(crate) fn exec(_cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        Mnemonic::Nop | Mnemonic::Pause => Ok(()),
        // SDM Vol. 2B UD2: raises #UD, always.
        Mnemonic::Ud2 => Err(ud()),
        _ => Err(form(ins)),
    }
}
