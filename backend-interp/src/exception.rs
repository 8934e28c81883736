//! Exception and interrupt delivery: the real-mode IVT, protected-mode 32/16-bit gates with
//! stack switch from the TSS, the 64-bit IDT with IST, and double/triple fault
//! (SDM Vol. 3A §6.12–6.15, §20.1.4).

use duet_core::state::rflags;
use duet_core::Segment;

use crate::cpu::{canonical, fault_code, gp, mask, vector, Abort, Cpu, Exception, Flow};
use crate::instructions::task::Switch;

/// What raised an event: it decides the saved RIP, the EXT bit and the gate-DPL check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// An exception raised by the processor (fault or trap).
    Exception,
    /// INT n, INT3, INTO: the gate's DPL is checked against CPL (SDM Vol. 3A §6.12.1.1).
    Software,
    /// An external interrupt injected by the run loop.
    External,
    /// A #DB for an instruction breakpoint: a fault, so RF = 1 in the image (SDM Vol. 3A
    /// §18.3.1.1), while other #DBs are traps.
    CodeBreakpoint,
}

/// One event to deliver through the IDT/IVT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    /// Vector.
    pub vector: u8,
    /// Error code to push.
    pub error: Option<u32>,
    /// Where it came from.
    pub source: Source,
    /// RIP saved in the frame (faulting instruction for faults, next instruction for traps).
    pub rip: u64,
}

/// Exception classes for double-fault detection (SDM Vol. 3A §6.15, Table 6-4).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Benign,
    Contributory,
    PageFault,
}

/// Fault-class exceptions (SDM Vol. 3A Table 6-1): the saved RIP is the faulting instruction
/// and the saved RFLAGS image has RF = 1 (Vol. 3A §18.3.1.1).
fn fault_class(v: u8) -> bool {
    matches!(v, 0 | 5 | 6 | 7 | 10..=14 | 16 | 17 | 19 | 20)
}

fn class(v: u8) -> Class {
    match v {
        0 | 10..=13 => Class::Contributory,
        14 => Class::PageFault,
        _ => Class::Benign,
    }
}

/// The gate's software-visible fields.
struct Gate {
    /// Code segment selector, or the TSS selector of a task gate.
    selector: u16,
    /// A task gate: the event switches tasks.
    task: bool,
    offset: u64,
    ist: u8,
    interrupt: bool,
    wide: bool,
}

impl Cpu {
    /// Delivers `ev`, turning a fault during delivery into a double fault or a serial delivery
    /// (Table 6-5), and a fault while delivering #DF into shutdown.
    pub fn raise(&mut self, ev: Event) -> Flow {
        // Delivery reads the IVT/IDT, descriptor tables and the TSS; where they lie in unbacked
        // memory those reads return all ones (as paging-structure reads do) rather than asking
        // the run loop for MMIO data in the middle of a delivery, which could not be resumed.
        let outer = std::mem::replace(&mut self.delivering, true);
        let r = self.raise_serially(ev);
        self.delivering = outer;
        r
    }

    /// [`Cpu::raise`] without the unbacked-read rule.
    fn raise_serially(&mut self, mut ev: Event) -> Flow {
        for _ in 0..4 {
            let saved = (self.gpr, self.rip, self.rflags, self.sregs);
            match self.deliver(&ev) {
                Ok(()) => {
                    self.halted = false;
                    return Ok(());
                }
                Err(Abort::Exception(e)) => {
                    (self.gpr, self.rip, self.rflags, self.sregs) = saved;
                    if ev.vector == vector::DF && ev.source == Source::Exception {
                        return Err(Abort::Shutdown);
                    }
                    if let Some(a) = e.cr2 {
                        self.sregs.cr2 = a;
                    }
                    let first = if ev.source == Source::Exception { class(ev.vector) } else { Class::Benign };
                    let second = class(e.vector);
                    let df = matches!(
                        (first, second),
                        (Class::Contributory, Class::Contributory)
                            | (Class::PageFault, Class::Contributory)
                            | (Class::PageFault, Class::PageFault)
                    );
                    // EXT: the fault happened while delivering an event not caused by software.
                    let ext = u32::from(ev.source != Source::Software);
                    ev = if df {
                        Event { vector: vector::DF, error: Some(0), source: Source::Exception, rip: self.rip }
                    } else {
                        let error = e.error.map(|c| if e.vector == vector::PF { c } else { c | ext });
                        let error = if self.protected() { error } else { None };
                        Event { vector: e.vector, error, source: Source::Exception, rip: self.rip }
                    };
                }
                Err(other) => {
                    (self.gpr, self.rip, self.rflags, self.sregs) = saved;
                    return Err(other);
                }
            }
        }
        Err(Abort::Shutdown)
    }

