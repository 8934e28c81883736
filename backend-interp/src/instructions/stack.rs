//! PUSH, POP (registers, memory, immediates, segment registers), PUSHA/POPA, PUSHF/POPF, LEAVE,
//! ENTER, and
//! the stack helpers every group uses (SDM Vol. 1 §6.2, Vol. 2B PUSH/POP).

use duet_core::state::rflags;
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::form;
use crate::cpu::{mask, Cpu, Flow};
use crate::mmu::Kind;

/// Operand size in bytes of an instruction with implicit operands (from iced-x86's opcode table).
pub(crate) fn opsize(ins: &Instruction, cpu: &Cpu) -> u32 {
    match ins.code().op_code().operand_size() {
        16 => 2,
        32 => 4,
        64 => 8,
        _ => {
            if cpu.bitness() == 16 {
                2
            } else {
                4
            }
        }
    }
}

impl Cpu {
    /// Pushes the low `bytes` of `v` (SDM Vol. 2B PUSH: decrement SP by the operand size, then store).
    pub fn push(&mut self, v: u64, bytes: u32) -> Flow {
        let sp = self.sp().wrapping_sub(u64::from(bytes)) & mask(self.stack_bytes());
        self.write_mem(Register::SS, sp, bytes, v)?;
        self.set_sp(sp);
        Ok(())
    }

    /// Checks that `count` pushes of `bytes` each, from the current SP down, can all be written —
    /// the stack segment's limit (#SS(0)) and every page they touch (#PF) — before any is made,
    /// so a multi-push instruction that faults leaves memory and SP as they were (SDM Vol. 2B
    /// PUSHA, Protected Mode Exceptions: "#SS(0) If the starting or ending stack address is
    /// outside the stack segment limit"; Vol. 2A ENTER likewise for the new stack pointer).
    pub(crate) fn check_pushes(&mut self, count: u64, bytes: u32) -> Flow {
        let sb = self.stack_bytes();
        let wrap = if self.long_mode() { u64::MAX } else { 0xffff_ffff };
        let mut sp = self.sp();
        for _ in 0..count {
            sp = sp.wrapping_sub(u64::from(bytes)) & mask(sb);
            let lin = self.seg_linear(Register::SS, sp, bytes, true)?;
            self.translate(lin, Kind::Write, false)?;
            let last = lin.wrapping_add(u64::from(bytes) - 1) & wrap;
            if last >> 12 != lin >> 12 {
                self.translate(last, Kind::Write, false)?;
            }
        }
        Ok(())
    }

    /// Sets the stack pointer as [`Cpu::set_sp`] does for a stack `width` bytes wide (the stack
    /// an instruction used before it loaded another SS).
    pub fn set_sp_width(&mut self, v: u64, width: u32) {
        match width {
            2 => self.set_gpr_sized(4, 2, v),
            4 => self.gpr[4] = v & 0xffff_ffff,
            _ => self.gpr[4] = v,
        }
    }

    /// Pops `bytes` bytes.
    pub fn pop(&mut self, bytes: u32) -> Flow<u64> {
        let sp = self.sp();
        let v = self.read_mem(Register::SS, sp, bytes)?;
        self.set_sp(sp.wrapping_add(u64::from(bytes)));
        Ok(v)
    }

    /// Reads `bytes` at SP + `off` without popping.
    pub fn peek(&mut self, off: u64, bytes: u32) -> Flow<u64> {
        let sp = self.sp().wrapping_add(off) & mask(self.stack_bytes());
        self.read_mem(Register::SS, sp, bytes)
    }

    /// RFLAGS as PUSHF stores it: VM and RF read as 0 (SDM Vol. 2B PUSHF).
    pub fn flags_image(&self) -> u64 {
        self.rflags & !(rflags::VM | rflags::RF)
    }

