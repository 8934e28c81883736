//! The crate's error type.

use duet_core::VcpuError;

/// An error of the software CPU itself (never a guest event: those are exceptions or exits).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InterpError {
    /// The state handed to `set_state`/`set_sregs` cannot be run (e.g. an MMIO exit was pending).
    #[error("invalid vCPU state: {0}")]
    InvalidState(String),
    /// An interrupt was injected while the vCPU could not take one.
    #[error("interrupt {vector:#x} injected while another ({pending:#x}) is still pending")]
    InterruptPending {
        /// The vector injected.
        vector: u8,
        /// The vector already queued.
        pending: u8,
    },
}

impl From<InterpError> for VcpuError {
    fn from(e: InterpError) -> Self {
        match e {
            InterpError::InvalidState(s) => VcpuError::InvalidState(s),
            other => VcpuError::Other(other.to_string()),
        }
    }
}
