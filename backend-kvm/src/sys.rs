//! Every `unsafe` block of duet-kvm: memory slots, the kvm_run area, KVM_INTERRUPT and the
//! deadline signal and timer. Each block names the invariant that makes it sound.
//!
//! # How a deadline ends KVM_RUN
//!
//! A [`Kicker`] is a one-shot POSIX timer (repeating only where KVM lacks
//! KVM_CAP_IMMEDIATE_EXIT, Linux before 4.11) that sends [`kick_signal`] to the thread running the
//! vCPU. It is armed once per deadline (not per KVM_RUN), so an exit costs no system call but
//! KVM_RUN itself. The signal's handler sets `kvm_run.immediate_exit` of the vCPU that is inside
//! [`Vm::run`] on that thread (a thread-local pointer, set only for the span of that call), so a
//! signal that lands after the deadline check but before the thread is inside KVM_RUN still
//! makes that KVM_RUN return at once; a signal inside KVM_RUN makes it return EINTR. A signal
//! outside that span changes nothing, and needs not: the timer never fires before its deadline,
//! and [`Vm::run`] checks the clock inside the span before entering, so the next entry sees the
//! deadline has passed. A kick is therefore never lost, and a stale one (from a deadline since
//! moved) at worst makes one KVM_RUN return early, after which the caller checks the clock
//! and runs on: only the clock ends a run.
//!
//! The handler is installed with `SA_RESTART`: a kick that lands while the thread is in some
//! other blocking system call (a device's read, a log write) restarts that call instead of
//! failing it with EINTR. KVM_RUN is not affected: it returns a plain EINTR, never one of the
//! ERESTART codes SA_RESTART acts on, so it still comes back to duet.
#![expect(unsafe_code, reason = "the one module of duet-kvm that talks to the kernel directly")]

use std::cell::Cell;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use duet_core::vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use duet_core::GuestMemory;
use kvm_bindings::{kvm_interrupt, kvm_run, kvm_userspace_memory_region, KVMIO, KVM_EXIT_IO_IN};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;
use vmm_sys_util::signal::{unblock_signal, SIGRTMIN};

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
    run: RunArea,
    memory: Arc<GuestMemory>,
    /// KVM_GET/SET_XSAVE usable with the fixed 4096-byte kvm_xsave.
    xsave: bool,
}

/// duet's own shared mapping of the vCPU's kvm_run area (KVM_GET_VCPU_MMAP_SIZE bytes).
///
/// kvm-ioctls maps the same pages but lends them only as `&mut kvm_run`, whose provenance
/// covers the struct alone, while the data of a port-I/O exit lies at `data_offset` past it in
/// the same mapping. A pointer from our own mmap covers the whole area, and is also what the
/// kick handler writes `immediate_exit` through. Both mappings are MAP_SHARED views of the
/// same kernel pages.
struct RunArea {
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping belongs to the process, not to a thread; `RunArea` hands out access only
// through `&self`/`&mut self`, so moving it to another thread moves that access with it.
unsafe impl Send for RunArea {}

impl RunArea {
    /// Maps `size` bytes of the vCPU fd's kvm_run area.
    fn map(vcpu: &VcpuFd, size: usize) -> Result<Self, KvmError> {
        let too_small = size < std::mem::size_of::<kvm_run>();
        // SAFETY: a fresh shared mapping at an address the kernel chooses aliases no Rust
        // object; the fd is a vCPU fd, whose mmap is the kvm_run area of `size` bytes.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED || too_small {
            let source = if too_small {
                io::Error::other(format!("KVM_GET_VCPU_MMAP_SIZE {size} is smaller than kvm_run"))
            } else {
                io::Error::last_os_error()
            };
            return Err(KvmError::Ioctl { op: "mmap (kvm_run)", source });
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or(KvmError::Ioctl { op: "mmap (kvm_run)", source: io::Error::other("null mapping") })?;
        Ok(RunArea { base, size })
    }

    /// The kvm_run struct at the start of the area.
    fn run(&self) -> *mut kvm_run {
        self.base.as_ptr().cast()
    }

    /// `kvm_run.immediate_exit`, which this thread, the kick handler and the kernel share.
    fn immediate_exit_ptr(&self) -> *mut u8 {
        self.base.as_ptr().wrapping_add(std::mem::offset_of!(kvm_run, immediate_exit))
    }