    /// POPF (or, with `iret`, IRET) flag update with the privilege rules of SDM Vol. 2B POPF/IRET:
    /// IOPL only at CPL 0, IF only at CPL ≤ IOPL; POPF clears RF, IRET loads it (and VIF/VIP at
    /// CPL 0).
    pub fn load_flags(&mut self, v: u64, bytes: u32, iret: bool) {
        let mut modifiable = rflags::STATUS
            | rflags::TF
            | rflags::IF
            | rflags::DF
            | rflags::IOPL
            | rflags::NT
            | rflags::AC
            | rflags::ID;
        let cpl = self.cpl();
        if self.protected() && cpl > 0 {
            modifiable &= !rflags::IOPL;
            if cpl > self.iopl() {
                modifiable &= !rflags::IF;
            }
        }
        if iret {
            modifiable |= rflags::RF;
            // SDM Vol. 2A IRET: at CPL 0 a 32/64-bit IRET also loads VIF and VIP (POPF never does).
            if cpl == 0 && bytes > 2 {
                modifiable |= rflags::VIF | rflags::VIP;
            }
        }
        modifiable &= mask(bytes);
        let mut f = (self.rflags & !modifiable) | (v & modifiable);
        if bytes > 2 && !iret {
            f &= !rflags::RF;
        }
        self.set_rflags(f);
    }
}

fn m_is(ins: &Instruction, m: Mnemonic) -> bool {
    ins.mnemonic() == m
}

