//! A KVM device this user may not open: duet says why once, and what to do about it.
//!
//! `DUET_KVM_DEVICE` points duet at a file only root may open (mode 0600, owned by root), and
//! the command runs as `nobody`; run by a user other than root, the file is made mode 0000
//! instead. Either way opening it fails with EACCES, as /dev/kvm does for a user outside its
//! group. (/dev/kvm itself is never touched.)

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use super::{text, TempFile, ERROR};

/// The uid `nobody` has on Debian (and most Linux distributions).
const NOBODY: u32 = 65534;

/// Runs duet with `args` where opening the KVM device is denied; `None` (with the reason
/// printed) where this host cannot set that up.
fn denied(tag: &str, args: &[&str]) -> Option<(Output, TempFile)> {
    if cfg!(not(target_arch = "x86_64")) {
        // There the KVM backend is unavailable whatever the device's permissions.
        eprintln!("skipped: duet's KVM backend needs an x86-64 host (this is {})", std::env::consts::ARCH);
        return None;
    }
    let device = TempFile::new(tag, b"");
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mode = if root { 0o600 } else { 0o000 };
    std::fs::set_permissions(&device.0, std::fs::Permissions::from_mode(mode)).ok()?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
    cmd.args(args).env("DUET_KVM_DEVICE", &device.0).env_remove("DUET_BACKENDS");
    if root {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    match cmd.output() {
        Ok(out) => Some((out, device)),
        Err(e) => {
            eprintln!("skipped: cannot run duet as uid {NOBODY}: {e}");
            None
        }
    }
}

#[test]
fn auto_says_once_why_the_software_cpu_runs() {
    let Some((out, device)) = denied("kvm-auto", &["run"]) else { return };
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "Hello from duet!\n", "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    let why = format!("[auto] runs on interp: KVM is not usable (permission denied opening {}", device.arg());
    assert_eq!(err.lines().filter(|l| l.contains("permission denied")).count(), 1, "{err}");
    assert!(err.lines().next().is_some_and(|l| l.starts_with(&why)), "{err}");
    assert!(err.contains("add your user to the `kvm` group"), "{err}");
}

#[test]
fn backend_kvm_gives_its_hint_once() {
    let Some((out, device)) = denied("kvm-strict", &["run", "--backend", "kvm"]) else { return };
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(ERROR), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let want = format!(
        "duet: error: the kvm backend is not usable here: permission denied opening {}",
        device.arg()
    );
    assert!(err.starts_with(&want), "{err}");
    assert_eq!(err.matches("--backend interp").count(), 1, "{err}");
}

#[test]
fn doctor_leads_with_the_permissions() {
    let Some((out, device)) = denied("kvm-doctor", &["doctor"]) else { return };
    drop(device);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!stdout.contains("enable nested virtualization"), "{stdout}");
    let first_no = stdout.lines().find(|l| l.starts_with("no ")).unwrap_or_default();
    assert!(
        first_no.contains("cannot be opened read-write: permission denied") && first_no.contains("group kvm"),
        "{stdout}"
    );
}