    /// `kvm_run.immediate_exit` as an atomic.
    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the byte lies inside the live mapping (size ≥ size_of::<kvm_run>(), checked
        // in `map`), a u8 is always aligned, and every access to it from Rust — here and in
        // `on_kick` — is atomic; the kernel only reads it, inside KVM_RUN.
        unsafe { AtomicU8::from_ptr(self.immediate_exit_ptr()) }
    }
}

impl Drop for RunArea {
    fn drop(&mut self) {
        // SAFETY: `base..base + size` is the mapping `map` created; nothing borrows it any more
        // (every lent slice borrows `self`), and no kick can write to it: the thread-local kick
        // target points here only while `Vm::run` holds `&mut self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
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
        let run = RunArea::map(&vcpu, mmap_size)?;
        Ok(Vm { vcpu, _vm: vm, run, memory, xsave })
    }

    /// The vCPU fd.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// One KVM_RUN, with `immediate_exit` set to `immediate` first. With `until`, the kick
    /// window is open for the call (see the module doc): a kick signal on this thread sets
    /// `immediate_exit`, and `None` is returned without entering when `until` has passed.
    pub fn run(
        &mut self,
        until: Option<Instant>,
        immediate: bool,
    ) -> Option<Result<KvmExit<'_>, vmm_sys_util::errno::Error>> {
        self.run.immediate_exit().store(immediate.into(), Ordering::SeqCst);
        let window = until.map(|_| KickWindow::open(&self.run));
        // Checked inside the window: a kick from here on sets immediate_exit, and a kick before
        // it came at or after the deadline, which this check sees.
        if until.is_some_and(|t| Instant::now() >= t) {
            return None;
        }
        #[cfg(test)]
        if until.is_some() && KICK_IN_WINDOW.replace(false) {
            raise_kick();
        }
        let exit = self.vcpu.run();
        drop(window);
        // Nothing is left set for whoever looks next: a kick that set it has done its work
        // (this KVM_RUN returned), and one still to come finds the window closed.
        self.run.immediate_exit().store(0, Ordering::SeqCst);
        Some(exit)
    }

    /// `kvm_run.immediate_exit` (tests check nothing is left set).
    #[cfg(test)]
    pub fn immediate_exit(&self) -> u8 {
        self.run.immediate_exit().load(Ordering::SeqCst)
    }

    /// Whether KVM can inject an external interrupt now: IF = 1 and nothing blocks injection.
    pub fn ready_for_interrupt(&self) -> bool {
        let run = self.run.run();
        // SAFETY: `run` points at the live kvm_run struct of our mapping; both fields are u8,
        // valid for any value, and the kernel writes them only inside KVM_RUN, which cannot be
        // running: it needs `&mut self`.
        unsafe { (*run).ready_for_interrupt_injection != 0 && (*run).if_flag != 0 }
    }

    /// Asks KVM for (or stops asking for) an exit as soon as an interrupt can be injected.
    pub fn request_interrupt_window(&mut self, on: bool) {
        let run = self.run.run();
        // SAFETY: as in `ready_for_interrupt`; the kernel reads the field at the next KVM_RUN.
        unsafe { (*run).request_interrupt_window = on.into() };
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
        let run = self.run.run();
        // SAFETY: `run` points at the live kvm_run struct of our mapping; the caller saw
        // exit_reason == KVM_EXIT_IO, so the kernel wrote the `io` member of the union, plain
        // integers valid for any bit pattern; it is copied out, no reference is made.
        let io = unsafe { (*run).__bindgen_anon_1.io };
        let len = usize::from(io.size) * io.count as usize;
        let offset = io.data_offset;
        let mmap_size = self.run.size;
        let start =
            usize::try_from(offset).ok().filter(|o| o.checked_add(len).is_some_and(|end| end <= mmap_size));
        let Some(start) = start else {
            return Err(KvmError::BadIoData { offset, len, mmap_size });
        };
        // SAFETY: `base` comes from our own mmap of `mmap_size` bytes, so its provenance covers
        // the whole area, and `start + len <= mmap_size` was checked just above. The kernel
        // writes the data only inside KVM_RUN, and the slice borrows `self` mutably, so nothing
        // else reads or writes those bytes (or runs the vCPU) while it lives.
        let data = unsafe { std::slice::from_raw_parts_mut(self.run.base.as_ptr().add(start), len) };
        Ok(IoData { port: io.port, size: io.size, input: u32::from(io.direction) == KVM_EXIT_IO_IN, data })
    }

