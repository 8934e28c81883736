//! One QEMU TCG run of a guest: prepare firmware and memory, start QEMU, watch for the end of
//! the run, read the final state before QEMU goes away.
//!
//! Observing the end (QEMU's isa-debug-exit would kill QEMU and lose the state):
//! - port 0xF4 is an `isa-debugcon` whose bytes go to a file: the first byte is the debug-exit
//!   value. The guest convention is `out 0xF4, al; cli; hlt` (duet-fixtures' `exit_al`), so the
//!   vCPU halts right after, and the run is first read there. RIP is then moved back over
//!   `cli; hlt` (checked against the bytes in guest memory), which locates the instruction
//!   after the OUT exactly. Because RFLAGS.IF before that CLI is lost, the guest is run a
//!   second time, identically, with a gdbstub hardware breakpoint on that CLI: the state there
//!   is the exact state after the OUT, as KVM and the software CPU report it, and it replaces
//!   the first. (TCG with the PICs masked runs the same guest the same way twice; if the
//!   second run does not reach the breakpoint after the exit, the rewound first state is
//!   kept and a note says what is approximate.) A guest that keeps running after the OUT is
//!   stopped a little later and its state noted as later than the exit.
//! - HLT (any IF: the stub masks the PICs, so nothing can wake the vCPU, as in duet's machine)
//!   is seen by polling `info registers` (HLT=1) over QMP.
//! - a triple fault becomes a reset request, which `-action reboot=shutdown,shutdown=pause`
//!   turns into a pause in the `shutdown` run state, state intact.
//! - the deadline stops the vCPU with QMP `stop`.
//!
//! Then QMP `info registers` gives the registers and `pmemsave` the guest RAM, and the gdbstub
//! completes the state (64-bit GPRs, CR8, MSRs: see [`crate::gdb`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_core::layout::{ExceptionReport, EXCEPTION_REPORT_ADDR};
use duet_core::state::rflags;
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuMode, CpuState, CpuidProfile, Guest, GuestMemory, RunOutcome, StopReason};

use crate::gdb::Gdb;
use crate::process::{read_or_empty, TempDir};
use crate::qmp::{quote, Qmp};
use crate::session::{prepare, Prepared, Session};
use crate::{cpuid, regs, wide, QemuError};

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

