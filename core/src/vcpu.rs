//! The seam every CPU implements: [`VcpuExit`], [`Vcpu`] and [`Backend`].

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::cpuid::CpuidProfile;
use crate::state::{CpuState, Regs, SystemRegs};
use crate::GuestMemory;

/// Why [`Vcpu::run`] returned. I/O variants lend their data, as kvm-ioctls' `VcpuExit` does.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `IN`/`INS`: fill `data` (a multiple of `size` bytes, one element per access) before the next run.
    IoIn {
        /// I/O port.
        port: u16,
        /// Access width in bytes (1, 2 or 4).
        size: u8,
        /// Buffer to fill, `count × size` bytes.
        data: &'a mut [u8],
    },
    /// `OUT`/`OUTS`: `data` holds `count × size` bytes written to `port`.
    IoOut {
        /// I/O port.
        port: u16,
        /// Access width in bytes (1, 2 or 4).
        size: u8,
        /// Bytes written.
        data: &'a [u8],
    },
    /// A read from a guest physical address that no RAM backs: fill `data`.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// A write to a guest physical address that no RAM backs.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest executed HLT.
    Hlt,
    /// The guest triple-faulted (or otherwise shut down).
    Shutdown,
    /// A debug event: single-step completed or breakpoint hit.
    Debug(DebugEvent),
    /// The interrupt window requested with [`Vcpu::request_interrupt_window`] is open.
    InterruptWindow,
    /// The deadline set with [`Vcpu::set_deadline`] passed.
    DeadlineReached,
    /// The software CPU met an instruction it does not implement.
    Unsupported(InstructionInfo),
    /// The software CPU was to fetch an instruction from a guest physical address no RAM backs
    /// (code cannot run from MMIO: there is no device to execute from).
    UnbackedFetch {
        /// The guest physical address of the fetch.
        addr: u64,
    },
    /// The hardware backend could not complete an instruction (e.g. KVM emulation failure).
    CannotRun(CannotRun),
}

/// What kind of debug event stopped the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    /// One instruction retired in single-step mode; RIP is the next instruction.
    SingleStep {
        /// RIP after the step.
        rip: u64,
    },
    /// A software or hardware breakpoint at `rip`.
    Breakpoint {
        /// RIP of the breakpoint.
        rip: u64,
    },
}

/// An instruction named by its address, bytes and mnemonic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstructionInfo {
    /// RIP (linear address = CS.base + RIP) of the instruction.
    pub rip: u64,
    /// The instruction bytes (up to 15).
    pub bytes: Vec<u8>,
    /// Disassembly or mnemonic, as far as the backend could decode it.
    pub mnemonic: String,
}

