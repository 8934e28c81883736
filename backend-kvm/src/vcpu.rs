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

/// How often the deadline signal repeats while KVM_RUN has not returned: a signal that lands
/// just before the thread enters KVM_RUN is lost, the next one is not.
const KICK_REPEAT: Duration = Duration::from_millis(10);
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
pub struct KvmVcpu {
    vm: sys::Vm,
    deadline: Option<Instant>,
    single_step: bool,
    kicker: Option<sys::Kicker>,
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
            io_pending: false,
            queued: None,
            deadline_seen: false,
            immediate_exit,
        }
    }

    /// One KVM_RUN, with the deadline timer armed for `until` when given.
    fn enter(&mut self, until: Option<Instant>) -> Result<Entered, KvmError> {
        if let Some(t) = until {
            self.kicker()?.arm(t.saturating_duration_since(Instant::now()), KICK_REPEAT)?;
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
        let raw = match self.vm.vcpu_mut().run() {
            Ok(KvmExit::IoIn(..) | KvmExit::IoOut(..)) => Ok(Raw::Io),
            Ok(KvmExit::MmioRead(..) | KvmExit::MmioWrite(..)) => Ok(Raw::Mmio),
            Ok(KvmExit::Hlt) => Ok(Raw::Hlt),
            Ok(KvmExit::Shutdown) => Ok(Raw::Shutdown),
            Ok(KvmExit::Debug(arch)) => Ok(Raw::Debug(arch)),
            Ok(KvmExit::IrqWindowOpen) => Ok(Raw::Window),
            Ok(KvmExit::Intr) => Ok(Raw::Intr),
            Ok(KvmExit::InternalError) => Ok(Raw::Internal),
            Ok(KvmExit::FailEntry(reason, cpu)) => Ok(Raw::FailEntry(reason, cpu)),
            Ok(other) => Ok(Raw::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR => Ok(Raw::Intr),
            Err(e) => Err(e),
        };
        if until.is_some() {
            self.kicker()?.disarm()?;
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

    /// The deadline timer for the calling thread (a vCPU may move between threads).
    fn kicker(&mut self) -> Result<&sys::Kicker, KvmError> {
        let tid = sys::current_tid();
        if self.kicker.as_ref().is_none_or(|k| k.tid() != tid) {
            self.kicker = None;
            self.kicker = Some(sys::Kicker::for_current_thread()?);
        }
        self.kicker.as_ref().ok_or(KvmError::UnexpectedExit("deadline timer vanished".into()))
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
        self.vm.vcpu_mut().set_kvm_immediate_exit(1);
        let r = self.enter(None);
        self.vm.vcpu_mut().set_kvm_immediate_exit(0);
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
        loop {
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return self.at_deadline();
            }
            match self.enter(self.deadline)? {
                Entered::Exit(e) => return Ok(e),
                // A signal before the deadline (not ours, or ours early): run on.
                Entered::Interrupted => {}
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
        let probe = probe?;
        restored?;
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
            match self.enter(Some(until))? {
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
        let run = self.vm.vcpu_mut().get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), VcpuError> {
        Ok(self.vm.interrupt(vector)?)
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.vm.vcpu_mut().get_kvm_run().request_interrupt_window = on.into();
    }

    fn set_single_step(&mut self, on: bool) -> Result<(), VcpuError> {
        self.guest_debug(on)?;
        self.single_step = on;
        Ok(())
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        self.deadline_seen = false;
    }
}

#[cfg(test)]
mod tests {
    use duet_core::{Backend, CpuidProfile, Guest, Segment};

    use super::*;
    use crate::testing::kvm_or_skip;

    #[test]
    fn deadline_leaves_no_signal_or_immediate_exit_behind() {
        let Some(kvm) = kvm_or_skip() else { return };
        // EB FE = jmp $ at 0x7c00, real mode.
        let mut g = Guest::new("spin", 0x10000);
        g.load(0x7c00, vec![0xeb, 0xfe]);
        g.state.sregs.cs = Segment::real_mode(0, true);
        g.state.regs.rip = 0x7c00;
        let memory = g.build_memory().unwrap();
        let profile = kvm.cpuid_profile(&CpuidProfile::baseline()).unwrap();
        let mut vcpu = kvm.create(memory, &profile).unwrap();
        vcpu.set_state(&g.state).unwrap();
        vcpu.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::DeadlineReached));
        assert!(!sys::kick_signal_pending());
        assert_eq!(vcpu.vm.vcpu_mut().get_kvm_run().immediate_exit, 0);
        // The deadline stays reported until it is moved.
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::DeadlineReached));
    }
}
