//! One QEMU process for a guest: firmware and RAM images, the command line, QMP, and reading
//! the state of the paused vCPU.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_core::layout::EXCEPTION_REPORT_ADDR;
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuState, Guest, GuestMemory};

use crate::process::{program, read_or_empty, Qemu, TempDir};
use crate::qmp::{quote, Qmp};
use crate::{regs, stub, QemuError};

/// Time QEMU gets to open its monitor socket.
const STARTUP: Duration = Duration::from_secs(10);

/// The firmware and the RAM images QEMU gets for `guest`.
pub(crate) struct Prepared {
    rom: Vec<u8>,
    memory: Arc<GuestMemory>,
    /// RAM ranges to load, as (address, length).
    ranges: Vec<(u64, u64)>,
}

pub(crate) fn prepare(guest: &Guest) -> Result<Prepared, QemuError> {
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

/// When QEMU quit during startup (e.g. `enforce` refusing a feature), its exit and stderr
/// explain more than the broken socket; otherwise `e` stands.
fn exited_instead(qemu: &mut Qemu, e: QemuError) -> QemuError {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Err(exited) = qemu.check_alive() {
            return exited;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    e
}

/// Connects to QMP, waiting for QEMU to create the socket.
fn connect(qemu: &mut Qemu, sock: &Path) -> Result<Qmp, QemuError> {
    let start = Instant::now();
    loop {
        qemu.check_alive()?;
        if let Ok(s) = UnixStream::connect(sock) {
            return Qmp::new(s, STARTUP).map_err(|e| exited_instead(qemu, e));
        }
        if start.elapsed() > STARTUP {
            return Err(QemuError::Startup { ms: start.elapsed().as_millis(), stderr: qemu.stderr() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
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

/// QEMU's LTR caches the TSS type it read (available, 1 or 9) and sets the busy bit only in
/// memory; hardware holds a busy type in TR once loaded (a TR with an available type cannot
/// exist: VMX guest-state checks require type 3 or 11, SDM Vol. 3C §28.3.1.2). The SDM wins,
/// so a present, loaded TR is reported busy.
pub(crate) fn busy_tr(s: &mut CpuState) {
    let tr = &mut s.sregs.tr;
    if tr.present && !tr.s && (tr.type_ == 1 || tr.type_ == 9) && tr.selector & !7 != 0 {
        tr.type_ |= 2;
    }
}

/// A QEMU started with the vCPU stopped (`-S`), its scratch directory and its QMP connection.
pub(crate) struct Session {
    /// Scratch directory: firmware, RAM images, console/exit/POST files, sockets.
    pub dir: TempDir,
    /// The process (killed on drop).
    pub qemu: Qemu,
    /// Its monitor.
    pub qmp: Qmp,
}

impl Session {
    /// Starts QEMU for `guest` with `-cpu cpu`; the vCPU waits for `cont` (or gdb's `c`).
    pub fn start(guest: &Guest, cpu: &str, prepared: &Prepared) -> Result<Self, QemuError> {
        let dir = TempDir::new()?;
        let args = arguments(guest, cpu, &dir, prepared)?;
        let mut qemu = Qemu::spawn(&program(), &args, dir.file("stderr"))?;
        let qmp = connect(&mut qemu, &dir.file("qmp.sock"))?;
        Ok(Session { dir, qemu, qmp })
    }

    /// Whether the guest has written to the debug-exit port.
    pub fn exited(&self) -> bool {
        std::fs::metadata(self.dir.file("exit")).is_ok_and(|m| m.len() > 0)
    }

    /// The debug-exit value: the first byte written to port 0xF4.
    pub fn exit_value(&self) -> u32 {
        read_or_empty(&self.dir.file("exit")).first().map_or(0, |&b| u32::from(b))
    }

    /// Registers (TR reported busy, APIC base from the start state) and memory of the
    /// stopped vCPU.
    pub fn dump(&mut self, guest: &Guest) -> Result<(regs::Dump, Arc<GuestMemory>), QemuError> {
        let mut dump = regs::parse(&self.qmp.hmp("info registers")?)?;
        dump.state.sregs.apic_base = guest.state.sregs.apic_base;
        busy_tr(&mut dump.state);
        let memory = dump_memory(&mut self.qmp, guest, &self.dir)?;
        Ok((dump, memory))
    }
}
