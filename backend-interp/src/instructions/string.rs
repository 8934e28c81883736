//! MOVS/STOS/LODS/CMPS/SCAS/INS/OUTS with REP/REPE/REPNE and DF. A repeated instruction runs
//! one element per step and re-executes itself until the count (or the condition) ends it, so
//! interrupts, single step and I/O exits land between elements as on hardware (SDM Vol. 2B REP).

use duet_core::state::rflags::{DF, ZF};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::form;
use crate::cpu::{Cpu, Flow, Post};
use crate::flags;
use crate::mmu::Kind;

/// Address size (bytes) of a string instruction, from its implicit memory operand kinds.
fn addr_size(ins: &Instruction) -> u32 {
    for op in 0..ins.op_count() {
        match ins.op_kind(op) {
            OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => return 2,
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => return 8,
            _ => {}
        }
    }
    0
}

/// Advances SI or DI (register index 6 or 7) by ±`n` within the address size.
fn step_index(cpu: &mut Cpu, reg: usize, n: u32, asz: u32) {
    let v = cpu.gpr_sized(reg, asz);
    let d = if cpu.flag(DF) { v.wrapping_sub(u64::from(n)) } else { v.wrapping_add(u64::from(n)) };
    cpu.set_gpr_sized(reg, asz, d);
}

/// Executes one element of a string instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    let asz = addr_size(ins);
    if asz == 0 {
        // MOVSD/CMPSD with XMM operands share the mnemonic: not a string instruction.
        return Err(form(ins));
    }
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    let io = matches!(
        m,
        Mnemonic::Insb
            | Mnemonic::Insw
            | Mnemonic::Insd
            | Mnemonic::Outsb
            | Mnemonic::Outsw
            | Mnemonic::Outsd
    );
    let n = match m {
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => cpu.op_bytes(ins, 0),
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => cpu.op_bytes(ins, 1),
        _ => cpu.op_bytes(ins, 0),
    };
    if rep && cpu.gpr_sized(1, asz) == 0 {
        // The I/O permission check of INS/OUTS (SDM Vol. 1 §19.5.1, Vol. 2A INS / Vol. 2B OUTS
        // "Operation") belongs to the instruction, not to an iteration: hardware raises #GP(0)
        // for REP INS/OUTS with a zero count at CPL > IOPL when the bitmap denies the port
        // (KVM, fixtures/corpus rep-ins-zero-count-iopl.json).
        if io {
            cpu.check_io(cpu.gpr_sized(2, 2) as u16, n as u8)?;
        }
        // No iteration: no flag is written, so what was undefined stays undefined.
        cpu.flag_effect = Some((0, 0));
        if asz == 4 && cpu.mode64() && !cpu.amd() {
            intel_zero_count_writes(cpu, m);
        }
        return Ok(());
    }
    let mut stop = false;
    match m {
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
            let v = cpu.read_op(ins, 1)?;
            cpu.write_op(ins, 0, v)?;
            step_index(cpu, 6, n, asz);
            step_index(cpu, 7, n, asz);
        }
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
            let v = cpu.gpr_sized(0, n);
            cpu.write_op(ins, 0, v)?;
            step_index(cpu, 7, n, asz);
        }
        Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
            let v = cpu.read_op(ins, 1)?;
            cpu.set_gpr_sized(0, n, v);
            step_index(cpu, 6, n, asz);
        }
        Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => {
            let a = cpu.read_op(ins, 0)?;
            let b = cpu.read_op(ins, 1)?;
            let (_, f) = flags::sub(a, b, false, n);
            cpu.set_status(f);
            step_index(cpu, 6, n, asz);
            step_index(cpu, 7, n, asz);
            stop = repeat_ends(cpu, ins);
        }
        Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => {
            let a = cpu.gpr_sized(0, n);
            let b = cpu.read_op(ins, 1)?;
            let (_, f) = flags::sub(a, b, false, n);
            cpu.set_status(f);
            step_index(cpu, 7, n, asz);
            stop = repeat_ends(cpu, ins);
        }
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => {
            let port = cpu.gpr_sized(2, 2) as u16;
            cpu.check_io(port, n as u8)?;
            // The destination must be writable before the port is read (no lost input on #PF).
            let (seg, off) = cpu.mem_addr(ins, 0);
            let lin = cpu.seg_linear(seg, off, n, true)?;
            cpu.translate(lin, Kind::Write, false)?;
            let v = cpu.port_in(port, n as u8)?;
            cpu.write_mem(Register::ES, off, n, v)?;
            step_index(cpu, 7, n, asz);
        }
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => {
            let port = cpu.gpr_sized(2, 2) as u16;
            cpu.check_io(port, n as u8)?;
            let v = cpu.read_op(ins, 1)?;
            cpu.post = Some(Post::IoOut { port, size: n as u8, value: v as u32 });
            step_index(cpu, 6, n, asz);
        }
        _ => return Err(form(ins)),
    }
    if rep {
        let c = cpu.gpr_sized(1, asz).wrapping_sub(1);
        cpu.set_gpr_sized(1, asz, c);
        if c & crate::cpu::mask(asz) != 0 && !stop {
            // Not done: run this instruction again (its next element) at the next step.
            cpu.next_rip = cpu.rip;
            cpu.rep_pending = true;
        }
    }
    Ok(())
}

/// A REP string instruction with a 32-bit address size and a zero count in 64-bit mode on an
/// Intel CPU still writes its 32-bit registers back: RCX becomes 0, and MOVS truncates RSI and
/// RDI, STOS RDI, to 32 bits (KVM, arch/x86/kvm/emulate.c `string_registers_quirk`: "Intel
/// CPUs mask the counter and pointers in quite strange manner when ECX is zero due to
/// REP-string optimizations" — modelled on Intel silicon; an Intel host's kvm_pvm shows it, issue
/// 11). An AMD CPU leaves all three untouched (this host's silicon: tests/isa_string.rs and
/// backend-interp/tests/vendors_data.rs).
fn intel_zero_count_writes(cpu: &mut Cpu, m: Mnemonic) {
    cpu.gpr[1] = 0;
    let movs = matches!(m, Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq);
    let stos = matches!(m, Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq);
    if movs {
        cpu.gpr[6] &= 0xffff_ffff;
    }
    if movs || stos {
        cpu.gpr[7] &= 0xffff_ffff;
    }
}

/// REPE ends when ZF = 0, REPNE when ZF = 1 (CMPS/SCAS only).
fn repeat_ends(cpu: &Cpu, ins: &Instruction) -> bool {
    let zf = cpu.flag(ZF);
    if ins.has_repe_prefix() {
        !zf
    } else if ins.has_repne_prefix() {
        zf
    } else {
        false
    }
}
