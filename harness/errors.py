"""Error classes, each tied to one of the documented exit codes.

0 passed, 1 the kernel under test misbehaved, 2 bad input, 3 infrastructure.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_KERNEL = 1
EXIT_BAD_INPUT = 2
EXIT_INFRA = 3


# The guest tests' own exit status (the pytest child's) when they stopped because
# the results directory could not be written (disk full, read-only).
RESULTS_UNWRITABLE = 75

class HarnessError(Exception):
    """Base class: carries the exit code the CLI returns for it."""

    exit_code = EXIT_INFRA


class BadInput(HarnessError):
    """Usage errors, unknown profiles, malformed YAML, missing files."""

    exit_code = EXIT_BAD_INPUT


class InfraError(HarnessError):
    """The harness or the host failed: QEMU would not start, missing hardware."""

    exit_code = EXIT_INFRA


class QemuStartError(InfraError):
    """QEMU exited or never connected while starting; carries argv and output."""

    def __init__(self, message: str, argv: list[str], output: str) -> None:
        super().__init__(message)
        self.argv = argv
        self.output = output

    def __str__(self) -> str:
        text = super().__str__()
        tail = self.output.strip().splitlines()[-5:]
        if tail:
            text += ": " + " | ".join(tail)
        return text


class GuestUnreachable(InfraError):
    """No sign of life from the guest at all (no console output)."""


class KernelFault(HarnessError):
    """The kernel under test misbehaved (panic, oops, hang after printing)."""

    exit_code = EXIT_KERNEL

    def __init__(self, message: str, lines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.lines = lines


class BootFailure(KernelFault):
    """The guest did not reach userspace because of the kernel."""


class GuestUnresponsive(KernelFault):
    """The guest stopped answering on the command channel after it booted."""


class Terminated(BaseException):
    """SIGTERM turned into an exception so that cleanup in `finally` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