/// Why the watch loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    let mut s = Session::start(guest, &cpu, &prepared)?;
    if wide::needs_window(&guest.state) {
        // The connection is closed again before the run: the vCPU stays stopped for `cont`.
        enter_wide(&mut s, guest, timeout)?;
    }
    s.qmp.execute("cont", None)?;
    let start = Instant::now();
    let end = watch(&mut s, start, timeout)?;
    if s.qmp.status()? == "running" {
        s.qmp.execute("stop", None)?;
    }
    let wall = start.elapsed();
    let (dump, mut memory) = s.dump(guest)?;
    let mut state = dump.state;
    let mut notes = Vec::new();
    let stop = match end {
        End::Exit => StopReason::DebugExit { value: s.exit_value() },
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
    let mut exact = None;
    if end == End::Exit {
        let cli = rewind_exit(&mut s.qmp, &s.dir, &mut state, dump.halted)
            .or_else(|why| cli_before_faulting_hlt(&mut s.qmp, &s.dir, guest, &memory).ok_or(why));
        match cli {
            Ok(cli) => match exact_exit(guest, &cpu, &prepared, cli, timeout) {
                Ok(e) => exact = Some(e),
                Err(e) => notes.push(format!(
                    "RIP moved back over the guest's `cli; hlt` after the debug-exit OUT; RFLAGS.IF is the value \
                     after that CLI (the exact second run failed: {e})"
                )),
            },
            Err(why) => notes.push(why),
        }
    }
    match exact {
        Some((exact_state, exact_memory)) => (state, memory) = (exact_state, exact_memory),
        None => {
            let extras = Gdb::connect(&s.dir.file("gdb.sock"))
                .and_then(|mut g| gdb_extras(&mut s.qmp, &mut g, &mut state, &stop));
            if let Err(e) = extras {
                notes.push(format!("not read through the gdbstub: {e}"));
            }
        }
    }
    let _ = s.qmp.execute("quit", None);
    let console = read_or_empty(&s.dir.file("console"));
    let post_code = read_or_empty(&s.dir.file("post")).last().copied();
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

/// Polls QEMU until the run ends (see the module docs).
fn watch(s: &mut Session, start: Instant, timeout: Duration) -> Result<End, QemuError> {
    let mut pause = Duration::from_micros(200);
    let mut since_exit: Option<u32> = None;
    loop {
        s.qemu.check_alive()?;
        if since_exit.is_none() && s.exited() {
            since_exit = Some(0);
        }
        // The exit file is checked again after the vCPU is seen stopped: the OUT may have
        // happened between the first check and the halt.
        if s.qmp.status()? == "shutdown" {
            return Ok(if s.exited() { End::Exit } else { End::Shutdown });
        }
        if regs::parse(&s.qmp.hmp("info registers")?)?.halted {
            return Ok(if s.exited() { End::Exit } else { End::Halt });
        }
        if let Some(n) = since_exit.as_mut() {
            *n += 1;
            if *n > EXIT_GRACE_POLLS {
                return Ok(End::Exit);
            }
        }
        if start.elapsed() >= timeout {
            return Ok(End::Deadline);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// The exact state at a debug exit: a second, identical run with a breakpoint on the
/// instruction after the OUT (linear address `cli`), which stops before the guest's CLI.
fn exact_exit(
    guest: &Guest,
    cpu: &str,
    prepared: &Prepared,
    cli: u64,
    timeout: Duration,
) -> Result<(CpuState, Arc<GuestMemory>), QemuError> {
    let mut s = Session::start(guest, cpu, prepared)?;
    let mut gdb = if wide::needs_window(&guest.state) {
        enter_wide(&mut s, guest, timeout)?
    } else {
        Gdb::connect(&s.dir.file("gdb.sock"))?
    };
    let stop = gdb.run_to(cli, timeout)?;
    if !s.exited() {
        return Err(QemuError::Unsupported(format!(
            "the breakpoint at {cli:#x} was reached before the debug exit ({stop})"
        )));
    }
    let (dump, memory) = s.dump(guest)?;
    let mut state = dump.state;
    let at = state.sregs.cs.base.wrapping_add(state.regs.rip);
    if at != cli {
        return Err(QemuError::Unsupported(format!("the second run stopped at {at:#x}, not at {cli:#x}")));
    }
    let stop = StopReason::DebugExit { value: s.exit_value() };
    gdb_extras(&mut s.qmp, &mut gdb, &mut state, &stop)?;
    Ok((state, memory))
}

/// Runs the entry stub to the guest's first instruction and gives the GPRs all 64 bits of the
/// start state there ([`wide`]: the stub's 32-bit code cannot); returns the gdb connection.
fn enter_wide(s: &mut Session, guest: &Guest, timeout: Duration) -> Result<Gdb, QemuError> {
    let st = &guest.state;
    let ip = if st.mode() == CpuMode::Real { st.regs.rip & 0xffff } else { st.regs.rip };
    let entry = st.sregs.cs.base.wrapping_add(ip);
    let mut gdb = Gdb::connect(&s.dir.file("gdb.sock"))?;
    gdb.run_to(entry, timeout)?;
    let now = regs::parse(&s.qmp.hmp("info registers")?)?.state;
    let at = now.sregs.cs.base.wrapping_add(now.regs.rip);
    if at != entry {
        return Err(QemuError::Unsupported(format!(
            "the entry stub stopped at {at:#x}, not at the guest's first instruction {entry:#x}"
        )));
    }
    wide::write_gprs(&mut gdb, &now, st)?;
    Ok(gdb)
}

/// Reads `len` bytes at linear address `addr` through the vCPU's translation (`memsave`).
fn read_linear(qmp: &mut Qmp, dir: &TempDir, addr: u64, len: u64) -> Result<Vec<u8>, QemuError> {
    let f = dir.file("linear.bin");
    let args =
        format!("{{\"val\": {addr}, \"size\": {len}, \"filename\": {}}}", quote(&f.display().to_string()));
    qmp.execute("memsave", Some(&args))?;
    Ok(read_or_empty(&f))
}

/// Moves RIP back over the `cli; hlt` that follows the debug-exit OUT, when the bytes say so,
/// and returns the linear address of that CLI; otherwise a note saying why not.
fn rewind_exit(qmp: &mut Qmp, dir: &TempDir, s: &mut CpuState, halted: bool) -> Result<u64, String> {
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
    if !(out_imm || out_dx) {
        return Err(format!(
            "the guest did not halt with `cli; hlt` right after its debug-exit OUT (code before RIP: {code:02x?}); \
             the state is from later"
        ));
    }
    s.regs.rip = s.regs.rip.wrapping_sub(2) & ip_mask;
    Ok(s.sregs.cs.base.wrapping_add(s.regs.rip))
}

/// Above ring 0 the convention's HLT after the debug-exit OUT raises #GP(0) (SDM Vol. 2A HLT),
/// which the guest's handler reports (duet's exception report) before it halts: the linear
/// address of the CLI before that HLT when the report and the code bytes say so (the second,
/// exact run then stops there). CS is taken to be the guest's starting one.
fn cli_before_faulting_hlt(qmp: &mut Qmp, dir: &TempDir, guest: &Guest, memory: &GuestMemory) -> Option<u64> {
    let mut b = [0u8; 24];
    memory.read_slice(&mut b, GuestAddress(EXCEPTION_REPORT_ADDR)).ok()?;
    let report = ExceptionReport::parse(&b)?;
    if report.vector != 13 || report.error_code != 0 {
        return None;
    }
    let hlt = guest.state.sregs.cs.base.wrapping_add(report.rip);
    let code = read_linear(qmp, dir, hlt.wrapping_sub(3), 4).ok()?;
    (code == [0xe6, 0xf4, 0xfa, 0xf4] || code.get(1..) == Some(&[0xee, 0xfa, 0xf4][..]))
        .then(|| hlt.wrapping_sub(1))
}

/// Completes `state` through the gdbstub: 64-bit GPRs in every mode, CR8, the tracked MSRs.
fn gdb_extras(
    qmp: &mut Qmp,
    gdb: &mut Gdb,
    state: &mut CpuState,
    stop: &StopReason,
) -> Result<(), QemuError> {
    let mut g = gdb.regs()?;
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
    // Outside 64-bit mode the gdbstub shows only the low halves of RAX–RSP: read them all.
    g.gprs = wide::read_gprs(gdb, state)?.gprs;
    let r = &mut state.regs;
    [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp] =
        [g.gprs[0], g.gprs[1], g.gprs[2], g.gprs[3], g.gprs[4], g.gprs[5], g.gprs[6], g.gprs[7]];
    [r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15] =
        [g.gprs[8], g.gprs[9], g.gprs[10], g.gprs[11], g.gprs[12], g.gprs[13], g.gprs[14], g.gprs[15]];
    state.sregs.cr8 = g.cr8;
    if *stop == StopReason::Shutdown {
        return Err(QemuError::Qmp {
            command: "gdbstub".into(),
            message: "MSRs are not read after a shutdown (the vCPU cannot be resumed to run the readback)"
                .into(),
        });
    }
    let msrs = gdb.read_msrs(state.sregs.idt, || qmp.execute("inject-nmi", None).map(|_| ()))?;
    state.msrs = msrs.into_iter().collect();
    Ok(())
}
