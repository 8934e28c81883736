//! QEMU's gdbstub, used after a run for what QMP does not show: full 64-bit GPRs in every
//! mode, CR8, and the tracked MSRs (read back by a small real-mode RDMSR snippet).
//!
//! The readback runs after the final registers and RAM have been saved, so what it changes in
//! QEMU (mode, CS, RIP, low RAM) is never reported: it switches the paused vCPU to real mode
//! (EFER = 0, CR0 = ET, CS = SS = 0), writes the snippet at [`SNIPPET_AT`] and IVT entry 2,
//! sets RIP to the snippet, injects an NMI (which also wakes a halted vCPU) and continues to a
//! breakpoint on the snippet's final HLT; the MSR values are then read from [`RESULTS_AT`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use duet_core::state::TRACKED_MSRS;
use iced_x86::code_asm::*;

use crate::QemuError;

/// Where the readback snippet is written (real mode, CS = 0).
pub const SNIPPET_AT: u64 = 0x100;
/// Where it stores EDX:EAX of each tracked MSR.
pub const RESULTS_AT: u64 = 0x400;
/// Its stack top (for the NMI frame).
const STACK_AT: u64 = 0x1000;

/// Registers from the `g` packet of QEMU's x86-64 target description.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GdbRegs {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8–R15 (gdb order).
    pub gprs: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR8.
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
}

