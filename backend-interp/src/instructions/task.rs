//! Hardware task switches through a 32-bit or 16-bit TSS: JMP/CALL to a TSS or task gate, a task
//! gate in the IDT, and IRET with NT = 1 (SDM Vol. 3A §8.3, §8.6). IA-32e mode has no task
//! switching (#GP).

use duet_core::state::{ctrl, rflags};
use duet_core::Segment;
use iced_x86::Register;

use crate::cpu::{fault_code, gp, unsupported, vector, Abort, Cpu, Flow};

/// What started a task switch: it decides the busy bits, NT and the back link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Switch {
    /// JMP to a TSS or task gate.
    Jmp,
    /// CALL to a TSS or task gate.
    Call,
    /// IRET with NT = 1 (return to the previous task).
    Iret,
    /// An interrupt or exception through a task gate.
    Interrupt,
}

/// Offset of the previous-task link, the same in both TSS formats.
const LINK: u64 = 0x00;
/// Offset of CR3 in a 32-bit TSS (a 16-bit TSS has none).
const CR3: u64 = 0x1c;

/// Where a TSS format keeps each field: 32-bit (SDM Vol. 3A Figure 8-2) or 16-bit (Figure 8-11,
/// which has no CR3, FS or GS and 16-bit fields).
#[derive(Clone, Copy)]
struct Layout {
    wide: bool,
}

impl Layout {
    /// The format of a TSS descriptor of type `ty` (bit 3 set: 32-bit).
    fn of(ty: u8) -> Self {
        Layout { wide: ty & 8 != 0 }
    }
    /// Field width in bytes.
    fn width(self) -> u32 {
        if self.wide {
            4
        } else {
            2
        }
    }
    /// The smallest limit a TSS of this format may have (SDM Vol. 3A §8.2.2, §8.6).
    fn min_limit(self) -> u32 {
        if self.wide {
            0x67
        } else {
            0x2b
        }
    }
    fn eip(self) -> u64 {
        if self.wide {
            0x20
        } else {
            0x0e
        }
    }
    fn eflags(self) -> u64 {
        self.eip() + u64::from(self.width())
    }
    /// General register `i` (EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI order).
    fn gpr(self, i: usize) -> u64 {
        self.eflags() + u64::from(self.width()) * (1 + i as u64)
    }
    /// Segment selector `i` in ES, CS, SS, DS, FS, GS order; a 16-bit TSS stops at DS.
    fn seg(self, i: usize) -> Option<u64> {
        let n = if self.wide { 6 } else { 4 };
        (i < n).then(|| self.gpr(8) + u64::from(self.width()) * i as u64)
    }
    fn ldt(self) -> u64 {
        if self.wide {
            0x60
        } else {
            0x2a
        }
    }
}

/// Segment registers in TSS order.
const SEGS: [Register; 6] =
    [Register::ES, Register::CS, Register::SS, Register::DS, Register::FS, Register::GS];

fn ts(code: u16) -> Abort {
    fault_code(vector::TS, u32::from(code & 0xfffc))
}

