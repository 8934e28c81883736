//! Far CALL and JMP through call gates, including the call to a more privileged level with a
//! stack switch and parameter copy (SDM Vol. 2A CALL "CALL-GATE", Vol. 3A §5.8.3–5.8.6).

use duet_core::Segment;

use crate::cpu::{canonical, fault_code, gp, mask, vector, Cpu, Flow};

impl Cpu {
    /// Far transfer through the call gate `gate_sel` (descriptor `raw` at linear `addr`).
    pub(crate) fn through_call_gate(&mut self, gate_sel: u16, raw: u64, addr: u64, call: bool) -> Flow {
        let lm = self.long_mode();
        let gate_err = u32::from(gate_sel & 0xfffc);
        let gate16 = (raw >> 40) & 0xf == 0x4;
        let gdpl = ((raw >> 45) & 3) as u8;
        let cpl = self.cpl();
        if gdpl < cpl || gdpl < (gate_sel & 3) as u8 {
            return Err(gp(gate_err));
        }
        if raw & (1 << 47) == 0 {
            return Err(fault_code(vector::NP, gate_err));
        }
        let cs_sel = (raw >> 16) as u16;
        let params = ((raw >> 32) & 0x1f) as u32;
        let mut offset = (raw & 0xffff) | ((raw >> 32) & 0xffff_0000);
        if gate16 {
            offset &= 0xffff;
        }
        if lm {
            // 16-byte gate: offset 63:32 in the next quadword, whose type field must be 0.
            let hi = self.read_lin_u(addr.wrapping_add(8), 8, true)?;
            if (hi >> 40) & 0x1f != 0 {
                return Err(gp(gate_err));
            }
            offset |= (hi & 0xffff_ffff) << 32;
        }
        if cs_sel & 0xfffc == 0 {
            return Err(gp(0));
        }
        let cs_err = u32::from(cs_sel & 0xfffc);
        let (craw, caddr) = self.descriptor(cs_sel).map_err(|_| gp(cs_err))?;
        let mut d = Segment::from_descriptor(cs_sel, craw);
        // In IA-32e mode the target must be 64-bit code (L = 1, D = 0).
        let not_64bit_code = !d.l || d.db;
        if !d.s || d.type_ & 8 == 0 || d.dpl > cpl || (lm && not_64bit_code) {
            return Err(gp(cs_err));
        }
        if !d.present {
            return Err(fault_code(vector::NP, cs_err));
        }
        let conforming = d.type_ & 4 != 0;
        let ok_offset = if lm { canonical(offset) } else { offset <= u64::from(d.limit) };
        if !ok_offset {
            return Err(gp(0));
        }
        let width = if lm {
            8
        } else if gate16 {
            2
        } else {
            4
        };
        let (old_cs, ret) = (u64::from(self.sregs.cs.selector), self.next_rip);
        let new_cpl = if !conforming && d.dpl < cpl {
            if !call {
                // JMP cannot change privilege (SDM Vol. 2A JMP).
                return Err(gp(cs_err));
            }
            let new_cpl = d.dpl;
            let old_ss = u64::from(self.sregs.ss.selector);
            let old_sp = self.gpr[4] & mask(self.stack_bytes());
            if lm {
                // IA-32e: RSP from the TSS, SS becomes null with RPL = new CPL, no parameters.
                let rsp = self.tss_read(4 + 8 * u64::from(new_cpl), 8)?;
                let ss = self.sregs.ss;
                let sp = self.push_frame(&ss, rsp, 8, &[old_ss, old_sp, old_cs, ret], 8, true)?;
                self.sregs.ss = Segment {
                    selector: u16::from(new_cpl),
                    dpl: new_cpl,
                    unusable: true,
                    ..Segment::default()
                };
                self.gpr[4] = sp;
            } else {
                let (mut ss, sp, sraw, saddr) = self.inner_stack(new_cpl, 0)?;
                // Copy the parameters from the caller's stack, deepest first, so their order holds.
                let mut frame = vec![old_ss, old_sp];
                for i in (0..params).rev() {
                    frame.push(self.peek(u64::from(i * width), width)?);
                }
                frame.extend_from_slice(&[old_cs, ret]);
                let sp_bytes = if ss.db { 4 } else { 2 };
                let new_sp = self.push_frame(&ss, sp, sp_bytes, &frame, width, true)?;
                self.set_accessed(saddr, sraw)?;
                ss.type_ |= 1;
                self.sregs.ss = ss;
                self.set_gpr_sized(4, sp_bytes, new_sp);
            }
            new_cpl
        } else {
            if !conforming && d.dpl != cpl {
                return Err(gp(cs_err));
            }
            if call {
                self.push(old_cs, width)?;
                self.push(ret, width)?;
            }
            cpl
        };
        self.set_accessed(caddr, craw)?;
        d.type_ |= 1;
        d.selector = (cs_sel & !3) | u16::from(new_cpl);
        self.sregs.cs = d;
        self.next_rip = offset;
        Ok(())
    }
}