fn err(message: impl Into<String>) -> QemuError {
    QemuError::Qmp { command: "gdbstub".into(), message: message.into() }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len() / 2).map(|i| s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

fn le(bytes: &[u8], off: usize, len: usize) -> Option<u64> {
    let mut b = [0u8; 8];
    b[..len].copy_from_slice(bytes.get(off..off + len)?);
    Some(u64::from_le_bytes(b))
}

/// Parses the `g` reply: 16 GPRs, RIP, EFLAGS (4), six selectors (4 each), FS/GS/KERNEL_GS
/// bases, CR0, CR2, CR3, CR4, CR8, EFER (8 each), then FPU state (ignored).
pub fn parse_g(reply: &str) -> Option<GdbRegs> {
    let b = hex_bytes(reply)?;
    let mut gprs = [0u64; 16];
    for (i, g) in gprs.iter_mut().enumerate() {
        *g = le(&b, 8 * i, 8)?;
    }
    let ctl = 128 + 8 + 4 + 24 + 24;
    Some(GdbRegs {
        gprs,
        rip: le(&b, 128, 8)?,
        cr0: le(&b, ctl, 8)?,
        cr3: le(&b, ctl + 16, 8)?,
        cr8: le(&b, ctl + 32, 8)?,
        efer: le(&b, ctl + 40, 8)?,
    })
}

/// A gdb remote-protocol connection (acknowledged mode).
pub struct Gdb {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl Gdb {
    /// Connects and asks for the target description (QEMU enables `p`/`P` only after that).
    pub fn connect(path: &std::path::Path) -> Result<Self, QemuError> {
        let stream = UnixStream::connect(path).map_err(|e| err(format!("connecting: {e}")))?;
        stream.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| err(e.to_string()))?;
        let mut g = Gdb { stream, pending: Vec::new() };
        g.request("qXfer:features:read:target.xml:0,ffb", Duration::from_secs(2))?;
        Ok(g)
    }

    fn send(&mut self, data: &str) -> Result<(), QemuError> {
        let sum = data.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        self.stream
            .write_all(format!("${data}#{sum:02x}").as_bytes())
            .map_err(|e| err(format!("sending {data:.20}: {e}")))
    }

    /// Waits up to `limit` for the next packet and acknowledges it.
    fn receive(&mut self, limit: Duration) -> Result<String, QemuError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(start) = self.pending.iter().position(|&c| c == b'$') {
                if let Some(hash) = self.pending[start..].iter().position(|&c| c == b'#').map(|h| h + start) {
                    if self.pending.len() >= hash + 3 {
                        let body = String::from_utf8_lossy(&self.pending[start + 1..hash]).into_owned();
                        self.pending.drain(..hash + 3);
                        self.stream.write_all(b"+").map_err(|e| err(e.to_string()))?;
                        return Ok(body);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(err(format!("no answer within {} ms", limit.as_millis())));
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(err("QEMU closed the gdb socket")),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(err(e.to_string())),
            }
        }
    }

    /// Sends a packet and returns the reply.
    pub fn request(&mut self, data: &str, limit: Duration) -> Result<String, QemuError> {
        self.send(data)?;
        self.receive(limit)
    }

    fn ok(&mut self, data: &str) -> Result<(), QemuError> {
        match self.request(data, Duration::from_secs(2))?.as_str() {
            "OK" => Ok(()),
            other => Err(err(format!("{data:.24} answered {other:?}"))),
        }
    }

    /// Continues the vCPU until it reaches linear address `linear` (a hardware breakpoint) and
    /// returns the stop reply; errors when that takes longer than `limit`.
    pub fn run_to(&mut self, linear: u64, limit: Duration) -> Result<String, QemuError> {
        self.ok(&format!("Z1,{linear:x},1"))?;
        self.send("c")?;
        let stop = self.receive(limit)?;
        self.ok(&format!("z1,{linear:x},1"))?;
        Ok(stop)
    }

    /// The registers of the `g` packet.
    pub fn regs(&mut self) -> Result<GdbRegs, QemuError> {
        let reply = self.request("g", Duration::from_secs(2))?;
        parse_g(&reply).ok_or_else(|| err(format!("cannot parse the g reply ({} characters)", reply.len())))
    }

    /// Writes register `n` (gdb numbering) with `bytes` little-endian bytes of `value`.
    fn set(&mut self, n: u32, value: u64, bytes: usize) -> Result<(), QemuError> {
        let hex: String = value.to_le_bytes()[..bytes].iter().map(|b| format!("{b:02x}")).collect();
        self.ok(&format!("P{n:x}={hex}"))
    }

    fn write_mem(&mut self, addr: u64, bytes: &[u8]) -> Result<(), QemuError> {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.ok(&format!("M{addr:x},{:x}:{hex}", bytes.len()))
    }

    fn read_mem(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, QemuError> {
        let r = self.request(&format!("m{addr:x},{len:x}"), Duration::from_secs(2))?;
        hex_bytes(&r).filter(|b| b.len() == len).ok_or_else(|| err(format!("m{addr:x} answered {r:?}")))
    }

    /// Reads every tracked MSR with the real-mode snippet; `nmi` injects the NMI (over QMP)
    /// that wakes the vCPU into it. Destroys the vCPU state and low RAM (already saved).
    pub fn read_msrs(
        &mut self,
        nmi: impl FnOnce() -> Result<(), QemuError>,
    ) -> Result<Vec<(u32, u64)>, QemuError> {
        let (snippet, hlt_at) = snippet()?;
        // EFER, CR0 (real mode), then CS and SS reloaded in real mode (base 0, CPL 0).
        self.set(32, 0, 8)?;
        self.set(27, 0x10, 8)?;
        for reg in [18, 19] {
            self.set(reg, 8, 4)?;
            self.set(reg, 0, 4)?;
        }
        self.write_mem(SNIPPET_AT, &snippet)?;
        self.write_mem(8, &(SNIPPET_AT as u32).to_le_bytes())?;
        self.set(16, SNIPPET_AT, 8)?;
        self.set(17, 2, 4)?;
        self.set(7, STACK_AT, 8)?;
        self.ok(&format!("Z0,{hlt_at:x},1"))?;
        nmi()?;
        self.send("c")?;
        let stop = self.receive(Duration::from_secs(2))?;
        if !stop.starts_with('T') && !stop.starts_with('S') {
            return Err(err(format!("continue answered {stop:?}")));
        }
        let rip = self.regs()?.rip;
        if rip != hlt_at {
            return Err(err(format!("the MSR snippet stopped at {rip:#x}, not at its HLT {hlt_at:#x}")));
        }
        let raw = self.read_mem(RESULTS_AT, 8 * TRACKED_MSRS.len())?;
        Ok(TRACKED_MSRS.iter().zip(raw.chunks(8)).map(|(&i, c)| (i, le(c, 0, 8).unwrap_or(0))).collect())
    }
}

/// The real-mode snippet (RDMSR of each tracked MSR into `RESULTS_AT`, then HLT) and the
/// address of its HLT.
fn snippet() -> Result<(Vec<u8>, u64), QemuError> {
    let mut a = CodeAssembler::new(16)?;
    for (i, &index) in TRACKED_MSRS.iter().enumerate() {
        let at = RESULTS_AT + 8 * i as u64;
        a.mov(ecx, index)?;
        a.rdmsr()?;
        a.mov(dword_ptr(at).cs(), eax)?;
        a.mov(dword_ptr(at + 4).cs(), edx)?;
    }
    a.hlt()?;
    let code = a.assemble(SNIPPET_AT)?;
    // HLT is one byte, the last one.
    let hlt_at = SNIPPET_AT + code.len() as u64 - 1;
    Ok((code, hlt_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g_reply_layout_puts_control_registers_after_the_segment_bases() {
        // 16 GPRs (RAX = 0x12345678), RIP 0xfff8, EFLAGS 2, CS 0xf000, then zeros, CR0 0x60000010.
        let mut b = vec![0u8; 128 + 8 + 4 + 24 + 24 + 48];
        b[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        b[128..130].copy_from_slice(&0xfff8u16.to_le_bytes());
        b[136] = 2;
        b[141] = 0xf0;
        b[188..192].copy_from_slice(&0x6000_0010u32.to_le_bytes());
        b[220] = 0xf;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let r = parse_g(&hex).unwrap();
        assert_eq!((r.gprs[0], r.rip, r.cr0, r.cr8), (0x1234_5678, 0xfff8, 0x6000_0010, 0xf));
        let (code, hlt) = snippet().unwrap();
        assert_eq!(code.get((hlt - SNIPPET_AT) as usize), Some(&0xf4));
    }
}
