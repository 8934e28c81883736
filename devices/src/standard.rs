//! [`StandardDevices`]: every device of the guest conventions, attached to a machine's buses.

use std::sync::{Arc, Mutex, MutexGuard};

use duet_core::layout::{DEBUG_CONSOLE_PORT, DEBUG_EXIT_PORT, MMIO_TEST_BASE, POST_CODE_PORT, SERIAL_PORT};
use duet_core::{Bus, InterruptLines, IrqLine, Machine, SharedDevice, Vcpu};

use crate::mmio_test::MMIO_TEST_SIZE;
use crate::ports::DEBUG_EXIT_PORTS;
use crate::serial::{SERIAL_IRQ_VECTOR, SERIAL_PORTS};
use crate::{Console, DebugConsole, DebugExit, DeviceError, MmioTestDevice, PostCode, Serial};

/// How [`StandardDevices`] are set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Stream console output to stdout as well as capturing it.
    pub echo: bool,
    /// Interrupt vector the UART raises.
    pub serial_vector: u8,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig { echo: false, serial_vector: SERIAL_IRQ_VECTOR }
    }
}

/// Handles to the standard devices after they are attached, to inspect them after a run.
///
/// | device | where |
/// | --- | --- |
/// | [`Serial`] | ports 0x3F8–0x3FF |
/// | [`DebugConsole`] | port 0xE9 |
/// | [`PostCode`] | port 0x80 |
/// | [`DebugExit`] | ports 0xF4–0xF7 |
/// | [`MmioTestDevice`] | `0xd000_0000`–`0xd000_0fff` |
#[derive(Clone, Debug)]
pub struct StandardDevices {
    console: Console,
    serial: Arc<Mutex<Serial>>,
    post_code: Arc<Mutex<PostCode>>,
    mmio_test: Arc<Mutex<MmioTestDevice>>,
}

/// Registers `device` on `bus`, naming it in the error.
fn insert<D: duet_core::BusDevice + 'static>(
    bus: &mut Bus,
    name: &'static str,
    base: u64,
    len: u64,
    device: &Arc<Mutex<D>>,
) -> Result<(), DeviceError> {
    let shared: SharedDevice = device.clone();
    bus.insert(base, len, shared).map_err(|source| DeviceError::Attach { device: name, source })
}

/// Locks a device, recovering from a poisoned lock.
fn lock<D>(device: &Mutex<D>) -> MutexGuard<'_, D> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl StandardDevices {
    /// Attaches every standard device to `pio` and `mmio` with the default [`DeviceConfig`]
    /// (UART on vector 0x24), echoing console output to stdout when `echo` is set.
    pub fn attach(
        pio: &mut Bus,
        mmio: &mut Bus,
        interrupts: &InterruptLines,
        echo: bool,
    ) -> Result<Self, DeviceError> {
        StandardDevices::attach_with(pio, mmio, interrupts, &DeviceConfig { echo, ..DeviceConfig::default() })
    }

    /// Attaches every standard device to `pio` and `mmio` as `config` says.
    pub fn attach_with(
        pio: &mut Bus,
        mmio: &mut Bus,
        interrupts: &InterruptLines,
        config: &DeviceConfig,
    ) -> Result<Self, DeviceError> {
        let console = Console::new(config.echo);
        let serial = Arc::new(Mutex::new(Serial::new(
            console.clone(),
            IrqLine::new(interrupts, config.serial_vector),
        )));
        let debug_console = Arc::new(Mutex::new(DebugConsole::new(console.clone())));
        let post_code = Arc::new(Mutex::new(PostCode::new()));
        let debug_exit = Arc::new(Mutex::new(DebugExit::new()));
        let mmio_test = Arc::new(Mutex::new(MmioTestDevice::new(interrupts)));

        insert(pio, "serial", u64::from(SERIAL_PORT), SERIAL_PORTS, &serial)?;
        insert(pio, "debug console", u64::from(DEBUG_CONSOLE_PORT), 1, &debug_console)?;
        insert(pio, "POST code", u64::from(POST_CODE_PORT), 1, &post_code)?;
        insert(pio, "debug exit", u64::from(DEBUG_EXIT_PORT), DEBUG_EXIT_PORTS, &debug_exit)?;
        insert(mmio, "MMIO test device", MMIO_TEST_BASE, MMIO_TEST_SIZE, &mmio_test)?;
        Ok(StandardDevices { console, serial, post_code, mmio_test })
    }

    /// Attaches every standard device to `machine`'s buses and interrupt lines.
    pub fn attach_to<V: Vcpu>(machine: &mut Machine<V>, config: &DeviceConfig) -> Result<Self, DeviceError> {
        let interrupts = machine.interrupts().clone();
        StandardDevices::attach_with(&mut machine.pio, &mut machine.mmio, &interrupts, config)
    }

    /// The console the UART and the debug console print to.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The last byte written to the POST-code port, if any.
    pub fn post_code(&self) -> Option<u8> {
        lock(&self.post_code).last()
    }

    /// The UART, e.g. to queue input for the guest.
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// The MMIO test device, to inspect its registers.
    pub fn mmio_test(&self) -> &Arc<Mutex<MmioTestDevice>> {
        &self.mmio_test
    }
}

