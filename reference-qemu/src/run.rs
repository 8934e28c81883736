//! One QEMU TCG run of a guest: prepare firmware and memory, start QEMU, watch for the end of
//! the run, read the final state before QEMU goes away.
//!
//! Observing the end (QEMU's isa-debug-exit would kill QEMU and lose the state):
//! - port 0xF4 is an `isa-debugcon` whose bytes go to a file: the first byte is the debug-exit
//!   value. The guest convention is `out 0xF4, al; cli; hlt`, so the vCPU halts right after;
//!   when it has, the state is read and RIP is moved back over `cli; hlt` (checked against the
//!   bytes in guest memory). RFLAGS.IF is then the value after the guest's CLI (0): what it was
//!   at the OUT cannot be recovered, and a note says so. A guest that keeps running after the
//!   OUT is stopped a little later and its state is noted as later than the exit.
//! - HLT (any IF: the stub masks the PICs, so nothing can wake the vCPU, as in duet's machine)
//!   is seen by polling `info registers` (HLT=1) over QMP.
//! - a triple fault becomes a reset request, which `-action reboot=shutdown,shutdown=pause`
//!   turns into a pause in the `shutdown` run state, state intact.
//! - the deadline stops the vCPU with QMP `stop`.
//!
//! Then QMP `info registers` gives the registers and `pmemsave` the guest RAM.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_core::layout::{ExceptionReport, EXCEPTION_REPORT_ADDR};
use duet_core::state::rflags;
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuMode, CpuState, CpuidProfile, Guest, GuestMemory, RunOutcome, StopReason};

use crate::gdb::Gdb;
use crate::process::{program, read_or_empty, Qemu, TempDir};
use crate::qmp::{quote, Qmp};
use crate::{cpuid, regs, stub, QemuError};

/// Time QEMU gets to open its monitor socket.
const STARTUP: Duration = Duration::from_secs(10);
/// Polls after a debug-exit byte before a guest that does not halt is stopped anyway.
const EXIT_GRACE_POLLS: u32 = 20;

/// Everything a QEMU run produced, in the shapes the other backends use.
#[derive(Clone, Debug)]
pub struct QemuRun {
    /// Terminal event and final state (backend "qemu", no instruction count, no exits).
    pub outcome: RunOutcome,
    /// Bytes written to the debug console (0xE9) and the UART (0x3F8), in order of arrival.
    pub console: Vec<u8>,
    /// The last byte written to port 0x80.
    pub post_code: Option<u8>,
    /// Guest RAM (and any extra region) at the end of the run.
    pub memory: Arc<GuestMemory>,
    /// Guest RAM size.
    pub ram_size: u64,
    /// How the final state was obtained where it is not exactly the architectural state at the
    /// terminal event (e.g. RFLAGS.IF after a debug exit).
    pub notes: Vec<String>,
}

impl QemuRun {
    /// Console output as text (lossy UTF-8).
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }
}

/// The firmware and the RAM images QEMU gets for `guest`.
struct Prepared {
    rom: Vec<u8>,
    memory: Arc<GuestMemory>,
    /// RAM ranges to load, as (address, length).
    ranges: Vec<(u64, u64)>,
}

