//! [`QemuError`]: everything that can go wrong preparing, running or reading a QEMU run.

/// An error of a QEMU reference run (not a guest event: those are `StopReason`s).
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// `qemu-system-x86_64` is not installed or cannot be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program that was started.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest's start state cannot be reproduced exactly by the entry stub.
    #[error("unsupported start state for QEMU: {0}")]
    Unsupported(String),
    /// The guest's memory or loads are not usable.
    #[error(transparent)]
    Guest(#[from] duet_core::GuestError),
    /// The CPUID profile has a bit QEMU's `-cpu` options cannot express.
    #[error("CPUID profile cannot be mapped onto QEMU's -cpu: {0}")]
    Cpuid(String),
    /// Assembling the entry stub failed (a bug in duet-qemu).
    #[error("assembling the entry stub failed: {0}")]
    Asm(String),
    /// A temporary file or socket could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU's monitor (QMP) answered something unexpected or reported an error.
    #[error("QMP {command}: {message}")]
    Qmp {
        /// The command sent.
        command: String,
        /// What went wrong.
        message: String,
    },
    /// QEMU's `info registers` output could not be parsed.
    #[error("cannot parse QEMU's register dump ({what}): {line:?}")]
    Registers {
        /// What was missing or malformed.
        what: String,
        /// The line (or excerpt) in question.
        line: String,
    },
    /// QEMU exited on its own before the run ended.
    #[error("QEMU exited unexpectedly ({status}); stderr: {stderr}")]
    Exited {
        /// Exit status as text.
        status: String,
        /// What QEMU printed on stderr.
        stderr: String,
    },
    /// QEMU did not come up (monitor socket) within the time allowed.
    #[error("QEMU did not open its monitor socket within {ms} ms; stderr: {stderr}")]
    Startup {
        /// Milliseconds waited.
        ms: u128,
        /// What QEMU printed on stderr.
        stderr: String,
    },
}

impl From<iced_x86::IcedError> for QemuError {
    fn from(e: iced_x86::IcedError) -> Self {
        QemuError::Asm(e.to_string())
    }
}
