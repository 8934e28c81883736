//! NOP forms and hints (PAUSE, ENDBR, fences, prefetches, CLFLUSH, WAIT), UD0/UD1/UD2, BOUND, ARPL,
//! and the undocumented SALC.

use duet_core::state::rflags::{CF, ZF};
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{fault, mask, sext, ud, Cpu, Flow};

/// #BR, the BOUND range exceeded exception.
const BR: u8 = 5;

/// Executes NOP (all encodings, including the multi-byte `0F 1F /0`), PAUSE, UD2, BOUND, ARPL.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        // Hints and fences have no architectural effect here: NOP, PAUSE, reserved NOPs, ENDBR
        // (no CET), the fences (one CPU, no weakly ordered memory) and the prefetches.
        Mnemonic::Nop
        | Mnemonic::Pause
        | Mnemonic::Reservednop
        | Mnemonic::Endbr32
        | Mnemonic::Endbr64
        | Mnemonic::Lfence
        | Mnemonic::Mfence
        | Mnemonic::Sfence
        | Mnemonic::Prefetchnta
        | Mnemonic::Prefetcht0
        | Mnemonic::Prefetcht1
        | Mnemonic::Prefetcht2
        | Mnemonic::Prefetch
        | Mnemonic::Prefetchw => Ok(()),
        // CLFLUSH checks the address like a byte read (SDM Vol. 2A CLFLUSH); there is no cache.
        Mnemonic::Clflush => {
            let (seg, off) = cpu.mem_addr(ins, 0);
            let lin = cpu.seg_linear(seg, off, 1, false)?;
            cpu.translate(lin, crate::mmu::Kind::Read, false)?;
            Ok(())
        }
        // WAIT/FWAIT: #NM when CR0.MP and CR0.TS are both set; no x87 exception can be pending.
        Mnemonic::Wait => {
            let cr0 = cpu.sregs.cr0;
            if cr0 & 0xa == 0xa {
                return Err(fault(crate::cpu::vector::NM));
            }
            Ok(())
        }
        // SALC (D6) has no manual page, but Intel and AMD parts execute it outside 64-bit mode:
        // AL ← FFh if CF else 00h, no flag changed (QEMU target/i386/tcg/translate.c and Bochs
        // implement it so; this host's silicon agrees, tests/vendors_data.rs). In 64-bit mode
        // it is #UD: iced-x86 decodes D6 as invalid there and the step loop raises #UD.
        Mnemonic::Salc => {
            let v = if cpu.flag(CF) { 0xff } else { 0 };
            cpu.set_gpr_sized(0, 1, v);
            Ok(())
        }
        // SDM Vol. 2B UD: UD0, UD1, UD2 raise #UD, always.
        Mnemonic::Ud2 | Mnemonic::Ud0 | Mnemonic::Ud1 => Err(ud()),
        Mnemonic::Bound => {
            // SDM Vol. 2A BOUND: #BR unless lower ≤ index ≤ upper (signed); a register bound is #UD.
            if !Cpu::is_mem(ins, 1) {
                return Err(ud());
            }
            let b = cpu.op_bytes(ins, 0);
            let index = sext(cpu.read_op(ins, 0)?, b) as i64;
            let (seg, ea) = cpu.mem_addr(ins, 1);
            // The bounds are one operand of twice the index size (SDM Vol. 2A BOUND, Exceptions).
            cpu.seg_linear(seg, ea, 2 * b, false)?;
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