fn prepare(guest: &Guest) -> Result<Prepared, QemuError> {
    let memory = guest.build_memory()?;
    // Like duet's machine, the exception report starts cleared.
    if guest.ram_size >= EXCEPTION_REPORT_ADDR + 4 {
        let _ = memory.write_slice(&[0u8; 4], GuestAddress(EXCEPTION_REPORT_ADDR));
    }
    let ram = guest.ram_size;
    let mut ranges: Vec<(u64, u64)> = guest
        .loads
        .iter()
        .filter(|l| l.addr < ram)
        .map(|l| (l.addr, (l.addr + l.bytes.len() as u64).min(ram)))
        .chain([(EXCEPTION_REPORT_ADDR, EXCEPTION_REPORT_ADDR + 4)].into_iter().filter(|r| r.1 <= ram))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let bios = guest.state == CpuState::reset() || guest.state.sregs.cs.base == 0xffff_0000;
    let rom = if bios {
        let [(base, size)] = guest.extra_regions[..] else {
            return Err(QemuError::Unsupported(
                "a RESET-state guest needs exactly one firmware region ending at 4 GiB (GuestBuilder::bios)"
                    .into(),
            ));
        };
        if base + size != 1 << 32 || size % 0x1_0000 != 0 {
            return Err(QemuError::Unsupported(format!(
                "firmware region {base:#x}+{size:#x} does not end at 4 GiB in 64 KiB units"
            )));
        }
        let mut rom = vec![0u8; size as usize];
        memory
            .read_slice(&mut rom, GuestAddress(base))
            .map_err(|e| QemuError::Unsupported(format!("firmware region: {e}")))?;
        rom
    } else {
        if let Some(&(b, s)) = guest.extra_regions.first() {
            return Err(QemuError::Unsupported(format!("extra memory region {b:#x}+{s:#x} outside RAM")));
        }
        let (lo, hi) = stub::RESET_WINDOW;
        if let Some(&(s, e)) = merged.iter().find(|&&(s, e)| s < hi && lo < e) {
            return Err(QemuError::Unsupported(format!(
                "bytes loaded at {s:#x}..{e:#x} overlap {lo:#x}..{hi:#x}, where QEMU's firmware window holds the entry stub's reset code"
            )));
        }
        stub::build(&guest.state, &memory)?
    };
    Ok(Prepared { rom, memory, ranges: merged.into_iter().map(|(s, e)| (s, e - s)).collect() })
}

