//! The one place tests decide whether KVM is there: skip out loud, or fail when it must be.

use duet_core::{Availability, Backend};

use crate::KvmBackend;

/// Environment variable that turns a KVM skip into a test failure.
pub const REQUIRE_KVM_ENV: &str = "DUET_REQUIRE_KVM";

/// A usable [`KvmBackend`] for a test, or `None` after printing `skipped: <reason>`.
///
/// Panics (failing the test) instead of skipping when `DUET_REQUIRE_KVM=1`.
pub fn kvm_or_skip() -> Option<KvmBackend> {
    let kvm = KvmBackend::new();
    match kvm.availability() {
        Availability::Available(_) => Some(kvm),
        Availability::Unavailable(why) => {
            assert!(std::env::var(REQUIRE_KVM_ENV).as_deref() != Ok("1"), "{REQUIRE_KVM_ENV}=1 but {why}");
            println!("skipped: {why}");
            None
        }
    }
}