impl Cpu {
    /// Switches to the task whose TSS selector is `sel`; `eip` is saved as the old task's EIP.
    /// Returns the new task's EIP.
    pub(crate) fn task_switch(&mut self, sel: u16, kind: Switch, eip: u64) -> Flow<u64> {
        if self.long_mode() {
            return Err(gp(u32::from(sel & 0xfffc)));
        }
        if sel & 4 != 0 || sel & 0xfffc == 0 {
            return Err(if kind == Switch::Iret { ts(sel) } else { gp(u32::from(sel & 0xfffc)) });
        }
        let (raw, addr) = self.descriptor(sel)?;
        let mut d = Segment::from_descriptor(sel, raw);
        if d.s || !matches!(d.type_, 0x1 | 0x3 | 0x9 | 0xb) {
            return Err(gp(u32::from(sel & 0xfffc)));
        }
        // IRET returns to a busy task; everything else needs an available one.
        let busy = d.type_ & 2 != 0;
        if busy != (kind == Switch::Iret) {
            return Err(if kind == Switch::Iret { ts(sel) } else { gp(u32::from(sel & 0xfffc)) });
        }
        if !d.present {
            return Err(fault_code(vector::NP, u32::from(sel & 0xfffc)));
        }
        let new = Layout::of(d.type_);
        if d.limit < new.min_limit() {
            return Err(ts(sel));
        }
        let old = self.sregs.tr;
        let was = Layout::of(old.type_);
        if old.limit < was.min_limit() {
            return Err(unsupported("task switch from a TSS below its minimum limit"));
        }
        // Read the new task's state first: a fault here leaves the old task untouched. A 16-bit
        // TSS has no CR3, FS or GS: the page tables and FS/GS stay (SDM Vol. 3A §8.6).
        let nb = d.base;
        let nw = new.width();
        let rd = |cpu: &mut Cpu, o: u64| cpu.read_lin_u(nb.wrapping_add(o), nw, true);
        let new_cr3 = if new.wide { rd(self, CR3)? } else { self.sregs.cr3 };
        let new_eip = rd(self, new.eip())?;
        let mut new_flags = rd(self, new.eflags())?;
        let mut gprs = [0u64; 8];
        for (i, g) in gprs.iter_mut().enumerate() {
            *g = rd(self, new.gpr(i))?;
        }
        let mut sels = [None; 6];
        for (i, s) in sels.iter_mut().enumerate() {
            if let Some(o) = new.seg(i) {
                *s = Some(rd(self, o)? as u16);
            }
        }
        let ldt = rd(self, new.ldt())? as u16;
        // Under PAE paging the new CR3's PDPTEs are loaded with it (SDM Vol. 3A §4.4.1); checked
        // here, before the old task is touched, #GP(0) on a reserved bit as for MOV to CR3.
        let new_pdpte = if self.pae_paging() && new.wide { Some(self.read_pdptes(new_cr3)?) } else { None };
        if new_flags & rflags::VM != 0 {
            return Err(unsupported("task switch into virtual-8086 mode"));
        }
        // Save the old task (dynamic fields) into its TSS.
        let ob = old.base;
        let mut old_flags = self.rflags;
        if kind == Switch::Iret {
            old_flags &= !rflags::NT;
        }
        // A 16-bit TSS keeps only the low halves of EIP, EFLAGS and the registers (§8.6).
        let ow = was.width();
        let w = |cpu: &mut Cpu, o: u64, v: u64| cpu.write_lin_u(ob.wrapping_add(o), ow, v, true);
        w(self, was.eip(), eip)?;
        w(self, was.eflags(), old_flags)?;
        for i in 0..8 {
            let v = self.gpr_sized(i, 4);
            w(self, was.gpr(i), v)?;
        }
        for (i, r) in SEGS.iter().enumerate() {
            let v = self.reg(*r);
            if let Some(o) = was.seg(i) {
                w(self, o, v)?;
            }
        }
        // Busy bits: JMP and IRET free the old task; CALL and interrupts nest (back link, NT).
        if matches!(kind, Switch::Jmp | Switch::Iret) {
            let (oraw, oaddr) = self.descriptor(old.selector)?;
            self.write_lin(oaddr.wrapping_add(5), &[((oraw >> 40) as u8) & !2], true)?;
        }
        if matches!(kind, Switch::Call | Switch::Interrupt) {
            self.write_lin_u(nb.wrapping_add(LINK), 2, u64::from(old.selector), true)?;
            new_flags |= rflags::NT;
        }
        if kind != Switch::Iret {
            self.write_lin(addr.wrapping_add(5), &[((raw >> 40) as u8) | 2], true)?;
        }
        d.type_ |= 2;
        self.sregs.tr = d;
        self.sregs.cr0 |= ctrl::CR0_TS;
        if self.paging() && new.wide {
            self.sregs.cr3 = new_cr3 & 0xffff_ffff;
            if let Some(p) = new_pdpte {
                self.pdpte = p;
            }
            self.tlb.flush_nonglobal();
        }
        // From a 16-bit TSS: FLAGS with the upper half of EFLAGS clear (it holds no VM, so a
        // 16-bit task never runs in virtual-8086 mode), and the registers zero-extended — the
        // SDM leaves their upper halves "modified and not maintained" (§8.6); KVM's task-switch
        // emulation does the same.
        self.set_rflags(new_flags & 0xffff_ffff);
        for (i, g) in gprs.iter().enumerate() {
            self.set_gpr_sized(i, 4, *g);
        }
        self.load_task_segments(&sels, ldt)?;
        Ok(new_eip & 0xffff_ffff)
    }

    /// Loads LDTR, CS, SS and the data segments of the new task (FS/GS only when the TSS has
    /// them); a bad selector is #TS(selector).
    fn load_task_segments(&mut self, sels: &[Option<u16>; 6], ldt: u16) -> Flow {
        let to_ts = |a: Abort| match a {
            Abort::Exception(e) if e.vector == vector::GP => fault_code(vector::TS, e.error.unwrap_or(0)),
            other => other,
        };
        self.load_system_seg(false, ldt).map_err(to_ts)?;
        let [es, cs, ss, ds, fs, gs] = *sels;
        let (es, cs, ss, ds) = (es.unwrap_or(0), cs.unwrap_or(0), ss.unwrap_or(0), ds.unwrap_or(0));
        // CS decides the new CPL (its RPL); it must be present code (SDM Vol. 3A §8.3, step 13).
        if cs & 0xfffc == 0 {
            return Err(ts(cs));
        }
        let (raw, addr) = self.descriptor(cs).map_err(to_ts)?;
        let mut c = Segment::from_descriptor(cs, raw);
        let rpl = (cs & 3) as u8;
        let conforming = c.type_ & 4 != 0;
        if !c.s || c.type_ & 8 == 0 || (conforming && c.dpl > rpl) || (!conforming && c.dpl != rpl) {
            return Err(ts(cs));
        }
        if !c.present {
            return Err(fault_code(vector::NP, u32::from(cs & 0xfffc)));
        }
        self.set_accessed(addr, raw)?;
        c.type_ |= 1;
        self.sregs.cs = c;
        // SS establishes CPL = RPL(CS) for the data-segment checks that follow.
        self.sregs.ss.dpl = rpl;
        self.load_data_seg(Register::SS, ss).map_err(to_ts)?;
        for (r, s) in
            [(Register::ES, Some(es)), (Register::DS, Some(ds)), (Register::FS, fs), (Register::GS, gs)]
        {
            if let Some(s) = s {
                self.load_data_seg(r, s).map_err(to_ts)?;
            }
        }
        Ok(())
    }
}