    /// Delivers an exception raised by an instruction at the current RIP.
    pub fn raise_exception(&mut self, e: Exception) -> Flow {
        if let Some(a) = e.cr2 {
            self.sregs.cr2 = a;
        }
        let error = if self.protected() { e.error } else { None };
        self.raise(Event { vector: e.vector, error, source: Source::Exception, rip: self.rip })
    }

    /// The RFLAGS image an event pushes: RF = 1 for faults and for an interrupt that arrives
    /// between iterations of a REP string instruction (SDM Vol. 3A §18.3.1.1).
    fn pushed_flags(&self, ev: &Event) -> u64 {
        let fault =
            (ev.source == Source::Exception && fault_class(ev.vector)) || ev.source == Source::CodeBreakpoint;
        let mid_rep = ev.source == Source::External && self.rep_pending;
        if fault || mid_rep {
            self.rflags | rflags::RF
        } else {
            self.rflags
        }
    }

    fn deliver(&mut self, ev: &Event) -> Flow {
        if !self.protected() {
            self.deliver_real(ev)
        } else if self.long_mode() {
            self.deliver_long(ev)
        } else {
            self.deliver_protected(ev)
        }
    }

    /// Real mode: IVT entry `vector`, push FLAGS, CS, IP; clear IF, TF, AC (SDM Vol. 3A §20.1.4).
    fn deliver_real(&mut self, ev: &Event) -> Flow {
        let off = u64::from(ev.vector) * 4;
        if off + 3 > u64::from(self.sregs.idt.limit) {
            return Err(gp(0));
        }
        let ent = self.read_lin_u(self.sregs.idt.base.wrapping_add(off), 4, true)?;
        let flags = self.rflags;
        let cs = u64::from(self.sregs.cs.selector);
        self.push(flags & 0xffff, 2)?;
        self.push(cs, 2)?;
        self.push(ev.rip & 0xffff, 2)?;
        self.rflags &= !(rflags::IF | rflags::TF | rflags::AC | rflags::RF);
        let sel = (ent >> 16) as u16;
        self.sregs.cs.selector = sel;
        self.sregs.cs.base = u64::from(sel) << 4;
        // As for a real-mode far transfer: 16-bit code from here (SDM Vol. 3A §10.9.2).
        self.sregs.cs.db = false;
        self.sregs.cs.l = false;
        self.rip = ent & 0xffff;
        Ok(())
    }

