//! duet: run the same x86 guest on KVM and on a software CPU.
