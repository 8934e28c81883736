//! duet-core: the seam between duet's CPUs and everything they share.
//!
//! CPU state types, [`VcpuExit`], the [`Vcpu`] and [`Backend`] traits, device buses, the
//! CPUID profile, state comparison and [`Machine`] with its run loop. Nothing here knows a
//! particular backend or device.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bus;
pub mod cpuid;
pub mod diff;
pub mod guest;
pub mod layout;
pub mod machine;
pub mod state;
pub mod vcpu;

pub use bus::{Bus, BusDevice, BusError, InterruptLines, IrqLine, SharedDevice, WriteOutcome};
pub use cpuid::{CpuidEntry, CpuidProfile, Vendor};
pub use diff::{DiffMask, StateDiff};
pub use guest::{Guest, GuestError, Load};
pub use layout::ExceptionReport;
pub use machine::{Machine, MachineError, RunOptions, RunOutcome, StopReason};
pub use state::{CpuMode, CpuState, DescriptorTable, FxArea, Regs, Segment, SystemRegs};
pub use vcpu::{Availability, Backend, CannotRun, DebugEvent, InstructionInfo, Vcpu, VcpuError, VcpuExit};

/// Guest physical memory shared by every backend: the same host pages KVM maps into the VM.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

pub use vm_memory;
