//! BT/BTS/BTR/BTC (including memory bit strings addressed by a register offset) and BSF/BSR.

use duet_core::state::rflags::{CF, ZF};
use iced_x86::{Instruction, Mnemonic, OpKind};

use super::form;
use crate::cpu::{mask, sext, Cpu, Flow};
use crate::operand::addr_bytes;

/// Executes a bit-test or bit-scan instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    let b = crate::cpu::width(cpu.op_bytes(ins, 0));
    let bits = u64::from(b * 8);
    match m {
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
            let raw = cpu.read_op(ins, 1)?;
            let reg_offset = ins.op_kind(1) == OpKind::Register;
            let (val, bit, place) = if Cpu::is_mem(ins, 0) && reg_offset {
                // SDM Vol. 2A BT: a register bit offset is signed and selects a unit beyond the
                // addressed operand: address + (offset SAR log2(bits)) × size.
                let off = sext(raw, b) as i64;
                let unit = off.div_euclid(bits as i64);
                let (seg, ea) = cpu.mem_addr(ins, 0);
                let am = mask(addr_bytes(ins, cpu.bitness()));
                let addr = ea.wrapping_add((unit as u64).wrapping_mul(u64::from(b))) & am;
                let v = if m == Mnemonic::Bt {
                    cpu.read_mem(seg, addr, b)?
                } else {
                    cpu.read_mem_rmw(seg, addr, b)?
                };
                (v, off.rem_euclid(bits as i64) as u64, Some((seg, addr)))
            } else {
                let v = if m == Mnemonic::Bt { cpu.read_op(ins, 0)? } else { cpu.read_op_rmw(ins, 0)? };
                (v, raw % bits, None)
            };
            let set = (val >> bit) & 1 != 0;
            let nv = match m {
                Mnemonic::Bts => val | (1 << bit),
                Mnemonic::Btr => val & !(1 << bit),
                Mnemonic::Btc => val ^ (1 << bit),
                _ => val,
            };
            if m != Mnemonic::Bt {
                match place {
                    Some((seg, addr)) => cpu.write_mem(seg, addr, b, nv)?,
                    None => cpu.write_op(ins, 0, nv)?,
                }
            }
            cpu.set_flag(CF, set);
            Ok(())
        }
        Mnemonic::Bsf | Mnemonic::Bsr => exec_scan(cpu, ins, m == Mnemonic::Bsf),
        _ => Err(form(ins)),
    }
}

/// BSF (`forward`) or BSR; also LZCNT/TZCNT on a profile without them, which execute as these.
pub(crate) fn exec_scan(cpu: &mut Cpu, ins: &Instruction, forward: bool) -> Flow {
    scan(cpu, ins, forward).map(|_| ())
}

/// `exec_scan`, returning the source operand it scanned.
pub(crate) fn scan(cpu: &mut Cpu, ins: &Instruction, forward: bool) -> Flow<u64> {
    let b = crate::cpu::width(cpu.op_bytes(ins, 0));
    let src = cpu.read_op(ins, 1)? & mask(b);
    if src == 0 {
        // ZF = 1; the destination is undefined (SDM Vol. 2A BSF/BSR). AMD leaves it unchanged,
        // all 64 bits (AMD64 APM Vol. 3 BSF/BSR: a zero source "does not change the contents of
        // the destination register"); Intel
        // writes the old value back at the operand size, so a 32-bit destination in 64-bit
        // mode loses bits 63:32 (Linux, arch/x86/include/asm/bitops.h, on `ffs`: "AMD64 says
        // BSFL won't clobber the dest reg if x==0; Intel64 says the dest reg is undefined if
        // x==0, but their CPU architect says its value is written to set it to the same as
        // before, except that the top 32 bits will be cleared"). The other status flags stay
        // as they were (undefined on both).
        cpu.set_flag(ZF, true);
        if b == 4 && !cpu.amd() && ins.op_kind(0) == OpKind::Register {
            let old = cpu.read_op(ins, 0)?;
            cpu.write_op(ins, 0, old)?;
        }
        return Ok(src);
    }
    let idx = if forward { src.trailing_zeros() } else { 63 - src.leading_zeros() };
    cpu.write_op(ins, 0, u64::from(idx))?;
    cpu.set_flag(ZF, false);
    Ok(src)
}
