//! Host facts for `duet doctor`: what a user would check by hand before trusting KVM here.
//!
//! [`HostFacts::gather`] reads `/proc/cpuinfo`, `/sys/module` and `/dev/kvm` under a root
//! directory (production passes `/`, tests a fake tree) and its `Display` prints a checklist,
//! one line per check: `ok`, `no` or `note`, the fact, and what to do. It never issues a KVM
//! ioctl: the KVM backend's `availability()` does that, and the caller prints it alongside.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What `/proc/cpuinfo` says about the CPU (its first processor entry).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuInfo {
    /// `vendor_id`, e.g. `GenuineIntel` or `AuthenticAMD`.
    pub vendor: Option<String>,
    /// `model name`.
    pub model_name: Option<String>,
    /// The `vmx` flag: Intel VT-x is visible.
    pub vmx: bool,
    /// The `svm` flag: AMD-V is visible.
    pub svm: bool,
    /// The `hypervisor` flag: this host is itself a virtual machine.
    pub hypervisor: bool,
}

impl CpuInfo {
    /// Parses the text of `/proc/cpuinfo`, keeping the first value of each field.
    pub fn parse(text: &str) -> CpuInfo {
        let mut info = CpuInfo::default();
        let mut flags = None;
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            match key.trim() {
                "vendor_id" if info.vendor.is_none() => info.vendor = Some(value.to_string()),
                "model name" if info.model_name.is_none() => info.model_name = Some(value.to_string()),
                "flags" if flags.is_none() => flags = Some(value),
                _ => {}
            }
        }
        for flag in flags.unwrap_or_default().split_whitespace() {
            match flag {
                "vmx" => info.vmx = true,
                "svm" => info.svm = true,
                "hypervisor" => info.hypervisor = true,
                _ => {}
            }
        }
        info
    }

    /// The KVM vendor module this CPU wants, when its vendor is known.
    fn vendor_module(&self) -> Option<&'static str> {
        match self.vendor.as_deref() {
            Some("GenuineIntel") => Some("kvm_intel"),
            Some("AuthenticAMD" | "HygonGenuine") => Some("kvm_amd"),
            _ if self.vmx => Some("kvm_intel"),
            _ if self.svm => Some("kvm_amd"),
            _ => None,
        }
    }
}

/// Which KVM kernel modules are loaded (present under `/sys/module`, built in or not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmModules {
    /// `kvm`, the common part.
    pub kvm: bool,
    /// `kvm_intel`, VT-x.
    pub kvm_intel: bool,
    /// `kvm_amd`, AMD-V.
    pub kvm_amd: bool,
    /// `kvm_pvm`, a KVM that needs no VT-x/AMD-V and emulates guest instructions in software.
    pub kvm_pvm: bool,
}

/// Whether `/dev/kvm` exists and this user can open it read-write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevKvm {
    /// Opens read-write.
    ReadWrite,
    /// Does not exist.
    Missing,
    /// Exists, but opening it read-write is not permitted.
    PermissionDenied {
        /// Permission bits of the device, e.g. `0o600`.
        mode: u32,
        /// The device's group: its name from `/etc/group`, else its numeric id.
        group: String,
    },
    /// Exists but cannot be opened for another reason (the OS error).
    Unopenable(String),
}

/// What KVM on this host is, all facts considered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization on bare metal: KVM's results are the silicon's.
    Hardware,
    /// KVM inside a virtual machine (nested virtualization): works, slower, the outer hypervisor's results.
    Nested,
    /// `kvm_pvm`: KVM emulating guest instructions in software: slow, and wrong in places.
    Software,
    /// `/dev/kvm` cannot be used.
    Unusable,
}

/// Everything `duet doctor` found out about the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// `std::env::consts::ARCH` of this build, e.g. `x86_64`.
    pub arch: String,
    /// The parsed `/proc/cpuinfo`, or why it could not be read.
    pub cpuinfo: Result<CpuInfo, String>,
    /// Loaded KVM modules.
    pub modules: KvmModules,
    /// The state of `/dev/kvm`.
    pub dev_kvm: DevKvm,
}

