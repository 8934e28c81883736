//! Every `unsafe` block of duet-kvm: memory slots, the kvm_run page, KVM_INTERRUPT and the
//! deadline signal and timer. Each block names the invariant that makes it sound.
#![expect(unsafe_code, reason = "the one module of duet-kvm that talks to the kernel directly")]

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use duet_core::vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use duet_core::GuestMemory;
use kvm_bindings::{kvm_interrupt, kvm_run, kvm_userspace_memory_region, KVMIO, KVM_EXIT_IO_IN};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use crate::error::KvmError;

// KVM_INTERRUPT is not wrapped by kvm-ioctls (it is only meaningful without an in-kernel
// irqchip); number from include/uapi/linux/kvm.h.
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// A VM with its single vCPU and the guest memory its slots point into.
///
/// Field order is drop order: the vCPU fd and VM fd close before the memory is unmapped, so
/// the kernel never holds a slot over freed host memory.
pub(crate) struct Vm {
    vcpu: VcpuFd,
    _vm: VmFd,
    memory: Arc<GuestMemory>,
    mmap_size: usize,
    /// KVM_GET/SET_XSAVE usable with the fixed 4096-byte kvm_xsave.
    xsave: bool,
}

/// Dword index of MXCSR in the XSAVE legacy region (byte 24, SDM Vol. 1 §13.4.1 / Table 10-2).
const XSAVE_MXCSR: usize = 6;
/// Dword index of XSTATE_BV's low half in the XSAVE header (byte 512, SDM Vol. 1 §13.4.2).
const XSAVE_XSTATE_BV: usize = 128;
/// XSTATE_BV bits for x87 and SSE state (SDM Vol. 1 §13.1).
const XSTATE_X87_SSE: u32 = 0b11;

/// The data of a port-I/O exit, lent from the kvm_run page.
pub(crate) struct IoData<'a> {
    /// I/O port.
    pub port: u16,
    /// Access width in bytes.
    pub size: u8,
    /// True for IN/INS.
    pub input: bool,
    /// `size × count` bytes.
    pub data: &'a mut [u8],
}

/// The data of an MMIO exit, lent from the kvm_run page.
pub(crate) struct MmioData<'a> {
    /// Guest physical address.
    pub addr: u64,
    /// True for a write.
    pub write: bool,
    /// The accessed bytes.
    pub data: &'a mut [u8],
}

