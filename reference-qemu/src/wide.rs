//! All 64 bits of the GPRs, and R8–R15, outside 64-bit mode.
//!
//! The start state of a 16- or 32-bit guest may hold values in the upper halves of its GPRs and
//! in R8–R15: code of that mode cannot see them, but they are part of the state and carried
//! through unchanged (SDM Vol. 1 §3.4.1.1 leaves them undefined after a mode switch; KVM and the
//! software CPU keep them, and so does QEMU, whose registers are 64 bits wide in every mode).
//! QEMU 7.2's gdbstub reads and writes only the low 32 bits of RAX–RSP, and nothing of R8–R15,
//! unless the vCPU is in 64-bit mode (its `HF_CS64` flag; target/i386/gdbstub.c). So, with the
//! vCPU stopped, [`with_cs64`] opens a 64-bit window through the gdbstub alone, without running
//! an instruction:
//! 1. in real mode, CR0.PE is set (segment loads through the gdbstub then read descriptors);
//! 2. CS's own GDT slot is overwritten with a 64-bit code descriptor, EFER gets LME and LMA,
//!    and CS is loaded with its selector's RPL flipped (the gdbstub reloads a segment only when
//!    the selector changes): the vCPU is now in 64-bit mode;
//! 3. the 16 GPRs are read or written with all their bits;
//! 4. the slot is given a descriptor of CS's cached hidden part, EFER its old value, CS its old
//!    selector (reloaded from that descriptor: the same hidden part), the slot its old bytes,
//!    CR0 its old value. QEMU recomputes its mode flags from these, so the vCPU is as before.

use duet_core::state::ctrl;
use duet_core::{CpuMode, CpuState, Segment};

use crate::gdb::{Gdb, GdbRegs};
use crate::QemuError;

/// gdb register numbers of QEMU's x86-64 target description.
const REG_CS: u32 = 18;
const REG_CR0: u32 = 27;
const REG_EFER: u32 = 32;

fn unsupported(msg: String) -> QemuError {
    QemuError::Unsupported(msg)
}

/// Whether the gdbstub already sees all 64 bits of the GPRs in `s` (64-bit mode).
pub fn is_cs64(s: &CpuState) -> bool {
    s.mode() == CpuMode::Long64
}

/// Whether a start state needs the window: outside 64-bit mode, a GPR with bits above 31 set.
pub fn needs_window(s: &CpuState) -> bool {
    let g = s.regs.gprs();
    !is_cs64(s) && (g[..8].iter().any(|&v| v > u64::from(u32::MAX)) || g[8..].iter().any(|&v| v != 0))
}

/// Runs `f` with the stopped vCPU, whose state (as `info registers` shows it) is `now`, in
/// 64-bit mode as the module docs describe; everything is put back afterwards, also when `f`
/// fails (its error is then the one returned).
pub fn with_cs64<T>(
    gdb: &mut Gdb,
    now: &CpuState,
    f: impl FnOnce(&mut Gdb) -> Result<T, QemuError>,
) -> Result<T, QemuError> {
    if is_cs64(now) {
        return f(gdb);
    }
    let sr = &now.sregs;
    let index = u64::from(sr.cs.selector & !7);
    if index + 7 > u64::from(sr.gdt.limit) {
        return Err(unsupported(format!(
            "CS {:#x} lies beyond the GDT limit {:#x}, so the gdbstub cannot switch to 64-bit mode to reach \
             the upper halves of the GPRs and R8–R15",
            sr.cs.selector, sr.gdt.limit
        )));
    }
    let slot = sr.gdt.base.wrapping_add(index);
    let old = gdb.read_mem(slot, 8)?;
    let real = sr.cr0 & ctrl::CR0_PE == 0;
    let code64 = Segment {
        base: 0,
        limit: 0xffff_ffff,
        type_: 0xb,
        present: true,
        s: true,
        l: true,
        g: true,
        dpl: sr.cs.dpl,
        ..Segment::default()
    };
    let open = |gdb: &mut Gdb| -> Result<(), QemuError> {
        if real {
            gdb.set(REG_CR0, sr.cr0 | ctrl::CR0_PE, 8)?;
        }
        gdb.write_mem(slot, &code64.to_descriptor().to_le_bytes())?;
        gdb.set(REG_EFER, sr.efer | ctrl::EFER_LME | ctrl::EFER_LMA, 8)?;
        gdb.set(REG_CS, u64::from(sr.cs.selector ^ 1), 4)
    };
    let result = open(gdb).and_then(|()| f(gdb));
    let close = |gdb: &mut Gdb| -> Result<(), QemuError> {
        gdb.write_mem(slot, &sr.cs.to_descriptor().to_le_bytes())?;
        gdb.set(REG_EFER, sr.efer, 8)?;
        gdb.set(REG_CS, u64::from(sr.cs.selector), 4)?;
        gdb.write_mem(slot, &old)?;
        if real {
            gdb.set(REG_CR0, sr.cr0, 8)?;
        }
        Ok(())
    };
    let closed = close(gdb);
    let value = result?;
    closed?;
    Ok(value)
}

/// Reads all 64 bits of the 16 GPRs of the stopped vCPU in state `now` (any mode).
pub fn read_gprs(gdb: &mut Gdb, now: &CpuState) -> Result<GdbRegs, QemuError> {
    with_cs64(gdb, now, |g| g.regs())
}

/// Writes the 16 GPRs of `want` with all their bits into the stopped vCPU in state `now`, and
/// checks that they read back so.
pub fn write_gprs(gdb: &mut Gdb, now: &CpuState, want: &CpuState) -> Result<(), QemuError> {
    let r = &want.regs;
    // gdb order: RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8–R15.
    let values = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14, r.r15,
    ];
    with_cs64(gdb, now, |g| {
        for (n, &v) in values.iter().enumerate() {
            g.set(n as u32, v, 8)?;
        }
        let back = g.regs()?.gprs;
        if back != values {
            return Err(unsupported(format!(
                "the gdbstub did not take the 64-bit GPRs (wrote {values:x?}, read {back:x?})"
            )));
        }
        Ok(())
    })
}
