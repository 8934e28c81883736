//! duet-qemu: run a duet guest under QEMU TCG as a reference.
