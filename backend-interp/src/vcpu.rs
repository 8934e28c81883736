//! [`InterpVcpu`]: the software CPU behind the `duet_core::Vcpu` seam, and its run loop.

use std::sync::Arc;
use std::time::Instant;

use duet_core::state::{msr, TRACKED_MSRS};
use duet_core::{
    CpuState, CpuidProfile, DebugEvent, GuestMemory, InstructionInfo, Regs, SystemRegs, Vcpu, VcpuError,
    VcpuExit,
};
use iced_x86::{Formatter, Instruction, IntelFormatter};

use crate::cpu::{ud, Abort, Cpu, Post};
use crate::decode::DecodeCache;
use crate::error::InterpError;
use crate::exception::{Event, Source};
use crate::instructions::run;
use crate::memory::Awaiting;

/// Instructions between two looks at the wall clock.
const DEADLINE_CHECK_INTERVAL: u32 = 4096;

/// What `run` returns, before its I/O data is lent from the vCPU.
#[derive(Debug)]
enum Exit {
    IoIn { port: u16, size: u8 },
    IoOut { port: u16, size: u8 },
    MmioRead { addr: u64, len: usize },
    MmioWrite { addr: u64 },
    Hlt,
    Shutdown,
    Step,
    Window,
    Deadline,
    Unsupported(InstructionInfo),
}

/// One software vCPU over shared guest memory.
pub struct InterpVcpu {
    cpu: Cpu,
    /// Decoded instructions by physical address (guest writes reach it through `cpu.code_lines`).
    code: DecodeCache,
    single_step: bool,
    deadline: Option<Instant>,
    window: bool,
    injected: Option<u8>,
    /// A single step retired an instruction whose I/O exit went out first: report the step next.
    step_report: bool,
    /// Data of the MMIO write being lent to the run loop.
    write_buf: Vec<u8>,
    /// RFLAGS.TF was set when the last instruction began: a single-step #DB trap is due.
    pending_db: bool,
    /// The CPU shut down (triple fault); it stays so until new state is loaded.
    shutdown: bool,
    /// GPRs, RIP and RFLAGS before the current instruction (kept only when it may need them).
    saved: ([u64; 16], u64, u64),
}

impl InterpVcpu {
    /// A vCPU in the RESET state (SDM Vol. 3A Table 10-1) over `memory`, answering CPUID from `cpuid`.
    pub fn new(memory: Arc<GuestMemory>, cpuid: &CpuidProfile) -> Self {
        InterpVcpu {
            cpu: Cpu::new(memory, cpuid.clone()),
            code: DecodeCache::default(),
            single_step: false,
            deadline: None,
            window: false,
            injected: None,
            step_report: false,
            write_buf: Vec::new(),
            pending_db: false,
            shutdown: false,
            saved: ([0; 16], 0, 0),
        }
    }

    /// Drops every cached decoded instruction. Guest writes do this page by page on their own;
    /// call it after the host (not the guest) wrote guest memory that may hold code.
    pub fn invalidate_code(&mut self) {
        self.code.clear(&mut self.cpu.code_lines);
    }

    fn ready(&self) -> bool {
        self.cpu.flag(duet_core::state::rflags::IF) && self.cpu.shadow == 0 && self.injected.is_none()
    }

    /// Describes the instruction at CS:RIP for an `Unsupported` exit.
    fn info(&mut self, ins: Option<&Instruction>, reason: &str) -> InstructionInfo {
        let len = ins.map_or(15, |i| i.len());
        let bytes = self.cpu.bytes_at_rip(len);
        let mnemonic = match ins {
            Some(i) => {
                let mut text = String::new();
                IntelFormatter::new().format(i, &mut text);
                let plain = format!("{:?}", i.mnemonic());
                if reason == plain {
                    text
                } else {
                    format!("{text} ({reason})")
                }
            }
            None => reason.to_string(),
        };
        InstructionInfo { rip: self.cpu.rip, bytes, mnemonic }
    }

