//! [`Machine`]: guest memory, one vCPU, the buses and the run loop shared by every backend.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::bus::{Bus, BusError, InterruptLines, WriteOutcome};
use crate::cpuid::CpuidProfile;
use crate::guest::{Guest, GuestError};
use crate::layout::{ExceptionReport, EXCEPTION_REPORT_ADDR};
use crate::state::{rflags, CpuState};
use crate::vcpu::{Backend, CannotRun, DebugEvent, InstructionInfo, Vcpu, VcpuError, VcpuExit};
use crate::GuestMemory;

/// The terminal event that ended a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `value` to the debug-exit port (0xF4).
    DebugExit {
        /// The value written.
        value: u32,
    },
    /// A fixture IDT stub reported an exception and halted.
    Exception(ExceptionReport),
    /// HLT with no interrupt pending and none that could ever arrive.
    Halted,
    /// Triple fault or other shutdown.
    Shutdown,
    /// A debug event (single step, breakpoint).
    Debug(DebugEvent),
    /// The deadline passed before the guest stopped.
    Deadline,
    /// The software CPU does not implement this instruction.
    Unsupported(InstructionInfo),
    /// The hardware backend cannot run this guest (e.g. KVM emulation failure).
    CannotRun(CannotRun),
    /// The software CPU was to fetch an instruction from a guest physical address no RAM backs.
    UnbackedFetch {
        /// The guest physical address of the fetch.
        addr: u64,
    },
}

impl StopReason {
    /// The process exit status the isa-debug-exit convention gives: (v << 1) | 1.
    pub fn debug_exit_code(&self) -> Option<u32> {
        match self {
            StopReason::DebugExit { value } => Some((value << 1) | 1),
            _ => None,
        }
    }

    /// The status a process exiting with [`StopReason::debug_exit_code`] really returns: its
    /// low 8 bits, as QEMU's isa-debug-exit (whose `exit()` the kernel truncates the same way).
    pub fn debug_exit_status(&self) -> Option<u8> {
        self.debug_exit_code().map(|c| (c & 0xff) as u8)
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::DebugExit { value } => {
                // The code the process returns: (v << 1) | 1, cut to 8 bits as QEMU's is.
                write!(f, "debug exit {value:#x} (exit code {})", ((value << 1) | 1) & 0xff)
            }
            StopReason::Exception(r) => write!(f, "exception {r}"),
            StopReason::Halted => write!(f, "halted"),
            StopReason::Shutdown => write!(f, "shutdown (triple fault)"),
            StopReason::Debug(DebugEvent::SingleStep { rip }) => write!(f, "single step at rip {rip:#x}"),
            StopReason::Debug(DebugEvent::Breakpoint { rip }) => write!(f, "breakpoint at rip {rip:#x}"),
            StopReason::Deadline => write!(f, "deadline reached"),
            StopReason::Unsupported(i) => write!(f, "unsupported instruction {i}"),
            StopReason::CannotRun(c) => write!(f, "the hardware backend cannot run this: {c}"),
            StopReason::UnbackedFetch { addr } => {
                write!(f, "instruction fetch from unbacked address {addr:#x} (no RAM there)")
            }
        }
    }
}

/// How a run ended and the state it ended in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// The backend that ran it.
    pub backend: &'static str,
    /// The terminal event.
    pub stop: StopReason,
    /// Final CPU state.
    pub state: CpuState,
    /// Exits handled by the run loop.
    pub exits: u64,
    /// Instructions retired, where the backend counts them.
    pub instructions: Option<u64>,
    /// Wall-clock time of the run.
    pub wall: Duration,
    /// RFLAGS bits left architecturally undefined at the end, where the backend tracks it.
    pub undefined_rflags: u64,
}

/// Options of [`Machine::run`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Wall-clock budget; every run has one so a hung guest or KVM cannot hang the caller.
    pub timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { timeout: Duration::from_secs(10) }
    }
}

/// An error of the machine itself (not a guest event).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A backend operation failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Guest memory could not be prepared.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A device could not be registered.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The backend returned an exit the run loop cannot make sense of.
    #[error("backend protocol error: {0}")]
    Protocol(String),
}

