//! Hardware task switches through a 32-bit TSS: JMP/CALL to a TSS or task gate, a task gate in
//! the IDT, and IRET with NT = 1 (SDM Vol. 3A §8.3). IA-32e mode has no task switching (#GP).

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

/// 32-bit TSS field offsets (SDM Vol. 3A Figure 8-2).
mod off {
    pub const LINK: u64 = 0x00;
    pub const CR3: u64 = 0x1c;
    pub const EIP: u64 = 0x20;
    pub const EFLAGS: u64 = 0x24;
    pub const EAX: u64 = 0x28;
    pub const ES: u64 = 0x48;
    pub const LDT: u64 = 0x60;
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
        if !d.s && matches!(d.type_, 0x1 | 0x3) {
            return Err(unsupported("task switch to a 16-bit TSS"));
        }
        if d.s || !matches!(d.type_, 0x9 | 0xb) {
            return Err(gp(u32::from(sel & 0xfffc)));
        }
        // IRET returns to a busy task; everything else needs an available one.
        let busy = d.type_ == 0xb;
        if busy != (kind == Switch::Iret) {
            return Err(if kind == Switch::Iret { ts(sel) } else { gp(u32::from(sel & 0xfffc)) });
        }
        if !d.present {
            return Err(fault_code(vector::NP, u32::from(sel & 0xfffc)));
        }
        if d.limit < 0x67 {
            return Err(ts(sel));
        }
        let old = self.sregs.tr;
        if old.type_ & 8 == 0 || old.limit < 0x67 {
            return Err(unsupported("task switch from a 16-bit or short TSS"));
        }
        // Read the new task's state first: a fault here leaves the old task untouched.
        let nb = d.base;
        let rd = |cpu: &mut Cpu, o: u64| cpu.read_lin_u(nb.wrapping_add(o), 4, true);
        let new_cr3 = rd(self, off::CR3)?;
        let new_eip = rd(self, off::EIP)?;
        let mut new_flags = rd(self, off::EFLAGS)?;
        let mut gprs = [0u64; 8];
        for (i, g) in gprs.iter_mut().enumerate() {
            *g = rd(self, off::EAX + 4 * i as u64)?;
        }
        let mut sels = [0u16; 6];
        for (i, s) in sels.iter_mut().enumerate() {
            *s = rd(self, off::ES + 4 * i as u64)? as u16;
        }
        let ldt = rd(self, off::LDT)? as u16;
        // Under PAE paging the new CR3's PDPTEs are loaded with it (SDM Vol. 3A §4.4.1); checked
        // here, before the old task is touched, #GP(0) on a reserved bit as for MOV to CR3.
        let new_pdpte = if self.pae_paging() { Some(self.read_pdptes(new_cr3)?) } else { None };
        if new_flags & rflags::VM != 0 {
            return Err(unsupported("task switch into virtual-8086 mode"));
        }
        // Save the old task (dynamic fields) into its TSS.
        let ob = old.base;
        let mut old_flags = self.rflags;
        if kind == Switch::Iret {
            old_flags &= !rflags::NT;
        }
        let w = |cpu: &mut Cpu, o: u64, v: u64| cpu.write_lin_u(ob.wrapping_add(o), 4, v, true);
        w(self, off::EIP, eip)?;
        w(self, off::EFLAGS, old_flags)?;
        for i in 0..8 {
            let v = self.gpr_sized(i, 4);
            w(self, off::EAX + 4 * i as u64, v)?;
        }
        for (i, r) in SEGS.iter().enumerate() {
            let v = self.reg(*r);
            w(self, off::ES + 4 * i as u64, v)?;
        }
        // Busy bits: JMP and IRET free the old task; CALL and interrupts nest (back link, NT).
        if matches!(kind, Switch::Jmp | Switch::Iret) {
            let (oraw, oaddr) = self.descriptor(old.selector)?;
            self.write_lin(oaddr.wrapping_add(5), &[((oraw >> 40) as u8) & !2], true)?;
        }
        if matches!(kind, Switch::Call | Switch::Interrupt) {
            self.write_lin_u(nb.wrapping_add(off::LINK), 2, u64::from(old.selector), true)?;
            new_flags |= rflags::NT;
        }
        if kind != Switch::Iret {
            self.write_lin(addr.wrapping_add(5), &[((raw >> 40) as u8) | 2], true)?;
        }
        d.type_ = 0xb;
        self.sregs.tr = d;
        self.sregs.cr0 |= ctrl::CR0_TS;
        if self.paging() {
            self.sregs.cr3 = new_cr3 & 0xffff_ffff;
            if let Some(p) = new_pdpte {
                self.pdpte = p;
            }
            self.tlb.flush_nonglobal();
        }
        self.set_rflags(new_flags & 0xffff_ffff);
        for (i, g) in gprs.iter().enumerate() {
            self.set_gpr_sized(i, 4, *g);
        }
        self.load_task_segments(&sels, ldt)?;
        Ok(new_eip & 0xffff_ffff)
    }

    /// Loads LDTR, CS, SS and the data segments of the new task; a bad selector is #TS(selector).
    fn load_task_segments(&mut self, sels: &[u16; 6], ldt: u16) -> Flow {
        let to_ts = |a: Abort| match a {
            Abort::Exception(e) if e.vector == vector::GP => fault_code(vector::TS, e.error.unwrap_or(0)),
            other => other,
        };
        self.load_system_seg(false, ldt).map_err(to_ts)?;
        let [es, cs, ss, ds, fs, gs] = *sels;
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
        for (r, s) in [(Register::ES, es), (Register::DS, ds), (Register::FS, fs), (Register::GS, gs)] {
            self.load_data_seg(r, s).map_err(to_ts)?;
        }
        Ok(())
    }
}
