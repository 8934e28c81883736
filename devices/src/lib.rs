//! duet-devices: the device models of duet's guest conventions, shared by every backend.
//!
//! Each device is a plain [`duet_core::BusDevice`] that reads and writes at offsets relative
//! to its base and raises interrupts through [`duet_core::InterruptLines`]; none knows which
//! CPU runs the guest. [`StandardDevices`] attaches them all at their conventional places:
//!
//! | what | where | behaviour |
//! | --- | --- | --- |
//! | [`Serial`] | port 0x3F8 | 16550 UART (vm-superio), output to the [`Console`], IRQ on vector 0x24 |
//! | [`DebugConsole`] | port 0xE9 | each byte written is console output; reads 0xE9 |
//! | [`PostCode`] | port 0x80 | remembers the last byte written |
//! | [`DebugExit`] | port 0xF4 | a write of v ends the run with exit code (v << 1) \| 1 |
//! | [`MmioTestDevice`] | `0xd000_0000` | ID, scratch, counter and interrupt registers |
//!
//! A port access wider than a byte reaches consecutive ports, as on the ISA bus; only the
//! debug-exit device takes a 2- or 4-byte value whole, as QEMU's isa-debug-exit does.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod console;
pub mod mmio_test;
pub mod ports;
pub mod serial;
pub mod standard;

pub use console::{Console, ConsoleDigest, CONSOLE_TAIL};
pub use mmio_test::MmioTestDevice;
pub use ports::{DebugConsole, DebugExit, PostCode};
pub use serial::{Serial, SERIAL_IRQ_VECTOR};
pub use standard::{DeviceConfig, StandardDevices};

/// An error of a device operation.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A device could not be registered on its bus.
    #[error("cannot attach the {device} device: {source}")]
    Attach {
        /// Which device.
        device: &'static str,
        /// Why the bus refused it.
        source: duet_core::BusError,
    },
    /// The UART's receive FIFO has no room for guest input.
    #[error("the UART receive FIFO is full; {offered} bytes of input were not queued")]
    InputFifoFull {
        /// Bytes offered.
        offered: usize,
    },
    /// The UART could not write to its output.
    #[error("UART output failed: {0}")]
    SerialIo(String),
}

/// The offset of byte `i` of an access at `offset`, or `None` past the end of the address space.
fn byte_offset(offset: u64, i: usize) -> Option<u64> {
    u64::try_from(i).ok().and_then(|i| offset.checked_add(i))
}
