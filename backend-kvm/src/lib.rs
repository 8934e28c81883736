//! duet-kvm: duet's hardware backend, running guests on the host CPU through KVM.
//!
//! [`KvmBackend`] opens `/dev/kvm` (or another path), explains why it cannot when it cannot,
//! and creates a VM with one vCPU over duet's shared guest memory. [`KvmVcpu`] implements
//! `duet_core::Vcpu`: registers convert to and from kvm-bindings in `convert` (x86-64 only),
//! exits are lent from the kvm_run page, a deadline kicks the thread out of KVM_RUN with a
//! signal, and an instruction KVM cannot complete becomes `VcpuExit::CannotRun` naming it.
//! There is no in-kernel irqchip: devices are userspace and shared with the interpreter.
//!
//! All `unsafe` code is in the private `sys` module.
//!
//! KVM runs guests of the host's own architecture, so only an x86-64 host's KVM can run
//! duet's x86 guests. On any other host (aarch64 CI runners, Linux on Apple silicon) the crate
//! still offers the same [`KvmBackend`] and [`KvmVcpu`], so the facade and the tests need no
//! `cfg`: the backend reports itself unavailable with that reason, tests skip out loud through
//! [`testing::kvm_or_skip`], and kvm-ioctls/kvm-bindings are not even built there.
//!
//! ```
//! use duet_core::{Backend, CpuidProfile, Guest, Segment, Vcpu, VcpuExit};
//!
//! // Skips (printing why) when KVM is unusable, fails instead under DUET_REQUIRE_KVM=1.
//! let Some(kvm) = duet_kvm::testing::kvm_or_skip() else { return Ok(()) };
//! let mut guest = Guest::new("hello", 0x10000);
//! // mov al,'A'; out 0xe9,al; hlt — at 0000:7C00 in real mode.
//! guest.load(0x7c00, vec![0xb0, b'A', 0xe6, 0xe9, 0xf4]);
//! guest.state.sregs.cs = Segment::real_mode(0, true);
//! guest.state.regs.rip = 0x7c00;
//! let profile = kvm.cpuid_profile(&CpuidProfile::baseline())?;
//! let mut vcpu = kvm.create_vcpu(guest.build_memory()?, &profile)?;
//! vcpu.set_state(&guest.state)?;
//! match vcpu.run()? {
//!     VcpuExit::IoOut { port: 0xe9, data, .. } => assert_eq!(data, b"A"),
//!     other => panic!("unexpected exit {other:?}"),
//! }
//! assert!(matches!(vcpu.run()?, VcpuExit::Hlt));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(target_arch = "x86_64")]
mod backend;
#[cfg(target_arch = "x86_64")]
pub mod convert;
mod error;
#[cfg(target_arch = "x86_64")]
mod insn;
#[cfg(not(target_arch = "x86_64"))]
mod other_arch;
#[cfg(target_arch = "x86_64")]
mod sys;
pub mod testing;
#[cfg(target_arch = "x86_64")]
mod vcpu;

#[cfg(target_arch = "x86_64")]
pub use backend::KvmBackend;
pub use error::KvmError;
#[cfg(not(target_arch = "x86_64"))]
pub use other_arch::{KvmBackend, KvmVcpu};
#[cfg(target_arch = "x86_64")]
pub use vcpu::{KvmVcpu, PROGRESS_PROBE};

/// The device KVM is normally reached through.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";
/// Guest physical address of the three pages KVM_SET_TSS_ADDR reserves (Intel real mode needs
/// them); the same place QEMU uses, inside the PC's 32-bit MMIO hole, away from RAM and firmware.
pub const TSS_ADDR: u64 = 0xfeff_d000;
/// Guest physical address of the identity-map page table KVM_SET_IDENTITY_MAP_ADDR reserves.
pub const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