/// Executes a stack-group instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let n = (-ins.stack_pointer_increment()).unsigned_abs();
    match ins.mnemonic() {
        Mnemonic::Push => {
            if ins.op_kind(0) == OpKind::Register && ins.op_register(0).is_segment_register() {
                // SDM Vol. 2B PUSH: with a 64-bit operand size the selector is zero-extended;
                // with 32 bits "either a zero-extended value is pushed … or the segment selector
                // is written on the stack using a 16-bit move", the latter on "all recent Intel
                // Core and Intel Atom processors". This AMD host's silicon does the same: a
                // 16-bit move at 32 bits, 8 bytes written at 64 (backend-interp/tests/
                // vendors_data.rs `push_sreg_writes_a_word_at_32_bits_and_a_zero_extended_qword_at_64`).
                let v = cpu.reg(ins.op_register(0));
                let store = if n == 4 { 2 } else { n };
                let sp = cpu.sp().wrapping_sub(u64::from(n)) & mask(cpu.stack_bytes());
                cpu.write_mem(Register::SS, sp, store, v)?;
                cpu.set_sp(sp);
                return Ok(());
            }
            let v = cpu.read_op(ins, 0)?;
            cpu.push(v, n)
        }
        Mnemonic::Pop => {
            let n = ins.stack_pointer_increment().unsigned_abs();
            if ins.op_kind(0) == OpKind::Register && ins.op_register(0).is_segment_register() {
                let r = ins.op_register(0);
                let v = cpu.peek(0, 2)?;
                // The increment uses the width of the stack the selector came from, not that of
                // the SS just loaded (SDM Vol. 2B POP, Operation: "IF StackAddrSize = 16 … SP ←
                // SP + 2/4"): a 16-bit stack's SP wraps and ESP[31:16] stays.
                let (sp, width) = (cpu.sp(), cpu.stack_bytes());
                cpu.load_data_seg(r, v as u16)?;
                cpu.set_sp_width(sp.wrapping_add(u64::from(n)), width);
                if r == Register::SS {
                    cpu.shadow = 2;
                    cpu.ss_shadow = 2;
                }
                return Ok(());
            }
            let v = cpu.pop(n)?;
            // SDM POP: with RSP as the base of a memory destination, the address uses the new RSP.
            cpu.write_op(ins, 0, v)
        }
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
            if cpu.vme_active() {
                return cpu.pushf_vme(n);
            }
            cpu.v86_iopl_check()?;
            let v = cpu.flags_image();
            cpu.push(v, n)
        }
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => {
            let n = ins.stack_pointer_increment().unsigned_abs();
            if cpu.vme_active() {
                return cpu.popf_vme(n);
            }
            cpu.v86_iopl_check()?;
            let v = cpu.pop(n)?;
            cpu.load_flags(v, n, false);
            Ok(())
        }
        Mnemonic::Pusha | Mnemonic::Pushad => {
            // SDM Vol. 2B PUSHA: AX, CX, DX, BX, the original SP, BP, SI, DI.
            let size = if m_is(ins, Mnemonic::Pushad) { 4 } else { 2 };
            let sp = cpu.gpr_sized(4, size);
            // The whole frame is checked first: a fault leaves no word written and SP unchanged.
            cpu.check_pushes(8, size)?;
            for r in 0..8 {
                let v = if r == 4 { sp } else { cpu.gpr_sized(r, size) };
                cpu.push(v, size)?;
            }
            Ok(())
        }
        Mnemonic::Popa | Mnemonic::Popad => {
            // SDM Vol. 2B POPA: DI, SI, BP, (SP skipped), BX, DX, CX, AX.
            let size = if m_is(ins, Mnemonic::Popad) { 4 } else { 2 };
            let mut vals = [0u64; 8];
            for (i, v) in vals.iter_mut().enumerate() {
                *v = cpu.peek(u64::from(size) * i as u64, size)?;
            }
            for (i, v) in vals.iter().enumerate() {
                let r = 7 - i;
                if r != 4 {
                    cpu.set_gpr_sized(r, size, *v);
                }
            }
            let sp = cpu.sp();
            cpu.set_sp(sp.wrapping_add(8 * u64::from(size)));
            Ok(())
        }
        Mnemonic::Leave => {
            let size = opsize(ins, cpu);
            let sb = cpu.stack_bytes();
            let bp = cpu.gpr_sized(5, sb);
            let v = cpu.read_mem(Register::SS, bp, size)?;
            cpu.set_sp(bp.wrapping_add(u64::from(size)));
            cpu.set_gpr_sized(5, size, v);
            Ok(())
        }
        Mnemonic::Enter => {
            // SDM Vol. 2A ENTER: push rBP; copy level−1 frame pointers from the caller's frame;
            // push the new frame pointer; rBP ← frame; rSP −= size.
            let level = ins.immediate(1) & 0x1f;
            let size = opsize(ins, cpu);
            let alloc = ins.immediate(0) & 0xffff;
            let sb = cpu.stack_bytes();
            let bp = cpu.gpr_sized(5, size);
            // Everything that can fault comes first — the caller's frame pointers are read, the
            // pushes and the new stack top checked — so a fault writes nothing and leaves rSP and
            // rBP (SDM Vol. 2A ENTER, Exceptions: #SS(0) for a new stack pointer outside the
            // limit, #PF also "if a write using the final value of the stack pointer … would
            // cause a page fault").
            let pushes = if level > 0 { 1 + level } else { 1 };
            let mut copies = Vec::new();
            let mut walk = cpu.gpr_sized(5, sb);
            for _ in 1..level {
                walk = walk.wrapping_sub(u64::from(size)) & mask(sb);
                copies.push(cpu.read_mem(Register::SS, walk, size)?);
            }
            cpu.check_pushes(pushes, size)?;
            // FrameTemp is rSP after the first push, read at the operand size: "FrameTemp ←
            // ESP" for a 32-bit operand even on a 16-bit stack, whose push moved only SP (SDM
            // Vol. 2A ENTER, Operation; QEMU and Bochs agree). It is pushed and moved into rBP at
            // the operand size; rSP itself moves at the stack's width.
            let pushed = cpu.sp().wrapping_sub(u64::from(size)) & mask(sb);
            let frame = ((cpu.gpr[4] & !mask(sb)) | pushed) & mask(size);
            let new_sp = cpu.sp().wrapping_sub(pushes * u64::from(size)).wrapping_sub(alloc) & mask(sb);
            if alloc != 0 {
                // The new stack top must be a valid, writable stack address.
                let lin = cpu.seg_linear(Register::SS, new_sp, 1, true)?;
                cpu.translate(lin, Kind::Write, false)?;
            }
            cpu.push(bp, size)?;
            if level > 0 {
                for v in copies {
                    cpu.push(v, size)?;
                }
                cpu.push(frame, size)?;
            }
            cpu.set_gpr_sized(5, size, frame);
            cpu.set_sp(new_sp);
            Ok(())
        }
        _ => Err(form(ins)),
    }
}
