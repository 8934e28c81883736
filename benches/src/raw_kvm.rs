//! The baseline for `exit_latency`: an exit guest driven by a bare kvm-ioctls loop.
//!
//! No duet layer is involved once the VM is set up: no `Vcpu` trait, no deadline timer, no
//! bus, no run loop. It runs the same code as duet's exit guests (same bytes, same real-mode
//! start state), so duet's overhead on KVM is the ratio of the two timings.
//!
//! A batch is bounded without touching the exit path: more exits than asked for is an error,
//! and a watchdog thread ends the process with a clear message if one batch stays in KVM_RUN
//! far longer than any working KVM needs (a guest this KVM cannot run would otherwise hang
//! `cargo bench`). The bench crate's only unsafe code is the two calls kvm-ioctls offers no
//! safe form of, in the private `sys` module below.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duet_core::vm_memory::{Bytes as _, GuestAddress};
use duet_core::GuestMemory;
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuExit;

use crate::workloads::{
    exit_images, ExitKind, EXIT_CODE_ADDR, EXIT_MMIO_SEGMENT, EXIT_RAM, EXIT_WAKE_VECTOR,
};

/// A batch may stay this long in KVM_RUN, plus [`BATCH_LIMIT_PER_EXIT`] per exit asked for,
/// before the watchdog gives up on it: far more than any KVM that runs the guest needs (this
/// emulating host takes ~30 µs per exit at worst).
pub const BATCH_LIMIT: Duration = Duration::from_secs(60);
/// See [`BATCH_LIMIT`].
pub const BATCH_LIMIT_PER_EXIT: Duration = Duration::from_millis(1);

/// The kernel interface kvm-ioctls has no safe wrapper for: a memory slot, and KVM_INTERRUPT.
mod sys {
    #![expect(unsafe_code, reason = "the bench crate's only calls without a safe kvm-ioctls form")]

    use std::sync::Arc;

    use duet_core::vm_memory::{
        GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, MemoryRegionAddress,
    };
    use duet_core::GuestMemory;
    use kvm_bindings::{kvm_interrupt, kvm_userspace_memory_region, KVMIO};
    use kvm_ioctls::{Kvm, VcpuFd, VmFd};
    use vmm_sys_util::ioctl::ioctl_with_ref;
    use vmm_sys_util::ioctl_iow_nr;

    // KVM_INTERRUPT (a VMM with a userspace irqchip injects with it); include/uapi/linux/kvm.h.
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

    /// Where KVM may put the real-mode TSS it needs on hosts without unrestricted guest.
    const TSS_ADDR: usize = 0xfffb_d000;

    /// A VM whose one memory slot is `memory`, with vCPU 0.
    pub struct RawVm {
        // Field order is drop order: the vCPU and VM fds go before the memory they map.
        pub vcpu: VcpuFd,
        _vm: VmFd,
        _memory: Arc<GuestMemory>,
    }

