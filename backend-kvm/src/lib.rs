//! duet backend over KVM (kvm-ioctls)
