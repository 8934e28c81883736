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
use crate::decode::{DecodeCache, Decoded};
use crate::error::InterpError;
use crate::exception::{Event, Source};
use crate::instructions::run;
use crate::memory::Awaiting;
use crate::mmu::Kind;

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
    UnbackedFetch { addr: u64 },
}

/// How one instruction ended, before the vCPU turns it into an exit.
enum Outcome {
    /// It retired and asks for nothing.
    Retired,
    /// HLT retired.
    Hlt,
    /// OUT/OUTS retired; the value is in the scratch buffer.
    IoOut { port: u16, size: u8 },
    /// It retired and queued MMIO writes.
    Writes,
    /// It did not retire: the abort, the instruction (if decoded), and whether the registers
    /// must be restored from the copy taken before it.
    Fault(Abort, Option<Instruction>, bool),
}

/// Runs decoded `d` at CS:RIP (fetched and checked): RIP, RF, the flag bookkeeping, the
/// instruction and step counts, the interrupt shadow and what it asks of the run loop. `tf`:
/// RFLAGS.TF when it began, which arms the single-step trap in `pending_db`. `BLOCK`: inside a
/// block, whose start reset the per-instruction I/O and REP state once (`begin_block`): the
/// instructions before a block's last neither stage I/O data nor iterate, and any that queues
/// an MMIO write or needs a read ends the block.
#[inline(always)]
fn exec_one<const BLOCK: bool>(
    cpu: &mut Cpu,
    saved: &mut ([u64; 16], u64, u64),
    pending_db: &mut bool,
    d: &Decoded,
    tf: bool,
) -> Outcome {
    if !BLOCK {
        begin_instruction(cpu);
    }
    cpu.next_rip = cpu.rip.wrapping_add(u64::from(d.len)) & d.ip_mask;
    // Registers to restore if the instruction faults or must be re-executed (the fast forms
    // change none before they fail).
    let restore = !d.fast;
    if restore {
        *saved = (cpu.gpr, cpu.rip, cpu.rflags);
    }
    let result = run(cpu, d);
    let effect = if cpu.flag_effect.is_some() { cpu.flag_effect.take() } else { None };
    if let Err(a) = result {
        return Outcome::Fault(a, Some(d.ins), restore);
    }
    // Per iced-x86 (unless this execution said otherwise): what this instruction wrote is
    // defined unless it is undefined.
    let (written, undefined) = effect.unwrap_or((d.written, d.undefined));
    cpu.undefined = (cpu.undefined & !written) | undefined;
    if BLOCK && d.straight {
        // Inside a block, before its last instruction: no IRET, no REP iteration, no interrupt
        // shadow (a block starts without one and nothing straight sets it), no exit request.
        cpu.rflags &= !duet_core::state::rflags::RF;
        cpu.rip = cpu.next_rip;
        cpu.retired = cpu.retired.wrapping_add(1);
        cpu.steps = cpu.steps.wrapping_add(1);
        return if cpu.io.writes.is_empty() { Outcome::Retired } else { Outcome::Writes };
    }
    // SDM Vol. 3A §18.3.1.4: TF set at the start of an instruction traps after it, except
    // after INT n/INT3/INTO, whose delivery clears TF first. (A block starts only with TF clear.)
    if !BLOCK {
        *pending_db = tf && !d.software_int;
    }
    // RF is cleared at the start of every instruction; only IRET loads it (SDM Vol. 3A
    // §18.3.1.1).
    if !d.iret {
        cpu.rflags &= !duet_core::state::rflags::RF;
    }
    cpu.rip = cpu.next_rip;
    // A REP string instruction retires once, with its last iteration, as hardware's
    // instructions-retired count has it; the iterations before are steps, not instructions
    // (and so do not advance the TSC either).
    if !cpu.rep_pending {
        cpu.retired = cpu.retired.wrapping_add(1);
    }
    cpu.steps = cpu.steps.wrapping_add(1);
    if !BLOCK {
        cpu.io.finish();
    }
    cpu.shadow = cpu.shadow.saturating_sub(1);
    cpu.ss_shadow = cpu.ss_shadow.saturating_sub(1);
    match cpu.post.take() {
        Some(Post::Hlt) => {
            cpu.halted = true;
            Outcome::Hlt
        }
        Some(Post::IoOut { port, size, value }) => {
            let n = usize::from(size).min(4);
            cpu.io.scratch[..n].copy_from_slice(&value.to_le_bytes()[..n]);
            Outcome::IoOut { port, size }
        }
        None if cpu.io.writes.is_empty() => Outcome::Retired,
        None => Outcome::Writes,
    }
}

