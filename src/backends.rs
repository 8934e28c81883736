//! Choosing a backend: by name, or the best one this host offers.

use std::fmt;
use std::str::FromStr;

use std::sync::OnceLock;

use duet_core::{Availability, Backend, CpuidProfile};
use duet_interp::InterpBackend;
use duet_kvm::KvmBackend;

/// A backend by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The host CPU through KVM.
    Kvm,
    /// duet's software CPU.
    Interp,
}

impl BackendKind {
    /// Every backend, hardware first.
    pub const ALL: [BackendKind; 2] = [BackendKind::Kvm, BackendKind::Interp];

    /// The short name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Interp => "interp",
        }
    }

    /// A new instance of this backend.
    pub fn create(self) -> Box<dyn Backend> {
        match self {
            BackendKind::Kvm => Box::new(KvmBackend::new()),
            BackendKind::Interp => Box::new(InterpBackend::new()),
        }
    }

    /// Whether this backend can run here, and why not.
    pub fn availability(self) -> Availability {
        self.create().availability()
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(BackendKind::Kvm),
            "interp" => Ok(BackendKind::Interp),
            other => Err(format!("unknown backend `{other}` (expected kvm or interp)")),
        }
    }
}

/// The CPUID profile every backend applies in this process, so both CPUs present one machine.
///
/// duet's baseline (only what the software CPU implements), restricted to what this host's
/// KVM supports when KVM is usable; the host's vendor string is kept because the silicon's
/// vendor-specific behaviour (e.g. SYSCALL in compatibility mode) follows it.
pub fn shared_cpuid_profile() -> CpuidProfile {
    static PROFILE: OnceLock<CpuidProfile> = OnceLock::new();
    PROFILE
        .get_or_init(|| {
            let kvm = KvmBackend::new();
            match kvm.host_cpuid() {
                Ok(host) => CpuidProfile::baseline().restricted_to(&host),
                Err(_) => CpuidProfile::baseline(),
            }
        })
        .clone()
}

/// The backend `auto` picks, with the reason in words.
///
/// KVM when it is usable (the hardware is the reference), else the software CPU.
pub fn auto() -> (BackendKind, String) {
    match BackendKind::Kvm.availability() {
        Availability::Available(what) => (BackendKind::Kvm, format!("KVM is usable ({what})")),
        Availability::Unavailable(why) => {
            (BackendKind::Interp, format!("KVM is not usable ({why}); the software CPU runs everything"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse_back() {
        for k in BackendKind::ALL {
            assert_eq!(k.name().parse::<BackendKind>(), Ok(k));
        }
        assert!("qemu".parse::<BackendKind>().unwrap_err().contains("qemu"));
    }

    #[test]
    fn interp_is_always_available_and_auto_explains_itself() {
        assert!(BackendKind::Interp.availability().is_available());
        let (kind, why) = auto();
        assert!(!why.is_empty());
        assert_eq!(kind == BackendKind::Kvm, BackendKind::Kvm.availability().is_available());
    }
}