    fn read_gate(&mut self, ev: &Event, ext: u32) -> Flow<Gate> {
        let wide = self.long_mode();
        let size = if wide { 16 } else { 8 };
        let idt_err = u32::from(ev.vector) * 8 + 2 + ext;
        let off = u64::from(ev.vector) * size;
        if off + size - 1 > u64::from(self.sregs.idt.limit) {
            return Err(gp(idt_err));
        }
        let base = self.sregs.idt.base.wrapping_add(off);
        let lo = self.read_lin_u(base, 8, true)?;
        let hi = if wide { self.read_lin_u(base.wrapping_add(8), 8, true)? } else { 0 };
        let ty = ((lo >> 40) & 0x1f) as u8;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        let (ok, gate16) = match (wide, ty) {
            (true, 0xe | 0xf) => (true, false),
            (false, 0xe | 0xf) => (true, false),
            (false, 0x6 | 0x7) => (true, true),
            (false, 0x5) => (true, false),
            _ => (false, false),
        };
        if !ok {
            return Err(gp(idt_err));
        }
        if ev.source == Source::Software && dpl < self.cpl() {
            return Err(gp(idt_err));
        }
        if !present {
            return Err(fault_code(vector::NP, idt_err));
        }
        let mut offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if gate16 {
            offset &= 0xffff;
        }
        if wide {
            offset |= (hi & 0xffff_ffff) << 32;
        }
        Ok(Gate {
            selector: (lo >> 16) as u16,
            task: !wide && ty == 0x5,
            offset,
            ist: ((lo >> 32) & 7) as u8,
            interrupt: ty & 1 == 0,
            wide: !gate16,
        })
    }

    /// The gate's target code segment, checked (SDM Vol. 3A §6.12.1).
    fn gate_code(&mut self, sel: u16, ext: u32) -> Flow<(Segment, u64, u64)> {
        if sel & 0xfffc == 0 {
            return Err(gp(ext));
        }
        let err = u32::from(sel & 0xfffc) + ext;
        let (raw, addr) = self.descriptor(sel).map_err(|_| gp(err))?;
        let d = Segment::from_descriptor(sel, raw);
        if !d.s || d.type_ & 8 == 0 || d.dpl > self.cpl() {
            return Err(gp(err));
        }
        if !d.present {
            return Err(fault_code(vector::NP, err));
        }
        Ok((d, raw, addr))
    }

    /// Reads `bytes` of the current TSS at `off`, #TS(TR selector) beyond its limit.
    pub(crate) fn tss_read(&mut self, off: u64, bytes: u32) -> Flow<u64> {
        let tr = self.sregs.tr;
        if off + u64::from(bytes) - 1 > u64::from(tr.limit) {
            return Err(fault_code(vector::TS, u32::from(tr.selector & 0xfffc)));
        }
        self.read_lin_u(tr.base.wrapping_add(off), bytes, true)
    }

    /// The checked SS descriptor and stack pointer for privilege level `new_cpl` from the current
    /// 32- or 16-bit TSS (SDM Vol. 3A §8.7, Figure 8-11): (SS, SP, raw descriptor, its address).
    pub(crate) fn inner_stack(&mut self, new_cpl: u8, ext: u32) -> Flow<(Segment, u64, u64, u64)> {
        let tss32 = self.sregs.tr.type_ & 8 != 0;
        let (sp, sel) = if tss32 {
            let o = 4 + 8 * u64::from(new_cpl);
            (self.tss_read(o, 4)?, self.tss_read(o + 4, 2)? as u16)
        } else {
            let o = 2 + 4 * u64::from(new_cpl);
            (self.tss_read(o, 2)?, self.tss_read(o + 2, 2)? as u16)
        };
        let ts = |c: u32| fault_code(vector::TS, c);
        if sel & 0xfffc == 0 {
            return Err(ts(ext));
        }
        let err = u32::from(sel & 0xfffc) + ext;
        let (sraw, saddr) = self.descriptor(sel).map_err(|_| ts(err))?;
        let ss = Segment::from_descriptor(sel, sraw);
        if (sel & 3) as u8 != new_cpl || ss.dpl != new_cpl || !ss.s || ss.type_ & 0xa != 0x2 {
            return Err(ts(err));
        }
        if !ss.present {
            return Err(fault_code(vector::SS, err));
        }
        Ok((ss, sp, sraw, saddr))
    }

