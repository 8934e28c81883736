//! CLC/STC/CMC/CLD/STD, CLI/STI (with the STI interrupt shadow), LAHF/SAHF, and condition codes.

use duet_core::state::rflags::{self, AF, CF, DF, OF, PF, SF, ZF};
use iced_x86::{ConditionCode, Instruction, Mnemonic};

use super::form;
use crate::cpu::{ud, Cpu, Flow};

/// Evaluates a condition code on RFLAGS (SDM Vol. 1 Appendix B, Table B-1).
pub(crate) fn cond(cpu: &Cpu, cc: ConditionCode) -> bool {
    let f = |b| cpu.flag(b);
    match cc {
        ConditionCode::o => f(OF),
        ConditionCode::no => !f(OF),
        ConditionCode::b => f(CF),
        ConditionCode::ae => !f(CF),
        ConditionCode::e => f(ZF),
        ConditionCode::ne => !f(ZF),
        ConditionCode::be => f(CF) || f(ZF),
        ConditionCode::a => !f(CF) && !f(ZF),
        ConditionCode::s => f(SF),
        ConditionCode::ns => !f(SF),
        ConditionCode::p => f(PF),
        ConditionCode::np => !f(PF),
        ConditionCode::l => f(SF) != f(OF),
        ConditionCode::ge => f(SF) == f(OF),
        ConditionCode::le => f(ZF) || f(SF) != f(OF),
        ConditionCode::g => !f(ZF) && f(SF) == f(OF),
        ConditionCode::None => true,
    }
}

/// Executes a flag-group instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        Mnemonic::Clc => cpu.set_flag(CF, false),
        Mnemonic::Stc => cpu.set_flag(CF, true),
        Mnemonic::Cmc => cpu.rflags ^= CF,
        Mnemonic::Cld => cpu.set_flag(DF, false),
        Mnemonic::Std => cpu.set_flag(DF, true),
        Mnemonic::Cli => cpu.cli_sti(false)?,
        Mnemonic::Sti => cpu.cli_sti(true)?,
        Mnemonic::Lahf | Mnemonic::Sahf => {
            if cpu.mode64() && cpu.cpuid.lookup(0x8000_0001, 0)[2] & 1 == 0 {
                return Err(ud());
            }
            if ins.mnemonic() == Mnemonic::Lahf {
                // AH ← EFLAGS(SF:ZF:0:AF:0:PF:1:CF).
                let v = (cpu.rflags & (SF | ZF | AF | PF | CF)) | rflags::FIXED;
                cpu.set_reg(iced_x86::Register::AH, v);
            } else {
                let ah = cpu.reg(iced_x86::Register::AH);
                cpu.set_status((cpu.rflags & OF) | (ah & (SF | ZF | AF | PF | CF)));
            }
        }
        _ => return Err(form(ins)),
    }
    Ok(())
}
