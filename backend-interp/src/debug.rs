//! Debug registers at work: instruction breakpoints from DR0–DR3 under DR7 (SDM Vol. 3A §18.2).
//! Data and I/O breakpoints and DR7.GD are not raised.

use duet_core::state::rflags;

use crate::cpu::Cpu;

impl Cpu {
    /// The enabled instruction breakpoints (DR7 L/G set, R/W = 00) on the linear address of
    /// CS:RIP as a DR6 B0–B3 mask; none while RF = 1 (SDM Vol. 3A §18.2.4, §18.3.1.1).
    ///
    /// On the instruction after MOV SS or POP SS an Intel CPU suppresses them "as if EFLAGS.RF
    /// were 1" (SDM Vol. 3B §18.3.1.1; Vol. 3A §6.8.3 inhibits debug exceptions there); an AMD
    /// CPU delivers them (KVM, arch/x86/kvm/x86.c `kvm_is_code_breakpoint_inhibited`: "Intel
    /// compatible CPUs inhibit code #DBs when MOV/POP SS blocking is active, but AMD compatible
    /// CPUs do not").
    #[inline]
    pub fn code_breakpoints(&self) -> u64 {
        let dr7 = self.dr[5];
        if self.rflags & rflags::RF != 0 || dr7 & 0xff == 0 || (self.ss_shadow != 0 && !self.amd()) {
            return 0;
        }
        let (lin, m) = if self.mode64() {
            (self.rip, u64::MAX)
        } else {
            (self.sregs.cs.base.wrapping_add(self.rip & 0xffff_ffff) & 0xffff_ffff, 0xffff_ffff)
        };
        (0..4)
            .filter(|&i| (dr7 >> (2 * i)) & 3 != 0 && (dr7 >> (16 + 4 * i)) & 3 == 0 && self.dr[i] & m == lin)
            .fold(0, |acc, i| acc | 1 << i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_cpu;

    #[test]
    fn only_enabled_execute_breakpoints_on_the_linear_cs_rip_match_and_rf_masks_them() {
        let mut c = test_cpu();
        c.sregs.cs.base = 0x1000;
        c.rip = 0x234;
        c.dr[1] = 0x1234;
        c.dr[2] = 0x1234;
        // DR7: L1 and G2 enabled; R/W2 = 01 (data write) makes breakpoint 2 not an execute one.
        c.dr[5] = (1 << 2) | (1 << 5) | (1 << 24) | 0x400;
        assert_eq!(c.code_breakpoints(), 0b010);
        c.rflags |= rflags::RF;
        assert_eq!(c.code_breakpoints(), 0);
    }
}
