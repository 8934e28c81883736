//! IN/OUT with immediate and DX ports, and the protected-mode I/O permission check
//! (SDM Vol. 1 §19.5).

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::form;
use crate::cpu::{gp, Abort, Cpu, Flow, Post};

impl Cpu {
    /// #GP(0) unless CPL ≤ IOPL (outside virtual-8086 mode) or the I/O permission bitmap of the
    /// 32/64-bit TSS allows all `size` ports from `port` (SDM Vol. 1 §19.5.1–19.5.2). The two
    /// bitmap bytes holding the port's bits are read as an implicit supervisor access: a bitmap
    /// or bytes beyond the TSS limit are #GP(0), a page fault on them is a #PF.
    pub fn check_io(&mut self, port: u16, size: u8) -> Flow {
        if !self.protected() || (!self.v86() && self.cpl() <= self.iopl()) {
            return Ok(());
        }
        let tr = self.sregs.tr;
        // Only a 32/64-bit available or busy TSS has an I/O bitmap.
        if tr.unusable || !matches!(tr.type_, 0x9 | 0xb) || tr.limit < 0x67 {
            return Err(gp(0));
        }
        let base = self.tss_read(0x66, 2)?;
        let byte = base + u64::from(port / 8);
        if byte + 1 > u64::from(tr.limit) {
            return Err(gp(0));
        }
        let bits = self.read_lin_u(tr.base.wrapping_add(byte), 2, true)?;
        let want = ((1u64 << size.min(4)) - 1) << (port % 8);
        if bits & want != 0 {
            return Err(gp(0));
        }
        Ok(())
    }

    /// The value the run loop supplied for this IN, or an `IoIn` exit to ask for it.
    pub fn port_in(&mut self, port: u16, size: u8) -> Flow<u64> {
        match self.io.port_in.take() {
            Some(v) => Ok(u64::from(v)),
            None => Err(Abort::IoIn { port, size }),
        }
    }
}

/// The port operand: an immediate or DX.
fn port_of(cpu: &Cpu, ins: &Instruction, op: u32) -> u16 {
    if ins.op_kind(op) == OpKind::Register {
        cpu.gpr_sized(2, 2) as u16
    } else {
        ins.immediate(op) as u16
    }
}

/// Executes IN or OUT.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        Mnemonic::In => {
            let size = cpu.op_bytes(ins, 0) as u8;
            let port = port_of(cpu, ins, 1);
            cpu.check_io(port, size)?;
            let v = cpu.port_in(port, size)?;
            cpu.write_op(ins, 0, v)
        }
        Mnemonic::Out => {
            let size = cpu.op_bytes(ins, 1) as u8;
            let port = port_of(cpu, ins, 0);
            cpu.check_io(port, size)?;
            let value = cpu.read_op(ins, 1)? as u32;
            cpu.post = Some(Post::IoOut { port, size, value });
            Ok(())
        }
        _ => Err(form(ins)),
    }
}
