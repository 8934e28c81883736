//! Device models on a port-I/O or MMIO bus, and the interrupt lines they raise.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device asks of the run loop after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum WriteOutcome {
    /// Carry on running.
    Continue,
    /// End the run with this exit code (the isa-debug-exit convention).
    Exit(u32),
}

/// A device model: reads and writes at offsets relative to the base it is registered at.
pub trait BusDevice: Send {
    /// Fills `data` for a read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome;
}

/// A shared handle to a device, so the caller can keep inspecting it after registering.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An error registering a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("empty or wrapping range at {base:#x} (length {len:#x})")]
    BadRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already registered.
    #[error("range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// Base address asked for.
        base: u64,
        /// Length asked for.
        len: u64,
        /// Base of the device already there.
        other: u64,
    },
}

/// Devices keyed by address range; an access no device claims reads all ones and is ignored.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, _)) = self.devices.range(..end).next_back().filter(|(&b, (l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within it.
    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a read; with no device there, `data` is filled with 0xff (PC behaviour).
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, dev)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Dispatches a write; with no device there it is ignored.
    pub fn write(&self, addr: u64, data: &[u8]) -> WriteOutcome {
        match self.find(addr) {
            Some((off, dev)) => lock(dev).write(off, data),
            None => WriteOutcome::Continue,
        }
    }

    /// Whether some device claims `addr`.
    pub fn claims(&self, addr: u64) -> bool {
        self.find(addr).is_some()
    }
}

/// Locks a device, recovering from a poisoned lock (a panicking test thread must not wedge others).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Interrupts raised by devices (or the user) and not yet delivered to the vCPU.
///
/// There is no in-kernel irqchip: the run loop injects the lowest pending vector whenever the
/// vCPU can take an interrupt, on every backend alike.
#[derive(Clone, Debug, Default)]
pub struct InterruptLines {
    pending: Arc<Mutex<[u64; 4]>>,
}

impl InterruptLines {
    /// No interrupt pending.
    pub fn new() -> Self {
        InterruptLines::default()
    }

    /// Marks `vector` pending.
    pub fn raise(&self, vector: u8) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p[usize::from(vector / 64)] |= 1 << (vector % 64);
    }

    /// The vector that would be delivered next, if any.
    pub fn peek(&self) -> Option<u8> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.iter().enumerate().find(|(_, w)| **w != 0).map(|(i, w)| (i as u32 * 64 + w.trailing_zeros()) as u8)
    }

    /// Takes the next vector off the pending set.
    pub fn take(&self) -> Option<u8> {
        let v = self.peek()?;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p[usize::from(v / 64)] &= !(1 << (v % 64));
        Some(v)
    }
}

/// A single interrupt line wired to one vector: what a device holds to raise its IRQ.
#[derive(Clone, Debug)]
pub struct IrqLine {
    lines: InterruptLines,
    vector: u8,
}

impl IrqLine {
    /// A line that raises `vector` on `lines`.
    pub fn new(lines: &InterruptLines, vector: u8) -> Self {
        IrqLine { lines: lines.clone(), vector }
    }

    /// Raises the interrupt.
    pub fn trigger(&self) {
        self.lines.raise(self.vector);
    }

    /// The vector this line raises.
    pub fn vector(&self) -> u8 {
        self.vector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
            self.0.push((offset, data.to_vec()));
            WriteOutcome::Continue
        }
    }

    #[test]
    fn bus_routes_by_range_and_reads_ones_elsewhere() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fa, &mut b);
        assert_eq!(b, [2]);
        bus.read(0x400, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(bus.write(0x3ff, &[7]), WriteOutcome::Continue);
        assert_eq!(bus.write(0x3f7, &[7]), WriteOutcome::Continue);
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
    }

    #[test]
    fn bus_rejects_overlap_and_empty_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder(vec![]))) as SharedDevice;
        bus.insert(0x10, 0x10, d()).unwrap();
        assert_eq!(bus.insert(0x18, 4, d()), Err(BusError::Overlap { base: 0x18, len: 4, other: 0x10 }));
        assert_eq!(bus.insert(0x8, 9, d()), Err(BusError::Overlap { base: 0x8, len: 9, other: 0x10 }));
        bus.insert(0x20, 1, d()).unwrap();
        bus.insert(0x8, 8, d()).unwrap();
        assert!(bus.insert(0x100, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
    }

    #[test]
    fn interrupt_lines_deliver_lowest_vector_first() {
        let lines = InterruptLines::new();
        assert_eq!(lines.take(), None);
        IrqLine::new(&lines, 0x80).trigger();
        lines.raise(0x21);
        lines.raise(0x21);
        assert_eq!(lines.take(), Some(0x21));
        assert_eq!(lines.take(), Some(0x80));
        assert_eq!(lines.take(), None);
    }
}
