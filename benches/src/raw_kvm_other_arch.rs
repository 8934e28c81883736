//! The `raw_kvm` baseline on a host that is not x86-64: the same [`RawKvm`], which cannot be
//! created, because only an x86-64 host's KVM runs the x86 exit guests (see duet-kvm).

use std::convert::Infallible;

use crate::workloads::ExitKind;

/// A one-vCPU VM running an exit guest; on this host there is none (the type has no values).
pub struct RawKvm(Infallible);

impl RawKvm {
    /// Always fails here, saying why.
    pub fn new(kind: ExitKind) -> Result<Self, String> {
        Err(format!(
            "raw_kvm: the `{}` exit guest is x86 code and KVM runs it only on an x86-64 host (this host is {})",
            kind.name(),
            std::env::consts::ARCH
        ))
    }

    /// Points the vCPU at the top of the loop with `exits` in ECX.
    pub fn start(&mut self, _exits: u64) -> Result<(), String> {
        match self.0 {}
    }

    /// Runs the loop to its debug exit; the number of exits taken.
    pub fn run_batch(&mut self, _exits: u64) -> Result<u64, String> {
        match self.0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_one_says_kvm_needs_an_x86_64_host() {
        let why = RawKvm::new(ExitKind::LoopOnly).err().unwrap_or_default();
        assert!(why.contains("KVM runs it only on an x86-64 host (this host is"), "{why}");
    }
}
