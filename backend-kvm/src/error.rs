//! [`KvmError`]: what can go wrong opening KVM, creating a VM or running a vCPU.

use std::path::PathBuf;

use duet_core::VcpuError;

/// An error of the KVM backend; every message names the path, ioctl or value involved.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// This host is not x86-64: its KVM (if any) runs guests of its own architecture only.
    #[error(
        "duet's KVM backend runs x86 guests and needs an x86-64 host (this host is {arch}); \
         `--backend interp` works without KVM"
    )]
    OtherArch {
        /// The host's architecture (`std::env::consts::ARCH`).
        arch: &'static str,
    },
    /// The KVM device could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Device path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The device path contains a NUL byte and cannot be passed to open(2).
    #[error("KVM device path {path:?} contains a NUL byte")]
    BadPath {
        /// Device path.
        path: PathBuf,
    },
    /// The kernel speaks another KVM API version than the stable one (12).
    #[error("{path} speaks KVM API version {got}, expected {expected}")]
    ApiVersion {
        /// Device path.
        path: PathBuf,
        /// Version the kernel reported.
        got: i32,
        /// Version duet needs.
        expected: i32,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// Name of the ioctl, e.g. "KVM_SET_SREGS".
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A guest memory region cannot become a KVM memory slot.
    #[error("guest memory region {base:#x}+{size:#x} cannot be mapped: {why}")]
    Region {
        /// Guest physical base.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// Why not.
        why: String,
    },
    /// The CPUID profile cannot be converted into a KVM CPUID table.
    #[error("CPUID profile of {entries} entries does not fit KVM's table of at most {max}")]
    CpuidTooLarge {
        /// Entries in the profile.
        entries: usize,
        /// KVM's maximum.
        max: usize,
    },
    /// KVM refused an MSR value when loading a state.
    #[error("KVM_SET_MSRS refused MSR {index:#x} = {value:#x}")]
    MsrRefused {
        /// MSR index.
        index: u32,
        /// Value that was refused.
        value: u64,
    },
    /// More MSRs than a KVM MSR table holds.
    #[error("{count} MSRs do not fit one KVM MSR table")]
    TooManyMsrs {
        /// How many were asked for.
        count: usize,
    },
    /// The deadline signal or timer could not be set up.
    #[error("deadline timer: {what} failed: {source}")]
    Timer {
        /// The call that failed (e.g. "timer_create").
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// KVM_RUN returned an exit the backend does not expect from a guest without in-kernel devices.
    #[error("unexpected KVM exit {0}")]
    UnexpectedExit(String),
    /// The kvm_run page describes an I/O exit whose data lies outside the page.
    #[error("kvm_run I/O exit data at offset {offset:#x} of {len} bytes lies outside the {mmap_size}-byte mapping")]
    BadIoData {
        /// data_offset from kvm_run.
        offset: u64,
        /// size × count.
        len: usize,
        /// Size of the kvm_run mapping.
        mmap_size: usize,
    },
}

#[cfg(target_arch = "x86_64")]
impl KvmError {
    /// Wraps an errno from kvm-ioctls with the name of the ioctl that failed.
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> KvmError {
        move |e| KvmError::Ioctl { op, source: std::io::Error::from_raw_os_error(e.errno()) }
    }
}

impl From<KvmError> for VcpuError {
    fn from(e: KvmError) -> Self {
        match e {
            KvmError::Ioctl { op, source } => VcpuError::Hypervisor { op, source },
            KvmError::OtherArch { .. }
            | KvmError::Open { .. }
            | KvmError::BadPath { .. }
            | KvmError::ApiVersion { .. } => VcpuError::Unavailable(e.to_string()),
            KvmError::MsrRefused { .. } => VcpuError::InvalidState(e.to_string()),
            other => VcpuError::Other(other.to_string()),
        }
    }
}