impl fmt::Display for InstructionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` at rip {:#x} (bytes", self.mnemonic, self.rip)?;
        for b in &self.bytes {
            write!(f, " {b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The hardware backend could not run the guest further; not a guest shutdown, not a duet bug.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CannotRun {
    /// The instruction it stopped at, if known.
    pub instruction: Option<InstructionInfo>,
    /// What the backend reported (e.g. "KVM_EXIT_INTERNAL_ERROR: emulation failure").
    pub reason: String,
}

impl fmt::Display for CannotRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if let Some(i) = &self.instruction {
            write!(f, " at {i}")?;
        }
        Ok(())
    }
}

/// An error of a backend operation; the message names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A hypervisor call failed (e.g. an ioctl), with its name.
    #[error("{op} failed: {source}")]
    Hypervisor {
        /// The operation, e.g. "KVM_SET_SREGS".
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state given cannot be loaded into this vCPU.
    #[error("invalid vCPU state: {0}")]
    InvalidState(String),
    /// The backend cannot be used on this host.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// Anything else, with a description.
    #[error("{0}")]
    Other(String),
}

/// One virtual CPU: registers are read and written, interrupts injected, the vCPU run.
pub trait Vcpu: Send {
    /// Short backend name ("kvm", "interp").
    fn backend_name(&self) -> &'static str;
    /// Reads GPRs, RIP and RFLAGS.
    fn regs(&mut self) -> Result<Regs, VcpuError>;
    /// Writes GPRs, RIP and RFLAGS.
    fn set_regs(&mut self, regs: &Regs) -> Result<(), VcpuError>;
    /// Reads segments, descriptor tables, control registers and EFER.
    fn sregs(&mut self) -> Result<SystemRegs, VcpuError>;
    /// Writes segments, descriptor tables, control registers and EFER.
    fn set_sregs(&mut self, sregs: &SystemRegs) -> Result<(), VcpuError>;
    /// Reads the whole state (regs, sregs, FPU, tracked MSRs).
    fn state(&mut self) -> Result<CpuState, VcpuError>;
    /// Writes the whole state.
    fn set_state(&mut self, state: &CpuState) -> Result<(), VcpuError>;
    /// Runs until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>, VcpuError>;
    /// Whether an external interrupt can be injected now (IF = 1, no interrupt shadow, none queued).
    fn ready_for_interrupt(&mut self) -> bool;
    /// Injects external interrupt `vector`; only valid when [`Vcpu::ready_for_interrupt`] is true.
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), VcpuError>;
    /// Asks for an [`VcpuExit::InterruptWindow`] exit as soon as an interrupt could be injected.
    fn request_interrupt_window(&mut self, on: bool);
    /// Turns single-step mode on or off: each run then retires at most one instruction.
    fn set_single_step(&mut self, on: bool) -> Result<(), VcpuError>;
    /// Sets (or clears) the wall-clock deadline after which `run` returns [`VcpuExit::DeadlineReached`].
    fn set_deadline(&mut self, deadline: Option<Instant>);
    /// Instructions retired so far, where the backend can count them.
    fn instructions_retired(&self) -> Option<u64> {
        None
    }
    /// RFLAGS bits whose current value is architecturally undefined (left so by the last
    /// instruction that wrote them, per iced-x86), where the backend tracks it; else 0.
    fn undefined_rflags(&self) -> u64 {
        0
    }
}

impl<V: Vcpu + ?Sized> Vcpu for Box<V> {
    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }
    fn regs(&mut self) -> Result<Regs, VcpuError> {
        (**self).regs()
    }
    fn set_regs(&mut self, regs: &Regs) -> Result<(), VcpuError> {
        (**self).set_regs(regs)
    }
    fn sregs(&mut self) -> Result<SystemRegs, VcpuError> {
        (**self).sregs()
    }
    fn set_sregs(&mut self, sregs: &SystemRegs) -> Result<(), VcpuError> {
        (**self).set_sregs(sregs)
    }
    fn state(&mut self) -> Result<CpuState, VcpuError> {
        (**self).state()
    }
    fn set_state(&mut self, state: &CpuState) -> Result<(), VcpuError> {
        (**self).set_state(state)
    }
    fn run(&mut self) -> Result<VcpuExit<'_>, VcpuError> {
        (**self).run()
    }
    fn ready_for_interrupt(&mut self) -> bool {
        (**self).ready_for_interrupt()
    }
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), VcpuError> {
        (**self).inject_interrupt(vector)
    }
    fn request_interrupt_window(&mut self, on: bool) {
        (**self).request_interrupt_window(on)
    }
    fn set_single_step(&mut self, on: bool) -> Result<(), VcpuError> {
        (**self).set_single_step(on)
    }
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        (**self).set_deadline(deadline)
    }
    fn instructions_retired(&self) -> Option<u64> {
        (**self).instructions_retired()
    }
    fn undefined_rflags(&self) -> u64 {
        (**self).undefined_rflags()
    }
}

/// Whether a backend can be used on this host, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// Usable; the string describes what was found (e.g. "KVM API 12").
    Available(String),
    /// Not usable; the string says why and what to do.
    Unavailable(String),
}

impl Availability {
    /// True when the backend can be used.
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available(_))
    }
}

/// A CPU implementation that creates vCPUs over shared guest memory.
pub trait Backend: Send + Sync {
    /// Short name ("kvm", "interp").
    fn name(&self) -> &'static str;
    /// Whether it can run on this host, and why not.
    fn availability(&self) -> Availability;
    /// The CPUID profile to use on this backend: `wanted` restricted to what this host supports.
    fn cpuid_profile(&self, wanted: &CpuidProfile) -> Result<CpuidProfile, VcpuError> {
        Ok(wanted.clone())
    }
    /// Creates a VM over `memory` with one vCPU applying `cpuid`, in the RESET state.
    fn create_vcpu(&self, memory: Arc<GuestMemory>, cpuid: &CpuidProfile)
        -> Result<Box<dyn Vcpu>, VcpuError>;
}