    /// Executes one instruction (or delivers one exception); `Some` when `run` must return.
    #[inline(always)]
    fn step(&mut self) -> Option<Exit> {
        let cpu = &mut self.cpu;
        // Guest writes since the last fetch (by instructions or by event delivery) drop the
        // decoded instructions they overwrote before anything is fetched.
        if cpu.code_lines.has_pending() {
            self.code.apply(&mut cpu.code_lines);
        }
        // SDM Vol. 3A §6.9 Table 6-2: an instruction breakpoint (priority 7) is taken before any
        // fault on fetching (8) or decoding (9) the instruction it names.
        let hits = cpu.code_breakpoints();
        if hits != 0 {
            cpu.dr[4] = (cpu.dr[4] & !0xf) | hits;
            let rip = cpu.rip;
            let db =
                Event { vector: crate::cpu::vector::DB, error: None, source: Source::CodeBreakpoint, rip };
            return match cpu.raise(db) {
                Ok(()) => self.single_step.then_some(Exit::Step),
                Err(Abort::Shutdown) => Some(Exit::Shutdown),
                Err(other) => Some(self.abort_exit(other, None)),
            };
        }
        let tf = cpu.flag(duet_core::state::rflags::TF);
        cpu.rep_pending = false;
        cpu.io.begin();
        cpu.post = None;
        let fetched = cpu.fetch(&mut self.code);
        // Registers to restore if the instruction faults or must be re-executed (fetching changes
        // none; the fast forms change none before they fail).
        let restore = match &fetched {
            Ok(d) if !d.fast => {
                self.saved = (cpu.gpr, cpu.rip, cpu.rflags);
                true
            }
            _ => false,
        };
        let (result, d) = match fetched {
            // More than 15 bytes is #GP(0) (SDM Vol. 2A §2.3.11); any other undecodable form is #UD.
            Ok(d) if d.ins.is_invalid() && d.ins.len() >= 15 => (Err(crate::cpu::gp(0)), Some(d)),
            Ok(d) if d.ins.is_invalid() => (Err(ud()), Some(d)),
            Ok(d) => {
                // Decoded for the current code size (the cache is keyed by it): 64 means 64-bit mode.
                let lim =
                    if d.ins.code_size() == iced_x86::CodeSize::Code64 { u64::MAX } else { 0xffff_ffff };
                cpu.next_rip = cpu.rip.wrapping_add(d.ins.len() as u64) & lim;
                (run(cpu, d), Some(d))
            }
            Err(e) => (Err(e), None),
        };
        let effect = cpu.flag_effect.take();
        match result {
            Ok(()) => {
                if let Some(d) = d {
                    // Per iced-x86 (unless this execution said otherwise): what this instruction
                    // wrote is defined unless it is undefined.
                    let (written, undefined) = effect.unwrap_or((d.written, d.undefined));
                    cpu.undefined = (cpu.undefined & !written) | undefined;
                }
                // SDM Vol. 3A §18.3.1.4: TF set at the start of an instruction traps after it,
                // except after INT n/INT3/INTO, whose delivery clears TF first.
                let software_int = d.is_some_and(|d| d.software_int);
                self.pending_db = tf && !software_int;
                // RF is cleared at the start of every instruction; only IRET loads it (SDM Vol. 3A
                // §18.3.1.1).
                let iret = d.is_some_and(|d| d.iret);
                if !iret {
                    cpu.rflags &= !duet_core::state::rflags::RF;
                }
                cpu.rip = cpu.next_rip;
                // A REP string instruction retires once, with its last iteration, as hardware's
                // instructions-retired count has it; the iterations before are steps, not
                // instructions (and so do not advance the TSC either).
                if !cpu.rep_pending {
                    cpu.retired = cpu.retired.wrapping_add(1);
                }
                cpu.io.finish();
                cpu.shadow = cpu.shadow.saturating_sub(1);
                let exit = match cpu.post.take() {
                    Some(Post::Hlt) => {
                        cpu.halted = true;
                        return Some(Exit::Hlt);
                    }
                    Some(Post::IoOut { port, size, value }) => {
                        let n = usize::from(size).min(4);
                        cpu.io.scratch[..n].copy_from_slice(&value.to_le_bytes()[..n]);
                        Some(Exit::IoOut { port, size })
                    }
                    None => self.next_write(),
                };
                if exit.is_some() {
                    self.step_report = self.single_step;
                    return exit;
                }
                self.single_step.then_some(Exit::Step)
            }
            Err(Abort::Exception(e)) => {
                let ins = d.map(|d| d.ins);
                if restore {
                    (cpu.gpr, cpu.rip, cpu.rflags) = self.saved;
                }
                cpu.io.finish();
                match cpu.raise_exception(e) {
                    Ok(()) => self.single_step.then_some(Exit::Step),
                    Err(Abort::Shutdown) => Some(Exit::Shutdown),
                    Err(other) => Some(self.abort_exit(other, ins.as_ref())),
                }
            }
            Err(other) => {
                let ins = d.map(|d| d.ins);
                if restore {
                    (cpu.gpr, cpu.rip, cpu.rflags) = self.saved;
                }
                Some(self.abort_exit(other, ins.as_ref()))
            }
        }
    }

