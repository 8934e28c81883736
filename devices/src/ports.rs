//! One-port devices of the guest conventions: debug console (0xE9), POST code (0x80), debug exit (0xF4).

use duet_core::{BusDevice, WriteOutcome};

use crate::{byte_offset, Console};

/// Bochs/QEMU debug console at port 0xE9: each byte written is console output.
///
/// Reading the port returns 0xE9, the presence check Bochs and QEMU answer. An access wider
/// than a byte reaches the next ports too, as on the ISA bus: only its first byte is this port's.
#[derive(Clone, Debug)]
pub struct DebugConsole {
    console: Console,
}

/// What a read of the debug-console port returns (its own port number, as Bochs and QEMU do).
pub const DEBUG_CONSOLE_PRESENT: u8 = 0xe9;

impl DebugConsole {
    /// A debug console printing to `console`.
    pub fn new(console: Console) -> Self {
        DebugConsole { console }
    }

    /// The console this port prints to.
    pub fn console(&self) -> &Console {
        &self.console
    }
}

impl BusDevice for DebugConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if byte_offset(offset, i) == Some(0) { DEBUG_CONSOLE_PRESENT } else { 0xff };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        for (i, &b) in data.iter().enumerate() {
            if byte_offset(offset, i) == Some(0) {
                self.console.push(&[b]);
            }
        }
        WriteOutcome::Continue
    }
}

/// POST-code port 0x80: remembers the last byte written.
///
/// Reads return that byte, or 0xff before any write (what an empty ISA bus returns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostCode {
    last: Option<u8>,
}

impl PostCode {
    /// A POST-code latch nothing has been written to.
    pub fn new() -> Self {
        PostCode::default()
    }

    /// The last byte written, if any.
    pub fn last(&self) -> Option<u8> {
        self.last
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match byte_offset(offset, i) {
                Some(0) => self.last.unwrap_or(0xff),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        for (i, &b) in data.iter().enumerate() {
            if byte_offset(offset, i) == Some(0) {
                self.last = Some(b);
            }
        }
        WriteOutcome::Continue
    }
}

/// Number of ports the debug-exit device decodes (QEMU `isa-debug-exit,iobase=0xf4,iosize=4`).
pub const DEBUG_EXIT_PORTS: u64 = 4;

/// QEMU isa-debug-exit at port 0xF4: a write of v ends the run with exit code (v << 1) | 1.
///
/// The value is the little-endian number written, for writes of 1, 2 or 4 bytes (the x86 port
/// widths) at any of its ports, as QEMU does; other widths are ignored. Reads return 0, as
/// QEMU's device does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugExit;

impl DebugExit {
    /// The debug-exit device.
    pub fn new() -> Self {
        DebugExit
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> WriteOutcome {
        match *data {
            [a] => WriteOutcome::Exit(u32::from(a)),
            [a, b] => WriteOutcome::Exit(u32::from(u16::from_le_bytes([a, b]))),
            [a, b, c, d] => WriteOutcome::Exit(u32::from_le_bytes([a, b, c, d])),
            _ => WriteOutcome::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_console_prints_each_byte_and_reads_e9() {
        let console = Console::new(false);
        let mut d = DebugConsole::new(console.clone());
        for &b in b"ok\n" {
            assert_eq!(d.write(0, &[b]), WriteOutcome::Continue);
        }
        assert_eq!(console.text(), "ok\n");
        let mut b = [0u8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0xe9, 0xff]);
    }

    #[test]
    fn debug_console_wide_write_prints_only_its_port_byte() {
        let console = Console::new(false);
        let mut d = DebugConsole::new(console.clone());
        // `out dx, ax` with AX = 0x4241: 'A' goes to 0xE9, 'B' to 0xEA (nothing there).
        let _ = d.write(0, &[0x41, 0x42]);
        let _ = d.write(1, b"Z");
        let _ = d.write(u64::MAX, b"Zz");
        assert_eq!(console.text(), "A");
    }

    #[test]
    fn post_code_remembers_last_byte() {
        let mut p = PostCode::new();
        let mut b = [0u8; 1];
        p.read(0, &mut b);
        assert_eq!((p.last(), b), (None, [0xff]));
        let _ = p.write(0, &[0x12]);
        let _ = p.write(0, &[0x34, 0x56]);
        assert_eq!(p.last(), Some(0x34));
        p.read(0, &mut b);
        assert_eq!(b, [0x34]);
        let _ = p.write(1, &[0x99]);
        assert_eq!(p.last(), Some(0x34));
    }

    #[test]
    fn debug_exit_takes_little_endian_value_of_each_port_width() {
        let mut d = DebugExit::new();
        assert_eq!(d.write(0, &[0x21]), WriteOutcome::Exit(0x21));
        assert_eq!(d.write(0, &[0x34, 0x12]), WriteOutcome::Exit(0x1234));
        assert_eq!(d.write(0, &[0x78, 0x56, 0x34, 0x12]), WriteOutcome::Exit(0x1234_5678));
        assert_eq!(d.write(2, &[0xff]), WriteOutcome::Exit(0xff));
        assert_eq!(d.write(0, &[]), WriteOutcome::Continue);
        assert_eq!(d.write(0, &[1, 2, 3]), WriteOutcome::Continue);
        assert_eq!(d.write(0, &[1; 8]), WriteOutcome::Continue);
        let mut b = [0xaau8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