    /// The MMIO data of the last exit; only call after KVM_RUN returned KVM_EXIT_MMIO.
    pub fn mmio_data(&mut self) -> MmioData<'_> {
        let run = self.run.run();
        // SAFETY: `run` points at the live kvm_run struct of our mapping, borrowed mutably for
        // as long as `self` is (so neither KVM_RUN nor another borrow can touch it); the caller
        // saw exit_reason == KVM_EXIT_MMIO, so `mmio` is the member the kernel wrote, plain
        // integers and bytes valid for any bit pattern.
        let mmio = unsafe { &mut (*run).__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        MmioData { addr: mmio.phys_addr, write: mmio.is_write != 0, data: &mut mmio.data[..len] }
    }

    /// Sub-error and data words of the last KVM_EXIT_INTERNAL_ERROR.
    pub fn internal_error(&self) -> (u32, Vec<u64>) {
        let run = self.run.run();
        // SAFETY: `run` points at the live kvm_run struct of our mapping; the caller saw
        // exit_reason == KVM_EXIT_INTERNAL_ERROR, so `internal` is the member the kernel wrote,
        // plain integers valid for any bit pattern; it is copied out.
        let internal = unsafe { (*run).__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 4
}

thread_local! {
    /// `immediate_exit` of the vCPU inside [`Vm::run`] with a deadline on this thread, else null.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    /// This thread's [`ThreadTag`], assigned on first use.
    static THREAD_TAG: Cell<Option<ThreadTag>> = const { Cell::new(None) };
}

/// While it lives, a kick signal on this thread sets one vCPU's `immediate_exit`.
struct KickWindow<'a>(std::marker::PhantomData<&'a RunArea>);

impl<'a> KickWindow<'a> {
    fn open(run: &'a RunArea) -> Self {
        KICK_TARGET.set(run.immediate_exit_ptr());
        // The handler must see the target before the deadline check and KVM_RUN that follow.
        compiler_fence(Ordering::SeqCst);
        KickWindow(std::marker::PhantomData)
    }
}

impl Drop for KickWindow<'_> {
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        KICK_TARGET.set(std::ptr::null_mut());
    }
}

/// Sets the running vCPU's `immediate_exit` (see the module doc); otherwise does nothing.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local without destructor is a plain TLS slot: reading it
    // allocates nothing and cannot fail, so this is async-signal-safe.
    let target = KICK_TARGET.try_with(Cell::get).unwrap_or(std::ptr::null_mut());
    if !target.is_null() {
        // SAFETY: the target is non-null only while a `KickWindow` lives on this thread, i.e.
        // inside `Vm::run`, which holds `&mut Vm` and so keeps the mapping alive; the handler
        // runs on the thread it interrupts, so that call is still in progress. The byte is
        // only ever accessed atomically (`RunArea::immediate_exit`).
        unsafe { AtomicU8::from_ptr(target) }.store(1, Ordering::SeqCst);
    }
}

/// Installs [`on_kick`] for [`kick_signal`] once per process, with `SA_RESTART` (module doc).
pub(crate) fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let install = || {
        // SAFETY: sigaction is plain data; all-zero is a valid value (empty mask, no flags),
        // filled in below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_kick as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `act` is a valid sigaction whose handler is an `extern "C"` function of the
        // SA_SIGINFO signature that only touches a thread-local and an atomic; the old action
        // is not requested.
        match unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)),
        }
    };
    INSTALLED
        .get_or_init(install)
        .map_err(|errno| KvmError::Timer { what: "sigaction", source: io::Error::from_raw_os_error(errno) })
}

/// Which thread this is: a process-unique serial (never reused, unlike a kernel tid) and the
/// kernel thread id the timer is aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadTag {
    serial: u64,
    tid: libc::pid_t,
}

