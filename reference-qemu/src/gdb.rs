//! QEMU's gdbstub, used after a run for what QMP does not show: full 64-bit GPRs in every
//! mode, CR8, and the tracked MSRs (read back by a small real-mode RDMSR snippet).
//!
//! The readback runs after the final registers and RAM have been saved, so what it changes in
//! QEMU (mode, CS, RIP, low RAM) is never reported: it switches the paused vCPU to real mode
//! (EFER = 0, CR0 = ET, CS = SS = 0), writes the snippet at [`SNIPPET_AT`] and IVT entry 2 (at
//! the IDTR's base),
//! sets RIP to the snippet, injects an NMI (which also wakes a halted vCPU) and continues to a
//! breakpoint on the snippet's final HLT; the MSR values are then read from [`RESULTS_AT`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use duet_core::state::TRACKED_MSRS;
use duet_core::DescriptorTable;

use crate::QemuError;

mod packet;
pub use packet::{checksum, decode, next_incoming, parse_g, GdbRegs, Incoming};
use packet::{hex_bytes, le};

/// Where the readback snippet is written (real mode, CS = 0).
pub const SNIPPET_AT: u64 = 0x100;
/// Where it stores EDX:EAX of each tracked MSR.
pub const RESULTS_AT: u64 = 0x400;
/// Its stack top (for the NMI frame).
const STACK_AT: u64 = 0x1000;

fn err(message: impl Into<String>) -> QemuError {
    QemuError::Qmp { command: "gdbstub".into(), message: message.into() }
}

/// Packets in a row with a bad checksum (or retransmit requests for ours) before giving up.
pub const MAX_RETRIES: u32 = 3;
/// The most bytes an unfinished packet may hold (a `g` reply is about 1 KiB).
const MAX_PACKET: usize = 1 << 20;
/// How long a stop takes to be reported after an interrupt (`0x03`).
const INTERRUPT_LIMIT: Duration = Duration::from_secs(2);

/// A gdb remote-protocol connection (acknowledged mode).
pub struct Gdb {
    stream: UnixStream,
    pending: Vec<u8>,
    /// The last packet sent, for a retransmit the stub asks for.
    last_sent: Vec<u8>,
    /// Whether the vCPU was continued and its stop not yet reported.
    running: bool,
}

/// A breakpoint set in the stub: [`Breakpoint::remove`] removes it; dropped without that (an
/// error or a timeout on the way), it is removed anyway, after stopping the vCPU if needed.
struct Breakpoint<'a> {
    gdb: &'a mut Gdb,
    /// `0` (software) or `1` (hardware).
    kind: u8,
    addr: u64,
    set: bool,
}

impl Breakpoint<'_> {
    fn remove(mut self) -> Result<(), QemuError> {
        self.set = false;
        self.gdb.stop()?;
        self.gdb.ok(&format!("z{},{:x},1", self.kind, self.addr))
    }
}

impl Drop for Breakpoint<'_> {
    fn drop(&mut self) {
        if self.set {
            // Best effort on a path that is already failing: its first error is the one reported.
            let _ = self.gdb.stop();
            let _ = self.gdb.ok(&format!("z{},{:x},1", self.kind, self.addr));
        }
    }
}

impl Gdb {
    /// Connects and asks for the target description (QEMU enables `p`/`P` only after that).
    pub fn connect(path: &std::path::Path) -> Result<Self, QemuError> {
        let stream = UnixStream::connect(path).map_err(|e| err(format!("connecting: {e}")))?;
        let mut g = Gdb::over(stream)?;
        g.request("qXfer:features:read:target.xml:0,ffb", Duration::from_secs(2))?;
        Ok(g)
    }