/// What the run loop does after one exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run again.
    Continue,
    /// HLT: stop unless an interrupt can wake the vCPU.
    Halt,
    /// Stop with this reason.
    Stop(StopReason),
}

/// Dispatches one exit to the buses; a plain function so it is testable without a guest.
pub fn handle_exit(pio: &Bus, mmio: &Bus, exit: VcpuExit<'_>) -> ExitAction {
    let chunks = |size: u8, len: usize| usize::from(size.max(1)).min(len.max(1));
    match exit {
        VcpuExit::IoOut { port, size, data } => {
            for chunk in data.chunks(chunks(size, data.len())) {
                if let WriteOutcome::Exit(value) = pio.write(u64::from(port), chunk) {
                    return ExitAction::Stop(StopReason::DebugExit { value });
                }
            }
            ExitAction::Continue
        }
        VcpuExit::IoIn { port, size, data } => {
            let n = chunks(size, data.len());
            for chunk in data.chunks_mut(n) {
                pio.read(u64::from(port), chunk);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead { addr, data } => {
            mmio.read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite { addr, data } => match mmio.write(addr, data) {
            WriteOutcome::Exit(value) => ExitAction::Stop(StopReason::DebugExit { value }),
            WriteOutcome::Continue => ExitAction::Continue,
        },
        VcpuExit::Hlt => ExitAction::Halt,
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::Shutdown),
        VcpuExit::Debug(e) => ExitAction::Stop(StopReason::Debug(e)),
        VcpuExit::InterruptWindow => ExitAction::Continue,
        VcpuExit::DeadlineReached => ExitAction::Stop(StopReason::Deadline),
        VcpuExit::Unsupported(i) => ExitAction::Stop(StopReason::Unsupported(i)),
        VcpuExit::CannotRun(c) => ExitAction::Stop(StopReason::CannotRun(c)),
        VcpuExit::UnbackedFetch { addr } => ExitAction::Stop(StopReason::UnbackedFetch { addr }),
    }
}

/// Guest memory, one vCPU, a port-I/O bus and an MMIO bus, and the run loop.
///
/// The loop is the same for every backend: the same device code serves KVM and the
/// software CPU, so a difference between two runs is a difference between two CPUs.
pub struct Machine<V: Vcpu = Box<dyn Vcpu>> {
    memory: Arc<GuestMemory>,
    vcpu: V,
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    interrupts: InterruptLines,
    exits: u64,
}

impl Machine<Box<dyn Vcpu>> {
    /// Builds `guest`'s memory, creates a vCPU on `backend` and loads the start state.
    pub fn new(backend: &dyn Backend, guest: &Guest, cpuid: &CpuidProfile) -> Result<Self, MachineError> {
        let memory = guest.build_memory()?;
        let profile = backend.cpuid_profile(cpuid)?;
        let mut vcpu = backend.create_vcpu(memory.clone(), &profile)?;
        vcpu.set_state(&guest.state)?;
        Ok(Machine::with_vcpu(memory, vcpu))
    }
}

impl<V: Vcpu> Machine<V> {
    /// A machine over an existing vCPU and the memory it was created with.
    pub fn with_vcpu(memory: Arc<GuestMemory>, vcpu: V) -> Self {
        Machine {
            memory,
            vcpu,
            pio: Bus::new(),
            mmio: Bus::new(),
            interrupts: InterruptLines::new(),
            exits: 0,
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The vCPU, to read or write registers between runs.
    pub fn vcpu(&mut self) -> &mut V {
        &mut self.vcpu
    }

    /// Interrupt lines: devices raise them, the run loop injects them.
    pub fn interrupts(&self) -> &InterruptLines {
        &self.interrupts
    }

    /// Clears the exception report area so a stale report cannot be mistaken for a new one.
    fn clear_exception_report(&self) {
        // A guest without RAM at the report address simply has no report.
        let _ = self.memory.write_slice(&[0u8; 4], GuestAddress(EXCEPTION_REPORT_ADDR));
    }

    /// The exception a fixture IDT stub reported, if any.
    pub fn exception_report(&self) -> Option<ExceptionReport> {
        let mut b = [0u8; 24];
        self.memory.read_slice(&mut b, GuestAddress(EXCEPTION_REPORT_ADDR)).ok()?;
        ExceptionReport::parse(&b)
    }

    /// Injects a pending interrupt if the vCPU can take one, else asks for a window.
    fn deliver_interrupts(&mut self) -> Result<(), VcpuError> {
        if self.interrupts.peek().is_none() {
            self.vcpu.request_interrupt_window(false);
        } else if self.vcpu.ready_for_interrupt() {
            if let Some(v) = self.interrupts.take() {
                self.vcpu.inject_interrupt(v)?;
            }
            self.vcpu.request_interrupt_window(self.interrupts.peek().is_some());
        } else {
            self.vcpu.request_interrupt_window(true);
        }
        Ok(())
    }

    /// The run loop proper: runs the vCPU and dispatches its exits until one stops the run.
    fn run_to_stop(&mut self) -> Result<StopReason, MachineError> {
        loop {
            self.deliver_interrupts()?;
            let exit = self.vcpu.run()?;
            self.exits += 1;
            match handle_exit(&self.pio, &self.mmio, exit) {
                ExitAction::Continue => {}
                ExitAction::Stop(reason) => return Ok(reason),
                ExitAction::Halt => {
                    let regs = self.vcpu.regs()?;
                    // SDM Vol. 2A HLT: only an interrupt (with IF = 1), NMI, SMI or reset resumes.
                    if regs.rflags & rflags::IF != 0 && self.interrupts.peek().is_some() {
                        continue;
                    }
                    return Ok(match self.exception_report() {
                        Some(r) => StopReason::Exception(r),
                        None => StopReason::Halted,
                    });
                }
            }
        }
    }

    /// Runs until a terminal event, dispatching every exit to the devices.
    pub fn run(&mut self, opts: &RunOptions) -> Result<RunOutcome, MachineError> {
        let start = Instant::now();
        self.clear_exception_report();
        self.vcpu.set_deadline(Some(start + opts.timeout));
        let stop = self.run_to_stop();
        // Cleared on every way out, errors included, so no later run inherits this deadline.
        self.vcpu.set_deadline(None);
        let stop = stop?;
        let state = self.vcpu.state()?;
        Ok(RunOutcome {
            backend: self.vcpu.backend_name(),
            stop,
            state,
            exits: self.exits,
            instructions: self.vcpu.instructions_retired(),
            wall: start.elapsed(),
            undefined_rflags: self.vcpu.undefined_rflags(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::BusDevice;
    use crate::state::{Regs, SystemRegs};

    struct Latch(Vec<u8>);
    impl BusDevice for Latch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> WriteOutcome {
            self.0.extend_from_slice(data);
            if data == [0xee] {
                WriteOutcome::Exit(7)
            } else {
                WriteOutcome::Continue
            }
        }
    }

    #[test]
    fn debug_exit_code_follows_isa_debug_exit() {
        // QEMU isa-debug-exit: writing v exits with (v << 1) | 1.
        assert_eq!(StopReason::DebugExit { value: 0x21 }.debug_exit_code(), Some(0x43));
        assert_eq!(StopReason::Halted.debug_exit_code(), None);
        // The process status is the low byte: 0x80 gives 0x101, which the shell sees as 1.
        let wraps = StopReason::DebugExit { value: 0x80 };
        assert_eq!(wraps.debug_exit_status(), Some(1));
        assert_eq!(wraps.to_string(), "debug exit 0x80 (exit code 1)");
    }

    #[test]
    fn string_io_is_split_into_elements() {
        let (mut pio, mmio) = (Bus::new(), Bus::new());
        let dev = Arc::new(Mutex::new(Latch(vec![])));
        pio.insert(0x80, 1, dev.clone()).unwrap();
        let a = handle_exit(&pio, &mmio, VcpuExit::IoOut { port: 0x80, size: 2, data: &[1, 2, 3, 4] });
        assert_eq!(a, ExitAction::Continue);
        assert_eq!(dev.lock().unwrap().0, vec![1, 2, 3, 4]);
        let mut buf = [0u8; 4];
        let a = handle_exit(&pio, &mmio, VcpuExit::IoIn { port: 0x80, size: 1, data: &mut buf });
        assert_eq!(a, ExitAction::Continue);
        assert_eq!(buf, [0x40; 4]);
    }

    #[test]
    fn unclaimed_ports_and_addresses_read_all_ones() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let mut b = [0u8; 2];
        assert_eq!(
            handle_exit(&pio, &mmio, VcpuExit::IoIn { port: 0x1234, size: 2, data: &mut b }),
            ExitAction::Continue
        );
        assert_eq!(b, [0xff, 0xff]);
        let mut b = [0u8; 8];
        assert_eq!(
            handle_exit(&pio, &mmio, VcpuExit::MmioRead { addr: 0xfee0_0000, data: &mut b }),
            ExitAction::Continue
        );
        assert_eq!(b, [0xff; 8]);
    }

    #[test]
    fn device_exit_request_and_terminal_exits_stop() {
        let (pio, mut mmio) = (Bus::new(), Bus::new());
        mmio.insert(0x1000, 0x10, Arc::new(Mutex::new(Latch(vec![])))).unwrap();
        assert_eq!(
            handle_exit(&pio, &mmio, VcpuExit::MmioWrite { addr: 0x1004, data: &[0xee] }),
            ExitAction::Stop(StopReason::DebugExit { value: 7 })
        );
        assert_eq!(handle_exit(&pio, &mmio, VcpuExit::Hlt), ExitAction::Halt);
        assert_eq!(handle_exit(&pio, &mmio, VcpuExit::Shutdown), ExitAction::Stop(StopReason::Shutdown));
        assert_eq!(
            handle_exit(&pio, &mmio, VcpuExit::DeadlineReached),
            ExitAction::Stop(StopReason::Deadline)
        );
    }
    /// A vCPU whose every run fails, recording the deadlines it is given.
    #[derive(Default)]
    struct FailingVcpu(Vec<Option<Instant>>);
    impl Vcpu for FailingVcpu {
        fn backend_name(&self) -> &'static str {
            "failing"
        }
        fn regs(&mut self) -> Result<Regs, VcpuError> {
            Ok(Regs::default())
        }
        fn set_regs(&mut self, _: &Regs) -> Result<(), VcpuError> {
            Ok(())
        }
        fn sregs(&mut self) -> Result<SystemRegs, VcpuError> {
            Ok(SystemRegs::default())
        }
        fn set_sregs(&mut self, _: &SystemRegs) -> Result<(), VcpuError> {
            Ok(())
        }
        fn state(&mut self) -> Result<CpuState, VcpuError> {
            Ok(CpuState::default())
        }
        fn set_state(&mut self, _: &CpuState) -> Result<(), VcpuError> {
            Ok(())
        }
        fn run(&mut self) -> Result<VcpuExit<'_>, VcpuError> {
            Err(VcpuError::InvalidState("this vCPU cannot run".into()))
        }
        fn ready_for_interrupt(&mut self) -> bool {
            false
        }
        fn inject_interrupt(&mut self, _: u8) -> Result<(), VcpuError> {
            Ok(())
        }
        fn request_interrupt_window(&mut self, _: bool) {}
        fn set_single_step(&mut self, _: bool) -> Result<(), VcpuError> {
            Ok(())
        }
        fn set_deadline(&mut self, deadline: Option<Instant>) {
            self.0.push(deadline);
        }
    }

    #[test]
    fn a_failed_run_leaves_no_deadline_armed() {
        let memory =
            Arc::new(crate::GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("1 page of RAM"));
        let mut m = Machine::with_vcpu(memory, FailingVcpu::default());
        let err = m.run(&RunOptions { timeout: Duration::from_secs(5) });
        assert!(err.is_err(), "a vCPU whose run fails makes the machine's run fail");
        let deadlines = &m.vcpu.0;
        assert!(deadlines.first().is_some_and(|d| d.is_some()), "the run set a deadline: {deadlines:?}");
        assert_eq!(deadlines.last(), Some(&None), "and cleared it on the way out: {deadlines:?}");
    }
}
