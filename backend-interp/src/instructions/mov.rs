//! Data movement: MOV (incl. moffs, segment, control and debug registers), MOVZX/MOVSX/MOVSXD, LEA,
//! XCHG, CBW…CQO, BSWAP, CMPXCHG, CMPXCHG8B, XADD, XLATB, LDS/LES/LFS/LGS/LSS, CMOVcc and SETcc.

use duet_core::state::rflags::ZF;
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::flags::cond;
use super::{form, system};
use crate::cpu::{sext, ud, Cpu, Flow};
use crate::flags;

fn is_reg(ins: &Instruction, op: u32, pred: fn(Register) -> bool) -> bool {
    ins.op_kind(op) == OpKind::Register && pred(ins.op_register(op))
}

/// Executes a data-movement instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    match m {
        Mnemonic::Mov => mov(cpu, ins),
        Mnemonic::Movzx => {
            let v = cpu.read_op(ins, 1)?;
            cpu.write_op(ins, 0, v)
        }
        Mnemonic::Movsx | Mnemonic::Movsxd => {
            let b = cpu.op_bytes(ins, 1);
            let v = sext(cpu.read_op(ins, 1)?, b);
            cpu.write_op(ins, 0, v)
        }
        Mnemonic::Lea => {
            if ins.op_kind(1) != OpKind::Memory {
                return Err(ud());
            }
            let ea = cpu.ea(ins);
            cpu.write_op(ins, 0, ea)
        }
        Mnemonic::Xchg => {
            // XCHG with memory is locked and read-modify-write: its read has write intent.
            let a = cpu.read_op_rmw(ins, 0)?;
            let b = cpu.read_op_rmw(ins, 1)?;
            // Memory (if any) first, so a fault leaves both registers intact.
            if Cpu::is_mem(ins, 1) {
                cpu.write_op(ins, 1, a)?;
                cpu.write_op(ins, 0, b)
            } else {
                cpu.write_op(ins, 0, b)?;
                cpu.write_op(ins, 1, a)
            }
        }
        Mnemonic::Cbw => {
            let v = sext(cpu.gpr_sized(0, 1), 1);
            cpu.set_gpr_sized(0, 2, v);
            Ok(())
        }
        Mnemonic::Cwde => {
            let v = sext(cpu.gpr_sized(0, 2), 2);
            cpu.set_gpr_sized(0, 4, v);
            Ok(())
        }
        Mnemonic::Cdqe => {
            let v = sext(cpu.gpr_sized(0, 4), 4);
            cpu.set_gpr_sized(0, 8, v);
            Ok(())
        }
        Mnemonic::Cwd | Mnemonic::Cdq | Mnemonic::Cqo => {
            let b = match m {
                Mnemonic::Cwd => 2,
                Mnemonic::Cdq => 4,
                _ => 8,
            };
            let neg = flags::msb(cpu.gpr_sized(0, b), b);
            cpu.set_gpr_sized(2, b, if neg { u64::MAX } else { 0 });
            Ok(())
        }
        Mnemonic::Bswap => {
            let b = cpu.op_bytes(ins, 0);
            let v = cpu.read_op(ins, 0)?;
            let r = match b {
                4 => u64::from((v as u32).swap_bytes()),
                8 => v.swap_bytes(),
                // BSWAP r16 is undefined (SDM Vol. 2A); current parts produce zero.
                _ => 0,
            };
            cpu.write_op(ins, 0, r)
        }
        Mnemonic::Cmpxchg => {
            let b = cpu.op_bytes(ins, 0);
            let dest = cpu.read_op_rmw(ins, 0)?;
            let acc = cpu.gpr_sized(0, b);
            let (_, f) = flags::sub(acc, dest, false, b);
            if acc == dest {
                let src = cpu.read_op(ins, 1)?;
                cpu.write_op(ins, 0, src)?;
            } else {
                // SDM Vol. 2A CMPXCHG: "the destination operand receives a write cycle without
                // regard to the result of the comparison" — a bus cycle, so a memory destination
                // is written back with its own value. A register destination is not written at
                // all: a 32-bit one in 64-bit mode keeps its upper half (KVM on the silicon,
                // fixtures/corpus cmpxchg-r32-fail-upper-half.json; QEMU agrees since 8.0).
                // Only the accumulator is loaded (and, at 32 bits, zero-extended).
                if Cpu::is_mem(ins, 0) {
                    cpu.write_op(ins, 0, dest)?;
                }
                cpu.set_gpr_sized(0, b, dest);
            }
            cpu.set_status(f);
            Ok(())
        }
        Mnemonic::Cmpxchg8b => {
            if !Cpu::is_mem(ins, 0) {
                return Err(ud());
            }
            let (seg, off) = cpu.mem_addr(ins, 0);
            let cur = cpu.read_mem_rmw(seg, off, 8)?;
            let edx_eax = (cpu.gpr_sized(2, 4) << 32) | cpu.gpr_sized(0, 4);
            if cur == edx_eax {
                let ecx_ebx = (cpu.gpr_sized(1, 4) << 32) | cpu.gpr_sized(3, 4);
                cpu.write_mem(seg, off, 8, ecx_ebx)?;
                cpu.set_flag(ZF, true);
            } else {
                cpu.write_mem(seg, off, 8, cur)?;
                cpu.set_gpr_sized(0, 4, cur & 0xffff_ffff);
                cpu.set_gpr_sized(2, 4, cur >> 32);
                cpu.set_flag(ZF, false);
            }
            Ok(())
        }
        Mnemonic::Xadd => {
            let b = cpu.op_bytes(ins, 0);
            let dest = cpu.read_op_rmw(ins, 0)?;
            let src = cpu.read_op(ins, 1)?;
            let (sum, f) = flags::add(dest, src, false, b);
            cpu.write_op(ins, 0, sum)?;
            if !Cpu::is_mem(ins, 1) && ins.op_register(1) != ins.op_register(0) {
                cpu.write_op(ins, 1, dest)?;
            }
            cpu.set_status(f);
            Ok(())
        }
        Mnemonic::Lds | Mnemonic::Les | Mnemonic::Lss | Mnemonic::Lfs | Mnemonic::Lgs => {
            // SDM Vol. 2A LDS/LES/LFS/LGS/LSS: offset then selector from m16:16/32/64.
            if !Cpu::is_mem(ins, 1) {
                return Err(ud());
            }
            let sr = match m {
                Mnemonic::Lds => Register::DS,
                Mnemonic::Les => Register::ES,
                Mnemonic::Lss => Register::SS,
                Mnemonic::Lfs => Register::FS,
                _ => Register::GS,
            };
            let size = cpu.op_bytes(ins, 0);
            let (seg, ea) = cpu.mem_addr(ins, 1);
            // The far pointer is one operand of size + 2 bytes: all of it must lie within the
            // segment (SDM Vol. 2A LDS/LES/LFS/LGS/LSS, Exceptions: #GP(0)/#SS(0) if a memory
            // operand effective address is outside the segment limit), so a pointer at offset
            // 0xFFFE of a 64 KiB segment faults rather than reading its selector from offset 0.
            cpu.seg_linear(seg, ea, size + 2, false)?;
            let off = cpu.read_mem(seg, ea, size)?;
            let am = crate::cpu::mask(crate::operand::addr_bytes(ins, cpu.bitness()));
            let sel = cpu.read_mem(seg, ea.wrapping_add(u64::from(size)) & am, 2)? as u16;
            cpu.load_data_seg(sr, sel)?;
            if sr == Register::SS {
                cpu.shadow = 2;
            }
            cpu.write_op(ins, 0, off)
        }
        Mnemonic::Xlatb => {
            let v = cpu.read_op(ins, 0)?;
            cpu.set_reg(Register::AL, v);
            Ok(())
        }
        _ if m as u32 >= Mnemonic::Cmova as u32 && m as u32 <= Mnemonic::Cmovs as u32 => {
            let v = cpu.read_op(ins, 1)?;
            if cond(cpu, ins.condition_code()) {
                cpu.write_op(ins, 0, v)
            } else if cpu.op_bytes(ins, 0) == 4 {
                // A 32-bit CMOV writes (zero-extends) its destination even when false (64-bit mode).
                let cur = cpu.read_op(ins, 0)?;
                cpu.write_op(ins, 0, cur)
            } else {
                Ok(())
            }
        }
        _ if m as u32 >= Mnemonic::Seta as u32 && m as u32 <= Mnemonic::Sets as u32 => {
            let v = u64::from(cond(cpu, ins.condition_code()));
            cpu.write_op(ins, 0, v)
        }
        _ => Err(form(ins)),
    }
}

