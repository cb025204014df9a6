"""`harness boot`: the guest's serial console on the user's terminal.

Ctrl-] leaves; QEMU is stopped on the way out, whatever happened.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty

from harness.machine import Machine

ESCAPE = 0x1D  # Ctrl-]


def attach(machine: Machine) -> int:
    """Forward stdin to the console until Ctrl-] or QEMU exits. Returns QEMU's status or 0."""
    assert machine.console is not None and machine.qemu is not None
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd)
    try:
        while machine.qemu.running():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data or ESCAPE in data:
                data = data.split(bytes([ESCAPE]), 1)[0]
                if data:
                    machine.console.send(data)
                return 0
            machine.console.send(data)
        return machine.qemu.returncode or 0
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def write_through(data: bytes) -> None:
    os.write(sys.stdout.fileno(), data)