    /// The exit for an instruction that could not complete without the run loop.
    fn abort_exit(&mut self, a: Abort, ins: Option<&Instruction>) -> Exit {
        let io = &mut self.cpu.io;
        match a {
            Abort::MmioRead { addr, len } => {
                io.rollback_writes();
                io.awaiting = Some(Awaiting::Mmio { addr, len });
                Exit::MmioRead { addr, len: len.min(16) }
            }
            Abort::IoIn { port, size } => {
                io.rollback_writes();
                io.awaiting = Some(Awaiting::Port { size });
                Exit::IoIn { port, size }
            }
            Abort::Shutdown => Exit::Shutdown,
            Abort::Exception(e) => {
                Exit::Unsupported(self.info(ins, &format!("exception {} during delivery", e.vector)))
            }
            Abort::Unsupported(reason) => {
                io.finish();
                Exit::Unsupported(self.info(ins, &reason))
            }
        }
    }

    /// Triple fault: the CPU stays shut down until new state is loaded.
    fn shut_down(&mut self) -> Exit {
        self.shutdown = true;
        Exit::Shutdown
    }

    /// The next queued MMIO write, moved into the lending buffer.
    fn next_write(&mut self) -> Option<Exit> {
        let (addr, data) = self.cpu.io.writes.pop_front()?;
        self.write_buf = data;
        Some(Exit::MmioWrite { addr })
    }

    fn run_inner(&mut self) -> Exit {
        self.cpu.io.complete();
        if let Some(e) = self.next_write() {
            return e;
        }
        if std::mem::take(&mut self.step_report) {
            return Exit::Step;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Exit::Deadline;
        }
        if self.shutdown {
            return Exit::Shutdown;
        }
        // An IN or MMIO read completes before any injected event is delivered, as on KVM.
        if self.cpu.io.resuming() {
            if let Some(e) = self.step() {
                return if matches!(e, Exit::Shutdown) { self.shut_down() } else { e };
            }
        }
        let mut count = 0u32;
        loop {
            if std::mem::take(&mut self.pending_db) {
                // DR6.BS reports a single-step trap (SDM Vol. 3A §18.2.3).
                self.cpu.dr[4] |= 1 << 14;
                let rip = self.cpu.rip;
                let db =
                    Event { vector: crate::cpu::vector::DB, error: None, source: Source::Exception, rip };
                match self.cpu.raise(db) {
                    Ok(()) => {}
                    Err(Abort::Shutdown) => return self.shut_down(),
                    Err(other) => return self.abort_exit(other, None),
                }
            }
            if let Some(v) = self.injected.take() {
                let rip = self.cpu.rip;
                match self.cpu.raise(Event { vector: v, error: None, source: Source::External, rip }) {
                    Ok(()) => {}
                    Err(Abort::Shutdown) => return self.shut_down(),
                    Err(other) => return self.abort_exit(other, None),
                }
            }
            if self.cpu.halted {
                return Exit::Hlt;
            }
            if self.window && self.ready() {
                return Exit::Window;
            }
            count = count.wrapping_add(1);
            if count % DEADLINE_CHECK_INTERVAL == 0 && self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Exit::Deadline;
            }
            match self.step() {
                Some(Exit::Shutdown) => return self.shut_down(),
                Some(e) => return e,
                None => {}
            }
        }
    }
}

