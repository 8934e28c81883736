//! [`KvmVcpu`]: one KVM vCPU behind duet's `Vcpu` trait, with a wall-clock deadline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use duet_core::state::TRACKED_MSRS;
use duet_core::{CannotRun, CpuState, DebugEvent, Regs, SystemRegs, Vcpu, VcpuError, VcpuExit};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_msr_entry, Msrs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
};
use kvm_ioctls::VcpuExit as KvmExit;

use crate::error::KvmError;
use crate::{convert, insn, sys};

/// Without KVM_CAP_IMMEDIATE_EXIT (Linux before 4.11) a kick that lands just before KVM_RUN is
/// lost, so there the timer repeats at this interval until the deadline is reported.
const KICK_REPEAT_WITHOUT_IMMEDIATE_EXIT: Duration = Duration::from_millis(10);
/// How long KVM gets to complete one instruction when the deadline has passed.
pub const PROGRESS_PROBE: Duration = Duration::from_millis(50);
/// DR6.BS: the #DB was caused by single-step (SDM Vol. 3A §19.2.3).
const DR6_BS: u64 = 1 << 14;

/// Why KVM_RUN returned, with the exit's data left on the kvm_run page.
#[derive(Debug)]
enum Exit {
    Io,
    Mmio,
    Hlt,
    Shutdown,
    Debug(DebugEvent),
    Window,
    Deadline,
    CannotRun(CannotRun),
}

/// What one KVM_RUN ended in.
enum Entered {
    Exit(Exit),
    /// EINTR or KVM_EXIT_INTR: a signal (normally the deadline's) interrupted the run.
    Interrupted,
}

/// A KVM vCPU (and its VM) implementing [`Vcpu`].
///
/// A deadline ([`Vcpu::set_deadline`]) is enforced by a one-shot timer that sends the real-time
/// signal `SIGRTMIN + 4` to the thread running the vCPU, armed once per deadline: an exit costs
/// no system call besides KVM_RUN. duet installs its handler for that signal (with
/// `SA_RESTART`, so other blocking calls on the thread are restarted, not failed) and unblocks
/// it on each thread that runs a vCPU; the process must leave that signal to duet and not
/// block it on those threads. The vCPU may move between threads: a run on a new thread aims a
/// new timer at it.
pub struct KvmVcpu {
    vm: sys::Vm,
    deadline: Option<Instant>,
    single_step: bool,
    /// The deadline timer, aimed at the thread that last ran the vCPU with a deadline.
    kicker: Option<sys::Kicker>,
    /// The instant `kicker` is armed for; `None` when it is disarmed.
    armed: Option<Instant>,
    /// The last exit was port I/O or MMIO: KVM finishes that instruction on the next KVM_RUN.
    io_pending: bool,
    /// An exit produced while finishing a pending I/O; the next `run` returns it.
    queued: Option<Exit>,
    /// The deadline passed and was handled once; later runs report it straight away.
    deadline_seen: bool,
    /// KVM_CAP_IMMEDIATE_EXIT: KVM_RUN can finish pending I/O without entering the guest.
    immediate_exit: bool,
}

impl KvmVcpu {
    /// Wraps a freshly created VM; the caller loads a state.
    pub(crate) fn new(vm: sys::Vm, immediate_exit: bool) -> Self {
        KvmVcpu {
            vm,
            deadline: None,
            single_step: false,
            kicker: None,
            armed: None,
            io_pending: false,
            queued: None,
            deadline_seen: false,
            immediate_exit,
        }
    }