impl Vm {
    /// Registers every region of `memory` as a KVM memory slot and takes ownership of the fds.
    ///
    /// `xsave` says KVM_GET/SET_XSAVE exist and KVM_CAP_XSAVE2 asks for at most 4096 bytes.
    pub fn new(
        vm: VmFd,
        vcpu: VcpuFd,
        memory: Arc<GuestMemory>,
        mmap_size: usize,
        max_slots: usize,
        xsave: bool,
    ) -> Result<Self, KvmError> {
        for (slot, region) in memory.iter().enumerate() {
            let base = region.start_addr().0;
            let size = region.len();
            let bad = |why: String| KvmError::Region { base, size, why };
            if slot >= max_slots {
                return Err(bad(format!("KVM offers only {max_slots} memory slots")));
            }
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| bad(format!("no host address: {e}")))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: base,
                memory_size: size,
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host + size` is one mmap owned by `memory`'s region; `memory` is
            // an Arc stored in the returned `Vm`, whose fields drop the vCPU and VM fds first,
            // so the mapping outlives every use the kernel can make of this slot.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { vcpu, _vm: vm, memory, mmap_size, xsave })
    }

    /// The vCPU fd.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// The vCPU fd, mutably (to run it or touch its kvm_run page).
    pub fn vcpu_mut(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// MXCSR, which KVM_GET_FPU does not report: read from KVM_GET_XSAVE when available.
    pub fn mxcsr(&self) -> Result<Option<u32>, KvmError> {
        if !self.xsave {
            return Ok(None);
        }
        let x = self.vcpu.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?;
        Ok(Some(x.region[XSAVE_MXCSR]))
    }

    /// Writes MXCSR, which KVM_SET_FPU ignores, through KVM_GET/SET_XSAVE when available.
    pub fn set_mxcsr(&self, mxcsr: u32) -> Result<(), KvmError> {
        if !self.xsave {
            return Ok(());
        }
        let mut x = self.vcpu.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?;
        x.region[XSAVE_MXCSR] = mxcsr;
        // MXCSR is only loaded when XSTATE_BV says SSE state is present (SDM Vol. 1 §13.8.1).
        x.region[XSAVE_XSTATE_BV] |= XSTATE_X87_SSE;
        // SAFETY: `x` is a whole kvm_xsave (4096 bytes) just filled by KVM_GET_XSAVE; `self.xsave`
        // is only true when KVM_CAP_XSAVE2 reports a size of at most 4096 bytes, so the kernel
        // reads nothing past the struct.
        unsafe { self.vcpu.set_xsave(&x) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))
    }

    /// KVM_INTERRUPT: queues external interrupt `vector` for injection on the next entry.
    pub fn interrupt(&self, vector: u8) -> Result<(), KvmError> {
        let irq = kvm_interrupt { irq: u32::from(vector) };
        // SAFETY: `self.vcpu` is a vCPU fd and KVM_INTERRUPT reads exactly one kvm_interrupt,
        // which `irq` is and which lives across the call.
        let ret = unsafe { ioctl_with_ref(&self.vcpu, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(KvmError::Ioctl { op: "KVM_INTERRUPT", source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// The port-I/O data of the last exit; only call after KVM_RUN returned KVM_EXIT_IO.
    pub fn io_data(&mut self) -> Result<IoData<'_>, KvmError> {
        let mmap_size = self.mmap_size;
        let run: &mut kvm_run = self.vcpu.get_kvm_run();
        // SAFETY: the caller saw exit_reason == KVM_EXIT_IO, so the kernel wrote the `io`
        // member of the union; every bit pattern is a valid value of its integer fields.
        let io = unsafe { run.__bindgen_anon_1.io };
        let len = usize::from(io.size) * io.count as usize;
        let offset = io.data_offset;
        let inside =
            usize::try_from(offset).ok().and_then(|o| o.checked_add(len)).is_some_and(|end| end <= mmap_size);
        if !inside {
            return Err(KvmError::BadIoData { offset, len, mmap_size });
        }
        let start = (run as *mut kvm_run).cast::<u8>();
        // SAFETY: kvm_run is the start of the vCPU's mmap of `mmap_size` bytes (from
        // KVM_GET_VCPU_MMAP_SIZE), which lives as long as `self.vcpu`; we checked that
        // `offset + len` lies inside it. The slice borrows `self` mutably, so nothing else can
        // touch the page (or run the vCPU) while it lives; this is what kvm-ioctls' own
        // `VcpuExit::IoIn/IoOut` does.
        let data = unsafe { std::slice::from_raw_parts_mut(start.add(offset as usize), len) };
        Ok(IoData { port: io.port, size: io.size, input: u32::from(io.direction) == KVM_EXIT_IO_IN, data })
    }

    /// The MMIO data of the last exit; only call after KVM_RUN returned KVM_EXIT_MMIO.
    pub fn mmio_data(&mut self) -> MmioData<'_> {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the caller saw exit_reason == KVM_EXIT_MMIO, so `mmio` is the member the
        // kernel wrote; it is plain integers and bytes, valid for any bit pattern.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        MmioData { addr: mmio.phys_addr, write: mmio.is_write != 0, data: &mut mmio.data[..len] }
    }

    /// Sub-error and data words of the last KVM_EXIT_INTERNAL_ERROR.
    pub fn internal_error(&mut self) -> (u32, Vec<u64>) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the caller saw exit_reason == KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // member the kernel wrote; it is plain integers, valid for any bit pattern.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 4
}

/// Does nothing: the signal exists only to make KVM_RUN return EINTR.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for [`kick_signal`] once per process.
pub(crate) fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| KvmError::Timer { what: "sigaction", source: io::Error::from_raw_os_error(errno) })
}

/// The kernel thread id of the calling thread.
pub(crate) fn current_tid() -> libc::pid_t {
    // SAFETY: gettid(2) has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Whether [`kick_signal`] is pending (generated, not yet delivered) for this thread.
#[cfg(test)]
pub(crate) fn kick_signal_pending() -> bool {
    // SAFETY: an all-zero sigset_t is a valid (empty) set; sigpending fills it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t for the duration of both calls.
    unsafe { libc::sigpending(&mut set) == 0 && libc::sigismember(&set, kick_signal()) == 1 }
}

/// A POSIX timer that sends [`kick_signal`] to one thread (SIGEV_THREAD_ID).
pub(crate) struct Kicker {
    timer: libc::timer_t,
    tid: libc::pid_t,
}

// SAFETY: a timer_t is a kernel timer id, not a pointer to thread-local data; timer_settime and
// timer_delete may be called from any thread of the process.
unsafe impl Send for Kicker {}

impl Kicker {
    /// A disarmed timer aimed at the calling thread.
    pub fn for_current_thread() -> Result<Self, KvmError> {
        install_kick_handler()?;
        // A thread that blocks the signal would never be kicked out of KVM_RUN.
        unblock_signal(kick_signal()).map_err(|e| KvmError::Timer {
            what: "pthread_sigmask (unblock)",
            source: io::Error::other(e.to_string()),
        })?;
        let tid = current_tid();
        // SAFETY: sigevent is plain data (integers and a union of integer/pointer); all-zero
        // is a valid value that we then fill in.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = kick_signal();
        ev.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `timer` are valid for the call; the kernel writes the new id to `timer`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer) } != 0 {
            return Err(KvmError::Timer { what: "timer_create", source: io::Error::last_os_error() });
        }
        Ok(Kicker { timer, tid })
    }

    /// The thread this timer signals.
    pub fn tid(&self) -> libc::pid_t {
        self.tid
    }

    /// Fires after `first`, then every `every` until disarmed (so a signal that arrives just
    /// before KVM_RUN is entered is followed by another one inside it).
    pub fn arm(&self, first: Duration, every: Duration) -> Result<(), KvmError> {
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos().into(),
        };
        // A zero it_value would disarm: fire after at least a nanosecond.
        let first = first.max(Duration::from_nanos(1));
        self.settime(libc::itimerspec { it_interval: ts(every), it_value: ts(first) }, "timer_settime (arm)")
    }

    /// Stops the timer.
    pub fn disarm(&self) -> Result<(), KvmError> {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        self.settime(libc::itimerspec { it_interval: zero, it_value: zero }, "timer_settime (disarm)")
    }

    fn settime(&self, spec: libc::itimerspec, what: &'static str) -> Result<(), KvmError> {
        // SAFETY: `self.timer` is a live timer id created by timer_create and deleted only in
        // Drop; `spec` is a valid itimerspec and the old value is not requested.
        if unsafe { libc::timer_settime(self.timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(KvmError::Timer { what, source: io::Error::last_os_error() });
        }
        Ok(())
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        // SAFETY: `self.timer` is a live timer id owned by this value and deleted only here.
        unsafe { libc::timer_delete(self.timer) };
    }
}