/// The verdict of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// As it should be.
    Ok,
    /// Stands in the way of running on KVM.
    No,
    /// Worth knowing: works, with a caveat.
    Note,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::No => "no",
            Status::Note => "note",
        })
    }
}

/// One line of the checklist: a verdict, the fact, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub fact: String,
    /// What to do, when there is something to do.
    pub action: Option<String>,
}

impl Check {
    fn new(status: Status, fact: impl Into<String>, action: Option<String>) -> Check {
        Check { status, fact: fact.into(), action }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {}", self.status, self.fact)?;
        if let Some(action) = &self.action {
            write!(f, " — {action}")?;
        }
        Ok(())
    }
}

/// What `kvm_pvm` gets wrong, as observed running duet's fixtures on it.
const PVM_CAVEATS: &str = "about a thousand times slower than hardware, and wrong in places: \
     DAA/AAA/AAS/ARPL/BOUND fail to emulate, real-mode INT 0x80 never completes, 32-bit/PAE paging \
     in protected mode triple-faults, SYSCALL and INT n from ring 3 fail; so KVM's numbers here are \
     the emulator's, not the silicon's";

impl HostFacts {
    /// Inspects the host under `root` (`/` in production).
    pub fn gather(root: &Path) -> HostFacts {
        HostFacts::gather_with(root, &root.join("dev/kvm"))
    }

    /// Inspects the host under `root`, trying `kvm_device` as the KVM device node.
    pub fn gather_with(root: &Path, kvm_device: &Path) -> HostFacts {
        let cpuinfo = fs::read_to_string(root.join("proc/cpuinfo"))
            .map(|text| CpuInfo::parse(&text))
            .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"));
        let module = |name: &str| root.join("sys/module").join(name).is_dir();
        let modules = KvmModules {
            kvm: module("kvm"),
            kvm_intel: module("kvm_intel"),
            kvm_amd: module("kvm_amd"),
            kvm_pvm: module("kvm_pvm"),
        };
        let dev_kvm = dev_kvm(root, kvm_device);
        HostFacts { arch: std::env::consts::ARCH.to_string(), cpuinfo, modules, dev_kvm }
    }

    /// What KVM on this host is.
    pub fn kind(&self) -> KvmKind {
        let cpu = self.cpuinfo.as_ref().ok();
        if self.dev_kvm != DevKvm::ReadWrite {
            KvmKind::Unusable
        } else if self.modules.kvm_pvm && !self.modules.kvm_intel && !self.modules.kvm_amd {
            KvmKind::Software
        } else if cpu.is_none_or(|c| c.hypervisor || !(c.vmx || c.svm)) {
            KvmKind::Nested
        } else {
            KvmKind::Hardware
        }
    }

    /// The checklist, in the order a user would go through it by hand.
    pub fn checks(&self) -> Vec<Check> {
        let mut checks = vec![self.arch_check()];
        checks.extend(self.cpu_checks());
        checks.push(self.module_check());
        checks.push(self.dev_kvm_check());
        checks.push(self.verdict());
        checks
    }

    fn arch_check(&self) -> Check {
        if self.arch == "x86_64" {
            Check::new(Status::Ok, "64-bit x86 host (x86_64)", None)
        } else {
            Check::new(
                Status::No,
                format!("host is {}, not x86_64", self.arch),
                Some("the KVM backend needs an x86-64 host; the interpreter still runs guests here".into()),
            )
        }
    }

