//! duet: run the same x86 guest on the host CPU through KVM and on a software CPU, and compare.
//!
//! Guest memory, device models, fixtures and the run loop are one piece of code shared by both
//! backends, so when two runs end in different states the difference is in a CPU.
//!
//! A test that runs a guest of your own on every available backend and compares them:
//!
//! ```no_run
//! use duet::fixtures::{GuestBuilder, Mode};
//! use duet::{compare, run_guest, testing, RunConfig, StopReason};
//! use iced_x86::code_asm::*;
//!
//! let guest = GuestBuilder::new(Mode::Long)
//!     .code(|a| {
//!         a.mov(rax, 6u64)?;
//!         a.imul_3(rax, rax, 7)?;
//!         a.mov(dx, 0xf4)?;
//!         a.out(dx, al)?; // debug exit with the value 42
//!         Ok(())
//!     })
//!     .build()
//!     .unwrap();
//! let mut reports = Vec::new();
//! for kind in testing::select_backends() {
//!     let report = run_guest(&*kind.create(), &guest, &RunConfig::default()).unwrap();
//!     assert_eq!(report.outcome.stop, StopReason::DebugExit { value: 42 });
//!     reports.push(report);
//! }
//! if let [kvm, interp] = &reports[..] {
//!     let diff = compare(kvm, interp);
//!     assert!(diff.is_empty(), "{diff}");
//! }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backends;
pub mod doctor;
pub mod fuzz;
pub mod host;
pub mod opinions;
pub mod recording;
pub mod run;
pub mod testing;

pub use backends::{auto, fastest, shared_cpuid_profile, BackendKind};
pub use duet_core::{
    Availability, Backend, CpuState, CpuidProfile, Guest, Machine, RunOutcome, StateDiff, StopReason, Vcpu,
    VcpuExit,
};
pub use host::{Host, KvmKind};
pub use run::{compare, run_guest, run_qemu, RunConfig, RunError, RunReport};

pub use duet_core as core;
pub use duet_devices as devices;
pub use duet_fixtures as fixtures;
pub use duet_interp as interp;
pub use duet_kvm as kvm;
pub use duet_qemu as qemu;
