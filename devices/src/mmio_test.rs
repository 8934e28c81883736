//! [`MmioTestDevice`]: a small register file at `MMIO_TEST_BASE` for exercising MMIO paths.

use duet_core::{BusDevice, InterruptLines, WriteOutcome};

use crate::byte_offset;

/// Bytes of guest physical address space the MMIO test device decodes.
pub const MMIO_TEST_SIZE: u64 = 0x1000;

/// Offset of the read-only ID register.
pub const MMIO_TEST_ID: u64 = 0x00;
/// Offset of the 64-bit read/write scratch register.
pub const MMIO_TEST_SCRATCH: u64 = 0x08;
/// Offset of the 64-bit counter register.
pub const MMIO_TEST_COUNTER: u64 = 0x10;
/// Offset of the interrupt register.
pub const MMIO_TEST_IRQ: u64 = 0x18;
/// Value of the ID register: "DUET" in memory order.
pub const MMIO_TEST_ID_VALUE: u32 = u32::from_le_bytes(*b"DUET");

/// A register file for testing MMIO on every backend.
///
/// Register map (offsets from `duet_core::layout::MMIO_TEST_BASE`, little-endian):
///
/// | offset | name | access |
/// | --- | --- | --- |
/// | `0x00` | ID | read-only u32, reads `0x54455544` ("DUET"); `0x04–0x07` read 0 |
/// | `0x08` | SCRATCH | read/write u64 |
/// | `0x10` | COUNTER | u64; a read returns the value, then the counter increments by one; a write sets the bytes written |
/// | `0x18` | IRQ | a write raises the interrupt vector in byte `0x18` on the run loop's interrupt lines; reads 0 |
/// | `0x20–0xfff` | — | read 0, writes ignored |
///
/// Any width at any offset works: an access is handled byte by byte, so a 2-byte read at `0x0f`
/// returns the top byte of SCRATCH and the low byte of COUNTER. A read that touches COUNTER
/// increments it once, after the value is read. Bytes past the end of the device (an 8-byte
/// access at `0xffc`) read 0xff and are ignored on write, as unclaimed addresses are.
#[derive(Debug)]
pub struct MmioTestDevice {
    scratch: u64,
    counter: u64,
    interrupts: InterruptLines,
}

/// Which register a byte offset falls in, and the byte's index within it.
enum Reg {
    Id(usize),
    Scratch(usize),
    Counter(usize),
    Irq(usize),
    Reserved,
    Outside,
}

fn reg_at(offset: Option<u64>) -> Reg {
    let Some(o) = offset.filter(|&o| o < MMIO_TEST_SIZE) else {
        return Reg::Outside;
    };
    // `o % 8` is below 8, so the cast cannot truncate.
    let byte = (o % 8) as usize;
    match o - o % 8 {
        MMIO_TEST_ID => Reg::Id(byte),
        MMIO_TEST_SCRATCH => Reg::Scratch(byte),
        MMIO_TEST_COUNTER => Reg::Counter(byte),
        MMIO_TEST_IRQ => Reg::Irq(byte),
        _ => Reg::Reserved,
    }
}

/// Byte `i` (0–7) of `v` in little-endian order.
fn byte_of(v: u64, i: usize) -> u8 {
    v.to_le_bytes().get(i).copied().unwrap_or(0)
}

/// `v` with byte `i` (0–7) replaced by `b`.
fn with_byte(v: u64, i: usize, b: u8) -> u64 {
    let mut bytes = v.to_le_bytes();
    if let Some(slot) = bytes.get_mut(i) {
        *slot = b;
    }
    u64::from_le_bytes(bytes)
}

impl MmioTestDevice {
    /// A device in its reset state (SCRATCH and COUNTER zero) raising interrupts on `interrupts`.
    pub fn new(interrupts: &InterruptLines) -> Self {
        MmioTestDevice { scratch: 0, counter: 0, interrupts: interrupts.clone() }
    }

    /// Current value of SCRATCH.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Current value of COUNTER (the value the next read returns).
    pub fn counter(&self) -> u64 {
        self.counter
    }
}

