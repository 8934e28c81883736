//! duet backend: a software x86 CPU on the iced-x86 decoder.
//!
//! [`InterpBackend`] creates [`InterpVcpu`]s: real mode, 16/32-bit protected mode and 64-bit
//! long mode, segmentation and paging with a TLB, exception and interrupt delivery, MMIO and
//! port I/O as exits. Instructions are decoded once by iced-x86, cached by physical address
//! (dropped when the guest writes the page) and executed by group in [`instructions`](crate)
//! modules. Anything not implemented returns `VcpuExit::Unsupported`; nothing a guest does
//! makes it panic.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cpu;
mod decode;
mod error;
mod exception;
mod flags;
mod instructions;
mod memory;
mod mmu;
mod operand;
mod vcpu;

use std::sync::Arc;

use duet_core::{Availability, Backend, CpuidProfile, GuestMemory, Vcpu, VcpuError};

pub use error::InterpError;
pub use instructions::{implemented_mnemonics, is_implemented};
pub use vcpu::InterpVcpu;

/// The software-CPU backend: always available.
#[derive(Clone, Copy, Debug, Default)]
pub struct InterpBackend;

impl InterpBackend {
    /// The backend (it has no configuration).
    pub fn new() -> Self {
        InterpBackend
    }
}

impl Backend for InterpBackend {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn availability(&self) -> Availability {
        Availability::Available("iced-x86 interpreter".into())
    }

    fn create_vcpu(
        &self,
        memory: Arc<GuestMemory>,
        cpuid: &CpuidProfile,
    ) -> Result<Box<dyn Vcpu>, VcpuError> {
        Ok(Box::new(InterpVcpu::new(memory, cpuid)))
    }
}