    /// Writes `vals` (each `width` bytes) downwards from `sp` on stack segment `ss`.
    pub(crate) fn push_frame(
        &mut self,
        ss: &Segment,
        sp: u64,
        sp_bytes: u32,
        vals: &[u64],
        width: u32,
        sup: bool,
    ) -> Flow<u64> {
        let mut sp = sp;
        for &v in vals {
            sp = sp.wrapping_sub(u64::from(width)) & mask(sp_bytes);
            let lin = if sp_bytes == 8 {
                if !canonical(sp) {
                    return Err(fault_code(vector::SS, 0));
                }
                sp
            } else {
                let last = sp + u64::from(width) - 1;
                let expand_down = ss.type_ & 0xc == 0x4;
                let upper = if ss.db { 0xffff_ffff } else { 0xffff };
                let bad = if expand_down {
                    sp <= u64::from(ss.limit) || last > upper
                } else {
                    last > u64::from(ss.limit)
                };
                if bad {
                    return Err(fault_code(vector::SS, 0));
                }
                ss.base.wrapping_add(sp) & 0xffff_ffff
            };
            self.write_lin_u(lin, width, v, sup)?;
        }
        Ok(sp)
    }

    /// Protected mode (not IA-32e): 32- or 16-bit interrupt/trap gate (SDM Vol. 3A §6.12.1).
    fn deliver_protected(&mut self, ev: &Event) -> Flow {
        let ext = u32::from(ev.source != Source::Software);
        let gate = self.read_gate(ev, ext)?;
        if gate.task {
            // Task gate: switch tasks, then push the error code on the new task's stack.
            let eip = self.task_switch(gate.selector, Switch::Interrupt, ev.rip)?;
            self.rip = eip;
            // The error code goes on the new task's stack, a word for a 16-bit TSS (SDM Vol. 3A
            // §6.12.2, as KVM's task-switch emulation does).
            if let Some(e) = ev.error {
                let width = if self.sregs.tr.type_ & 8 != 0 { 4 } else { 2 };
                self.push(u64::from(e), width)?;
            }
            return Ok(());
        }
        let (mut cs, raw, addr) = self.gate_code(gate.selector, ext)?;
        let cpl = self.cpl();
        let conforming = cs.type_ & 4 != 0;
        let from_v86 = self.v86();
        // From virtual-8086 mode only a ring-0, non-conforming handler is allowed (SDM Vol. 3A
        // §20.3.1.1).
        if from_v86 && (conforming || cs.dpl != 0) {
            return Err(gp(u32::from(gate.selector & 0xfffc) + ext));
        }
        let width = if gate.wide { 4 } else { 2 };
        let flags = self.pushed_flags(ev);
        let old_cs = u64::from(self.sregs.cs.selector);
        let mut frame = vec![flags, old_cs, ev.rip];
        if let Some(e) = ev.error {
            frame.push(u64::from(e));
        }
        let new_cpl = if conforming { cpl } else { cs.dpl };
        if new_cpl < cpl {
            let (mut ss, sp, sraw, saddr) = self.inner_stack(new_cpl, ext)?;
            let old_ss = u64::from(self.sregs.ss.selector);
            let old_sp =
                if from_v86 { self.gpr[4] & 0xffff_ffff } else { self.gpr[4] & mask(self.stack_bytes()) };
            let mut full = if from_v86 {
                let s = &self.sregs;
                [s.gs, s.fs, s.ds, s.es].iter().map(|x| u64::from(x.selector)).collect()
            } else {
                Vec::new()
            };
            full.extend_from_slice(&[old_ss, old_sp]);
            full.extend_from_slice(&frame);
            let sp_bytes = if ss.db { 4 } else { 2 };
            let new_sp = self.push_frame(&ss, sp, sp_bytes, &full, width, new_cpl != 3)?;
            self.set_accessed(saddr, sraw)?;
            ss.type_ |= 1;
            self.sregs.ss = ss;
            self.set_gpr_sized(4, if sp_bytes == 4 { 4 } else { 2 }, new_sp);
            if from_v86 {
                // The handler starts with null data segments (SDM Vol. 3A §20.3.1.1).
                for r in [&mut self.sregs.ds, &mut self.sregs.es, &mut self.sregs.fs, &mut self.sregs.gs] {
                    *r = Segment { unusable: true, ..Segment::default() };
                }
            }
        } else {
            if !conforming && cs.dpl != cpl {
                return Err(gp(u32::from(gate.selector & 0xfffc) + ext));
            }
            let ss = self.sregs.ss;
            let sp_bytes = self.stack_bytes();
            let new_sp = self.push_frame(&ss, self.sp(), sp_bytes, &frame, width, cpl != 3)?;
            self.set_sp(new_sp);
        }
        if gate.offset > u64::from(cs.limit) {
            return Err(gp(0));
        }
        self.set_accessed(addr, raw)?;
        cs.type_ |= 1;
        cs.selector = (cs.selector & !3) | u16::from(new_cpl);
        self.sregs.cs = cs;
        self.rip = gate.offset;
        self.finish_delivery(gate.interrupt);
        Ok(())
    }

