//! Control transfer: JMP/CALL/RET near and far (with descriptor loads), Jcc, JCXZ family,
//! LOOP family, INT n/INT3/INTO and IRET (SDM Vol. 2A CALL/JMP, Vol. 2B RET/IRET/INT).

use duet_core::state::rflags;
use duet_core::Segment;
use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::flags::cond;
use super::form;
use super::stack::opsize;
use super::task::Switch;
use crate::cpu::{canonical, fault_code, gp, mask, unsupported, vector, Cpu, Flow};
use crate::exception::{Event, Source};

/// Width mask of a near-branch operand.
fn branch_mask(kind: OpKind) -> u64 {
    match kind {
        OpKind::NearBranch16 => 0xffff,
        OpKind::NearBranch32 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

impl Cpu {
    /// Checks a near target against CS.limit (or canonicality in 64-bit mode): #GP(0).
    fn check_near(&self, target: u64) -> Flow {
        let ok = if self.mode64() { canonical(target) } else { target <= u64::from(self.sregs.cs.limit) };
        if ok {
            Ok(())
        } else {
            Err(gp(0))
        }
    }

    /// Jumps to a near target.
    fn jump_near(&mut self, target: u64) -> Flow {
        self.check_near(target)?;
        self.next_rip = target;
        Ok(())
    }

    /// The target code segment of a far JMP/CALL/RET/IRET, checked as SDM Vol. 3A §5.8.1 requires.
    /// `rpl_rule`: for returns, DPL must equal RPL (non-conforming) and RPL ≥ CPL.
    fn far_code(&mut self, sel: u16, ret: bool) -> Flow<(Segment, u64, u64)> {
        if sel & 0xfffc == 0 {
            return Err(gp(0));
        }
        let err = u32::from(sel & 0xfffc);
        let (raw, addr) = self.descriptor(sel)?;
        let d = Segment::from_descriptor(sel, raw);
        if !d.s {
            return match d.type_ {
                0x4 | 0xc | 0x5 | 0x1 | 0x9 if !ret => {
                    Err(unsupported("far transfer through a call gate, task gate or TSS"))
                }
                _ => Err(gp(err)),
            };
        }
        if d.type_ & 8 == 0 {
            return Err(gp(err));
        }
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        let conforming = d.type_ & 4 != 0;
        let bad = if ret {
            rpl < cpl || (conforming && d.dpl > rpl) || (!conforming && d.dpl != rpl)
        } else if conforming {
            d.dpl > cpl
        } else {
            rpl > cpl || d.dpl != cpl
        };
        if bad {
            return Err(gp(err));
        }
        if !d.present {
            return Err(fault_code(vector::NP, err));
        }
        if self.long_mode() && d.l && d.db {
            return Err(gp(err));
        }
        Ok((d, raw, addr))
    }

    /// Checks a far target offset against the new code segment.
    fn check_far_offset(&self, d: &Segment, off: u64) -> Flow {
        let ok = if self.long_mode() && d.l { canonical(off) } else { off <= u64::from(d.limit) };
        if ok {
            Ok(())
        } else {
            Err(gp(0))
        }
    }

    /// Installs CS for a far transfer and sets the next RIP.
    fn enter_cs(&mut self, mut d: Segment, raw: u64, addr: u64, rpl: u8, off: u64) -> Flow {
        self.set_accessed(addr, raw)?;
        d.type_ |= 1;
        d.selector = (d.selector & !3) | u16::from(rpl);
        self.sregs.cs = d;
        self.next_rip = off;
        Ok(())
    }

    /// Real-mode CS load: selector and base, and 16-bit default size — the far JMP that ends a
    /// return from protected mode "puts appropriate values in the access rights of CS" (SDM Vol.
    /// 3A §10.9.2, step 5) while the limit stays; in virtual-8086 mode the whole fixed hidden part
    /// (§20.2.1).
    pub(crate) fn real_cs(&mut self, sel: u16, off: u64) {
        if self.v86() {
            self.sregs.cs = Cpu::v86_segment(sel, true);
        } else {
            let cs = &mut self.sregs.cs;
            cs.selector = sel;
            cs.base = u64::from(sel) << 4;
            cs.db = false;
            cs.l = false;
        }
        self.next_rip = off;
    }

    /// Far JMP or CALL to `sel:off` with operand size `size` (SDM Vol. 2A JMP/CALL "far").
    fn far_transfer(&mut self, sel: u16, off: u64, size: u32, call: bool) -> Flow {
        let ret = self.next_rip;
        let old_cs = u64::from(self.sregs.cs.selector);
        if !self.protected() || self.v86() {
            if call {
                self.push(old_cs, size)?;
                self.push(ret, size)?;
            }
            self.real_cs(sel, off & mask(size));
            return Ok(());
        }
        if sel & 0xfffc != 0 {
            let (raw, addr) = self.descriptor(sel)?;
            // Type with the S bit: 0x0C is a 32-bit (or, in IA-32e mode, 64-bit) call gate, 0x04 a
            // 16-bit one (not valid in IA-32e mode).
            let ty = (raw >> 40) & 0x1f;
            if ty == 0x0c || (ty == 0x04 && !self.long_mode()) {
                return self.through_call_gate(sel, raw, addr, call);
            }
            // A TSS (0x01/0x09 available, 0x03/0x0B busy) or a task gate (0x05): task switch, after
            // DPL ≥ max(CPL, RPL) (SDM Vol. 3A §8.3, step 2).
            if matches!(ty, 0x01 | 0x03 | 0x09 | 0x0b | 0x05) {
                let dpl = ((raw >> 45) & 3) as u8;
                if dpl < self.cpl() || dpl < (sel & 3) as u8 {
                    return Err(gp(u32::from(sel & 0xfffc)));
                }
                if raw & (1 << 47) == 0 {
                    return Err(fault_code(vector::NP, u32::from(sel & 0xfffc)));
                }
                let tss = if ty == 0x05 { (raw >> 16) as u16 } else { sel };
                let kind = if call { Switch::Call } else { Switch::Jmp };
                self.next_rip = self.task_switch(tss, kind, ret)?;
                return Ok(());
            }
        }
        let (d, raw, addr) = self.far_code(sel, false)?;
        let off = if self.long_mode() && d.l { off } else { off & mask(size) };
        self.check_far_offset(&d, off)?;
        if call {
            self.push(old_cs, size)?;
            self.push(ret, size)?;
        }
        let cpl = self.cpl();
        self.enter_cs(d, raw, addr, cpl, off)
    }

    /// Reads an SS descriptor for a return to privilege `rpl`, checked like RET/IRET do.
    fn return_ss(&mut self, sel: u16, rpl: u8, to64: bool) -> Flow<Segment> {
        if sel & 0xfffc == 0 {
            // A null SS is allowed returning to 64-bit code at CPL < 3 (SDM Vol. 2B IRET).
            if to64 && rpl != 3 && (sel & 3) as u8 == rpl {
                return Ok(Segment { selector: sel, dpl: rpl, unusable: true, ..Segment::default() });
            }
            return Err(gp(0));
        }
        let err = u32::from(sel & 0xfffc);
        let (raw, addr) = self.descriptor(sel)?;
        let mut s = Segment::from_descriptor(sel, raw);
        if (sel & 3) as u8 != rpl || !s.s || s.type_ & 0xa != 0x2 || s.dpl != rpl {
            return Err(gp(err));
        }
        if !s.present {
            return Err(fault_code(vector::SS, err));
        }
        self.set_accessed(addr, raw)?;
        s.type_ |= 1;
        Ok(s)
    }

    /// After a return to an outer level: data segments the new CPL may not use become null.
    fn null_inner_segments(&mut self) {
        let cpl = self.cpl();
        for s in [&mut self.sregs.ds, &mut self.sregs.es, &mut self.sregs.fs, &mut self.sregs.gs] {
            let conforming_code = s.type_ & 0xc == 0xc;
            if !s.unusable && !conforming_code && s.dpl < cpl {
                *s = Segment { selector: 0, unusable: true, ..Segment::default() };
            }
        }
    }

    /// RETF / IRET common part: return to `sel:off`, popping `popped` bytes, with the outer-level
    /// SS:SP found at SP + `popped` when the privilege level changes (or always, `always_ss`).
    fn far_return(&mut self, sel: u16, off: u64, size: u32, popped: u64, imm: u64, always_ss: bool) -> Flow {
        let (d, raw, addr) = self.far_code(sel, true)?;
        let off = if self.long_mode() && d.l { off } else { off & mask(size) };
        self.check_far_offset(&d, off)?;
        let rpl = (sel & 3) as u8;
        let to64 = self.long_mode() && d.l;
        if rpl == self.cpl() && !always_ss {
            let sp = self.sp();
            self.set_sp(sp.wrapping_add(popped).wrapping_add(imm));
            return self.enter_cs(d, raw, addr, rpl, off);
        }
        let new_sp = self.peek(popped + imm, size)?;
        let ss_sel = self.peek(popped + imm + u64::from(size), size)? as u16;
        let ss = self.return_ss(ss_sel, rpl, to64)?;
        let outer = rpl != self.cpl();
        self.enter_cs(d, raw, addr, rpl, off)?;
        let db = ss.db;
        self.sregs.ss = ss;
        let sp = new_sp.wrapping_add(imm);
        if to64 {
            self.gpr[4] = sp;
        } else {
            self.set_gpr_sized(4, if db { 4 } else { 2 }, sp);
        }
        if outer {
            self.null_inner_segments();
        }
        Ok(())
    }

    /// IRET from CPL 0 to virtual-8086 mode: ESP, SS, ES, DS, FS, GS follow EIP, CS, EFLAGS on
    /// the stack (SDM Vol. 2A IRET, RETURN-TO-VIRTUAL-8086-MODE).
    fn iret_to_v86(&mut self, off: u64, sel: u16, fl: u64) -> Flow {
        let mut v = [0u64; 6];
        for (i, x) in v.iter_mut().enumerate() {
            *x = self.peek(12 + 4 * i as u64, 4)?;
        }
        let [esp, ss, es, ds, fs, gs] = v;
        self.set_rflags(fl & 0xffff_ffff);
        self.sregs.cs = Cpu::v86_segment(sel, true);
        for (r, x) in [(&mut self.sregs.ss, ss), (&mut self.sregs.es, es), (&mut self.sregs.ds, ds)] {
            *r = Cpu::v86_segment(x as u16, false);
        }
        self.sregs.fs = Cpu::v86_segment(fs as u16, false);
        self.sregs.gs = Cpu::v86_segment(gs as u16, false);
        self.gpr[4] = esp & 0xffff_ffff;
        self.next_rip = off & 0xffff;
        Ok(())
    }

    fn iret(&mut self, ins: &Instruction) -> Flow {
        let size = match ins.code() {
            Code::Iretw => 2,
            Code::Iretd => 4,
            _ => 8,
        };
        let sz = u64::from(size);
        let off = self.peek(0, size)?;
        let sel = self.peek(sz, size)? as u16;
        let fl = self.peek(2 * sz, size)?;
        if !self.protected() {
            let sp = self.sp();
            self.set_sp(sp.wrapping_add(3 * sz));
            self.real_cs(sel, off & mask(size));
            // SDM Vol. 2B IRET (real mode): a 32-bit IRET keeps VM, VIF, VIP.
            let v = if size == 4 { (fl & 0x25_7fd5) | (self.rflags & 0x1a_0000) } else { fl };
            let keep = self.rflags & !mask(size);
            self.set_rflags(keep | (v & mask(size)));
            return Ok(());
        }
        if self.v86() {
            if self.vme_active() {
                return self.iret_vme(size);
            }
            // IOPL 3: a real-mode style IRET that cannot change IOPL or VM (SDM Vol. 2A IRET).
            self.v86_iopl_check()?;
            let sp = self.sp();
            self.set_sp(sp.wrapping_add(3 * sz));
            self.real_cs(sel, off & mask(size));
            self.load_flags(fl, size, true);
            return Ok(());
        }
        if self.rflags & rflags::NT != 0 {
            if self.long_mode() {
                return Err(gp(0));
            }
            // Return to the task in the back link of the current TSS (SDM Vol. 2A IRET, TASK-RETURN).
            let link = self.tss_read(0, 2)? as u16;
            let next = self.next_rip;
            self.next_rip = self.task_switch(link, Switch::Iret, next)?;
            return Ok(());
        }
        if size == 4 && fl & rflags::VM != 0 && self.cpl() == 0 && !self.long_mode() {
            return self.iret_to_v86(off, sel, fl);
        }
        let old = self.rflags;
        let always_ss = self.mode64();
        // Flags are loaded with the privilege rules of the CPL before the return.
        self.load_flags(fl, size, true);
        let r = self.far_return(sel, off, size, 3 * sz, 0, always_ss);
        if r.is_err() {
            self.rflags = old;
        }
        r
    }
}

/// Counter width (bytes) of LOOPcc/JrCXZ from the address size iced-x86 encodes in the `Code`.
fn counter_bytes(code: Code) -> u32 {
    use Code::*;
    match code {
        Loopne_rel8_16_CX | Loopne_rel8_32_CX | Loope_rel8_16_CX | Loope_rel8_32_CX | Loop_rel8_16_CX
        | Loop_rel8_32_CX | Jcxz_rel8_16 | Jcxz_rel8_32 => 2,
        Loopne_rel8_16_RCX | Loopne_rel8_64_RCX | Loope_rel8_16_RCX | Loope_rel8_64_RCX
        | Loop_rel8_16_RCX | Loop_rel8_64_RCX | Jrcxz_rel8_16 | Jrcxz_rel8_64 => 8,
        _ => 4,
    }
}

/// Jcc and JMP with a relative near target (`ops.imm` from the instruction's start, `ops.bytes`
/// the target's width): the same checks as `exec`.
pub(crate) fn jcc_near(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    if cond(cpu, d.ins.condition_code()) {
        let target = cpu.rip.wrapping_add(d.ops.imm) & mask(u32::from(d.ops.bytes));
        cpu.jump_near(target)?;
    }
    Ok(())
}

/// Near CALL with a relative target (`ops.imm` from the instruction's start, `ops.bytes` the
/// operand size): the same checks and order as `exec` (target, then the push, then RIP).
pub(crate) fn call_near(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    let bytes = u32::from(d.ops.bytes);
    let target = cpu.rip.wrapping_add(d.ops.imm) & mask(bytes);
    cpu.check_near(target)?;
    let ret = cpu.next_rip;
    cpu.push(ret, bytes)?;
    cpu.next_rip = target;
    Ok(())
}

/// Near RET (`ops.bytes` the operand size, `ops.imm` the bytes to release): as `exec`.
pub(crate) fn ret_near(cpu: &mut Cpu, d: &crate::decode::Decoded) -> Flow {
    let size = u32::from(d.ops.bytes);
    let target = cpu.peek(0, size)?;
    cpu.check_near(target)?;
    let sp = cpu.sp();
    cpu.set_sp(sp.wrapping_add(u64::from(size)).wrapping_add(d.ops.imm));
    cpu.next_rip = target;
    Ok(())
}

/// Executes a control-transfer instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    let k0 = ins.op_kind(0);
    let near = matches!(k0, OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64);
    let rel_target = if near { cpu.rip.wrapping_add(ins.near_branch_target()) & branch_mask(k0) } else { 0 };
    match m {
        Mnemonic::Jmp | Mnemonic::Call => {
            let call = m == Mnemonic::Call;
            let far_mem = matches!(
                ins.code(),
                Code::Jmp_m1616
                    | Code::Jmp_m1632
                    | Code::Jmp_m1664
                    | Code::Call_m1616
                    | Code::Call_m1632
                    | Code::Call_m1664
            );
            if matches!(k0, OpKind::FarBranch16 | OpKind::FarBranch32) {
                let (off, size) = if k0 == OpKind::FarBranch16 {
                    (u64::from(ins.far_branch16()), 2)
                } else {
                    (u64::from(ins.far_branch32()), 4)
                };
                return cpu.far_transfer(ins.far_branch_selector(), off, size, call);
            }
            if far_mem {
                let size = ins.memory_size().size() as u32 - 2;
                let (seg, ea) = cpu.mem_addr(ins, 0);
                // The far pointer is one operand: all of it lies within the segment or it faults
                // (SDM Vol. 2A JMP/CALL, Exceptions), as LDS & co. check it.
                cpu.seg_linear(seg, ea, size + 2, false)?;
                let off = cpu.read_mem(seg, ea, size)?;
                let am = mask(crate::operand::addr_bytes(ins, cpu.bitness()));
                let sel = cpu.read_mem(seg, ea.wrapping_add(u64::from(size)) & am, 2)? as u16;
                return cpu.far_transfer(sel, off, size, call);
            }
            let (target, size) = if near {
                let size = match k0 {
                    OpKind::NearBranch16 => 2,
                    OpKind::NearBranch32 => 4,
                    _ => 8,
                };
                (rel_target, size)
            } else {
                (cpu.read_op(ins, 0)?, cpu.op_bytes(ins, 0))
            };
            cpu.check_near(target)?;
            if call {
                let ret = cpu.next_rip;
                cpu.push(ret, size)?;
            }
            cpu.next_rip = target;
            Ok(())
        }
        Mnemonic::Jcxz | Mnemonic::Jecxz | Mnemonic::Jrcxz => {
            if cpu.gpr_sized(1, counter_bytes(ins.code())) == 0 {
                cpu.jump_near(rel_target)?;
            }
            Ok(())
        }
        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne => {
            let b = counter_bytes(ins.code());
            let c = cpu.gpr_sized(1, b).wrapping_sub(1) & mask(b);
            let zf = cpu.flag(rflags::ZF);
            let take = c != 0
                && match m {
                    Mnemonic::Loope => zf,
                    Mnemonic::Loopne => !zf,
                    _ => true,
                };
            if take {
                cpu.check_near(rel_target)?;
            }
            cpu.set_gpr_sized(1, b, c);
            if take {
                cpu.next_rip = rel_target;
            }
            Ok(())
        }
        Mnemonic::Ret => {
            let size = opsize(ins, cpu);
            let target = cpu.peek(0, size)?;
            cpu.check_near(target)?;
            let imm = if ins.op_count() > 0 { ins.immediate(0) & 0xffff } else { 0 };
            let sp = cpu.sp();
            cpu.set_sp(sp.wrapping_add(u64::from(size)).wrapping_add(imm));
            cpu.next_rip = target;
            Ok(())
        }
        Mnemonic::Retf => {
            let size = opsize(ins, cpu);
            let imm = if ins.op_count() > 0 { ins.immediate(0) & 0xffff } else { 0 };
            let off = cpu.peek(0, size)?;
            let sel = cpu.peek(u64::from(size), size)? as u16;
            if !cpu.protected() || cpu.v86() {
                let sp = cpu.sp();
                cpu.set_sp(sp.wrapping_add(2 * u64::from(size)).wrapping_add(imm));
                cpu.real_cs(sel, off & mask(size));
                return Ok(());
            }
            cpu.far_return(sel, off, size, 2 * u64::from(size), imm, false)
        }
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => cpu.iret(ins),
        Mnemonic::Int1 => {
            // INT1 (ICEBP): #DB as a trap, without the gate-DPL check of INT n (SDM Vol. 2A INT n).
            cpu.raise(Event {
                vector: vector::DB,
                error: None,
                source: Source::External,
                rip: cpu.next_rip,
            })?;
            cpu.next_rip = cpu.rip;
            Ok(())
        }
        Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into => {
            let v = match m {
                Mnemonic::Int => ins.immediate(0) as u8,
                Mnemonic::Int3 => vector::BP,
                _ => {
                    if !cpu.flag(rflags::OF) {
                        return Ok(());
                    }
                    vector::OF
                }
            };
            if m == Mnemonic::Int && cpu.v86() && cpu.sregs.cr4 & 1 != 0 {
                // CR4.VME: the redirection bitmap decides (SDM Vol. 3A Table 20-2).
                if cpu.int_vme(v)? {
                    return Ok(());
                }
            } else if m == Mnemonic::Int {
                // INT n (not INT3/INTO) is IOPL-sensitive in virtual-8086 mode.
                cpu.v86_iopl_check()?;
            }
            cpu.raise(Event { vector: v, error: None, source: Source::Software, rip: cpu.next_rip })?;
            cpu.next_rip = cpu.rip;
            Ok(())
        }
        _ if near => {
            if cond(cpu, ins.condition_code()) {
                cpu.jump_near(rel_target)?;
            }
            Ok(())
        }
        _ => Err(form(ins)),
    }
}