/// Resets what one instruction may leave behind in the I/O stage, the REP state and the exit
/// request: before each instruction outside a block, once at a block's start.
#[inline(always)]
fn begin_instruction(cpu: &mut Cpu) {
    cpu.rep_pending = false;
    cpu.io.begin();
    cpu.post = None;
}

/// Whether `block`, found at CS:RIP, can run as a block: it holds instructions, and outside
/// 64-bit mode its last byte lies within the CS limit (SDM Vol. 3A §5.3; else `step` checks
/// each instruction).
#[inline(always)]
fn runnable(cpu: &Cpu, block: &crate::decode::Block, bitness: u32) -> bool {
    let past_limit = bitness != 64
        && (cpu.rip & 0xffff_ffff).wrapping_add(block.bytes.saturating_sub(1))
            > u64::from(cpu.sregs.cs.limit);
    !block.ins.is_empty() && !past_limit
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

    /// Steps executed since creation: instructions retired plus the iterations of REP string
    /// instructions before their last (which retires the instruction).
    pub fn steps(&self) -> u64 {
        self.cpu.steps
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
    /// Every check is made per instruction: the path for single-step, TF, breakpoints, the
    /// interrupt shadow, resumed I/O and anything a block cannot hold.
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
        begin_instruction(cpu);
        let outcome = match cpu.fetch(&mut self.code) {
            // More than 15 bytes is #GP(0) (SDM Vol. 2A §2.3.11); any other undecodable form is #UD.
            Ok(d) if d.ins.is_invalid() && d.ins.len() >= 15 => {
                Outcome::Fault(crate::cpu::gp(0), Some(d.ins), false)
            }
            Ok(d) if d.ins.is_invalid() => Outcome::Fault(ud(), Some(d.ins), false),
            Ok(d) => exec_one::<false>(cpu, &mut self.saved, &mut self.pending_db, d, tf),
            Err(e) => Outcome::Fault(e, None, false),
        };
        self.settle(outcome)
    }

    /// Runs the cached block at CS:RIP, instruction after instruction, with the mode, code
    /// translation, CS limit and cache lookup worked out once for the block; `Some` when `run`
    /// must return. The caller has checked what a block cannot hold (single-step, TF,
    /// breakpoints, the interrupt shadow); `count` grows by the instructions run. Anything
    /// irregular at the block's start goes to `step`, which makes every check and raises.
    ///
    /// A block that ends in a near branch whose target lies in the same linear code page goes
    /// on at the target's block (block chaining): a near branch changes nothing the caller
    /// checked (mode, CS, paging, TF, IF, the interrupt shadow, the debug registers), the page
    /// keeps its translation, and the deadline count and guest writes to code are looked at
    /// here as the caller would. Anything else returns to the caller.
    #[inline(always)]
    fn run_block(&mut self, count: &mut u32) -> Option<Exit> {
        let cpu = &mut self.cpu;
        if cpu.code_lines.has_pending() {
            self.code.apply(&mut cpu.code_lines);
        }
        let bitness = cpu.bitness();
        let Ok(lin) = cpu.code_linear() else { return self.step() };
        let Ok(pa) = cpu.translate(lin, Kind::Exec, false) else { return self.step() };
        let mut block = cpu.block_at(pa, bitness, &mut self.code);
        if !runnable(cpu, block, bitness) {
            return self.step();
        }
        // Nothing is staged between instructions here: resuming an MMIO read or IN goes through
        // `step`, and a queued MMIO write returns to the run loop, which hands them all out
        // before it runs on.
        begin_instruction(cpu);
        let mut outcome = Outcome::Retired;
        let mut cut = false;
        loop {
            let mut chain = false;
            for d in &block.ins {
                *count = count.wrapping_add(1);
                outcome = exec_one::<true>(cpu, &mut self.saved, &mut self.pending_db, d, false);
                // A write to cached code (perhaps later in this block) ends the block here.
                if !matches!(outcome, Outcome::Retired) || cpu.code_lines.has_pending() {
                    cut = d.straight;
                    break;
                }
                chain = d.chain;
            }
            // Chain only after a near branch that retired with nothing to hand out, inside the
            // deadline interval, to a target in this linear page (same physical page).
            if !chain
                || !matches!(outcome, Outcome::Retired)
                || cpu.code_lines.has_pending()
                || *count >= DEADLINE_CHECK_INTERVAL
            {
                break;
            }
            let Ok(next) = cpu.code_linear() else { break };
            if next >> 12 != lin >> 12 {
                break;
            }
            // The block before ran to its end: new blocks are whole again.
            self.code.short = false;
            cpu.io.finish();
            begin_instruction(cpu);
            block = cpu.block_at((pa & !0xfff) | (next & 0xfff), bitness, &mut self.code);
            if !runnable(cpu, block, bitness) {
                break;
            }
        }
        // A straight-line instruction that exits (MMIO) or faults leaves the next block to start
        // where no block starts yet; code that does so instruction after instruction would
        // decode a whole block per instruction. Until a block runs to its end again, new blocks
        // hold one instruction.
        self.code.short = cut;
        self.cpu.io.finish();
        self.settle(outcome)
    }

    /// What `run` does after an instruction ran (or failed to): the exit it returns, if any.
    #[inline(always)]
    fn settle(&mut self, outcome: Outcome) -> Option<Exit> {
        let exit = match outcome {
            Outcome::Retired => None,
            Outcome::Hlt => return Some(Exit::Hlt),
            Outcome::IoOut { port, size } => Some(Exit::IoOut { port, size }),
            Outcome::Writes => self.next_write(),
            Outcome::Fault(a, ins, restore) => return self.fail(a, ins, restore),
        };
        if exit.is_some() {
            self.step_report = self.single_step;
            return exit;
        }
        self.single_step.then_some(Exit::Step)
    }

    /// An instruction failed with `a`: undo what it did and deliver its exception, or name the
    /// exit. MMIO writes it queued are dropped: a faulting instruction writes nothing.
    #[inline(never)]
    fn fail(&mut self, a: Abort, ins: Option<Instruction>, restore: bool) -> Option<Exit> {
        let cpu = &mut self.cpu;
        if restore {
            (cpu.gpr, cpu.rip, cpu.rflags) = self.saved;
        }
        match a {
            Abort::Exception(e) => {
                cpu.io.rollback_writes();
                cpu.io.finish();
                match cpu.raise_exception(e) {
                    Ok(()) => self.single_step.then_some(Exit::Step),
                    Err(Abort::Shutdown) => Some(Exit::Shutdown),
                    Err(other) => Some(self.abort_exit(other, ins.as_ref())),
                }
            }
            other => Some(self.abort_exit(other, ins.as_ref())),
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
            Abort::Shutdown => {
                io.rollback_writes();
                Exit::Shutdown
            }
            Abort::Exception(e) => {
                Exit::Unsupported(self.info(ins, &format!("exception {} during delivery", e.vector)))
            }
            Abort::Unsupported(reason) => {
                io.rollback_writes();
                io.finish();
                Exit::Unsupported(self.info(ins, &reason))
            }
            Abort::UnbackedFetch { addr } => {
                io.rollback_writes();
                io.finish();
                Exit::UnbackedFetch { addr }
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
            if count >= DEADLINE_CHECK_INTERVAL {
                count = 0;
                if self.deadline.is_some_and(|d| Instant::now() >= d) {
                    return Exit::Deadline;
                }
            }
            // A block runs only where nothing must be looked at between its instructions.
            let cpu = &self.cpu;
            let per_instruction = self.single_step
                || cpu.shadow != 0
                || cpu.flag(duet_core::state::rflags::TF)
                || cpu.dr[5] & 0xff != 0;
            let next = if per_instruction {
                count = count.wrapping_add(1);
                self.step()
            } else {
                self.run_block(&mut count)
            };
            match next {
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
                let held = self.cpu.msr_held(i, v);
                self.cpu.msrs.insert(i, held);
            }
        }
        self.cpu.io = Default::default();
        self.cpu.shadow = 0;
        self.cpu.ss_shadow = 0;
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
            Exit::UnbackedFetch { addr } => VcpuExit::UnbackedFetch { addr },
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