impl ThreadTag {
    /// The calling thread's tag: a thread-local read; gettid only on a thread's first call.
    pub fn current() -> ThreadTag {
        if let Some(tag) = THREAD_TAG.get() {
            return tag;
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // SAFETY: gettid(2) has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() };
        let tag = ThreadTag { serial: NEXT.fetch_add(1, Ordering::Relaxed), tid };
        THREAD_TAG.set(Some(tag));
        tag
    }
}

/// Whether [`kick_signal`] is pending (generated, not yet delivered) for this thread.
#[cfg(test)]
pub(crate) fn kick_signal_pending() -> bool {
    // SAFETY: an all-zero sigset_t is a valid (empty) set; sigpending fills it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t for the duration of both calls.
    unsafe { libc::sigpending(&mut set) == 0 && libc::sigismember(&set, kick_signal()) == 1 }
}

#[cfg(test)]
thread_local! {
    /// Test hook: the next [`Vm::run`] with a deadline on this thread sends itself a kick after
    /// its deadline check, before KVM_RUN — the moment a lost kick would hang the run.
    static KICK_IN_WINDOW: Cell<bool> = const { Cell::new(false) };
}

/// Makes the next [`Vm::run`] with a deadline on this thread kick itself inside the window.
#[cfg(test)]
pub(crate) fn kick_inside_next_window() {
    KICK_IN_WINDOW.set(true);
}

/// Sends [`kick_signal`] to the calling thread; the handler has run when this returns.
#[cfg(test)]
fn raise_kick() {
    // SAFETY: pthread_kill on the calling thread with a valid signal number; the kick handler
    // is installed (a Kicker exists whenever a window is open with a deadline).
    unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
}

/// A one-shot POSIX timer that sends [`kick_signal`] to one thread (SIGEV_THREAD_ID).
pub(crate) struct Kicker {
    timer: libc::timer_t,
    thread: ThreadTag,
}

// SAFETY: a timer_t is a kernel timer id, not a pointer to thread-local data; timer_settime and
// timer_delete may be called from any thread of the process.
unsafe impl Send for Kicker {}

impl Kicker {
    /// A disarmed timer aimed at the calling thread, which gets the signal unblocked.
    pub fn for_current_thread() -> Result<Self, KvmError> {
        install_kick_handler()?;
        // A thread that blocks the signal would never be kicked out of KVM_RUN.
        unblock_signal(kick_signal()).map_err(|e| KvmError::Timer {
            what: "pthread_sigmask (unblock)",
            source: io::Error::other(e.to_string()),
        })?;
        let thread = ThreadTag::current();
        // SAFETY: sigevent is plain data (integers and a union of integer/pointer); all-zero
        // is a valid value that we then fill in.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = kick_signal();
        ev.sigev_notify_thread_id = thread.tid;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `timer` are valid for the call; the kernel writes the new id to `timer`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer) } != 0 {
            return Err(KvmError::Timer { what: "timer_create", source: io::Error::last_os_error() });
        }
        Ok(Kicker { timer, thread })
    }

    /// Whether this timer signals the calling thread.
    pub fn serves_current_thread(&self) -> bool {
        self.thread == ThreadTag::current()
    }

    /// Fires at `deadline` or later (never earlier: the relative time is taken before the
    /// kernel reads its clock), then every `repeat` if given, replacing any earlier arming.
    pub fn arm(&self, deadline: Instant, repeat: Option<Duration>) -> Result<(), KvmError> {
        // A zero it_value would disarm: fire after at least a nanosecond.
        let after = deadline.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1));
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos().into(),
        };
        let interval = ts(repeat.unwrap_or_default());
        self.settime(libc::itimerspec { it_interval: interval, it_value: ts(after) }, "timer_settime (arm)")
    }

    /// Stops the timer.
    pub fn disarm(&self) -> Result<(), KvmError> {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        self.settime(libc::itimerspec { it_interval: zero, it_value: zero }, "timer_settime (disarm)")
    }

    /// Whether the timer is armed (tests).
    #[cfg(test)]
    pub fn is_armed(&self) -> bool {
        // SAFETY: itimerspec is plain integers; all-zero is valid and timer_gettime fills it.
        let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: `self.timer` is a live timer id (deleted only in Drop); `cur` is writable.
        let ok = unsafe { libc::timer_gettime(self.timer, &mut cur) } == 0;
        ok && (cur.it_value.tv_sec != 0 || cur.it_value.tv_nsec != 0)
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::thread::JoinHandleExt;

    use super::*;

    #[test]
    fn a_kick_restarts_a_blocking_call_instead_of_failing_it() {
        install_kick_handler().unwrap();
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let t = std::thread::spawn(move || {
            unblock_signal(kick_signal()).unwrap();
            let mut b = [0u8; 1];
            reader.read(&mut b).map(|n| (n, b[0])).map_err(|e| e.kind())
        });
        // Let the thread block in read(2) (if it is not there yet, the kick interrupts nothing
        // and the test passes trivially: it cannot fail for timing reasons).
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: the thread is alive until joined below (it waits for the byte written after
        // this), and the kick handler is installed.
        assert_eq!(unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) }, 0);
        std::thread::sleep(Duration::from_millis(20));
        // (Fails with EPIPE when the read already failed and dropped its end: the join says.)
        let _ = writer.write_all(b"k");
        // Without SA_RESTART the read fails with EINTR (std's read does not retry).
        assert_eq!(t.join().unwrap(), Ok((1, b'k')));
    }
}