    fn cpu_checks(&self) -> Vec<Check> {
        let cpu = match &self.cpuinfo {
            Ok(cpu) => cpu,
            Err(e) => return vec![Check::new(Status::No, e.clone(), Some("is /proc mounted?".into()))],
        };
        let name = match (&cpu.model_name, &cpu.vendor) {
            (Some(m), Some(v)) => format!("{m} ({v})"),
            (Some(s), None) | (None, Some(s)) => s.clone(),
            (None, None) => "unknown CPU".into(),
        };
        let usable = self.dev_kvm == DevKvm::ReadWrite;
        let denied = matches!(self.dev_kvm, DevKvm::PermissionDenied { .. });
        let flags = match (cpu.vmx, cpu.svm) {
            (true, _) => Check::new(Status::Ok, format!("{name}: VT-x visible (cpuinfo flag vmx)"), None),
            (_, true) => Check::new(Status::Ok, format!("{name}: AMD-V visible (cpuinfo flag svm)"), None),
            _ if usable => Check::new(
                Status::Note,
                format!("{name}: cpuinfo shows neither vmx nor svm, yet /dev/kvm opens"),
                Some("this KVM is nested or emulated, not hardware virtualization (see the verdict)".into()),
            ),
            // The device is there and only its permissions stand in the way: what KVM it is
            // (kvm_pvm needs no vmx/svm) shows once it opens, so the flags prove nothing yet.
            _ if denied => Check::new(
                Status::Note,
                format!("{name}: cpuinfo shows neither vmx nor svm, but /dev/kvm exists"),
                Some(
                    "a KVM that needs neither (kvm_pvm) may be there: fix the permissions below first".into(),
                ),
            ),
            _ if cpu.hypervisor => Check::new(
                Status::No,
                format!("{name}: cpuinfo shows neither vmx nor svm"),
                Some("this host is a VM: enable nested virtualization in the outer hypervisor".into()),
            ),
            _ => Check::new(
                Status::No,
                format!("{name}: cpuinfo shows neither vmx nor svm"),
                Some("enable Intel VT-x or AMD-V (SVM) in the firmware (BIOS/UEFI) setup".into()),
            ),
        };
        let hypervisor = if cpu.hypervisor {
            Check::new(
                Status::Note,
                "running inside a virtual machine (cpuinfo flag hypervisor)",
                Some(
                    "KVM here runs inside another hypervisor: slower than bare metal, and not the silicon's word"
                        .into(),
                ),
            )
        } else {
            Check::new(Status::Ok, "bare metal (no cpuinfo flag hypervisor)", None)
        };
        vec![flags, hypervisor]
    }

    fn module_check(&self) -> Check {
        let m = self.modules;
        let want = self.cpuinfo.as_ref().ok().and_then(CpuInfo::vendor_module);
        let load = want
            .map_or("sudo modprobe kvm_intel (Intel) or sudo modprobe kvm_amd (AMD)".to_string(), |w| {
                format!("sudo modprobe {w}")
            });
        let vendor: Vec<&str> = [(m.kvm_intel, "kvm_intel"), (m.kvm_amd, "kvm_amd"), (m.kvm_pvm, "kvm_pvm")]
            .into_iter()
            .filter_map(|(loaded, name)| loaded.then_some(name))
            .collect();
        match (m.kvm, vendor.as_slice()) {
            (false, []) => Check::new(Status::No, "no KVM module loaded", Some(load)),
            (true, []) => {
                Check::new(Status::No, "kvm is loaded but no kvm_intel, kvm_amd or kvm_pvm", Some(load))
            }
            (_, names) if m.kvm_pvm && !m.kvm_intel && !m.kvm_amd => Check::new(
                Status::Note,
                format!(
                    "modules loaded: {}{} (PVM: a KVM that needs no VT-x/AMD-V)",
                    kvm_prefix(m.kvm),
                    names.join(", ")
                ),
                Some("it emulates guest instructions in software (see the verdict)".into()),
            ),
            (_, names) => Check::new(
                Status::Ok,
                format!("modules loaded: {}{}", kvm_prefix(m.kvm), names.join(", ")),
                None,
            ),
        }
    }

