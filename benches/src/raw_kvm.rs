//! The baseline for `exit_latency`: an exit guest driven by a bare kvm-ioctls loop.
//!
//! No duet layer is involved once the VM is set up: no `Vcpu` trait, no deadline timer, no
//! bus, no run loop. It runs the same code as duet's exit guests (same bytes, same real-mode
//! start state), so duet's overhead on KVM is the ratio of the two timings. This is the bench
//! crate's only unsafe code.

use std::sync::Arc;

use duet_core::vm_memory::{
    GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, MemoryRegionAddress,
};
use duet_core::GuestMemory;
use kvm_bindings::{kvm_interrupt, kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::workloads::{
    exit_images, ExitKind, EXIT_CODE_ADDR, EXIT_MMIO_SEGMENT, EXIT_RAM, EXIT_WAKE_VECTOR,
};

/// kvm-ioctls has no wrapper for KVM_INTERRUPT (a VMM with a userspace irqchip injects with it).
mod nr {
    use kvm_bindings::{kvm_interrupt, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;

    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use nr::KVM_INTERRUPT;

/// Where KVM may put the real-mode TSS it needs on hosts without unrestricted guest.
const TSS_ADDR: usize = 0xfffb_d000;

/// A one-vCPU VM running an exit guest, with nothing between the caller and KVM_RUN.
pub struct RawKvm {
    // Field order is drop order: the vCPU and VM fds go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    _memory: Arc<GuestMemory>,
    kind: ExitKind,
}

impl RawKvm {
    /// Creates the VM, maps 64 KiB of RAM with the guest's code and sets the real-mode start state.
    pub fn new(kind: ExitKind) -> Result<Self, String> {
        let ioctl = |op: &'static str| move |e: kvm_ioctls::Error| format!("{op}: {e}");
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), EXIT_RAM as usize)])
            .map_err(|e| format!("guest memory: {e}"))?;
        for (addr, bytes) in exit_images(kind).map_err(|e| e.to_string())? {
            duet_core::vm_memory::Bytes::write_slice(&memory, &bytes, GuestAddress(addr))
                .map_err(|e| format!("loading the guest: {e}"))?;
        }
        let memory = Arc::new(memory);
        let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        let region = memory.find_region(GuestAddress(0)).ok_or("no RAM region")?;
        let host =
            region.get_host_address(MemoryRegionAddress(0)).map_err(|e| format!("host address: {e}"))?;
        let desc = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: EXIT_RAM,
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host + EXIT_RAM` is the single mmap owned by `memory`, which the
        // returned `RawKvm` keeps alive and drops only after the VM and vCPU fds (field order),
        // so the kernel never uses the slot after the mapping is gone.
        unsafe { vm.set_user_memory_region(desc) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        for s in [&mut sregs.ss, &mut sregs.es] {
            s.base = 0;
            s.selector = 0;
        }
        sregs.ds.base = u64::from(EXIT_MMIO_SEGMENT) << 4;
        sregs.ds.selector = EXIT_MMIO_SEGMENT;
        vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        Ok(RawKvm { vcpu, _vm: vm, _memory: memory, kind })
    }

    /// Points the vCPU at the top of the loop with `exits` in ECX.
    pub fn start(&mut self, exits: u64) -> Result<(), String> {
        let regs = kvm_regs { rip: EXIT_CODE_ADDR, rflags: 2, rcx: exits, rsp: 0x8000, ..Default::default() };
        self.vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    /// Runs the loop to its debug exit: `exits` exits of the guest's kind, each handled the way
    /// a minimal VMM would (reads return all ones, writes are dropped, HLT is woken by
    /// injecting [`EXIT_WAKE_VECTOR`]).
    pub fn run_batch(&mut self, exits: u64) -> Result<u64, String> {
        self.start(exits)?;
        let mut seen = 0u64;
        loop {
            match self.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
                VcpuExit::IoOut(0xf4, _) => break,
                VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => seen += 1,
                VcpuExit::Hlt => {
                    self.interrupt(EXIT_WAKE_VECTOR)?;
                    seen += 1;
                }
                VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => {
                    data.fill(0xff);
                    seen += 1;
                }
                other => return Err(format!("unexpected exit {other:?} in the {} loop", self.kind.name())),
            }
        }
        // Complete the pending OUT now (KVM finishes it on the next entry), so the next
        // KVM_SET_REGS is not followed by a skipped instruction.
        self.vcpu.set_kvm_immediate_exit(1);
        let settled = match self.vcpu.run() {
            Err(e) if e.errno() != libc::EINTR => Err(format!("KVM_RUN (immediate exit): {e}")),
            _ => Ok(seen),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        settled
    }

    /// KVM_INTERRUPT: queues external interrupt `vector` for the next entry.
    fn interrupt(&self, vector: u8) -> Result<(), String> {
        let irq = kvm_interrupt { irq: u32::from(vector) };
        // SAFETY: `self.vcpu` is a vCPU fd, and KVM_INTERRUPT reads exactly one kvm_interrupt,
        // which `irq` is and which lives across the call.
        let ret = unsafe { ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(format!("KVM_INTERRUPT: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}
