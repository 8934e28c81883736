//! duet backend: a software x86 CPU on the iced-x86 decoder.
//!
//! [`InterpBackend`] creates [`InterpVcpu`]s that run real mode, 16/32-bit protected mode and
//! 64-bit long mode: segmentation with limit/type checks, paging (32-bit with PSE, PAE, 4-level
//! with 2 MiB/1 GiB pages, NX, WP, accessed/dirty bits) behind a TLB, exception and interrupt
//! delivery through the IVT, 32-bit gates (with TSS stack switch), task gates and the 64-bit IDT
//! (IST), double and triple fault, call gates, hardware task switches (32- and 16-bit TSSs),
//! virtual-8086 mode with the CR4.VME/PVI virtual-interrupt extensions, instruction breakpoints,
//! and the integer instruction set [`implemented_mnemonics`] lists (CPUID-gated extensions included). Guest
//! physical addresses outside RAM are MMIO: reads and `IN` end `run` with an exit and the
//! instruction is re-executed with the data the run loop supplied; writes and `OUT` retire the
//! instruction first. Instructions are decoded once, with their handler and flag masks, cached by
//! physical address and dropped when the guest writes any of their bytes, so self-modifying code
//! works; the common register and register/memory forms run through handlers with their operands
//! resolved at decode time.
//!
//! Where Intel and AMD silicon differ, it follows the vendor of its CPUID profile, never the
//! host's (docs/VENDORS.md lists each difference).
//!
//! Not implemented (an `Unsupported` exit names the instruction): x87/MMX/SSE/AVX, SMM, data and
//! I/O breakpoints (DR0–DR3 raise instruction breakpoints only).
//! Nothing a guest does makes the interpreter panic.
//!
//! ```
//! use duet_core::{CpuState, CpuidProfile, Guest, Machine, RunOptions, Segment, StopReason, Vcpu};
//! use duet_interp::InterpVcpu;
//!
//! // mov al, 'A'; out 0xe9, al; hlt — at 0000:7C00 in real mode.
//! let mut guest = Guest::new("doc", 0x10000);
//! guest.load(0x7c00, vec![0xb0, b'A', 0xe6, 0xe9, 0xf4]);
//! let mem = guest.build_memory()?;
//! let mut state = CpuState::reset();
//! state.sregs.cs = Segment::real_mode(0, true);
//! state.regs.rip = 0x7c00;
//! let mut vcpu = InterpVcpu::new(mem.clone(), &CpuidProfile::baseline());
//! vcpu.set_state(&state)?;
//! let mut machine = Machine::with_vcpu(mem, vcpu);
//! let out = machine.run(&RunOptions::default())?;
//! assert_eq!(out.stop, StopReason::Halted);
//! assert_eq!((out.instructions, out.state.regs.rip), (Some(3), 0x7c05));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]

mod cpu;
mod debug;
mod decode;
mod error;
mod exception;
mod flags;
#[expect(unsafe_code, reason = "guest RAM by host pointer: the one unsafe module STYLE.md §8 allows")]
mod hostmem;
mod instructions;
mod memory;
mod mmu;
mod operand;
mod vcpu;
mod wide;

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
