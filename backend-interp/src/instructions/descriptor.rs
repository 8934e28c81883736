//! Descriptor queries: LAR, LSL, VERR, VERW (SDM Vol. 2A LAR/LSL, Vol. 2B VERR/VERW).
//! Each sets ZF = 1 when the selector passes the checks, else ZF = 0 and the destination is kept.

use duet_core::state::rflags::ZF;
use duet_core::Segment;
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{ud, Abort, Cpu, Flow};

/// Whether a system descriptor type is visible to LAR (`lar`) or LSL (SDM Vol. 2A Table 3-60/3-61).
fn system_type_ok(ty: u8, lar: bool, long: bool) -> bool {
    if long {
        matches!(ty, 0x2 | 0x9 | 0xb) || (lar && ty == 0xc)
    } else {
        matches!(ty, 0x1 | 0x2 | 0x3 | 0x9 | 0xb) || (lar && matches!(ty, 0x4 | 0x5 | 0xc))
    }
}

/// Executes LAR, LSL, VERR or VERW.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    if !cpu.protected() || cpu.v86() {
        return Err(ud());
    }
    let m = ins.mnemonic();
    let src_op = if matches!(m, Mnemonic::Lar | Mnemonic::Lsl) { 1 } else { 0 };
    let sel = cpu.read_op(ins, src_op)? as u16;
    let found = if sel & 0xfffc == 0 {
        None
    } else {
        match cpu.descriptor(sel) {
            Ok((raw, _)) => Some(raw),
            // A selector beyond the table limit just clears ZF; a #PF reading it is real.
            Err(Abort::Exception(e)) if e.vector == crate::cpu::vector::GP => None,
            Err(other) => return Err(other),
        }
    };
    let Some(raw) = found else {
        cpu.set_flag(ZF, false);
        return Ok(());
    };
    let d = Segment::from_descriptor(sel, raw);
    let rpl = (sel & 3) as u8;
    let cpl = cpu.cpl();
    let code = d.s && d.type_ & 8 != 0;
    let conforming = code && d.type_ & 4 != 0;
    let privileged_ok = conforming || (d.dpl >= cpl && d.dpl >= rpl);
    let ok = match m {
        Mnemonic::Lar | Mnemonic::Lsl => {
            let type_ok = d.s || system_type_ok(d.type_, m == Mnemonic::Lar, cpu.long_mode());
            // Conforming code skips the privilege check only for LAR/LSL on code segments.
            let priv_ok = if d.s && conforming { true } else { d.dpl >= cpl && d.dpl >= rpl };
            type_ok && priv_ok
        }
        Mnemonic::Verr => d.s && (!code || d.type_ & 2 != 0) && privileged_ok,
        Mnemonic::Verw => d.s && !code && d.type_ & 2 != 0 && d.dpl >= cpl && d.dpl >= rpl,
        _ => return Err(form(ins)),
    };
    cpu.set_flag(ZF, ok);
    if ok && m == Mnemonic::Lar {
        // Access rights: bits 23:8 of the descriptor's high dword (type, S, DPL, P, AVL, L, D/B, G).
        cpu.write_op(ins, 0, (raw >> 32) & 0x00f0_ff00)?;
    } else if ok && m == Mnemonic::Lsl {
        cpu.write_op(ins, 0, u64::from(d.limit))?;
    }
    Ok(())
}