impl Vcpu for InterpVcpu {
    fn backend_name(&self) -> &'static str {
        "interp"
    }

    fn regs(&mut self) -> Result<Regs, VcpuError> {
        let mut r = Regs { rip: self.cpu.rip, rflags: self.cpu.rflags, ..Regs::default() };
        r.set_gprs(&self.cpu.gpr);
        Ok(r)
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), VcpuError> {
        self.cpu.gpr = regs.gprs();
        self.cpu.rip = regs.rip;
        self.cpu.set_rflags(regs.rflags);
        self.cpu.halted = false;
        Ok(())
    }

    fn sregs(&mut self) -> Result<SystemRegs, VcpuError> {
        Ok(self.cpu.sregs)
    }

    fn set_sregs(&mut self, sregs: &SystemRegs) -> Result<(), VcpuError> {
        if sregs.efer & duet_core::state::ctrl::EFER_LMA != 0
            && sregs.cr4 & duet_core::state::ctrl::CR4_PAE == 0
        {
            return Err(InterpError::InvalidState("EFER.LMA = 1 needs CR4.PAE = 1".into()).into());
        }
        self.cpu.sregs = *sregs;
        // Loading state under PAE paging loads the PDPTE registers from CR3, as KVM_SET_SREGS
        // does; entries with reserved bits are kept and fault on use.
        if self.cpu.pae_paging() {
            let base = self.cpu.sregs.cr3 & 0xffff_ffe0;
            self.cpu.pdpte = std::array::from_fn(|i| self.cpu.phys_read_u64(base + 8 * i as u64));
        }
        self.cpu.tlb.flush();
        self.code.clear(&mut self.cpu.code_lines);
        Ok(())
    }

    fn state(&mut self) -> Result<CpuState, VcpuError> {
        let regs = self.regs()?;
        let msrs = TRACKED_MSRS.iter().map(|&i| (i, self.cpu.rdmsr(i).unwrap_or(0))).collect();
        Ok(CpuState { regs, sregs: self.cpu.sregs, fpu: self.cpu.fpu, msrs })
    }

    fn set_state(&mut self, state: &CpuState) -> Result<(), VcpuError> {
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        self.cpu.fpu = state.fpu;
        for (&i, &v) in &state.msrs {
            if i == msr::TSC {
                self.cpu.tsc_offset = v.wrapping_sub(self.cpu.retired);
            } else if TRACKED_MSRS.contains(&i) {
                self.cpu.msrs.insert(i, v);
            }
        }
        self.cpu.io = Default::default();
        self.cpu.shadow = 0;
        self.cpu.undefined = 0;
        self.step_report = false;
        self.pending_db = false;
        self.shutdown = false;
        Ok(())
    }

    fn run(&mut self) -> Result<VcpuExit<'_>, VcpuError> {
        let exit = self.run_inner();
        let rip = self.cpu.rip;
        Ok(match exit {
            Exit::IoIn { port, size } => {
                let n = usize::from(size).min(4);
                VcpuExit::IoIn { port, size, data: &mut self.cpu.io.scratch[..n] }
            }
            Exit::IoOut { port, size } => {
                let n = usize::from(size).min(4);
                VcpuExit::IoOut { port, size, data: &self.cpu.io.scratch[..n] }
            }
            Exit::MmioRead { addr, len } => {
                VcpuExit::MmioRead { addr, data: &mut self.cpu.io.scratch[..len] }
            }
            Exit::MmioWrite { addr } => VcpuExit::MmioWrite { addr, data: &self.write_buf },
            Exit::Hlt => VcpuExit::Hlt,
            Exit::Shutdown => VcpuExit::Shutdown,
            Exit::Step => VcpuExit::Debug(DebugEvent::SingleStep { rip }),
            Exit::Window => VcpuExit::InterruptWindow,
            Exit::Deadline => VcpuExit::DeadlineReached,
            Exit::Unsupported(i) => VcpuExit::Unsupported(i),
        })
    }

    fn ready_for_interrupt(&mut self) -> bool {
        self.ready()
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), VcpuError> {
        if let Some(pending) = self.injected {
            return Err(InterpError::InterruptPending { vector, pending }.into());
        }
        self.injected = Some(vector);
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.window = on;
    }

    fn set_single_step(&mut self, on: bool) -> Result<(), VcpuError> {
        self.single_step = on;
        Ok(())
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Instructions retired: a REP string instruction counts once, however many iterations.
    fn instructions_retired(&self) -> Option<u64> {
        Some(self.cpu.retired)
    }

    fn undefined_rflags(&self) -> u64 {
        self.cpu.undefined
    }
}