    /// One KVM_RUN (with `immediate_exit` = `immediate`), ended by the deadline timer at
    /// `until` when given: `Interrupted` without entering when `until` has passed.
    ///
    /// The timer is armed only when `until` differs from what it is armed for, or the vCPU
    /// moved to another thread; otherwise KVM_RUN is the only system call here.
    fn enter(&mut self, until: Option<Instant>, immediate: bool) -> Result<Entered, KvmError> {
        if let Some(t) = until {
            self.arm(t)?;
        }
        enum Raw {
            Io,
            Mmio,
            Hlt,
            Shutdown,
            Debug(kvm_debug_exit_arch),
            Window,
            Intr,
            Internal,
            FailEntry(u64, u32),
            Unexpected(String),
        }
        let raw = match self.vm.run(until, immediate) {
            None => return Ok(Entered::Interrupted),
            Some(Ok(KvmExit::IoIn(..) | KvmExit::IoOut(..))) => Ok(Raw::Io),
            Some(Ok(KvmExit::MmioRead(..) | KvmExit::MmioWrite(..))) => Ok(Raw::Mmio),
            Some(Ok(KvmExit::Hlt)) => Ok(Raw::Hlt),
            Some(Ok(KvmExit::Shutdown)) => Ok(Raw::Shutdown),
            Some(Ok(KvmExit::Debug(arch))) => Ok(Raw::Debug(arch)),
            Some(Ok(KvmExit::IrqWindowOpen)) => Ok(Raw::Window),
            Some(Ok(KvmExit::Intr)) => Ok(Raw::Intr),
            Some(Ok(KvmExit::InternalError)) => Ok(Raw::Internal),
            Some(Ok(KvmExit::FailEntry(reason, cpu))) => Ok(Raw::FailEntry(reason, cpu)),
            Some(Ok(other)) => Ok(Raw::Unexpected(format!("{other:?}"))),
            Some(Err(e)) if e.errno() == libc::EINTR => Ok(Raw::Intr),
            Some(Err(e)) => Err(e),
        };
        if raw.is_err() {
            // The caller gets the KVM_RUN error; a timer left armed would only kick a thread
            // that may no longer run this vCPU, so stop it (its own failure adds nothing).
            let _ = self.disarm();
        }
        self.io_pending = false;
        let exit = match raw.map_err(KvmError::ioctl("KVM_RUN"))? {
            Raw::Intr => return Ok(Entered::Interrupted),
            Raw::Io => {
                self.io_pending = true;
                Exit::Io
            }
            Raw::Mmio => {
                self.io_pending = true;
                Exit::Mmio
            }
            Raw::Hlt => Exit::Hlt,
            Raw::Shutdown => Exit::Shutdown,
            Raw::Window => Exit::Window,
            Raw::Debug(arch) => Exit::Debug(self.debug_event(&arch)?),
            Raw::Internal => {
                let (sub, data) = self.vm.internal_error();
                let what = match sub {
                    KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
                    KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
                    KVM_INTERNAL_ERROR_DELIVERY_EV => "failure delivering an event",
                    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit",
                    _ => "unknown sub-error",
                };
                let data: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
                self.cannot_run(format!(
                    "KVM_EXIT_INTERNAL_ERROR: {what} (suberror {sub}, data [{}])",
                    data.join(", ")
                ))?
            }
            Raw::FailEntry(reason, cpu) => self.cannot_run(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host cpu {cpu}"
            ))?,
            Raw::Unexpected(what) => return Err(KvmError::UnexpectedExit(what)),
        };
        Ok(Entered::Exit(exit))
    }

    /// Arms the deadline timer for `t` on the calling thread, unless it already is.
    ///
    /// A vCPU may move between threads (it is `Send`): the timer is aimed at one thread, so
    /// a run on another gets a new timer aimed at it. Threads are told apart by a per-thread
    /// serial read from a thread-local, never by a kernel tid (those are reused).
    fn arm(&mut self, t: Instant) -> Result<(), KvmError> {
        if self.kicker.as_ref().is_none_or(|k| !k.serves_current_thread()) {
            // The old timer (if any) is deleted before the new one exists.
            self.kicker = None;
            self.armed = None;
            self.kicker = Some(sys::Kicker::for_current_thread()?);
        }
        // A deadline already past needs no timer: `enter` sees it before entering.
        if self.armed != Some(t) && Instant::now() < t {
            if let Some(k) = &self.kicker {
                k.arm(t, (!self.immediate_exit).then_some(KICK_REPEAT_WITHOUT_IMMEDIATE_EXIT))?;
            }
            self.armed = Some(t);
        }
        Ok(())
    }

    /// Stops the deadline timer if it is armed.
    fn disarm(&mut self) -> Result<(), KvmError> {
        if self.armed.take().is_some() {
            if let Some(k) = &self.kicker {
                k.disarm()?;
            }
        }
        Ok(())
    }

    /// Single step or breakpoint, from the #DB/#BP KVM intercepted (SDM Vol. 3A §19.2.3 DR6).
    fn debug_event(&self, arch: &kvm_debug_exit_arch) -> Result<DebugEvent, KvmError> {
        let rip = self.vm.vcpu().get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?.rip;
        Ok(if arch.exception == 1 && arch.dr6 & DR6_BS != 0 {
            DebugEvent::SingleStep { rip }
        } else {
            DebugEvent::Breakpoint { rip }
        })
    }

    /// A [`CannotRun`] exit naming the instruction at RIP.
    fn cannot_run(&self, reason: String) -> Result<Exit, KvmError> {
        let vcpu = self.vm.vcpu();
        let regs = convert::regs_from_kvm(&vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?);
        let sregs = convert::sregs_from_kvm(&vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?);
        let instruction = Some(insn::describe(vcpu, self.vm.memory(), &regs, &sregs));
        Ok(Exit::CannotRun(CannotRun { instruction, reason }))
    }

    /// Lets KVM finish a pending I/O instruction (KVM_RUN with immediate_exit) so that the
    /// registers read or written next are those after it; an exit it produces is queued.
    fn settle(&mut self) -> Result<(), KvmError> {
        if !self.io_pending || self.queued.is_some() || !self.immediate_exit {
            return Ok(());
        }
        let r = self.enter(None, true);
        if let Entered::Exit(e) = r? {
            self.queued = Some(e);
        }
        Ok(())
    }

    /// The next exit, honouring the queue and the deadline.
    fn next_exit(&mut self) -> Result<Exit, KvmError> {
        if let Some(e) = self.queued.take() {
            return Ok(e);
        }
        if self.deadline_seen {
            return Ok(Exit::Deadline);
        }
        loop {
            match self.enter(self.deadline, false)? {
                Entered::Exit(e) => return Ok(e),
                // `enter` read the clock (it does, before entering, when there is a deadline)
                // or a signal interrupted KVM_RUN: the deadline has passed, or it was a signal
                // that is not ours (or a stale kick) and the vCPU runs on.
                Entered::Interrupted => {
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        return self.at_deadline();
                    }
                }
            }
        }
    }

    /// The deadline passed: check that KVM can still complete an instruction, so a guest
    /// that loops is told apart from a KVM that cannot finish one instruction.
    fn at_deadline(&mut self) -> Result<Exit, KvmError> {
        if self.deadline_seen {
            return Ok(Exit::Deadline);
        }
        self.deadline_seen = true;
        // The timer has done its work; the probe below arms it for its own, shorter span.
        self.disarm()?;
        self.settle()?;
        if let Some(e) = self.queued.take() {
            // Finishing the pending I/O produced an exit: the vCPU advances.
            return Ok(e);
        }
        let before = (self.read_regs()?, self.read_sregs()?);
        let spins = insn::branches_to_itself(self.vm.vcpu(), self.vm.memory(), &before.0, &before.1);
        self.guest_debug(true)?;
        let probe = self.probe(&before, spins);
        let restored = self.guest_debug(self.single_step);
        let disarmed = self.disarm();
        let probe = probe?;
        restored?;
        disarmed?;
        match probe {
            Some(e) => Ok(e),
            None => self.cannot_run(format!(
                "KVM did not complete the instruction within {} ms (after the deadline, at rip {:#x})",
                PROGRESS_PROBE.as_millis(),
                before.0.rip
            )),
        }
    }

    /// Single-steps until one instruction completes or [`PROGRESS_PROBE`] passes: `Some(exit)`
    /// when the vCPU advanced (`DeadlineReached`, or another exit it reached), `None` if not.
    ///
    /// A step "completes" when the registers change, or when the instruction is a branch to
    /// itself (`jmp $`), which retires without changing them. On this development host
    /// (kvm_pvm) a real-mode `INT n` returns a single-step exit with nothing changed, again and
    /// again; elsewhere KVM_RUN may simply not return, and the timer ends the probe.
    fn probe(&mut self, before: &(Regs, SystemRegs), spins: bool) -> Result<Option<Exit>, KvmError> {
        let until = Instant::now() + PROGRESS_PROBE;
        loop {
            match self.enter(Some(until), false)? {
                Entered::Exit(Exit::Debug(DebugEvent::SingleStep { .. })) => {
                    let after = (self.read_regs()?, self.read_sregs()?);
                    if spins || after != *before {
                        return Ok(Some(Exit::Deadline));
                    }
                }
                // Any other exit is progress too; the next run reports the deadline.
                Entered::Exit(e) => return Ok(Some(e)),
                Entered::Interrupted => {}
            }
            if Instant::now() >= until {
                return Ok(None);
            }
        }
    }

    /// KVM_SET_GUEST_DEBUG with single-step on or off.
    fn guest_debug(&self, step: bool) -> Result<(), KvmError> {
        let control = if step { KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP } else { 0 };
        let dbg = kvm_guest_debug { control, ..Default::default() };
        self.vm.vcpu().set_guest_debug(&dbg).map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))
    }

    /// Lends the data of `exit` from the kvm_run page.
    fn lend(&mut self, exit: Exit) -> Result<VcpuExit<'_>, KvmError> {
        Ok(match exit {
            Exit::Io => {
                let io = self.vm.io_data()?;
                if io.input {
                    VcpuExit::IoIn { port: io.port, size: io.size, data: io.data }
                } else {
                    VcpuExit::IoOut { port: io.port, size: io.size, data: io.data }
                }
            }
            Exit::Mmio => {
                let m = self.vm.mmio_data();
                if m.write {
                    VcpuExit::MmioWrite { addr: m.addr, data: m.data }
                } else {
                    VcpuExit::MmioRead { addr: m.addr, data: m.data }
                }
            }
            Exit::Hlt => VcpuExit::Hlt,
            Exit::Shutdown => VcpuExit::Shutdown,
            Exit::Debug(e) => VcpuExit::Debug(e),
            Exit::Window => VcpuExit::InterruptWindow,
            Exit::Deadline => VcpuExit::DeadlineReached,
            Exit::CannotRun(c) => VcpuExit::CannotRun(c),
        })
    }

    /// The tracked MSRs KVM can read; an MSR KVM does not know is left out.
    fn read_msrs(&self) -> Result<BTreeMap<u32, u64>, KvmError> {
        let vcpu = self.vm.vcpu();
        let read = |indices: &[u32]| -> Result<Vec<kvm_msr_entry>, KvmError> {
            let entries: Vec<kvm_msr_entry> =
                indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs =
                Msrs::from_entries(&entries).map_err(|_| KvmError::TooManyMsrs { count: entries.len() })?;
            let n = vcpu.get_msrs(&mut msrs).map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
            Ok(msrs.as_slice().iter().take(n).copied().collect())
        };
        let all = read(&TRACKED_MSRS)?;
        let got = if all.len() == TRACKED_MSRS.len() {
            all
        } else {
            // KVM_GET_MSRS stops at the first MSR it refuses: ask one at a time.
            let mut got = Vec::new();
            for index in TRACKED_MSRS {
                got.extend(read(&[index])?);
            }
            got
        };
        Ok(got.into_iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes `msrs`, naming the first one KVM refuses.
    fn write_msrs(&self, msrs: &BTreeMap<u32, u64>) -> Result<(), KvmError> {
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|(&index, &data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        if entries.is_empty() {
            return Ok(());
        }
        let table =
            Msrs::from_entries(&entries).map_err(|_| KvmError::TooManyMsrs { count: entries.len() })?;
        let n = self.vm.vcpu().set_msrs(&table).map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        match entries.get(n) {
            Some(e) => Err(KvmError::MsrRefused { index: e.index, value: e.data }),
            None => Ok(()),
        }
    }

    /// Loads a whole state: system registers first (they set the mode), then GPRs, FPU, MSRs.
    pub(crate) fn load_state(&mut self, s: &CpuState) -> Result<(), KvmError> {
        self.settle()?;
        let vcpu = self.vm.vcpu();
        let bitmap = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?.interrupt_bitmap;
        let (regs, sregs, fpu) = convert::state_to_kvm(s, bitmap);
        vcpu.set_sregs(&sregs).map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        vcpu.set_fpu(&fpu).map_err(KvmError::ioctl("KVM_SET_FPU"))?;
        self.vm.set_mxcsr(fpu.mxcsr)?;
        self.write_msrs(&s.msrs)
    }

    fn read_regs(&mut self) -> Result<Regs, KvmError> {
        self.settle()?;
        Ok(convert::regs_from_kvm(&self.vm.vcpu().get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?))
    }

    fn read_sregs(&mut self) -> Result<SystemRegs, KvmError> {
        self.settle()?;
        Ok(convert::sregs_from_kvm(&self.vm.vcpu().get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?))
    }
}

impl Vcpu for KvmVcpu {
    fn backend_name(&self) -> &'static str {
        "kvm"
    }

    fn regs(&mut self) -> Result<Regs, VcpuError> {
        Ok(self.read_regs()?)
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), VcpuError> {
        self.settle()?;
        let r = convert::regs_to_kvm(regs);
        Ok(self.vm.vcpu().set_regs(&r).map_err(KvmError::ioctl("KVM_SET_REGS"))?)
    }

    fn sregs(&mut self) -> Result<SystemRegs, VcpuError> {
        Ok(self.read_sregs()?)
    }

    fn set_sregs(&mut self, sregs: &SystemRegs) -> Result<(), VcpuError> {
        self.settle()?;
        let vcpu = self.vm.vcpu();
        let bitmap = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?.interrupt_bitmap;
        let s = convert::sregs_to_kvm(sregs, bitmap);
        Ok(vcpu.set_sregs(&s).map_err(KvmError::ioctl("KVM_SET_SREGS"))?)
    }

    fn state(&mut self) -> Result<CpuState, VcpuError> {
        let regs = self.read_regs()?;
        let sregs = self.read_sregs()?;
        let mut kfpu = self.vm.vcpu().get_fpu().map_err(KvmError::ioctl("KVM_GET_FPU"))?;
        if let Some(mxcsr) = self.vm.mxcsr()? {
            kfpu.mxcsr = mxcsr;
        }
        let fpu = convert::fpu_from_kvm(&kfpu);
        let msrs = self.read_msrs()?;
        Ok(CpuState { regs, sregs, fpu, msrs })
    }

    fn set_state(&mut self, state: &CpuState) -> Result<(), VcpuError> {
        Ok(self.load_state(state)?)
    }

    fn run(&mut self) -> Result<VcpuExit<'_>, VcpuError> {
        let exit = self.next_exit()?;
        Ok(self.lend(exit)?)
    }

    fn ready_for_interrupt(&mut self) -> bool {
        self.vm.ready_for_interrupt()
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), VcpuError> {
        Ok(self.vm.interrupt(vector)?)
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.vm.request_interrupt_window(on);
    }

    fn set_single_step(&mut self, on: bool) -> Result<(), VcpuError> {
        self.guest_debug(on)?;
        self.single_step = on;
        Ok(())
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        if self.armed.is_some() && self.armed != deadline {
            // Stop the old deadline's timer now, so it cannot fire into whatever this thread
            // does next; the next run arms it for the new one. timer_settime fails only for a
            // bad timer id or value, neither possible here, and this method has no error to
            // return: a failure would leave at most one stray kick, which stops nothing.
            let _ = self.disarm();
        }
        self.deadline = deadline;
        self.deadline_seen = false;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use duet_core::{Backend, CpuidProfile, Guest, Segment};

    use super::*;
    use crate::testing::kvm_or_skip;

    /// A real-mode vCPU running `code` at 0000:7C00, or `None` (skipped) without KVM.
    fn vcpu_with(code: &[u8]) -> Option<KvmVcpu> {
        let kvm = kvm_or_skip()?;
        let mut g = Guest::new("kick", 0x10000);
        g.load(0x7c00, code.to_vec());
        g.state.sregs.cs = Segment::real_mode(0, true);
        g.state.regs.rip = 0x7c00;
        let memory = g.build_memory().unwrap();
        let profile = kvm.cpuid_profile(&CpuidProfile::baseline()).unwrap();
        let mut vcpu = kvm.create(memory, &profile).unwrap();
        vcpu.set_state(&g.state).unwrap();
        Some(vcpu)
    }

    fn timer_armed(vcpu: &KvmVcpu) -> bool {
        vcpu.kicker.as_ref().is_some_and(sys::Kicker::is_armed)
    }

    /// EB FE = jmp $.
    const SPIN: &[u8] = &[0xeb, 0xfe];
    /// E6 80 = out 0x80,al; EB FE = jmp $.
    const OUT_THEN_SPIN: &[u8] = &[0xe6, 0x80, 0xeb, 0xfe];

    #[test]
    fn deadline_leaves_no_signal_or_immediate_exit_behind() {
        let Some(mut vcpu) = vcpu_with(SPIN) else { return };
        vcpu.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::DeadlineReached));
        assert!(!sys::kick_signal_pending());
        assert_eq!(vcpu.vm.immediate_exit(), 0);
        assert!(!timer_armed(&vcpu), "the deadline was reported, its timer must be stopped");
        // The deadline stays reported until it is moved.
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::DeadlineReached));
    }

    #[test]
    fn a_kick_between_the_deadline_check_and_kvm_run_ends_that_kvm_run() {
        // The race the handler closes: the signal lands after the clock was read but before
        // the thread is inside KVM_RUN. Without immediate_exit, KVM_RUN would spin on `jmp $`
        // until the (far) deadline's own timer.
        let Some(mut vcpu) = vcpu_with(SPIN) else { return };
        let deadline = Instant::now() + Duration::from_secs(60);
        vcpu.set_deadline(Some(deadline));
        sys::kick_inside_next_window();
        assert!(matches!(vcpu.enter(Some(deadline), false).unwrap(), Entered::Interrupted));
        assert!(Instant::now() < deadline, "KVM_RUN ran until the deadline's timer, not the kick");
        assert_eq!(vcpu.vm.immediate_exit(), 0);
        vcpu.set_deadline(None);
        assert!(!timer_armed(&vcpu));
    }

    #[test]
    fn a_stale_kick_does_not_end_a_run_before_its_deadline() {
        // A kick whose deadline is not this one (a timer since re-armed, another vCPU's) makes
        // one KVM_RUN return early; the run goes on to the guest's real exit.
        let Some(mut vcpu) = vcpu_with(&[0xe6, 0x80, 0xf4]) else { return };
        vcpu.set_deadline(Some(Instant::now() + Duration::from_secs(60)));
        sys::kick_inside_next_window();
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { port: 0x80, .. } => {}
            e => panic!("expected the guest's OUT to port 0x80, got {e:?}"),
        }
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    }

    #[test]
    fn the_timer_is_armed_once_per_deadline_and_stopped_when_it_changes() {
        // E6 80 = out 0x80,al, three times; F4 = hlt.
        let Some(mut vcpu) = vcpu_with(&[0xe6, 0x80, 0xe6, 0x80, 0xe6, 0x80, 0xf4]) else { return };
        let first = Instant::now() + Duration::from_secs(60);
        vcpu.set_deadline(Some(first));
        assert!(!timer_armed(&vcpu), "armed lazily, by the first run");
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut { .. }));
        assert!(timer_armed(&vcpu) && vcpu.armed == Some(first));
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut { .. }));
        assert_eq!(vcpu.armed, Some(first));
        // A new deadline stops the old timer at once; the next run arms it for the new one.
        let second = first + Duration::from_secs(1);
        vcpu.set_deadline(Some(second));
        assert!(!timer_armed(&vcpu) && vcpu.armed.is_none());
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut { .. }));
        assert!(timer_armed(&vcpu) && vcpu.armed == Some(second));
        // No deadline: no timer, and runs do not arm one.
        vcpu.set_deadline(None);
        assert!(!timer_armed(&vcpu));
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
        assert!(!timer_armed(&vcpu));
    }

    #[test]
    fn a_vcpu_moved_to_another_thread_is_kicked_there() {
        let Some(mut vcpu) = vcpu_with(OUT_THEN_SPIN) else { return };
        vcpu.set_deadline(Some(Instant::now() + Duration::from_secs(60)));
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::IoOut { port: 0x80, .. }));
        assert!(vcpu.kicker.as_ref().is_some_and(sys::Kicker::serves_current_thread));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            vcpu.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
            let exit = format!("{:?}", vcpu.run().map_err(|e| e.to_string()));
            let retargeted = vcpu.kicker.as_ref().is_some_and(sys::Kicker::serves_current_thread);
            let _ = tx.send((exit, retargeted));
        });
        // A kick aimed at the old thread would leave the new one in KVM_RUN for ever: wait
        // long, so that only a lost kick (never a slow host) fails here.
        let (exit, retargeted) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the moved vCPU was never kicked out of KVM_RUN");
        assert_eq!(exit, "Ok(DeadlineReached)");
        assert!(retargeted, "the deadline timer was not re-created for the new thread");
    }
}