    fn dev_kvm_check(&self) -> Check {
        match &self.dev_kvm {
            DevKvm::ReadWrite => Check::new(Status::Ok, "/dev/kvm opens read-write", None),
            DevKvm::Missing => {
                let m = self.modules;
                let action = if m.kvm && (m.kvm_intel || m.kvm_amd || m.kvm_pvm) {
                    "the modules are loaded: in a container, pass the device (docker run --device /dev/kvm); \
                     otherwise create it: sudo mknod -m 660 /dev/kvm c 10 232 && sudo chgrp kvm /dev/kvm"
                } else {
                    "load the KVM modules first (above); the module creates /dev/kvm"
                };
                Check::new(Status::No, "/dev/kvm does not exist", Some(action.into()))
            }
            DevKvm::PermissionDenied { mode, group } => {
                let fact = format!("/dev/kvm exists but cannot be opened read-write: permission denied (mode {mode:04o}, group {group})");
                let action = if mode & 0o060 == 0o060 {
                    format!("add the user to group {group}: sudo usermod -aG {group} $USER, then log out and in again")
                } else {
                    "give the device to group kvm (sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm; \
                     the udev rule KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\" makes it last), then add the \
                     user to group kvm: sudo usermod -aG kvm $USER, and log out and in again"
                        .to_string()
                };
                Check::new(Status::No, fact, Some(action))
            }
            DevKvm::Unopenable(e) => Check::new(
                Status::No,
                format!("/dev/kvm cannot be opened: {e}"),
                Some("check that it is the KVM character device (c 10 232)".into()),
            ),
        }
    }

    fn verdict(&self) -> Check {
        match self.kind() {
            KvmKind::Hardware => {
                Check::new(Status::Ok, "KVM is hardware virtualization on bare metal: it decides", None)
            }
            KvmKind::Nested => Check::new(
                Status::Note,
                "KVM is nested virtualization",
                Some(
                    "it runs, slower than bare metal; where it disagrees with the interpreter, ask QEMU too"
                        .into(),
                ),
            ),
            KvmKind::Software => Check::new(
                Status::Note,
                format!("KVM is kvm_pvm, emulating guest instructions in software: {PVM_CAVEATS}"),
                Some("trust the QEMU reference or bare-metal KVM over it where they disagree".into()),
            ),
            KvmKind::Unusable => Check::new(
                Status::No,
                "KVM cannot be used here",
                Some(
                    "fix the lines above; meanwhile the interpreter runs alone (DUET_BACKENDS=interp)".into(),
                ),
            ),
        }
    }
}

/// `"kvm, "` when the common module is loaded, else nothing.
fn kvm_prefix(kvm: bool) -> &'static str {
    if kvm {
        "kvm, "
    } else {
        ""
    }
}

/// Tries to open the KVM device read-write, the way the KVM backend will; its group's name
/// comes from `root/etc/group`.
fn dev_kvm(root: &Path, path: &Path) -> DevKvm {
    let opened = OpenOptions::new().read(true).write(true).open(path).map(drop);
    let meta = fs::metadata(path).ok();
    let group = meta.as_ref().map(|m| group_name(root, m.gid()));
    classify(opened, meta.map(|m| m.mode() & 0o7777), group)
}

/// Turns the result of opening `/dev/kvm` into a [`DevKvm`], given its mode and group when known.
fn classify(opened: io::Result<()>, mode: Option<u32>, group: Option<String>) -> DevKvm {
    match opened {
        Ok(()) => DevKvm::ReadWrite,
        Err(e) if e.kind() == io::ErrorKind::NotFound => DevKvm::Missing,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => DevKvm::PermissionDenied {
            mode: mode.unwrap_or(0),
            group: group.unwrap_or_else(|| "unknown".into()),
        },
        Err(e) => DevKvm::Unopenable(e.to_string()),
    }
}

/// The name of group `gid` from `root/etc/group`, else the number.
fn group_name(root: &Path, gid: u32) -> String {
    let groups = fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?;
            (id.parse() == Ok(gid)).then(|| name.to_string())
        })
        .unwrap_or_else(|| gid.to_string())
}

impl fmt::Display for HostFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in self.checks() {
            writeln!(f, "{check}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