    impl RawVm {
        /// Creates the VM, maps `memory` (one region at guest address 0) and creates vCPU 0.
        pub fn new(memory: Arc<GuestMemory>) -> Result<Self, String> {
            let ioctl = |op: &'static str| move |e: kvm_ioctls::Error| format!("{op}: {e}");
            let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
            let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
            vm.set_tss_address(TSS_ADDR).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
            let region = memory.find_region(GuestAddress(0)).ok_or("no RAM region at 0")?;
            let host =
                region.get_host_address(MemoryRegionAddress(0)).map_err(|e| format!("host address: {e}"))?;
            let desc = kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host + region.len()` is one mmap owned by `memory`, which the
            // returned `RawVm` keeps alive and drops only after the VM and vCPU fds (field
            // order), so the kernel never uses the slot after the mapping is gone.
            unsafe { vm.set_user_memory_region(desc) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
            Ok(RawVm { vcpu, _vm: vm, _memory: memory })
        }

        /// KVM_INTERRUPT: queues external interrupt `vector` for the next entry.
        pub fn interrupt(&self, vector: u8) -> Result<(), String> {
            let irq = kvm_interrupt { irq: u32::from(vector) };
            // SAFETY: `self.vcpu` is a vCPU fd, and KVM_INTERRUPT reads exactly one
            // kvm_interrupt, which `irq` is and which lives across the call.
            let ret = unsafe { ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
            if ret < 0 {
                return Err(format!("KVM_INTERRUPT: {}", std::io::Error::last_os_error()));
            }
            Ok(())
        }
    }
}

/// What the watchdog thread watches: when the current batch started (0: none running).
struct Watch {
    origin: Instant,
    /// Milliseconds from `origin` to the start of the running batch, plus one; 0 when idle.
    started: AtomicU64,
    /// How long the running batch may take, in milliseconds.
    limit_ms: AtomicU64,
    stop: AtomicBool,
}

/// Ends the process, saying why, when a batch overstays its limit.
struct Watchdog {
    watch: Arc<Watch>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(kind: ExitKind) -> Self {
        let watch = Arc::new(Watch {
            origin: Instant::now(),
            started: AtomicU64::new(0),
            limit_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let w = Arc::clone(&watch);
        let thread = std::thread::spawn(move || {
            while !w.stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_secs(1));
                let started = w.started.load(Ordering::Relaxed);
                let now = w.origin.elapsed().as_millis() as u64 + 1;
                let limit = w.limit_ms.load(Ordering::Relaxed);
                if started != 0 && now.saturating_sub(started) > limit {
                    eprintln!(
                        "raw_kvm: the `{}` exit loop has been running for {} s without reaching its \
                         debug exit (limit {} s): this host's KVM does not run the guest; stopping \
                         instead of hanging",
                        kind.name(),
                        (now - started) / 1000,
                        limit / 1000
                    );
                    std::process::exit(3);
                }
            }
        });
        Watchdog { watch, thread: Some(thread) }
    }

    /// Marks the start of a batch of `exits` exits.
    fn begin(&self, exits: u64) {
        let limit = BATCH_LIMIT + BATCH_LIMIT_PER_EXIT.saturating_mul(exits.min(u64::from(u32::MAX)) as u32);
        self.watch.limit_ms.store(limit.as_millis() as u64, Ordering::Relaxed);
        self.watch.started.store(self.watch.origin.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Marks the end of the batch.
    fn end(&self) {
        self.watch.started.store(0, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A one-vCPU VM running an exit guest, with nothing between the caller and KVM_RUN.
pub struct RawKvm {
    vm: sys::RawVm,
    kind: ExitKind,
    watchdog: Watchdog,
}

impl RawKvm {
    /// Creates the VM, maps 64 KiB of RAM with the guest's code and sets the real-mode start state.
    pub fn new(kind: ExitKind) -> Result<Self, String> {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), EXIT_RAM as usize)])
            .map_err(|e| format!("guest memory: {e}"))?;
        for (addr, bytes) in exit_images(kind).map_err(|e| e.to_string())? {
            memory.write_slice(&bytes, GuestAddress(addr)).map_err(|e| format!("loading the guest: {e}"))?;
        }
        let vm = sys::RawVm::new(Arc::new(memory))?;
        let mut sregs = vm.vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        for s in [&mut sregs.ss, &mut sregs.es] {
            s.base = 0;
            s.selector = 0;
        }
        sregs.ds.base = u64::from(EXIT_MMIO_SEGMENT) << 4;
        sregs.ds.selector = EXIT_MMIO_SEGMENT;
        vm.vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        Ok(RawKvm { vm, kind, watchdog: Watchdog::start(kind) })
    }

    /// Points the vCPU at the top of the loop with `exits` in ECX.
    pub fn start(&mut self, exits: u64) -> Result<(), String> {
        let regs = kvm_regs { rip: EXIT_CODE_ADDR, rflags: 2, rcx: exits, rsp: 0x8000, ..Default::default() };
        self.vm.vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    /// Runs the loop to its debug exit: `exits` exits of the guest's kind, each handled the way
    /// a minimal VMM would (reads return all ones, writes are dropped, HLT is woken by
    /// injecting [`EXIT_WAKE_VECTOR`]). More exits than that is an error, and a batch that
    /// stays in KVM_RUN past [`BATCH_LIMIT`] ends the process with a message saying so.
    pub fn run_batch(&mut self, exits: u64) -> Result<u64, String> {
        self.start(exits)?;
        self.watchdog.begin(exits);
        let result = self.exit_loop(exits);
        self.watchdog.end();
        let seen = result?;
        // Complete the pending OUT now (KVM finishes it on the next entry), so the next
        // KVM_SET_REGS is not followed by a skipped instruction.
        self.vm.vcpu.set_kvm_immediate_exit(1);
        let settled = match self.vm.vcpu.run() {
            Err(e) if e.errno() != libc::EINTR => Err(format!("KVM_RUN (immediate exit): {e}")),
            _ => Ok(seen),
        };
        self.vm.vcpu.set_kvm_immediate_exit(0);
        settled
    }

    /// KVM_RUN until the debug exit; the number of exits before it.
    fn exit_loop(&mut self, exits: u64) -> Result<u64, String> {
        let mut seen = 0u64;
        loop {
            match self.vm.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
                VcpuExit::IoOut(0xf4, _) => return Ok(seen),
                VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => {}
                VcpuExit::Hlt => self.vm.interrupt(EXIT_WAKE_VECTOR)?,
                VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => data.fill(0xff),
                other => return Err(format!("unexpected exit {other:?} in the {} loop", self.kind.name())),
            }
            seen += 1;
            if seen > exits {
                return Err(format!(
                    "the {} loop took more than the {exits} exits asked for without reaching its debug exit",
                    self.kind.name()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_the_exits_asked_for_and_no_more() {
        // Prints why KVM is left out, or panics under DUET_REQUIRE_KVM=1 when it is unusable.
        if !crate::backends().contains(&duet::BackendKind::Kvm) {
            return;
        }
        let mut raw = RawKvm::new(ExitKind::PortOut).unwrap();
        assert_eq!(raw.run_batch(3), Ok(3));
        // ECX says 5 exits but the batch allows 2: the cap ends it with an error, not a hang.
        raw.start(5).unwrap();
        raw.watchdog.begin(2);
        let err = raw.exit_loop(2).unwrap_err();
        raw.watchdog.end();
        assert!(err.contains("more than the 2 exits"), "{err}");
    }
}
