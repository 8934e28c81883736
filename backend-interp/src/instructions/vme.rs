//! Virtual interrupts: CR4.VME in virtual-8086 mode and CR4.PVI at CPL 3 in protected mode.
//! CLI/STI, PUSHF/POPF, IRET and INT n work on VIF (with VIP) instead of IF where IOPL would
//! otherwise make them fault, and INT n is redirected through the TSS's interrupt redirection
//! bitmap (SDM Vol. 3A §20.3, Table 20-2; Vol. 2 CLI, STI, PUSHF, POPF, IRET, INT n).
//! Hardware interrupts and exceptions are unaffected: they always use the protected-mode IDT.

use duet_core::state::rflags::{self, DF, IF, IOPL, NT, STATUS, TF, VIF, VIP};

use crate::cpu::{gp, mask, Cpu, Flow};

/// CR4.VME (SDM Vol. 3A §2.5).
const CR4_VME: u64 = 1;
/// CR4.PVI.
const CR4_PVI: u64 = 2;
/// FLAGS bits a virtual POPF/IRET loads: all of bits 15:0 except IF and IOPL.
const VIRTUAL_LOADABLE: u64 = STATUS | TF | DF | NT;

impl Cpu {
    /// Virtual-8086 mode with CR4.VME and IOPL < 3: PUSHF, POPF and IRET use VIF for IF.
    pub fn vme_active(&self) -> bool {
        self.v86() && self.sregs.cr4 & CR4_VME != 0 && self.iopl() < 3
    }

    /// CLI (`set` = false) or STI, after the decision tables of SDM Vol. 2A CLI and Vol. 2B STI:
    /// IF where CPL ≤ IOPL (always in real mode); else VIF in virtual-8086 mode with CR4.VME or
    /// at CPL 3 with CR4.PVI, where STI with VIP = 1 is #GP(0); else #GP(0).
    pub fn cli_sti(&mut self, set: bool) -> Flow {
        if !self.protected() || self.cpl() <= self.iopl() {
            // SDM Vol. 2B STI: interrupts stay inhibited until after the next instruction, only
            // when IF was 0 before.
            if set && !self.flag(IF) {
                self.shadow = 2;
            }
            self.set_flag(IF, set);
            return Ok(());
        }
        let virt = if self.v86() {
            self.sregs.cr4 & CR4_VME != 0
        } else {
            self.cpl() == 3 && self.sregs.cr4 & CR4_PVI != 0
        };
        if !virt || (set && self.flag(VIP)) {
            return Err(gp(0));
        }
        self.set_flag(VIF, set);
        Ok(())
    }

    /// The FLAGS image a virtual PUSHF or INT n pushes: IF replaced by VIF, IOPL read as 3.
    fn virtual_flags(&self) -> u64 {
        let f = self.flags_image() & 0xffff & !IF;
        f | IOPL | if self.flag(VIF) { IF } else { 0 }
    }

    /// PUSHF under [`Cpu::vme_active`] (SDM Vol. 2B PUSHF): 16-bit only, else #GP(0).
    pub fn pushf_vme(&mut self, bytes: u32) -> Flow {
        if bytes != 2 {
            return Err(gp(0));
        }
        let v = self.virtual_flags();
        self.push(v, 2)
    }

    /// Loads a FLAGS image popped by a virtual POPF or IRET: #GP(0) if it sets TF, or IF while
    /// VIP = 1; else VIF ← its IF and the rest of bits 15:0 except IF and IOPL.
    fn load_virtual_flags(&mut self, v: u64) -> Flow {
        if v & TF != 0 || (v & IF != 0 && self.flag(VIP)) {
            return Err(gp(0));
        }
        let f = (self.rflags & !VIRTUAL_LOADABLE) | (v & VIRTUAL_LOADABLE);
        self.set_rflags(f);
        self.set_flag(VIF, v & IF != 0);
        Ok(())
    }

    /// POPF under [`Cpu::vme_active`] (SDM Vol. 2B POPF): 16-bit only, else #GP(0).
    pub fn popf_vme(&mut self, bytes: u32) -> Flow {
        if bytes != 2 {
            return Err(gp(0));
        }
        let v = self.peek(0, 2)?;
        self.load_virtual_flags(v)?;
        let sp = self.sp();
        self.set_sp(sp.wrapping_add(2));
        Ok(())
    }

    /// IRET under [`Cpu::vme_active`] (SDM Vol. 2A IRET, virtual-8086 mode with CR4.VME):
    /// 16-bit only, else #GP(0).
    pub fn iret_vme(&mut self, bytes: u32) -> Flow {
        if bytes != 2 {
            return Err(gp(0));
        }
        let ip = self.peek(0, 2)?;
        let cs = self.peek(2, 2)? as u16;
        let fl = self.peek(4, 2)?;
        self.load_virtual_flags(fl)?;
        let sp = self.sp();
        self.set_sp(sp.wrapping_add(6));
        self.real_cs(cs, ip);
        Ok(())
    }

    /// INT n in virtual-8086 mode with CR4.VME (SDM Vol. 3A §20.3.3.5, Table 20-2, methods
    /// 3–6). Returns true when the interrupt was redirected to the 8086 program's own IVT; false
    /// when it goes to the protected-mode IDT (bit set in the redirection bitmap, IOPL = 3).
    pub fn int_vme(&mut self, vector: u8) -> Flow<bool> {
        // The redirection bitmap is the 32 bytes below the I/O map base of a 32-bit TSS; one
        // that is missing or beyond the TSS limit is #GP(0).
        let tr = self.sregs.tr;
        if tr.unusable || !matches!(tr.type_, 0x9 | 0xb) || tr.limit < 0x67 {
            return Err(gp(0));
        }
        let io_base = self.tss_read(0x66, 2)?;
        let byte = io_base.checked_sub(32).ok_or_else(|| gp(0))? + u64::from(vector / 8);
        if byte > u64::from(tr.limit) {
            return Err(gp(0));
        }
        let bits = self.read_lin_u(tr.base.wrapping_add(byte), 1, true)?;
        if (bits >> (vector % 8)) & 1 != 0 {
            return if self.iopl() < 3 { Err(gp(0)) } else { Ok(false) };
        }
        // Redirected: a real-mode style interrupt through the IVT at linear 0 of the
        // virtual-8086 task; with IOPL < 3 the pushed IF is VIF, IOPL reads 3 and VIF is cleared
        // instead of IF.
        let ent = self.read_lin_u(u64::from(vector) * 4, 4, false)?;
        let image = if self.iopl() < 3 { self.virtual_flags() } else { self.flags_image() & 0xffff };
        let cs = u64::from(self.sregs.cs.selector);
        let ip = self.next_rip & mask(2);
        self.push(image, 2)?;
        self.push(cs, 2)?;
        self.push(ip, 2)?;
        self.rflags &= !(TF | rflags::RF);
        if self.iopl() < 3 {
            self.set_flag(VIF, false);
        } else {
            self.set_flag(IF, false);
        }
        self.real_cs((ent >> 16) as u16, ent & 0xffff);
        Ok(true)
    }
}
