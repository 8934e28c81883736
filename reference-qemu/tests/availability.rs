//! `availability()` reports the installed QEMU's version, and says why when it cannot run.

#[test]
fn availability_names_the_version_or_the_reason() {
    match duet_qemu::availability() {
        duet_core::Availability::Available(what) => assert!(what.contains("QEMU emulator version"), "{what}"),
        duet_core::Availability::Unavailable(why) => {
            assert!(std::env::var("DUET_REQUIRE_QEMU").as_deref() != Ok("1"), "QEMU required: {why}");
            println!("skipped: {why}");
        }
    }
    // A program that does not exist is reported unavailable, with what to do about it. This
    // binary holds only this test, so changing the environment races with nothing.
    std::env::set_var("DUET_QEMU", "/nonexistent/qemu-system-x86_64");
    let a = duet_qemu::availability();
    assert!(
        matches!(&a, duet_core::Availability::Unavailable(m) if m.contains("/nonexistent") && m.contains("apt-get install")),
        "{a:?}"
    );
    let guest = duet_fixtures::find("hello").unwrap().guest().unwrap();
    let err = duet_qemu::run(&guest, &duet_core::CpuidProfile::baseline(), std::time::Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, duet_qemu::QemuError::Spawn { .. }), "{err}");
    // Where spawning cannot report a failed exec (a test under qemu-user: its vfork is a fork),
    // the same missing program is a child that exits 127 (POSIX: command not found) in
    // silence; a program doing just that stands in for it on every host.
    let dir = std::env::temp_dir().join(format!("duet-qemu-exec-failed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("qemu-system-x86_64");
    std::fs::write(&fake, "#!/bin/sh\nexit 127\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::env::set_var("DUET_QEMU", &fake);
    let a = duet_qemu::availability();
    assert!(
        matches!(&a, duet_core::Availability::Unavailable(m) if m.contains("cannot be run") && m.contains("apt-get install")),
        "{a:?}"
    );
    let err = duet_qemu::run(&guest, &duet_core::CpuidProfile::baseline(), std::time::Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, duet_qemu::QemuError::Spawn { .. }), "{err}");
    std::env::remove_var("DUET_QEMU");
    let _ = std::fs::remove_dir_all(&dir);
}
