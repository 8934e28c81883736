//! CLC/STC/CMC/CLD/STD, CLI/STI (with the STI interrupt shadow), LAHF/SAHF, and condition codes.

use duet_core::state::rflags::{self, AF, CF, DF, IF, OF, PF, SF, ZF};
use iced_x86::{ConditionCode, Instruction, Mnemonic};

use super::form;
use crate::cpu::{gp, ud, Cpu, Flow};

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

/// Whether CLI/STI are allowed: real mode, or CPL ≤ IOPL (SDM Vol. 2A CLI, Vol. 2B STI).
fn if_allowed(cpu: &Cpu) -> bool {
    !cpu.protected() || cpu.cpl() <= cpu.iopl()
}

/// Executes a flag-group instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        Mnemonic::Clc => cpu.set_flag(CF, false),
        Mnemonic::Stc => cpu.set_flag(CF, true),
        Mnemonic::Cmc => cpu.rflags ^= CF,
        Mnemonic::Cld => cpu.set_flag(DF, false),
        Mnemonic::Std => cpu.set_flag(DF, true),
        Mnemonic::Cli | Mnemonic::Sti if !if_allowed(cpu) && cpu.sregs.cr4 & 3 != 0 => {
            // CR4.VME/PVI turn this #GP into a VIF update; that extension is not modelled.
            return Err(crate::cpu::unsupported("CLI/STI under CR4.VME/PVI"));
        }
        Mnemonic::Cli => {
            if !if_allowed(cpu) {
                return Err(gp(0));
            }
            cpu.set_flag(IF, false);
        }
        Mnemonic::Sti => {
            if !if_allowed(cpu) {
                return Err(gp(0));
            }
            // SDM Vol. 2B STI: interrupts stay inhibited until after the next instruction,
            // only when IF was 0 before.
            if !cpu.flag(IF) {
                cpu.shadow = 2;
            }
            cpu.set_flag(IF, true);
        }
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
