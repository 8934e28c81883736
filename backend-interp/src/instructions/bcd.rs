//! Legacy decimal arithmetic: DAA, DAS, AAA, AAS, AAM, AAD (SDM Vol. 2A; all #UD in 64-bit mode,
//! which iced-x86 already decodes as invalid).

use duet_core::state::rflags::{AF, CF};
use iced_x86::{Instruction, Mnemonic, Register};

use super::form;
use crate::cpu::{fault, vector, Cpu, Flow};
use crate::flags::szp;

/// Executes a decimal-adjust instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let al = cpu.reg(Register::AL);
    let ah = cpu.reg(Register::AH);
    let (cf, af) = (cpu.flag(CF), cpu.flag(AF));
    let bit = |on: bool, f: u64| if on { f } else { 0 };
    match ins.mnemonic() {
        Mnemonic::Daa | Mnemonic::Das => {
            let add = ins.mnemonic() == Mnemonic::Daa;
            let mut v = al;
            let mut new_cf = false;
            let new_af = (al & 0xf) > 9 || af;
            if new_af {
                // CF ← old_CF or (carry/borrow from AL ± 6).
                new_cf = cf || if add { al + 6 > 0xff } else { al < 6 };
                v = if add { (v + 6) & 0xff } else { v.wrapping_sub(6) & 0xff };
            }
            if al > 0x99 || cf {
                v = if add { (v + 0x60) & 0xff } else { v.wrapping_sub(0x60) & 0xff };
                new_cf = true;
            } else if add {
                // DAA: "ELSE CF ← 0"; DAS keeps the CF of the low-digit step.
                new_cf = false;
            }
            cpu.set_reg(Register::AL, v);
            let of = cpu.rflags & duet_core::state::rflags::OF;
            cpu.set_status(szp(v, 1) | bit(new_cf, CF) | bit(new_af, AF) | of);
        }
        Mnemonic::Aaa | Mnemonic::Aas => {
            let adjust = (al & 0xf) > 9 || af;
            if adjust {
                let ax = cpu.gpr_sized(0, 2);
                // AAA: AX ← AX + 106H; AAS: AX ← AX − 6, AH ← AH − 1.
                let nax = if ins.mnemonic() == Mnemonic::Aaa {
                    ax.wrapping_add(0x106)
                } else {
                    let t = ax.wrapping_sub(6);
                    (t & 0xff) | ((((t >> 8) & 0xff).wrapping_sub(1) & 0xff) << 8)
                };
                cpu.set_gpr_sized(0, 2, nax);
            }
            let v = cpu.reg(Register::AL) & 0xf;
            cpu.set_reg(Register::AL, v);
            cpu.rflags = (cpu.rflags & !(CF | AF)) | bit(adjust, CF | AF);
        }
        Mnemonic::Aam => {
            let base = ins.immediate(0) & 0xff;
            if base == 0 {
                return Err(fault(vector::DE));
            }
            let (q, r) = (al / base, al % base);
            cpu.set_gpr_sized(0, 2, (q << 8) | r);
            let keep = cpu.rflags & (CF | AF | duet_core::state::rflags::OF);
            cpu.set_status(szp(r, 1) | keep);
        }
        Mnemonic::Aad => {
            let base = ins.immediate(0) & 0xff;
            let v = (al + ah * base) & 0xff;
            cpu.set_gpr_sized(0, 2, v);
            let keep = cpu.rflags & (CF | AF | duet_core::state::rflags::OF);
            cpu.set_status(szp(v, 1) | keep);
        }
        _ => return Err(form(ins)),
    }
    Ok(())
}
