//! Shared by the QEMU tests: skip out loud when QEMU is missing, run with a deadline.

use std::time::Duration;

use duet_core::{CpuidProfile, Guest};
use duet_qemu::{QemuError, QemuRun};

/// True when QEMU can run here; otherwise prints `skipped: <reason>` (or fails when
/// `DUET_REQUIRE_QEMU=1`).
pub fn qemu_available() -> bool {
    match duet_qemu::availability() {
        duet_core::Availability::Available(_) => true,
        duet_core::Availability::Unavailable(why) => {
            assert!(
                std::env::var("DUET_REQUIRE_QEMU").as_deref() != Ok("1"),
                "QEMU required but unavailable: {why}"
            );
            println!("skipped: {why}");
            false
        }
    }
}

/// Runs `guest` under QEMU with the baseline profile and a generous deadline.
pub fn run(guest: &Guest) -> Result<QemuRun, QemuError> {
    duet_qemu::run(guest, &CpuidProfile::baseline(), Duration::from_secs(20))
}