/// The QEMU command line.
fn arguments(guest: &Guest, cpu: &str, dir: &TempDir, p: &Prepared) -> Result<Vec<String>, QemuError> {
    let path = |n: &str| dir.file(n).display().to_string();
    let mut a: Vec<String> = [
        "-machine",
        "isapc",
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-S",
        "-action",
        "reboot=shutdown,shutdown=pause",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-cpu".into(), cpu.into(), "-m".into(), format!("{}K", guest.ram_size.div_ceil(1024))]);
    a.extend(["-bios".into(), dir.write("firmware.bin", &p.rom)?.display().to_string()]);
    a.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", path("qmp.sock"))]);
    a.extend(["-chardev".into(), format!("file,id=con,path={},mux=on", path("console"))]);
    a.extend(["-serial".into(), "chardev:con".into()]);
    a.extend(["-device".into(), "isa-debugcon,iobase=0xe9,chardev=con".into()]);
    for (id, port) in [("exit", 0xf4), ("post", 0x80)] {
        a.extend(["-chardev".into(), format!("file,id={id},path={}", path(id))]);
        a.extend(["-device".into(), format!("isa-debugcon,iobase={port:#x},chardev={id}")]);
    }
    a.extend(["-chardev".into(), format!("socket,id=gdb,path={},server=on,wait=off", path("gdb.sock"))]);
    a.extend(["-gdb".into(), "chardev:gdb".into()]);
    let mut mem = vec![0u8; 0];
    for (i, &(addr, len)) in p.ranges.iter().enumerate() {
        mem.resize(len as usize, 0);
        p.memory
            .read_slice(&mut mem, GuestAddress(addr))
            .map_err(|e| QemuError::Unsupported(format!("RAM at {addr:#x}: {e}")))?;
        let f = dir.write(&format!("ram{i}.bin"), &mem)?;
        a.extend(["-device".into(), format!("loader,file={},addr={addr:#x},force-raw=on", f.display())]);
    }
    Ok(a)
}

/// Connects to QMP, waiting for QEMU to create the socket.
fn connect(qemu: &mut Qemu, sock: &Path) -> Result<Qmp, QemuError> {
    let start = Instant::now();
    loop {
        qemu.check_alive()?;
        if let Ok(s) = UnixStream::connect(sock) {
            return Qmp::new(s, STARTUP);
        }
        if start.elapsed() > STARTUP {
            return Err(QemuError::Startup { ms: start.elapsed().as_millis(), stderr: qemu.stderr() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Why the watch loop ended.
enum End {
    Exit,
    Shutdown,
    Halt,
    Deadline,
}

/// Runs `guest` under QEMU TCG with `cpuid` until it ends or `timeout` passes.
pub fn run(guest: &Guest, cpuid_profile: &CpuidProfile, timeout: Duration) -> Result<QemuRun, QemuError> {
    let cpu = cpuid::cpu_option(cpuid_profile)?;
    let prepared = prepare(guest)?;
    let dir = TempDir::new()?;
    let args = arguments(guest, &cpu, &dir, &prepared)?;
    let mut qemu = Qemu::spawn(&program(), &args, dir.file("stderr"))?;
    let mut qmp = connect(&mut qemu, &dir.file("qmp.sock"))?;
    let exit_file = dir.file("exit");
    qmp.execute("cont", None)?;
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    let mut since_exit: Option<u32> = None;
    let exited = || std::fs::metadata(&exit_file).is_ok_and(|m| m.len() > 0);
    let end = loop {
        qemu.check_alive()?;
        if since_exit.is_none() && exited() {
            since_exit = Some(0);
        }
        // The exit file is checked again after the vCPU is seen stopped: the OUT may have
        // happened between the first check and the halt.
        if qmp.status()? == "shutdown" {
            break if exited() { End::Exit } else { End::Shutdown };
        }
        if regs::parse(&qmp.hmp("info registers")?)?.halted {
            break if exited() { End::Exit } else { End::Halt };
        }
        if let Some(n) = since_exit.as_mut() {
            *n += 1;
            if *n > EXIT_GRACE_POLLS {
                break End::Exit;
            }
        }
        if start.elapsed() >= timeout {
            break End::Deadline;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    };
    if qmp.status()? == "running" {
        qmp.execute("stop", None)?;
    }
    let wall = start.elapsed();
    let dump = regs::parse(&qmp.hmp("info registers")?)?;
    let memory = dump_memory(&mut qmp, guest, &dir)?;
    let mut state = dump.state;
    state.sregs.apic_base = guest.state.sregs.apic_base;
    busy_tr(&mut state);
    let mut notes = Vec::new();
    let stop = match end {
        End::Exit => {
            let value = read_or_empty(&exit_file).first().map_or(0, |&b| u32::from(b));
            rewind_exit(&mut qmp, &dir, &mut state, dump.halted, &mut notes)?;
            StopReason::DebugExit { value }
        }
        End::Shutdown => StopReason::Shutdown,
        End::Deadline => StopReason::Deadline,
        End::Halt => {
            let mut b = [0u8; 24];
            let report = memory
                .read_slice(&mut b, GuestAddress(EXCEPTION_REPORT_ADDR))
                .ok()
                .and_then(|_| ExceptionReport::parse(&b));
            report.map_or(StopReason::Halted, StopReason::Exception)
        }
    };
    if let Err(e) = gdb_extras(&mut qmp, &dir, &mut state, &stop) {
        notes.push(format!("not read through the gdbstub: {e}"));
    }
    let _ = qmp.execute("quit", None);
    let console = read_or_empty(&dir.file("console"));
    let post_code = read_or_empty(&dir.file("post")).last().copied();
    Ok(QemuRun {
        outcome: RunOutcome {
            backend: "qemu",
            stop,
            state,
            exits: 0,
            instructions: None,
            wall,
            undefined_rflags: 0,
        },
        console,
        post_code,
        memory,
        ram_size: guest.ram_size,
        notes,
    })
}

/// Saves RAM and extra regions with `pmemsave` and builds a [`GuestMemory`] from them.
fn dump_memory(qmp: &mut Qmp, guest: &Guest, dir: &TempDir) -> Result<Arc<GuestMemory>, QemuError> {
    let regions = guest.regions()?;
    let ranges: Vec<(GuestAddress, usize)> =
        regions.iter().map(|&(b, s)| (GuestAddress(b), s as usize)).collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| duet_core::GuestError::Alloc(e.to_string()))?;
    for (i, &(base, size)) in regions.iter().enumerate() {
        let f = dir.file(&format!("dump{i}.bin"));
        let args = format!(
            "{{\"val\": {base}, \"size\": {size}, \"filename\": {}}}",
            quote(&f.display().to_string())
        );
        qmp.execute("pmemsave", Some(&args))?;
        let bytes = read_or_empty(&f);
        if bytes.len() as u64 != size {
            return Err(QemuError::Qmp {
                command: "pmemsave".into(),
                message: format!("{} bytes saved of {size:#x} at {base:#x}", bytes.len()),
            });
        }
        mem.write_slice(&bytes, GuestAddress(base))
            .map_err(|e| duet_core::GuestError::Alloc(e.to_string()))?;
    }
    Ok(Arc::new(mem))
}

/// Reads `len` bytes at linear address `addr` through the vCPU's translation (`memsave`).
fn read_linear(qmp: &mut Qmp, dir: &TempDir, addr: u64, len: u64) -> Result<Vec<u8>, QemuError> {
    let f = dir.file("linear.bin");
    let args =
        format!("{{\"val\": {addr}, \"size\": {len}, \"filename\": {}}}", quote(&f.display().to_string()));
    qmp.execute("memsave", Some(&args))?;
    Ok(read_or_empty(&f))
}

/// Moves RIP back over the `cli; hlt` that follows the debug-exit OUT, when the bytes say so.
fn rewind_exit(
    qmp: &mut Qmp,
    dir: &TempDir,
    s: &mut CpuState,
    halted: bool,
    notes: &mut Vec<String>,
) -> Result<(), QemuError> {
    let ip_mask = match s.mode() {
        CpuMode::Long64 => u64::MAX,
        CpuMode::Real | CpuMode::Protected16 | CpuMode::Virtual8086 => 0xffff,
        _ => 0xffff_ffff,
    };
    let out_at = s.regs.rip.wrapping_sub(4) & ip_mask;
    let lin = s.sregs.cs.base.wrapping_add(out_at);
    let code = if halted && s.regs.rflags & rflags::IF == 0 {
        read_linear(qmp, dir, lin, 4).unwrap_or_default()
    } else {
        Vec::new()
    };
    let out_imm = code == [0xe6, 0xf4, 0xfa, 0xf4];
    let out_dx = code.get(1..) == Some(&[0xee, 0xfa, 0xf4][..]) && s.regs.rdx & 0xffff == 0xf4;
    if out_imm || out_dx {
        s.regs.rip = s.regs.rip.wrapping_sub(2) & ip_mask;
        notes.push("RIP moved back over the guest's `cli; hlt` after the debug-exit OUT; RFLAGS.IF is the value after that CLI".into());
    } else {
        notes.push(format!(
            "the guest did not halt with `cli; hlt` right after its debug-exit OUT (code before RIP: {code:02x?}); the state is from later"
        ));
    }
    Ok(())
}

/// QEMU's LTR caches the TSS type it read (available, 1 or 9) and sets the busy bit only in
/// memory; hardware holds a busy type in TR once loaded (a TR with an available type cannot
/// exist: VMX guest-state checks require type 3 or 11, SDM Vol. 3C §28.3.1.2). The SDM wins,
/// so a present, loaded TR is reported busy.
fn busy_tr(s: &mut CpuState) {
    let tr = &mut s.sregs.tr;
    if tr.present && !tr.s && (tr.type_ == 1 || tr.type_ == 9) && tr.selector & !7 != 0 {
        tr.type_ |= 2;
    }
}

/// Completes `state` through the gdbstub: 64-bit GPRs in every mode, CR8, the tracked MSRs.
fn gdb_extras(
    qmp: &mut Qmp,
    dir: &TempDir,
    state: &mut CpuState,
    stop: &StopReason,
) -> Result<(), QemuError> {
    let mut gdb = Gdb::connect(&dir.file("gdb.sock"))?;
    let g = gdb.regs()?;
    let s = &state.sregs;
    if (g.cr0, g.cr3, g.efer) != (s.cr0, s.cr3, s.efer) {
        return Err(QemuError::Qmp {
            command: "gdbstub".into(),
            message: format!(
                "its CR0/CR3/EFER {:#x}/{:#x}/{:#x} disagree with info registers",
                g.cr0, g.cr3, g.efer
            ),
        });
    }
    let r = &mut state.regs;
    [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp] =
        [g.gprs[0], g.gprs[1], g.gprs[2], g.gprs[3], g.gprs[4], g.gprs[5], g.gprs[6], g.gprs[7]];
    [r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15] =
        [g.gprs[8], g.gprs[9], g.gprs[10], g.gprs[11], g.gprs[12], g.gprs[13], g.gprs[14], g.gprs[15]];
    state.sregs.cr8 = g.cr8;
    if *stop == StopReason::Shutdown {
        return Err(QemuError::Unsupported(
            "MSRs after a shutdown (the vCPU cannot be resumed to read them)".into(),
        ));
    }
    let msrs = gdb.read_msrs(|| qmp.execute("inject-nmi", None).map(|_| ()))?;
    state.msrs = msrs.into_iter().collect();
    Ok(())
}
