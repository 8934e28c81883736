//! duet-kvm: duet's hardware backend, running guests on the host CPU through KVM.
//!
//! [`KvmBackend`] opens `/dev/kvm` (or another path), explains why it cannot when it cannot,
//! and creates a VM with one vCPU over duet's shared guest memory. [`KvmVcpu`] implements
//! `duet_core::Vcpu`: registers convert to and from kvm-bindings in [`convert`], exits are
//! lent from the kvm_run page, a deadline kicks the thread out of KVM_RUN with a signal, and
//! an instruction KVM cannot complete becomes `VcpuExit::CannotRun` naming it. There is no
//! in-kernel irqchip: devices are userspace and shared with the interpreter.
//!
//! All `unsafe` code is in the private `sys` module.
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
pub mod convert;
mod error;
mod insn;
mod sys;
pub mod testing;
mod vcpu;

pub use backend::{KvmBackend, DEFAULT_KVM_PATH, IDENTITY_MAP_ADDR, TSS_ADDR};
pub use error::KvmError;
pub use vcpu::{KvmVcpu, PROGRESS_PROBE};