impl BusDevice for MmioTestDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut counted = false;
        for (i, b) in data.iter_mut().enumerate() {
            *b = match reg_at(byte_offset(offset, i)) {
                Reg::Id(j) => MMIO_TEST_ID_VALUE.to_le_bytes().get(j).copied().unwrap_or(0),
                Reg::Scratch(j) => byte_of(self.scratch, j),
                Reg::Counter(j) => {
                    counted = true;
                    byte_of(self.counter, j)
                }
                Reg::Irq(_) | Reg::Reserved => 0,
                Reg::Outside => 0xff,
            };
        }
        if counted {
            self.counter = self.counter.wrapping_add(1);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        for (i, &b) in data.iter().enumerate() {
            match reg_at(byte_offset(offset, i)) {
                Reg::Scratch(j) => self.scratch = with_byte(self.scratch, j, b),
                Reg::Counter(j) => self.counter = with_byte(self.counter, j, b),
                Reg::Irq(0) => self.interrupts.raise(b),
                Reg::Id(_) | Reg::Irq(_) | Reg::Reserved | Reg::Outside => {}
            }
        }
        WriteOutcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (MmioTestDevice, InterruptLines) {
        let lines = InterruptLines::new();
        (MmioTestDevice::new(&lines), lines)
    }

    fn read(d: &mut MmioTestDevice, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read(off, &mut b);
        b
    }

    #[test]
    fn mmio_test_id_reads_duet_and_ignores_writes() {
        let (mut d, _) = dev();
        assert_eq!(read(&mut d, 0, 4), b"DUET");
        assert_eq!(MMIO_TEST_ID_VALUE, 0x5445_5544);
        assert_eq!(read(&mut d, 0, 8), [b'D', b'U', b'E', b'T', 0, 0, 0, 0]);
        assert_eq!(read(&mut d, 1, 2), b"UE");
        let _ = d.write(0, &[0; 8]);
        assert_eq!(read(&mut d, 0, 4), b"DUET");
    }

    #[test]
    fn mmio_test_scratch_keeps_every_width_and_offset() {
        let (mut d, _) = dev();
        let _ = d.write(8, &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(d.scratch(), 0x1122_3344_5566_7788);
        assert_eq!(read(&mut d, 8, 8), 0x1122_3344_5566_7788u64.to_le_bytes());
        // A 2-byte write at byte 3 replaces bytes 3 and 4 only.
        let _ = d.write(0x0b, &[0xaa, 0xbb]);
        assert_eq!(d.scratch(), 0x1122_33bb_aa66_7788);
        assert_eq!(read(&mut d, 0x0b, 2), [0xaa, 0xbb]);
        assert_eq!(read(&mut d, 0x0e, 1), [0x22]);
        // A misaligned 4-byte write at 0x0f touches the scratch top byte and COUNTER's low three.
        let _ = d.write(0x0f, &[0x99, 1, 2, 3]);
        assert_eq!(d.scratch(), 0x9922_33bb_aa66_7788);
        assert_eq!(d.counter(), 0x03_0201);
    }

    #[test]
    fn mmio_test_counter_returns_then_increments_and_can_be_set() {
        let (mut d, _) = dev();
        assert_eq!(read(&mut d, 0x10, 8), 0u64.to_le_bytes());
        assert_eq!(read(&mut d, 0x10, 4), 1u32.to_le_bytes());
        assert_eq!(read(&mut d, 0x10, 1), [2]);
        let _ = d.write(0x10, &0xffu16.to_le_bytes());
        assert_eq!(read(&mut d, 0x10, 2), [0xff, 0]);
        assert_eq!(read(&mut d, 0x10, 2), [0, 1]);
        // Reading across SCRATCH and COUNTER increments COUNTER once.
        let _ = d.write(0x10, &[5]);
        assert_eq!(read(&mut d, 0x0c, 8), [0, 0, 0, 0, 5, 1, 0, 0]);
        assert_eq!(d.counter(), 0x106);
        let _ = d.write(0x10, &u64::MAX.to_le_bytes());
        let _ = read(&mut d, 0x17, 1);
        assert_eq!(d.counter(), 0);
    }

    #[test]
    fn mmio_test_irq_register_raises_the_written_vector() {
        let (mut d, lines) = dev();
        let _ = d.write(0x18, &[0x30]);
        let _ = d.write(0x18, &0x0000_0041u32.to_le_bytes());
        assert_eq!(lines.take(), Some(0x30));
        assert_eq!(lines.take(), Some(0x41));
        // Bytes of the IRQ register other than its first raise nothing; reads are 0.
        let _ = d.write(0x19, &[0x50, 0x51]);
        assert_eq!(lines.take(), None);
        assert_eq!(read(&mut d, 0x18, 8), [0; 8]);
        // An 8-byte write at 0x14 reaches the IRQ byte at 0x18.
        let _ = d.write(0x14, &[0, 0, 0, 0, 0x22, 0, 0, 0]);
        assert_eq!(lines.take(), Some(0x22));
    }

    #[test]
    fn mmio_test_other_offsets_read_zero_and_past_the_end_all_ones() {
        let (mut d, lines) = dev();
        let _ = d.write(0x20, &[1; 8]);
        assert_eq!(read(&mut d, 0x20, 8), [0; 8]);
        assert_eq!(read(&mut d, 0x800, 3), [0; 3]);
        assert_eq!(read(&mut d, 0xffc, 8), [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(read(&mut d, 0x1000, 2), [0xff, 0xff]);
        assert_eq!(read(&mut d, u64::MAX, 8), [0xff; 8]);
        assert_eq!(d.write(u64::MAX, &[0x30; 8]), WriteOutcome::Continue);
        assert_eq!(read(&mut d, 0, 0), Vec::<u8>::new());
        assert_eq!((d.scratch(), d.counter(), lines.take()), (0, 0, None));
    }
}