    /// IA-32e mode: 16-byte gates, IST, RSP aligned to 16, null SS on a privilege change
    /// (SDM Vol. 3A §6.14).
    fn deliver_long(&mut self, ev: &Event) -> Flow {
        let ext = u32::from(ev.source != Source::Software);
        let gate = self.read_gate(ev, ext)?;
        let (mut cs, raw, addr) = self.gate_code(gate.selector, ext)?;
        if !cs.l || cs.db {
            return Err(gp(u32::from(gate.selector & 0xfffc) + ext));
        }
        if !canonical(gate.offset) {
            return Err(gp(ext));
        }
        let cpl = self.cpl();
        let new_cpl = if cs.type_ & 4 != 0 { cpl } else { cs.dpl };
        // IA-32e delivery pushes all of RSP and, without a stack switch, goes on from all of it,
        // whatever SS.B a compatibility-mode program ran with (SDM Vol. 3A §6.14.2: SS:RSP is
        // pushed unconditionally in 64-bit form; QEMU's do_interrupt64 and KVM agree: a 16-bit
        // stack at ESP = 0x1FFF2 is saved as 0x1FFF2, not 0xFFF2).
        let old_sp = self.gpr[4];
        let sp = if gate.ist != 0 {
            self.tss_read(0x24 + 8 * u64::from(gate.ist - 1), 8)?
        } else if new_cpl < cpl {
            self.tss_read(4 + 8 * u64::from(new_cpl), 8)?
        } else {
            old_sp
        } & !0xf;
        let mut frame = vec![
            u64::from(self.sregs.ss.selector),
            old_sp,
            // RF = 1 in the image a fault pushes, in IA-32e mode too (SDM Vol. 3A §18.3.1.1).
            self.pushed_flags(ev),
            u64::from(self.sregs.cs.selector),
            ev.rip,
        ];
        if let Some(e) = ev.error {
            frame.push(u64::from(e));
        }
        let ss = self.sregs.ss;
        let new_sp = self.push_frame(&ss, sp, 8, &frame, 8, new_cpl != 3)?;
        self.set_accessed(addr, raw)?;
        if new_cpl < cpl {
            self.sregs.ss =
                Segment { selector: u16::from(new_cpl), dpl: new_cpl, unusable: true, ..Segment::default() };
        }
        self.gpr[4] = new_sp;
        cs.type_ |= 1;
        cs.selector = (cs.selector & !3) | u16::from(new_cpl);
        self.sregs.cs = cs;
        self.rip = gate.offset;
        self.finish_delivery(gate.interrupt);
        Ok(())
    }

    /// Clears TF, NT, RF, VM (and IF for an interrupt gate) after a gate transfer.
    fn finish_delivery(&mut self, interrupt_gate: bool) {
        self.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
        if interrupt_gate {
            self.rflags &= !rflags::IF;
        }
    }
}
