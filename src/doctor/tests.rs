//! Tests of the host checks against fake /proc, /sys and /dev trees.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// A fake root directory under the system temp dir, removed when dropped.
struct FakeRoot(PathBuf);

impl FakeRoot {
    fn new(name: &str) -> FakeRoot {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("duet-doctor-{}-{name}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        FakeRoot(dir)
    }

    fn file(&self, rel: &str, text: &str) -> &Self {
        let path = self.0.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
        self
    }

    fn modules(&self, names: &[&str]) -> &Self {
        for name in names {
            fs::create_dir_all(self.0.join("sys/module").join(name).join("parameters")).unwrap();
        }
        self
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn cpuinfo(vendor: &str, model: &str, flags: &str) -> String {
    // Two processors, as the kernel prints them; only the first counts.
    let entry = |n: u32| {
        format!("processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: {flags}\n\n")
    };
    entry(0) + &entry(1)
}

fn lines_with(facts: &HostFacts, status: Status) -> Vec<String> {
    facts.checks().into_iter().filter(|c| c.status == status).map(|c| c.to_string()).collect()
}

#[test]
fn doctor_bare_metal_intel_with_kvm_intel_is_all_ok() {
    let root = FakeRoot::new("intel");
    root.file("proc/cpuinfo", &cpuinfo("GenuineIntel", "Intel(R) Core(TM) i7-8700", "fpu vme vmx sse2 lm"))
        .modules(&["kvm", "kvm_intel"])
        .file("dev/kvm", "");
    let mut facts = HostFacts::gather(&root.0);
    // The fake tree describes an x86-64 machine; gather takes the architecture from the build.
    facts.arch = "x86_64".into();
    assert_eq!(
        facts.cpuinfo,
        Ok(CpuInfo {
            vendor: Some("GenuineIntel".into()),
            model_name: Some("Intel(R) Core(TM) i7-8700".into()),
            vmx: true,
            svm: false,
            hypervisor: false,
        })
    );
    assert_eq!(facts.modules, KvmModules { kvm: true, kvm_intel: true, kvm_amd: false, kvm_pvm: false });
    assert_eq!(facts.dev_kvm, DevKvm::ReadWrite);
    assert_eq!(facts.kind(), KvmKind::Hardware);
    let text = facts.to_string();
    assert!(text.contains("ok    Intel(R) Core(TM) i7-8700 (GenuineIntel): VT-x visible"), "{text}");
    assert!(text.contains("ok    modules loaded: kvm, kvm_intel\n"), "{text}");
    assert!(text.contains("ok    /dev/kvm opens read-write\n"), "{text}");
    assert!(text.contains("ok    KVM is hardware virtualization on bare metal"), "{text}");
    assert_eq!(lines_with(&facts, Status::No), Vec::<String>::new());
    assert_eq!(lines_with(&facts, Status::Note), Vec::<String>::new());
}

#[test]
fn doctor_host_without_vmx_or_dev_kvm_says_what_to_enable_and_load() {
    let root = FakeRoot::new("novmx");
    root.file("proc/cpuinfo", &cpuinfo("GenuineIntel", "Intel(R) Pentium(R)", "fpu vme sse2 lm"));
    let facts = HostFacts::gather(&root.0);
    assert_eq!(facts.modules, KvmModules::default());
    assert_eq!(facts.dev_kvm, DevKvm::Missing);
    assert_eq!(facts.kind(), KvmKind::Unusable);
    let no = lines_with(&facts, Status::No);
    assert!(
        no.iter().any(|l| l.contains("neither vmx nor svm") && l.contains("firmware (BIOS/UEFI)")),
        "{no:?}"
    );
    assert!(no.iter().any(|l| l.contains("no KVM module loaded — sudo modprobe kvm_intel")), "{no:?}");
    assert!(
        no.iter().any(|l| l.starts_with("no    /dev/kvm does not exist — load the KVM modules")),
        "{no:?}"
    );
    assert!(no.iter().any(|l| l.contains("DUET_BACKENDS=interp")), "{no:?}");
}

#[test]
fn doctor_nested_pvm_host_without_flags_reports_software_kvm() {
    let root = FakeRoot::new("pvm");
    root.file("proc/cpuinfo", &cpuinfo("AuthenticAMD", "AMD EPYC", "fpu sse2 lm hypervisor"))
        .modules(&["kvm", "kvm_pvm"])
        .file("dev/kvm", "");
    let mut facts = HostFacts::gather(&root.0);
    facts.arch = "x86_64".into(); // as above: the fake tree is an x86-64 machine
    assert!(facts.cpuinfo.as_ref().is_ok_and(|c| c.hypervisor && !c.vmx && !c.svm));
    assert_eq!(facts.modules, KvmModules { kvm: true, kvm_intel: false, kvm_amd: false, kvm_pvm: true });
    assert_eq!(facts.kind(), KvmKind::Software);
    let notes = lines_with(&facts, Status::Note).join("\n");
    assert!(notes.contains("AMD EPYC (AuthenticAMD): cpuinfo shows neither vmx nor svm, yet /dev/kvm opens"));
    assert!(notes.contains("running inside a virtual machine"), "{notes}");
    assert!(notes.contains("modules loaded: kvm, kvm_pvm (PVM"), "{notes}");
    assert!(notes.contains("about a thousand times slower"), "{notes}");
    assert!(notes.contains("DAA/AAA/AAS/ARPL/BOUND") && notes.contains("INT 0x80"), "{notes}");
    assert_eq!(lines_with(&facts, Status::No), Vec::<String>::new());
}

#[test]
fn doctor_nested_host_with_hidden_flags_is_reported_as_nested() {
    let root = FakeRoot::new("nested");
    root.file("proc/cpuinfo", &cpuinfo("AuthenticAMD", "AMD EPYC", "fpu lm hypervisor"))
        .modules(&["kvm", "kvm_amd"])
        .file("dev/kvm", "");
    let facts = HostFacts::gather(&root.0);
    assert_eq!(facts.kind(), KvmKind::Nested);
    assert!(facts.to_string().contains("note  KVM is nested virtualization"));
}

#[test]
fn doctor_permission_denied_says_which_group_to_join() {
    let denied = || Err(io::Error::from(io::ErrorKind::PermissionDenied));
    let dev = classify(denied(), Some(0o660), Some("kvm".into()));
    assert_eq!(dev, DevKvm::PermissionDenied { mode: 0o660, group: "kvm".into() });
    let facts = HostFacts {
        arch: "x86_64".into(),
        cpuinfo: Ok(CpuInfo { vmx: true, ..CpuInfo::default() }),
        modules: KvmModules { kvm: true, kvm_intel: true, ..KvmModules::default() },
        dev_kvm: dev,
    };
    let no = lines_with(&facts, Status::No);
    assert!(no[0].contains("permission denied (mode 0660, group kvm)"), "{no:?}");
    assert!(no[0].contains("sudo usermod -aG kvm $USER"), "{no:?}");
    // A root-only device needs its group changed first.
    let facts = HostFacts { dev_kvm: classify(denied(), Some(0o600), Some("root".into())), ..facts };
    let no = lines_with(&facts, Status::No);
    assert!(no[0].contains("sudo chgrp kvm /dev/kvm"), "{no:?}");
    assert_eq!(classify(Err(io::Error::from(io::ErrorKind::NotFound)), None, None), DevKvm::Missing);
    assert!(
        matches!(classify(Err(io::Error::other("ENXIO")), None, None), DevKvm::Unopenable(e) if e == "ENXIO")
    );
}

#[test]
fn doctor_permission_denied_on_a_vm_leads_with_the_permissions_not_nested_virtualization() {
    // This host's shape (a VM whose kvm_pvm needs no vmx/svm) with a root-only /dev/kvm.
    let facts = HostFacts {
        arch: "x86_64".into(),
        cpuinfo: Ok(CpuInfo::parse(&cpuinfo("AuthenticAMD", "AMD EPYC", "fpu sse2 lm hypervisor"))),
        modules: KvmModules { kvm: true, kvm_pvm: true, ..KvmModules::default() },
        dev_kvm: classify(
            Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            Some(0o600),
            Some("root".into()),
        ),
    };
    let text = facts.to_string();
    assert!(!text.contains("nested virtualization in the outer hypervisor"), "{text}");
    let no = lines_with(&facts, Status::No);
    assert!(
        no[0].starts_with("no    /dev/kvm exists but cannot be opened read-write: permission denied"),
        "{no:?}"
    );
    assert!(no[0].contains("sudo usermod -aG kvm $USER"), "{no:?}");
    assert!(text.contains("neither vmx nor svm, but /dev/kvm exists — a KVM that needs neither"), "{text}");
}

#[test]
fn doctor_opens_the_device_it_is_given() {
    let root = FakeRoot::new("device");
    root.file("elsewhere/kvm", "");
    let facts = HostFacts::gather_with(&root.0, &root.0.join("elsewhere/kvm"));
    assert_eq!(facts.dev_kvm, DevKvm::ReadWrite);
    assert_eq!(HostFacts::gather(&root.0).dev_kvm, DevKvm::Missing);
}

#[test]
fn doctor_missing_cpuinfo_and_foreign_arch_are_reported() {
    let root = FakeRoot::new("empty");
    root.file("etc/group", "root:x:0:\nkvm:x:36:alice\n");
    let mut facts = HostFacts::gather(&root.0);
    assert!(facts.cpuinfo.as_ref().is_err_and(|e| e.starts_with("cannot read /proc/cpuinfo")));
    assert_eq!(group_name(&root.0, 36), "kvm");
    assert_eq!(group_name(&root.0, 99), "99");
    facts.arch = "aarch64".into();
    let no = lines_with(&facts, Status::No);
    assert!(no[0].starts_with("no    host is aarch64, not x86_64"), "{no:?}");
    assert!(no[1].contains("cannot read /proc/cpuinfo"), "{no:?}");
    assert!(no.iter().any(|l| l.contains("sudo modprobe kvm_intel (Intel) or sudo modprobe kvm_amd (AMD)")));
}
