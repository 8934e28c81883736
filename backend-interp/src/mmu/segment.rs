//! Segmentation: offsets to linear addresses with limit and type checks, and descriptor loads
//! (SDM Vol. 3A Chapter 3 and §5.3–5.5).

use duet_core::Segment;
use iced_x86::Register;

use crate::cpu::{canonical, fault_code, gp, vector, Cpu, Flow};

impl Cpu {
    /// The fault a bad access through `sr` raises: #SS(0) for the stack segment, else #GP(0).
    fn seg_fault(sr: Register) -> crate::cpu::Abort {
        if sr == Register::SS {
            fault_code(vector::SS, 0)
        } else {
            gp(0)
        }
    }

    /// Linear address of `len` bytes at offset `off` in `sr`, after the limit, type and canonical
    /// checks of SDM Vol. 3A §5.3 (protected mode) and §3.3.7.1 (64-bit mode).
    pub fn seg_linear(&self, sr: Register, off: u64, len: u32, write: bool) -> Flow<u64> {
        let s = self.seg(sr).ok_or_else(|| gp(0))?;
        let last_off = off.wrapping_add(u64::from(len.max(1) - 1));
        if self.mode64() {
            let base = if matches!(sr, Register::FS | Register::GS) { s.base } else { 0 };
            let lin = base.wrapping_add(off);
            if !canonical(lin) || !canonical(lin.wrapping_add(u64::from(len.max(1) - 1))) {
                return Err(Self::seg_fault(sr));
            }
            return Ok(lin);
        }
        if !self.protected() || self.v86() {
            // Real mode still checks the (hidden) limit: offset beyond it is #GP(0) / #SS(0).
            if last_off > u64::from(s.limit) || last_off < off {
                return Err(Self::seg_fault(sr));
            }
            return Ok(s.base.wrapping_add(off) & 0xffff_ffff);
        }
        if s.unusable {
            return Err(Self::seg_fault(sr));
        }
        let code = s.type_ & 8 != 0;
        // Writes need a writable data segment; reads fail only on execute-only code (§5.5).
        let rw = s.type_ & 2 != 0;
        if if write { code || !rw } else { code && !rw } {
            return Err(Self::seg_fault(sr));
        }
        let limit = u64::from(s.limit);
        let bad = if !code && s.type_ & 4 != 0 {
            // Expand-down: valid offsets are limit+1 ..= 0xffff or 0xffffffff (§5.3).
            let upper = if s.db { 0xffff_ffff } else { 0xffff };
            off <= limit || last_off > upper || last_off < off
        } else {
            last_off > limit || last_off < off
        };
        if bad {
            return Err(Self::seg_fault(sr));
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    /// Reads the 8-byte descriptor `sel` names in the GDT or LDT, returning it and its linear address.
    /// An index beyond the table limit is #GP(selector) (SDM Vol. 3A §3.5.1).
    pub fn descriptor(&mut self, sel: u16) -> Flow<(u64, u64)> {
        let (base, limit) = if sel & 4 != 0 {
            if self.sregs.ldt.unusable || self.sregs.ldt.selector & 0xfffc == 0 {
                return Err(gp(u32::from(sel & 0xfffc)));
            }
            (self.sregs.ldt.base, u64::from(self.sregs.ldt.limit))
        } else {
            (self.sregs.gdt.base, u64::from(self.sregs.gdt.limit))
        };
        let off = u64::from(sel & 0xfff8);
        if off + 7 > limit {
            return Err(gp(u32::from(sel & 0xfffc)));
        }
        let addr = base.wrapping_add(off);
        let raw = self.read_lin_u(addr, 8, true)?;
        Ok((raw, addr))
    }

    /// Sets the accessed bit of a code/data descriptor in memory, as a segment load does.
    pub fn set_accessed(&mut self, addr: u64, raw: u64) -> Flow {
        if raw & (1 << 40) == 0 {
            let b = ((raw >> 40) as u8) | 1;
            self.write_lin(addr.wrapping_add(5), &[b], true)?;
        }
        Ok(())
    }

    /// What DS, ES, FS or GS (`sr`) holds after a null selector `sel` is loaded in protected
    /// mode: unusable either way, but an Intel CPU clears the hidden part, base included (SDM
    /// Vol. 2B MOV, Operation: the register is loaded with "NULL segment descriptor"), while an
    /// AMD CPU keeps the old base and limit (Linux, arch/x86/kernel/cpu/common.c
    /// `detect_null_seg_behavior`: "writing zero to a segment selector on AMD does not clear the
    /// base") unless it enumerates NullSelectorClearsBase (CPUID Fn8000_0021 EAX bit 6; this
    /// host's family-19h silicon clears it in ring 3 though its VM's CPUID hides the bit).
    /// Only 64-bit mode can see the difference, through FS and GS.
    pub fn null_segment(&self, sr: Register, sel: u16) -> Segment {
        match self.seg(sr) {
            Some(old) if self.amd() && !self.null_selector_clears_base() => {
                Segment { selector: sel, present: false, unusable: true, ..*old }
            }
            _ => Segment { selector: sel, unusable: true, ..Segment::default() },
        }
    }

    /// Whether the profile enumerates AMD's NullSelectorClearsBase (Fn8000_0021 EAX bit 6).
    fn null_selector_clears_base(&self) -> bool {
        use duet_core::cpuid::ext_leaf21;
        self.cpuid.lookup(0x8000_0000, 0)[0] >= ext_leaf21::LEAF
            && self.cpuid.lookup(ext_leaf21::LEAF, 0)[0] & ext_leaf21::EAX_NULL_SEL_CLR_BASE != 0
    }

    /// Loads DS, ES, FS, GS or SS as MOV/POP do (SDM Vol. 2B MOV, "Operation"; Vol. 3A §5.6–5.7).
    pub fn load_data_seg(&mut self, sr: Register, sel: u16) -> Flow {
        if !self.protected() {
            // Real mode: only the selector and base change (SDM Vol. 3A §20.1.1).
            if let Some(s) = self.seg_mut(sr) {
                s.selector = sel;
                s.base = u64::from(sel) << 4;
            }
            return Ok(());
        }
        if self.v86() {
            if let Some(s) = self.seg_mut(sr) {
                *s = Cpu::v86_segment(sel, false);
            }
            return Ok(());
        }
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        let err = u32::from(sel & 0xfffc);
        if sel & 0xfffc == 0 {
            if sr == Register::SS {
                // A null SS is allowed only in 64-bit mode at CPL < 3 with RPL = CPL.
                if !(self.mode64() && cpl != 3 && rpl == cpl) {
                    return Err(gp(0));
                }
                self.sregs.ss = Segment { selector: sel, dpl: cpl, unusable: true, ..Segment::default() };
                return Ok(());
            }
            let null = self.null_segment(sr, sel);
            if let Some(s) = self.seg_mut(sr) {
                *s = null;
            }
            return Ok(());
        }
        let (raw, addr) = self.descriptor(sel)?;
        let mut d = Segment::from_descriptor(sel, raw);
        let code = d.type_ & 8 != 0;
        if sr == Register::SS {
            if rpl != cpl || !d.s || code || d.type_ & 2 == 0 || d.dpl != cpl {
                return Err(gp(err));
            }
            if !d.present {
                return Err(fault_code(vector::SS, err));
            }
        } else {
            if !d.s || (code && d.type_ & 2 == 0) {
                return Err(gp(err));
            }
            let conforming = code && d.type_ & 4 != 0;
            if !conforming && (rpl > d.dpl || cpl > d.dpl) {
                return Err(gp(err));
            }
            if !d.present {
                return Err(fault_code(vector::NP, err));
            }
        }
        self.set_accessed(addr, raw)?;
        d.type_ |= 1;
        if let Some(s) = self.seg_mut(sr) {
            *s = d;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use duet_core::state::ctrl;

    use super::*;
    use crate::cpu::{test_cpu, Abort};

    fn is_fault(r: Flow<u64>, v: u8) -> bool {
        matches!(r, Err(Abort::Exception(e)) if e.vector == v && e.error == Some(0))
    }

    #[test]
    fn real_mode_checks_the_limit_and_adds_the_base() {
        let mut c = test_cpu();
        c.sregs.ds = Segment::real_mode(0x1234, false);
        assert_eq!(c.seg_linear(Register::DS, 0x10, 2, false).ok(), Some(0x12350));
        // A word at offset 0xffff crosses the 64 KiB limit: #GP(0); on SS it is #SS(0).
        assert!(is_fault(c.seg_linear(Register::DS, 0xffff, 2, false), vector::GP));
        assert!(is_fault(c.seg_linear(Register::SS, 0xffff, 2, true), vector::SS));
    }

    #[test]
    fn protected_mode_type_and_expand_down_checks() {
        let mut c = test_cpu();
        c.sregs.cr0 |= ctrl::CR0_PE;
        // Read-only data: reads pass, writes are #GP(0) (SDM Vol. 3A §5.5).
        c.sregs.ds = Segment::from_descriptor(0x10, 0x00cf_9100_0000_ffff);
        assert!(c.seg_linear(Register::DS, 0, 4, false).is_ok());
        assert!(is_fault(c.seg_linear(Register::DS, 0, 4, true), vector::GP));
        // Expand-down, 16-bit (B = 0), limit 0x0fff: valid offsets are 0x1000..=0xffff.
        c.sregs.es = Segment::from_descriptor(0x18, 0x0000_9700_0000_0fff);
        assert!(is_fault(c.seg_linear(Register::ES, 0xfff, 1, false), vector::GP));
        assert!(c.seg_linear(Register::ES, 0x1000, 1, true).is_ok());
        assert!(is_fault(c.seg_linear(Register::ES, 0xffff, 2, false), vector::GP));
        // An unusable (null-loaded) segment faults on any access.
        c.sregs.fs.unusable = true;
        assert!(is_fault(c.seg_linear(Register::FS, 0, 1, false), vector::GP));
    }

    #[test]
    fn long_mode_checks_canonical_addresses_and_ignores_ds_base() {
        let mut c = test_cpu();
        c.sregs.cr0 |= ctrl::CR0_PE | ctrl::CR0_PG;
        c.sregs.efer |= ctrl::EFER_LMA | ctrl::EFER_LME;
        c.sregs.cs.l = true;
        c.sregs.ds.base = 0x1000;
        c.sregs.gs.base = 0x2000;
        assert_eq!(c.seg_linear(Register::DS, 0x10, 8, false).ok(), Some(0x10));
        assert_eq!(c.seg_linear(Register::GS, 0x10, 8, false).ok(), Some(0x2010));
        assert!(is_fault(c.seg_linear(Register::DS, 0x0000_8000_0000_0000, 1, false), vector::GP));
        assert!(is_fault(c.seg_linear(Register::SS, 0x0000_7fff_ffff_fffc, 8, true), vector::SS));
    }
}
