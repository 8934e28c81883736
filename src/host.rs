//! Which host this is: the CPU vendor and the kind of KVM, so a recorded hardware result can
//! say where it was recorded and a replay can tell whether this host may be compared with it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use duet_core::Vendor;

/// The kind of KVM a host offers, by the kernel module that provides `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KvmKind {
    /// `kvm_pvm`: nested, emulates much of the guest in the kernel, wrong in places (DEVELOPERS.md).
    Pvm,
    /// `kvm_intel`: VMX, the silicon runs the guest.
    Vmx,
    /// `kvm_amd`: SVM, the silicon runs the guest.
    Svm,
    /// No KVM module is loaded (or this is not Linux).
    None,
}

impl KvmKind {
    /// The kernel module's name (`kvm_pvm`, `kvm_intel`, `kvm_amd`), or `none`.
    pub fn name(self) -> &'static str {
        match self {
            KvmKind::Pvm => "kvm_pvm",
            KvmKind::Vmx => "kvm_intel",
            KvmKind::Svm => "kvm_amd",
            KvmKind::None => "none",
        }
    }

    /// Whether the silicon decides (VMX or SVM); `kvm_pvm` results need the limit lists.
    pub fn is_hardware(self) -> bool {
        matches!(self, KvmKind::Vmx | KvmKind::Svm)
    }

    /// The kind of KVM this host offers, from the loaded modules (`/sys/module`); `None` on a
    /// host that is not x86-64, whose KVM runs no x86 guest.
    pub fn detect() -> KvmKind {
        // Under qemu-user, /sys is the emulating host's: it must not speak for an aarch64 process.
        if cfg!(not(target_arch = "x86_64")) {
            return KvmKind::None;
        }
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            KvmKind::Pvm
        } else if loaded("kvm_intel") {
            KvmKind::Vmx
        } else if loaded("kvm_amd") {
            KvmKind::Svm
        } else {
            KvmKind::None
        }
    }
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [KvmKind::Pvm, KvmKind::Vmx, KvmKind::Svm, KvmKind::None]
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown KVM kind `{s}` (expected kvm_pvm, kvm_intel, kvm_amd or none)"))
    }
}

/// A host as far as recorded results care: the CPU vendor and the KVM that ran the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Host {
    /// The host CPU's vendor (`Other` on a non-x86 host).
    pub vendor: Vendor,
    /// The KVM module providing `/dev/kvm`.
    pub kvm: KvmKind,
}

impl Host {
    /// This host, detected once per process.
    pub fn this() -> Host {
        static HOST: std::sync::OnceLock<Host> = std::sync::OnceLock::new();
        *HOST.get_or_init(|| Host { vendor: host_vendor(), kvm: KvmKind::detect() })
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vendor = match self.vendor {
            Vendor::Intel | Vendor::Amd => self.vendor.id(),
            Vendor::Other => "a CPU of another vendor",
        };
        write!(f, "{vendor} with {}", self.kvm)
    }
}

/// The host CPU's vendor, from `/proc/cpuinfo` (`vendor_id`); `Other` where there is none
/// (an ARM host) or the file cannot be read.
fn host_vendor() -> Vendor {
    // Under qemu-user, /proc/cpuinfo is the emulating x86 host's: not this process's CPU.
    if cfg!(not(target_arch = "x86_64")) {
        return Vendor::Other;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| vendor_of_cpuinfo(&text))
        .unwrap_or(Vendor::Other)
}

/// The vendor named by the first `vendor_id` line of a `/proc/cpuinfo` text.
fn vendor_of_cpuinfo(text: &str) -> Option<Vendor> {
    text.lines()
        .find_map(|l| l.strip_prefix("vendor_id").and_then(|rest| rest.split(':').nth(1)))
        .map(|id| Vendor::from_id(id.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_vendor_is_read_from_the_vendor_id_line() {
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n";
        assert_eq!(vendor_of_cpuinfo(intel), Some(Vendor::Intel));
        assert_eq!(vendor_of_cpuinfo("vendor_id\t: AuthenticAMD\n"), Some(Vendor::Amd));
        // An aarch64 cpuinfo has no vendor_id line.
        assert_eq!(vendor_of_cpuinfo("processor\t: 0\nCPU implementer\t: 0x41\n"), None);
    }

    /// A process built for another architecture has no x86 vendor and no KVM for x86 guests,
    /// even under qemu-user on an x86 host, where /proc/cpuinfo and /sys/module are the host's.
    #[cfg(not(target_arch = "x86_64"))]
    #[test]
    fn a_host_that_is_not_x86_64_has_no_x86_vendor_and_no_kvm_for_x86_guests() {
        assert_eq!(Host::this(), Host { vendor: Vendor::Other, kvm: KvmKind::None });
    }

    #[test]
    fn a_host_of_another_vendor_does_not_print_as_intel() {
        let arm = Host { vendor: Vendor::Other, kvm: KvmKind::None };
        assert_eq!(arm.to_string(), "a CPU of another vendor with none");
        let amd = Host { vendor: Vendor::Amd, kvm: KvmKind::Pvm };
        assert_eq!(amd.to_string(), "AuthenticAMD with kvm_pvm");
    }

    #[test]
    fn kvm_kinds_round_trip_by_module_name() {
        for k in [KvmKind::Pvm, KvmKind::Vmx, KvmKind::Svm, KvmKind::None] {
            assert_eq!(k.name().parse::<KvmKind>(), Ok(k));
        }
        assert!("kvm_arm".parse::<KvmKind>().is_err());
        assert!(KvmKind::Vmx.is_hardware() && !KvmKind::Pvm.is_hardware());
    }
}
