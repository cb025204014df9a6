"""SSH: as the command channel of our guests, and as a remote target (a guest of ours
standing in for a lab box or a cloud CVM), with per-run keys and a pinned host key."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.machine import Machine
from harness.runner import RunRequest, make_plan
from harness.ssh import SshChannelFactory
from tests.conftest import Cli, meta


@pytest.fixture
def ssh_guest(debian_kernel) -> Iterator[Machine]:  # type: ignore[no-untyped-def]
    """One of our guests with dropbear up: the stand-in for a remote machine."""
    plan, _ = make_plan(RunRequest(kernel=str(debian_kernel.image), profile="emulated", channel="ssh"))
    with tempfile.TemporaryDirectory(prefix="ht-ssh-", dir="/tmp") as tmp, \
            Machine(plan, Path(tmp) / "logs", name="ssh-target", sock_parent=Path(tmp) / "s") as m:
        m.wait_boot()
        yield m


def _ssh(m: Machine) -> SshChannelFactory:
    assert isinstance(m.channels, SshChannelFactory)
    return m.channels


def _known_hosts(m: Machine, path: Path, key: str | None = None) -> Path:
    path.write_text(f"[127.0.0.1]:{_ssh(m).ssh_port} {key or _ssh(m).keys.host_key_public}\n")
    return path


def _cases(run_dir: Path) -> dict[str, object]:
    return {c.name: c for suite in JUnitXml.fromfile(str(run_dir / "junit.xml")) for c in suite}


def test_ssh_channel_runs_the_boot_suite(cli: Cli) -> None:
    proc = cli("run", "--channel", "ssh", "--results", str(cli.results), "-k", "test_boot")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = meta(cli.only_run())
    assert m["machines"][0]["channel"] == "ssh"
    assert "harness.ssh=1" in m["cmdline"].split()


def test_ssh_session_separates_stdout_stderr_and_status(ssh_guest: Machine) -> None:
    guest = ssh_guest.guest
    assert guest is not None and type(guest).__name__ == "SshSession"
    result = guest.run("echo out; echo err >&2; exit 7")
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert guest.run("sleep 5", timeout=1).exit_code == 137  # killed in the guest at the deadline
    data = bytes(range(256)) * 300
    guest.put(data, "/tmp/blob")
    assert guest.get("/tmp/blob") == data


def test_remote_target_runs_the_same_tests(cli: Cli, ssh_guest: Machine, tmp_path: Path,
                                           debian_kernel) -> None:  # type: ignore[no-untyped-def]
    known = _known_hosts(ssh_guest, tmp_path / "known_hosts")
    proc = cli("run", "--target", f"ssh://root@127.0.0.1:{_ssh(ssh_guest).ssh_port}",
               "--identity", str(_ssh(ssh_guest).keys.client_key), "--known-hosts", str(known),
               "--kernel", str(debian_kernel.image), "--results", str(cli.results), "-k", "test_boot")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    assert meta(run_dir)["target"] == f"ssh://root@127.0.0.1:{_ssh(ssh_guest).ssh_port}"
    cases = _cases(run_dir)
    assert cases["test_reached_userspace"].is_passed  # type: ignore[attr-defined]
    assert cases["test_booted_release_matches_kernel"].is_passed  # type: ignore[attr-defined]
    assert cases["test_boot_log_is_clean"].is_passed  # type: ignore[attr-defined]
    skipped = cases["test_kernel_cmdline_is_the_planned_one"]
    assert skipped.is_skipped and "remote target" in skipped.result[0].message  # type: ignore[attr-defined]
    assert json.loads((run_dir / "target.json").read_text())["known_hosts"] == str(known)


def test_remote_target_with_another_host_key_is_refused(cli: Cli, ssh_guest: Machine, tmp_path: Path) -> None:
    impostor = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm7nKuBbaqPAGE9bA9kKsD1Lp1D0XLbyqGw0Zr+cQ1e"
    known = _known_hosts(ssh_guest, tmp_path / "known_hosts", impostor)
    proc = cli("run", "--target", f"ssh://root@127.0.0.1:{_ssh(ssh_guest).ssh_port}",
               "--identity", str(_ssh(ssh_guest).keys.client_key), "--known-hosts", str(known),
               "--results", str(cli.results), "-k", "userspace")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "host key does not match the pinned key" in meta(cli.only_run())["failure"]["message"]


def test_remote_target_bad_input(cli: Cli, tmp_path: Path) -> None:
    proc = cli("run", "--target", "ssh://root@127.0.0.1:2222", "--identity", str(tmp_path / "nokey"),
               "--results", str(cli.results))
    assert proc.returncode == 2 and "--identity" in proc.stderr
    proc = cli("run", "--target", "http://example", "--results", str(cli.results))
    assert proc.returncode == 2 and "expected ssh://user@host" in proc.stderr
    assert cli.run_dirs() == []