    /// A connection over `stream`, with nothing sent yet.
    fn over(stream: UnixStream) -> Result<Self, QemuError> {
        stream.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| err(e.to_string()))?;
        Ok(Gdb { stream, pending: Vec::new(), last_sent: Vec::new(), running: false })
    }

    fn send(&mut self, data: &str) -> Result<(), QemuError> {
        if data.contains(['$', '#']) {
            return Err(err(format!("packet {data:.24} would need escapes")));
        }
        self.last_sent = format!("${data}#{:02x}", checksum(data.as_bytes())).into_bytes();
        self.stream.write_all(&self.last_sent).map_err(|e| err(format!("sending {data:.20}: {e}")))?;
        if data == "c" {
            self.running = true;
        }
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), QemuError> {
        self.stream.write_all(bytes).map_err(|e| err(format!("sending {bytes:?}: {e}")))
    }

    /// Waits up to `limit` for the next packet with a good checksum and acknowledges it; a bad
    /// one is refused (`-`) so the stub sends it again, up to [`MAX_RETRIES`] times.
    fn receive(&mut self, limit: Duration) -> Result<String, QemuError> {
        let deadline = Instant::now() + limit;
        let (mut bad, mut naks) = (0u32, 0u32);
        loop {
            while let Some(incoming) = next_incoming(&mut self.pending) {
                match incoming {
                    Incoming::Ack => {}
                    Incoming::Nak => {
                        naks += 1;
                        if naks > MAX_RETRIES {
                            return Err(err(format!("the stub refused our packet {naks} times")));
                        }
                        let again = self.last_sent.clone();
                        self.write_raw(&again)?;
                    }
                    Incoming::BadChecksum { got, computed } => {
                        bad += 1;
                        let got = got.map_or("not hex".into(), |g| format!("{g:#04x}"));
                        if bad >= MAX_RETRIES {
                            return Err(err(format!(
                                "{bad} packets in a row with a bad checksum (the last: sent {got}, computed {computed:#04x})"
                            )));
                        }
                        self.write_raw(b"-")?;
                    }
                    Incoming::Packet(raw) => {
                        self.write_raw(b"+")?;
                        let data = decode(&raw).map_err(|e| err(format!("malformed packet: {e}")))?;
                        let reply = String::from_utf8_lossy(&data).into_owned();
                        if reply.starts_with(['S', 'T', 'W', 'X']) {
                            self.running = false;
                        }
                        return Ok(reply);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(err(format!("no answer within {} ms", limit.as_millis())));
            }
            if self.pending.len() > MAX_PACKET {
                return Err(err(format!("a packet of more than {MAX_PACKET} bytes, unfinished")));
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

    /// Stops the vCPU if it was continued and has not stopped yet (interrupt, then its stop reply).
    fn stop(&mut self) -> Result<(), QemuError> {
        if self.running {
            self.write_raw(&[0x03])?;
            let reply = self.receive(INTERRUPT_LIMIT)?;
            if self.running {
                return Err(err(format!("the interrupt was answered {reply:?}, not a stop")));
            }
        }
        Ok(())
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

    /// Sets a breakpoint of `kind` (0 software, 1 hardware) at `addr`, removed again on every
    /// path out.
    fn breakpoint(&mut self, kind: u8, addr: u64) -> Result<Breakpoint<'_>, QemuError> {
        self.ok(&format!("Z{kind},{addr:x},1"))?;
        Ok(Breakpoint { gdb: self, kind, addr, set: true })
    }

    /// Continues the vCPU until it reaches linear address `linear` (a hardware breakpoint) and
    /// returns the stop reply; errors when that takes longer than `limit`. The breakpoint is
    /// gone afterwards either way.
    pub fn run_to(&mut self, linear: u64, limit: Duration) -> Result<String, QemuError> {
        let bp = self.breakpoint(1, linear)?;
        bp.gdb.send("c")?;
        let stop = bp.gdb.receive(limit)?;
        bp.remove()?;
        Ok(stop)
    }

    /// The registers of the `g` packet.
    pub fn regs(&mut self) -> Result<GdbRegs, QemuError> {
        let reply = self.request("g", Duration::from_secs(2))?;
        parse_g(&reply).ok_or_else(|| err(format!("cannot parse the g reply ({} characters)", reply.len())))
    }

    /// Writes register `n` (gdb numbering) with `bytes` little-endian bytes of `value`.
    pub(crate) fn set(&mut self, n: u32, value: u64, bytes: usize) -> Result<(), QemuError> {
        let hex: String = value.to_le_bytes()[..bytes].iter().map(|b| format!("{b:02x}")).collect();
        self.ok(&format!("P{n:x}={hex}"))
    }

    /// Writes `bytes` at `addr` (a linear address, translated as the vCPU would).
    pub(crate) fn write_mem(&mut self, addr: u64, bytes: &[u8]) -> Result<(), QemuError> {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.ok(&format!("M{addr:x},{:x}:{hex}", bytes.len()))
    }

    /// Reads `len` bytes at `addr` (a linear address, translated as the vCPU would).
    pub(crate) fn read_mem(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, QemuError> {
        let r = self.request(&format!("m{addr:x},{len:x}"), Duration::from_secs(2))?;
        hex_bytes(&r).filter(|b| b.len() == len).ok_or_else(|| err(format!("m{addr:x} answered {r:?}")))
    }

    /// Reads every tracked MSR with the real-mode snippet; `nmi` injects the NMI (over QMP)
    /// that wakes the vCPU into it. Destroys the vCPU state and low RAM (already saved).
    ///
    /// `idt` is the vCPU's IDTR, which the gdbstub cannot change: in real mode it is the IVT, so
    /// the NMI's vector is written at its base + 8 (SDM Vol. 3A §21.1.4).
    pub fn read_msrs(
        &mut self,
        idt: DescriptorTable,
        nmi: impl FnOnce() -> Result<(), QemuError>,
    ) -> Result<Vec<(u32, u64)>, QemuError> {
        if idt.limit < 11 {
            return Err(err(format!(
                "the IDTR limit {:#x} leaves no real-mode vector 2 for the NMI",
                idt.limit
            )));
        }
        let (snippet, hlt_at) = snippet()?;
        // EFER, CR0 (real mode), then CS and SS reloaded in real mode (base 0, CPL 0).
        self.set(32, 0, 8)?;
        self.set(27, 0x10, 8)?;
        for reg in [18, 19] {
            self.set(reg, 8, 4)?;
            self.set(reg, 0, 4)?;
        }
        self.write_mem(SNIPPET_AT, &snippet)?;
        self.write_mem(idt.base.wrapping_add(8), &(SNIPPET_AT as u32).to_le_bytes())?;
        self.set(16, SNIPPET_AT, 8)?;
        self.set(17, 2, 4)?;
        self.set(7, STACK_AT, 8)?;
        let bp = self.breakpoint(0, hlt_at)?;
        nmi()?;
        bp.gdb.send("c")?;
        let stop = bp.gdb.receive(Duration::from_secs(2))?;
        if !stop.starts_with('T') && !stop.starts_with('S') {
            return Err(err(format!("continue answered {stop:?}")));
        }
        bp.remove()?;
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
    use iced_x86::code_asm::*;

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
    use std::thread::JoinHandle;

    use super::*;

    /// What the client sent next: a whole `$…#xx` packet, or one byte (`+`, `-`, 0x03).
    fn heard(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8];
        while s.read(&mut b).unwrap_or(0) == 1 {
            out.push(b[0]);
            let n = out.len();
            if out[0] != b'$' || (n >= 4 && out[n - 3] == b'#') {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A fake stub: for each (expected, reply), reads what the client sends and answers. It
    /// returns what it heard, stopping at the first surprise.
    fn stub(script: &'static [(&'static str, &'static [u8])]) -> (Gdb, JoinHandle<Vec<String>>) {
        let (client, mut server) = UnixStream::pair().unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let handle = std::thread::spawn(move || {
            let mut transcript = Vec::new();
            for &(expect, reply) in script {
                let h = heard(&mut server);
                transcript.push(h.clone());
                if h != expect {
                    break;
                }
                server.write_all(reply).unwrap();
            }
            transcript
        });
        (Gdb::over(client).unwrap(), handle)
    }

    fn said(script: &[(&str, &[u8])]) -> Vec<String> {
        script.iter().map(|(e, _)| e.to_string()).collect()
    }

    #[test]
    fn gdb_bad_checksum_is_refused_and_the_retransmit_accepted() {
        // '?' is 0x3f. The stub's first OK is corrupt (0x9b), the second good.
        const S: &[(&str, &[u8])] = &[("$?#3f", b"+$OK#9b"), ("-", b"$OK#9a"), ("+", b"")];
        let (mut g, stub) = stub(S);
        assert_eq!(g.request("?", Duration::from_secs(2)).unwrap(), "OK");
        assert_eq!(stub.join().unwrap(), said(S));
    }

    #[test]
    fn gdb_gives_up_after_repeated_bad_checksums() {
        const S: &[(&str, &[u8])] = &[("$?#3f", b"+$OK#00"), ("-", b"$OK#01"), ("-", b"$OK#02")];
        let (mut g, stub) = stub(S);
        let e = g.request("?", Duration::from_secs(2)).unwrap_err().to_string();
        assert!(
            e.contains("3 packets in a row with a bad checksum (the last: sent 0x02, computed 0x9a)"),
            "{e}"
        );
        drop(g);
        assert_eq!(stub.join().unwrap(), said(S));
    }

    #[test]
    fn gdb_resends_a_packet_the_stub_refused() {
        // 'S' 0x53 + '0' 0x30 + '5' 0x35 = 0xb8.
        const S: &[(&str, &[u8])] = &[("$?#3f", b"-"), ("$?#3f", b"+$S05#b8"), ("+", b"")];
        let (mut g, stub) = stub(S);
        assert_eq!(g.request("?", Duration::from_secs(2)).unwrap(), "S05");
        assert_eq!(stub.join().unwrap(), said(S));
    }

    #[test]
    fn gdb_endless_packet_is_refused() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            let _ = server.write_all(b"+$");
            let chunk = [b'a'; 4096];
            // Until the client gives up and closes its end.
            while server.write_all(&chunk).is_ok() {}
        });
        let mut g = Gdb::over(client).unwrap();
        let e = g.receive(Duration::from_secs(20)).unwrap_err().to_string();
        assert!(e.contains("a packet of more than 1048576 bytes, unfinished"), "{e}");
        drop(g);
        flood.join().unwrap();
    }

    // "Z1,1000,1" sums to 0x1d5 (checksum d5); "z1,1000,1" is 0x20 more ('z' − 'Z'): f5.
    // 'c' is 0x63. "S02" sums to 0xb5.

    #[test]
    fn gdb_run_to_removes_its_breakpoint_when_reached() {
        const S: &[(&str, &[u8])] = &[
            ("$Z1,1000,1#d5", b"+$OK#9a"),
            ("+", b""),
            ("$c#63", b"+$S05#b8"),
            ("+", b""),
            ("$z1,1000,1#f5", b"+$OK#9a"),
            ("+", b""),
        ];
        let (mut g, stub) = stub(S);
        assert_eq!(g.run_to(0x1000, Duration::from_secs(2)).unwrap(), "S05");
        assert_eq!(stub.join().unwrap(), said(S));
    }

    #[test]
    fn gdb_run_to_removes_its_breakpoint_after_a_timeout() {
        // The guest never reaches the breakpoint: the client interrupts (0x03), waits for the
        // stop, then removes the breakpoint.
        const S: &[(&str, &[u8])] = &[
            ("$Z1,1000,1#d5", b"+$OK#9a"),
            ("+", b""),
            ("$c#63", b"+"),
            ("\x03", b"$S02#b5"),
            ("+", b""),
            ("$z1,1000,1#f5", b"+$OK#9a"),
            ("+", b""),
        ];
        let (mut g, stub) = stub(S);
        let e = g.run_to(0x1000, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("no answer within 300 ms"), "{e}");
        assert_eq!(stub.join().unwrap(), said(S));
    }

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
