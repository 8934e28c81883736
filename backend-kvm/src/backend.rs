//! [`KvmBackend`]: opens the KVM device, says why it cannot, and creates VMs with one vCPU.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use duet_core::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use duet_core::{Availability, Backend, CpuState, CpuidProfile, GuestMemory, Vcpu, VcpuError};
use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::convert;
use crate::error::KvmError;
use crate::sys;
use crate::vcpu::KvmVcpu;
use crate::{DEFAULT_KVM_PATH, IDENTITY_MAP_ADDR, TSS_ADDR};

/// The duet backend that runs guests on the host CPU through KVM.
#[derive(Clone, Debug)]
pub struct KvmBackend {
    path: PathBuf,
}

impl Default for KvmBackend {
    fn default() -> Self {
        KvmBackend::new()
    }
}

impl KvmBackend {
    /// A backend over `/dev/kvm`.
    pub fn new() -> Self {
        KvmBackend::with_path(DEFAULT_KVM_PATH)
    }

    /// A backend over another KVM device node (tests use a path that does not exist).
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        KvmBackend { path: path.into() }
    }

    /// The device path this backend opens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the device and checks the API version (SDM-independent: KVM's stable API is 12).
    pub fn open(&self) -> Result<Kvm, KvmError> {
        let c = CString::new(self.path.as_os_str().as_bytes())
            .map_err(|_| KvmError::BadPath { path: self.path.clone() })?;
        let kvm = Kvm::new_with_path(&c).map_err(|e| KvmError::Open {
            path: self.path.clone(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let got = kvm.get_api_version();
        if got < 0 {
            return Err(KvmError::Ioctl {
                op: "KVM_GET_API_VERSION",
                source: std::io::Error::last_os_error(),
            });
        }
        let expected = KVM_API_VERSION as i32;
        if got != expected {
            return Err(KvmError::ApiVersion { path: self.path.clone(), got, expected });
        }
        Ok(kvm)
    }

    /// What KVM supports on this host, as a CPUID profile (KVM_GET_SUPPORTED_CPUID).
    pub fn host_cpuid(&self) -> Result<CpuidProfile, KvmError> {
        let kvm = self.open()?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(convert::cpuid_from_kvm(cpuid.as_slice()))
    }

    /// Why KVM cannot be used, in words a user can act on.
    fn explain(&self, e: &KvmError) -> String {
        let path = self.path.display();
        match e {
            KvmError::Open { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "{path} does not exist: the kvm module is not loaded (modprobe kvm_intel or kvm_amd) \
                     or this host has no hardware virtualisation (vmx/svm); `--backend interp` works without KVM"
                ),
                std::io::ErrorKind::PermissionDenied => format!(
                    "permission denied opening {path}: add your user to the `kvm` group (and log in again) \
                     or run as root; `--backend interp` works without KVM"
                ),
                _ => format!("cannot open {path}: {source}"),
            },
            other => other.to_string(),
        }
    }

    /// Creates the VM and its vCPU 0 over `memory`, applies `cpuid` and loads the RESET state.
    pub fn create(&self, memory: Arc<GuestMemory>, cpuid: &CpuidProfile) -> Result<KvmVcpu, KvmError> {
        let kvm = self.open()?;
        for r in memory.iter() {
            let (base, size) = (r.start_addr().0, r.len());
            let reserved = IDENTITY_MAP_ADDR..TSS_ADDR + 3 * 4096;
            if base < reserved.end && reserved.start < base.saturating_add(size) {
                return Err(KvmError::Region {
                    base,
                    size,
                    why: format!(
                        "it overlaps KVM's reserved pages {:#x}..{:#x}",
                        reserved.start, reserved.end
                    ),
                });
            }
        }
        // No in-kernel irqchip: interrupt controllers are userspace devices shared with the
        // interpreter, and interrupts are injected with KVM_INTERRUPT.
        let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR as usize).map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            vm.set_identity_map_address(IDENTITY_MAP_ADDR)
                .map_err(KvmError::ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        let mmap_size = kvm.get_vcpu_mmap_size().map_err(KvmError::ioctl("KVM_GET_VCPU_MMAP_SIZE"))?;
        let entries = convert::cpuid_to_kvm(cpuid);
        let table = CpuId::from_entries(&entries)
            .map_err(|_| KvmError::CpuidTooLarge { entries: entries.len(), max: KVM_MAX_CPUID_ENTRIES })?;
        vcpu.set_cpuid2(&table).map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
        // KVM_CAP_XSAVE2 gives the kvm_xsave size KVM needs (0 when the cap is absent: 4096).
        let xsave = kvm.check_extension(Cap::Xsave) && kvm.check_extension_int(Cap::Xsave2) <= 4096;
        let vm = sys::Vm::new(vm, vcpu, memory, mmap_size, kvm.get_nr_memslots(), xsave)?;
        let mut vcpu = KvmVcpu::new(vm, kvm.check_extension(Cap::ImmediateExit));
        vcpu.load_state(&CpuState::reset())?;
        Ok(vcpu)
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn availability(&self) -> Availability {
        let probe = || -> Result<(), KvmError> {
            let kvm = self.open()?;
            // A VM must be creatable too: another hypervisor may hold VT-x/AMD-V.
            kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
            Ok(())
        };
        match probe() {
            Ok(()) => {
                Availability::Available(format!("KVM API {KVM_API_VERSION} on {}", self.path.display()))
            }
            Err(e) => Availability::Unavailable(self.explain(&e)),
        }
    }

    fn cpuid_profile(&self, wanted: &CpuidProfile) -> Result<CpuidProfile, VcpuError> {
        Ok(wanted.restricted_to(&self.host_cpuid()?))
    }

    fn create_vcpu(
        &self,
        memory: Arc<GuestMemory>,
        cpuid: &CpuidProfile,
    ) -> Result<Box<dyn Vcpu>, VcpuError> {
        Ok(Box::new(self.create(memory, cpuid)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_explained_with_its_path() {
        let b = KvmBackend::with_path("/nonexistent/duet-kvm-test");
        match b.availability() {
            Availability::Unavailable(why) => {
                assert!(why.contains("/nonexistent/duet-kvm-test"), "{why}");
                assert!(why.contains("--backend interp"), "{why}");
            }
            a => panic!("expected Unavailable, got {a:?}"),
        }
    }

    #[test]
    fn permission_and_version_problems_say_what_to_do() {
        let b = KvmBackend::with_path("/dev/kvm");
        let denied = KvmError::Open {
            path: "/dev/kvm".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let why = b.explain(&denied);
        assert!(why.contains("permission denied opening /dev/kvm"), "{why}");
        assert!(why.contains("`kvm` group") && why.contains("root"), "{why}");
        let old = KvmError::ApiVersion { path: "/dev/kvm".into(), got: 11, expected: 12 };
        assert_eq!(b.explain(&old), "/dev/kvm speaks KVM API version 11, expected 12");
        let failed =
            KvmError::Ioctl { op: "KVM_CREATE_VM", source: std::io::Error::from_raw_os_error(libc::EBUSY) };
        assert!(b.explain(&failed).starts_with("KVM_CREATE_VM failed: "), "{}", b.explain(&failed));
    }

    #[test]
    fn path_with_nul_is_refused_not_truncated() {
        let b = KvmBackend::with_path("/dev/kvm\0junk");
        assert!(matches!(b.open(), Err(KvmError::BadPath { .. })));
        assert!(!b.availability().is_available());
    }

    #[test]
    fn non_kvm_device_is_reported_as_an_ioctl_or_version_failure() {
        // /dev/null opens fine but answers KVM_GET_API_VERSION with ENOTTY.
        let b = KvmBackend::with_path("/dev/null");
        match b.availability() {
            Availability::Unavailable(why) => assert!(why.contains("KVM_GET_API_VERSION"), "{why}"),
            a => panic!("expected Unavailable, got {a:?}"),
        }
    }
}
