//! Instructions of CPUID-enumerated extensions outside the bit-manipulation group: MOVBE,
//! CMPXCHG16B, RDTSCP, RDRAND, RDFSBASE/RDGSBASE/WRFSBASE/WRGSBASE and XGETBV/XSETBV. Each is
//! #UD when the vCPU's CPUID profile does not advertise it (SDM Vol. 2, each page's exceptions).

use duet_core::cpuid::{ext_leaf1, leaf1_ecx, leaf7_ebx};
use duet_core::state::msr;
use duet_core::state::rflags::{CF, ZF};
use iced_x86::{Instruction, Mnemonic};

use super::form;
use crate::cpu::{canonical, gp, mask, ud, width, Cpu, Flow};

/// CR4.FSGSBASE (SDM Vol. 3A §2.5).
pub(crate) const CR4_FSGSBASE: u64 = 1 << 16;
/// CR4.OSXSAVE (SDM Vol. 3A §2.5).
pub(crate) const CR4_OSXSAVE: u64 = 1 << 18;
/// XCR0 bits the interpreter supports: x87 state only (it has no SSE/AVX state to manage).
const XCR0_SUPPORTED: u64 = 1;

/// Executes an extension instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    use Mnemonic::*;
    let m = ins.mnemonic();
    let p = &cpu.cpuid;
    let advertised = match m {
        Movbe => p.has_leaf1_ecx(leaf1_ecx::MOVBE),
        Cmpxchg16b => p.has_leaf1_ecx(leaf1_ecx::CX16),
        Rdtscp => p.has_ext_edx(ext_leaf1::EDX_RDTSCP),
        Rdrand => p.has_leaf1_ecx(leaf1_ecx::RDRAND),
        Rdfsbase | Rdgsbase | Wrfsbase | Wrgsbase => p.has_leaf7_ebx(leaf7_ebx::FSGSBASE),
        Xgetbv | Xsetbv => p.has_leaf1_ecx(leaf1_ecx::XSAVE),
        _ => return Err(form(ins)),
    };
    if !advertised {
        return Err(ud());
    }
    match m {
        Movbe => {
            // SDM Vol. 2B MOVBE: a load or store with the bytes reversed.
            let b = width(cpu.op_bytes(ins, 0));
            let v = cpu.read_op(ins, 1)?;
            let swapped = v.swap_bytes() >> (64 - 8 * b);
            cpu.write_op(ins, 0, swapped)?;
        }
        Cmpxchg16b => cmpxchg16b(cpu, ins)?,
        Rdtscp => {
            // SDM Vol. 2B RDTSCP: CR4.TSD restricts it to CPL 0; ECX ← IA32_TSC_AUX[31:0].
            if cpu.sregs.cr4 & 4 != 0 && cpu.cpl() != 0 {
                return Err(gp(0));
            }
            let t = cpu.tsc();
            let aux = cpu.msrs.get(&msr::TSC_AUX).copied().unwrap_or(0);
            cpu.set_gpr_sized(0, 4, t & 0xffff_ffff);
            cpu.set_gpr_sized(2, 4, t >> 32);
            cpu.set_gpr_sized(1, 4, aux & 0xffff_ffff);
        }
        Rdrand => {
            // SDM Vol. 2B RDRAND: CF = 1 for a valid value; OF, SF, ZF, AF, PF cleared. The values
            // are a deterministic xorshift64* sequence (hardware's can never be reproduced).
            let b = width(cpu.op_bytes(ins, 0));
            cpu.rng ^= cpu.rng >> 12;
            cpu.rng ^= cpu.rng << 25;
            cpu.rng ^= cpu.rng >> 27;
            let v = cpu.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
            cpu.write_op(ins, 0, v & mask(b))?;
            cpu.set_status(CF);
        }
        Rdfsbase | Rdgsbase | Wrfsbase | Wrgsbase => {
            // SDM Vol. 2B RDFSBASE/WRFSBASE: 64-bit mode only, and CR4.FSGSBASE = 1, else #UD.
            if !cpu.mode64() || cpu.sregs.cr4 & CR4_FSGSBASE == 0 {
                return Err(ud());
            }
            let fs = matches!(m, Rdfsbase | Wrfsbase);
            if matches!(m, Rdfsbase | Rdgsbase) {
                let v = if fs { cpu.sregs.fs.base } else { cpu.sregs.gs.base };
                cpu.write_op(ins, 0, v)?;
            } else {
                // A 32-bit source is zero-extended; a non-canonical base is #GP(0).
                let v = cpu.read_op(ins, 0)?;
                if !canonical(v) {
                    return Err(gp(0));
                }
                if fs {
                    cpu.sregs.fs.base = v;
                } else {
                    cpu.sregs.gs.base = v;
                }
            }
        }
        Xgetbv | Xsetbv => {
            // SDM Vol. 2C XGETBV/XSETBV: #UD unless CR4.OSXSAVE; only XCR0 (ECX = 0) exists here.
            if cpu.sregs.cr4 & CR4_OSXSAVE == 0 {
                return Err(ud());
            }
            let index = cpu.gpr_sized(1, 4);
            if m == Xgetbv {
                if index != 0 {
                    return Err(gp(0));
                }
                let v = cpu.xcr0;
                cpu.set_gpr_sized(0, 4, v & 0xffff_ffff);
                cpu.set_gpr_sized(2, 4, v >> 32);
            } else {
                let v = (cpu.gpr_sized(2, 4) << 32) | cpu.gpr_sized(0, 4);
                // CPL > 0 (V86 included), another XCR, x87 bit clear or an unsupported bit: #GP(0).
                if cpu.cpl() != 0 || index != 0 || v & 1 == 0 || v & !XCR0_SUPPORTED != 0 {
                    return Err(gp(0));
                }
                cpu.xcr0 = v;
            }
        }
        _ => return Err(form(ins)),
    }
    Ok(())
}

/// CMPXCHG16B m128 (SDM Vol. 2A CMPXCHG8B/CMPXCHG16B): #GP(0) unless 16-byte aligned; the
/// destination is written whether or not the comparison succeeds.
fn cmpxchg16b(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    if !Cpu::is_mem(ins, 0) {
        return Err(ud());
    }
    let (seg, off) = cpu.mem_addr(ins, 0);
    let lin = cpu.seg_linear(seg, off, 16, true)?;
    if lin & 15 != 0 {
        return Err(gp(0));
    }
    let mut cur = [0u8; 16];
    // Read with write intent, as every read-modify-write (SDM Vol. 3A §4.7; see `read_mem_rmw`).
    cpu.read_lin_as(lin, &mut cur, false, crate::mmu::Kind::Write)?;
    let cur = u128::from_le_bytes(cur);
    let rdx_rax = (u128::from(cpu.gpr[2]) << 64) | u128::from(cpu.gpr[0]);
    if cur == rdx_rax {
        let rcx_rbx = (u128::from(cpu.gpr[1]) << 64) | u128::from(cpu.gpr[3]);
        cpu.write_lin(lin, &rcx_rbx.to_le_bytes(), false)?;
        cpu.set_flag(ZF, true);
    } else {
        cpu.write_lin(lin, &cur.to_le_bytes(), false)?;
        cpu.gpr[0] = cur as u64;
        cpu.gpr[2] = (cur >> 64) as u64;
        cpu.set_flag(ZF, false);
    }
    Ok(())
}