#[cfg(test)]
mod tests {
    use duet_core::machine::{handle_exit, ExitAction};
    use duet_core::{StopReason, VcpuExit};

    use super::*;

    fn attached() -> (Bus, Bus, InterruptLines, StandardDevices) {
        let (mut pio, mut mmio, lines) = (Bus::new(), Bus::new(), InterruptLines::new());
        let devs = StandardDevices::attach(&mut pio, &mut mmio, &lines, false).unwrap();
        (pio, mmio, lines, devs)
    }

    #[test]
    fn standard_devices_answer_at_the_conventional_addresses() {
        let (pio, mmio, _, devs) = attached();
        let out = |port: u16, data: &[u8]| handle_exit(&pio, &mmio, VcpuExit::IoOut { port, size: 1, data });
        assert_eq!(out(0x3f8, b"S"), ExitAction::Continue);
        assert_eq!(out(0xe9, b"D"), ExitAction::Continue);
        assert_eq!(out(0x80, &[0x42]), ExitAction::Continue);
        assert_eq!(devs.console().text(), "SD");
        assert_eq!(devs.post_code(), Some(0x42));
        let mut b = [0u8; 1];
        let _ = handle_exit(&pio, &mmio, VcpuExit::IoIn { port: 0x3fd, size: 1, data: &mut b });
        assert_eq!(b, [0x60]);
        let _ = handle_exit(&pio, &mmio, VcpuExit::IoIn { port: 0xe9, size: 1, data: &mut b });
        assert_eq!(b, [0xe9]);
        let mut id = [0u8; 4];
        let _ = handle_exit(&pio, &mmio, VcpuExit::MmioRead { addr: 0xd000_0000, data: &mut id });
        assert_eq!(&id, b"DUET");
        assert_eq!(
            handle_exit(&pio, &mmio, VcpuExit::IoOut { port: 0xf4, size: 2, data: &[0x10, 0x01] }),
            ExitAction::Stop(StopReason::DebugExit { value: 0x110 })
        );
    }

    #[test]
    fn standard_devices_raise_interrupts_on_the_given_lines() {
        let (pio, mmio, lines, devs) = attached();
        let _ = handle_exit(&pio, &mmio, VcpuExit::MmioWrite { addr: 0xd000_0018, data: &[0x40] });
        // IER bit 1: THR-empty interrupt, raised at once since the transmitter is empty.
        let _ = handle_exit(&pio, &mmio, VcpuExit::IoOut { port: 0x3f9, size: 1, data: &[0x02] });
        assert_eq!(lines.take(), Some(0x24));
        assert_eq!(lines.take(), Some(0x40));
        assert_eq!(lines.take(), None);
        assert_eq!(lock(devs.serial()).vector(), 0x24);
    }

    #[test]
    fn standard_devices_config_moves_the_uart_vector() {
        let (mut pio, mut mmio, lines) = (Bus::new(), Bus::new(), InterruptLines::new());
        let config = DeviceConfig { echo: false, serial_vector: 0x64 };
        let devs = StandardDevices::attach_with(&mut pio, &mut mmio, &lines, &config).unwrap();
        let _ = pio.write(0x3f9, &[0x02]);
        assert_eq!(lines.take(), Some(0x64));
        assert!(!devs.console().echoes());
    }

    #[test]
    fn standard_devices_refuse_a_bus_already_populated() {
        let (mut pio, mut mmio, lines, _) = attached();
        let err = StandardDevices::attach(&mut pio, &mut mmio, &lines, false).unwrap_err();
        assert!(matches!(err, DeviceError::Attach { device: "serial", .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "cannot attach the serial device: range 0x3f8+0x8 overlaps the device at 0x3f8"
        );
    }
}