/// `mov r, r` (GPRs of the same width, neither AH–BH).
pub(crate) fn rr(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    let b = u32::from(d.ops.bytes);
    let v = cpu.gpr_sized(usize::from(d.ops.r1), b);
    cpu.set_gpr_sized(usize::from(d.ops.r0), b, v);
    Ok(())
}

/// `mov r, imm`.
pub(crate) fn ri(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    cpu.set_gpr_sized(usize::from(d.ops.r0), u32::from(d.ops.bytes), d.ops.imm);
    Ok(())
}

/// `mov r, [m]` and `movzx r, [m]` (`ops.mbytes` read, zero-extended to `ops.bytes`).
pub(crate) fn load(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    let v = cpu.read_mem(d.ops.mem.seg, cpu.ea_of(&d.ops.mem), u32::from(d.ops.mbytes))?;
    cpu.set_gpr_sized(usize::from(d.ops.r0), u32::from(d.ops.bytes), v);
    Ok(())
}

/// `mov [m], r` (`IMM` false) or `mov [m], imm`.
pub(crate) fn store<const IMM: bool>(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    let b = u32::from(d.ops.bytes);
    let v = if IMM { d.ops.imm } else { cpu.gpr_sized(usize::from(d.ops.r1), b) };
    cpu.write_mem(d.ops.mem.seg, cpu.ea_of(&d.ops.mem), b, v)
}

fn mov(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    if is_reg(ins, 0, Register::is_cr) || is_reg(ins, 1, Register::is_cr) {
        return system::mov_cr(cpu, ins);
    }
    if is_reg(ins, 0, Register::is_dr) || is_reg(ins, 1, Register::is_dr) {
        return system::mov_dr(cpu, ins);
    }
    if is_reg(ins, 0, Register::is_segment_register) {
        let r = ins.op_register(0);
        if r == Register::CS {
            return Err(ud());
        }
        let v = cpu.read_op(ins, 1)? as u16;
        cpu.load_data_seg(r, v)?;
        if r == Register::SS {
            // SDM Vol. 2B MOV: loading SS inhibits interrupts until after the next instruction.
            cpu.shadow = 2;
            cpu.ss_shadow = 2;
        }
        return Ok(());
    }
    let v = cpu.read_op(ins, 1)?;
    cpu.write_op(ins, 0, v)
}
