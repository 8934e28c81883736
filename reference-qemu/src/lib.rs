//! duet-qemu: run a duet guest under QEMU TCG as a third opinion.
//!
//! [`run()`] starts `qemu-system-x86_64 -accel tcg` on the `isapc` machine with an entry stub as
//! its only firmware ([`stub`]): the stub installs the guest's start state exactly (or the run
//! is refused with [`QemuError::Unsupported`]) and jumps to it. Guest RAM is loaded with
//! `-device loader`. Ports follow duet's conventions: debug console 0xE9 and a 16550 at 0x3F8
//! feed the console, 0x80 is the POST code, and 0xF4 is the debug exit, observed without
//! losing the state (the [`mod@run`] module says how). The result holds the same
//! [`duet_core::RunOutcome`] and a [`duet_core::GuestMemory`] as the other backends, so
//! `StateDiff` compares any two of the three.
//!
//! Registers, segments with their hidden parts, control registers and EFER come from QMP's
//! `info registers`; 64-bit GPRs in every mode, CR8 and the tracked MSRs from QEMU's gdbstub
//! afterwards ([`gdb`]-module docs; outside 64-bit mode the GPRs' upper halves and R8–R15 are
//! written at the guest's first instruction and read at its end through [`wide`]); RAM from
//! `pmemsave`.
//!
//! Known limits, all documented where they arise: FOP/FIP/FDP read 0; the debug-exit value is
//! one byte; a debug exit not followed by the convention's `cli; hlt` is read later than the
//! exit (with a note in [`QemuRun::notes`]); MSRs are not read after a triple fault; duet's MMIO
//! test device does not exist under QEMU (its address is unassigned there: reads return 0,
//! not duet's all ones); only the PICs' interrupts are masked away, so a guest that unmasks
//! them sees QEMU's timer where duet has none.
//!
//! Where QEMU 7.2 and the SDM disagree, the SDM wins and the case is written down:
//! - after LTR, QEMU caches the TSS type it read (available) while hardware holds the busy type
//!   (VMX guest-state checks, SDM Vol. 3C §28.3.1.2): duet-qemu reports TR busy;
//! - an interrupt or exception through an IST gate without a privilege change loads a null SS
//!   in QEMU; the SDM (Vol. 2A, INT n, IA-32e intra-privilege case) leaves SS unchanged. Not
//!   corrected (the SS before delivery is unknown); pinned by the `fault-long` state test.
//!
//! And where QEMU's machine differs from duet's conventions: unassigned memory reads 0 (duet:
//! all ones), so the MMIO test device's fixtures (`mmio-loop`, `irq`) cannot pass; a ROM guest
//! starts from QEMU's own RESET, whose EDX holds the CPUID signature as the SDM's Table 10-1
//! says (duet's `CpuState::reset` has 0x600).
//!
//! ```
//! use std::time::Duration;
//!
//! use duet_core::{Availability, CpuidProfile, StopReason};
//!
//! if let Availability::Available(_) = duet_qemu::availability() {
//!     let guest = duet_fixtures::find("hello").expect("in the catalogue").guest()?;
//!     let run = duet_qemu::run(&guest, &CpuidProfile::baseline(), Duration::from_secs(10))?;
//!     assert_eq!(run.outcome.stop, StopReason::Halted);
//!     assert_eq!(run.console_text(), "Hello from duet!\n");
//!     assert_eq!(run.outcome.backend, duet_qemu::BACKEND_NAME);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cpuid;
mod error;
pub mod gdb;
pub mod process;
pub mod qmp;
pub mod regs;
pub mod run;
mod session;
pub mod stub;
pub mod wide;

pub use error::QemuError;
pub use process::availability;
pub use run::{run, QemuRun};

/// Backend name used in outcomes and diffs.
pub const BACKEND_NAME: &str = "qemu";
