"""Kernels given to `--kernel`: checked before anything boots, Debian packages by
their own versioned names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness import kernel
from harness.errors import BadInput
from harness.kernel import Kernel, _concrete_package, bzimage_release, resolve_kernel
from tests.conftest import Cli


def test_a_truncated_bzimage_is_refused_naming_the_file(tmp_path: Path, debian_kernel: Kernel) -> None:
    whole = debian_kernel.image.read_bytes()
    cut = tmp_path / "bzImage"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadInput, match=rf"kernel {cut}: truncated bzImage \(\d+ bytes; its setup header says \d+\)"):
        bzimage_release(cut)
    assert bzimage_release(debian_kernel.image) == debian_kernel.release


def test_a_truncated_kernel_is_bad_input_before_any_boot(cli: Cli, debian_kernel: Kernel) -> None:
    cut = cli.tmp.parent / "bzImage"
    shutil.copy2(debian_kernel.image, cut)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 4096 * 64)
    proc = cli("run", "--kernel", str(cut), "--results", str(cli.results), "-k", "userspace")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"harness: kernel {cut}: truncated bzImage")
    assert cli.run_dirs() == []


def test_versioned_debian_names_are_taken_as_they_are() -> None:
    # No apt call for a versioned name: bookworm-backports' `+deb12` names included.
    for name in ("linux-image-6.1.0-56-cloud-amd64", "linux-image-6.12.57+deb12-cloud-amd64",
                 "linux-image-6.12.90+deb12.1-cloud-amd64"):
        assert _concrete_package(name) == name


def _newest_backports_612() -> str:
    out = subprocess.run(["apt-cache", "search", "--names-only", r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$"],
                         capture_output=True, text=True, timeout=120).stdout
    names = sorted((line.split()[0] for line in out.splitlines()),
                   key=lambda n: int(n.split(".")[2].split("+")[0]))
    if not names:
        pytest.skip("apt knows no linux-image-6.12.N+deb12-cloud-amd64 (bookworm-backports not configured)")
    return names[-1]


def test_a_bookworm_backports_612_kernel_resolves_by_its_own_name() -> None:
    package = _newest_backports_612()
    kernel = resolve_kernel(f"debian:{package}")
    assert kernel.package == package and kernel.release.startswith("6.12.")
    assert kernel.modules_dir is not None and (kernel.modules_dir / "modules.dep").is_file()


def test_a_meta_package_is_resolved_by_apt_once_per_apt_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`apt-cache depends` (0.6-0.9 s) runs again only when apt's lists, sources or pins change."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "bookworm_Packages").write_text("one\n")
    monkeypatch.setattr(kernel, "APT_STATE", (lists, tmp_path / "sources.list"))
    asked: list[list[str]] = []

    def apt(args: list[str], what: str, cwd: str | None = None) -> str:
        asked.append(args)
        return f"linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-{len(asked)}-cloud-amd64\n"

    monkeypatch.setattr(kernel, "_apt", apt)
    assert _concrete_package("linux-image-cloud-amd64") == "linux-image-6.1.0-1-cloud-amd64"
    assert _concrete_package("linux-image-cloud-amd64") == "linux-image-6.1.0-1-cloud-amd64"
    assert len(asked) == 1
    (lists / "bookworm_Packages").write_text("one, then two\n")  # `apt-get update`
    assert _concrete_package("linux-image-cloud-amd64") == "linux-image-6.1.0-2-cloud-amd64"
    (tmp_path / "sources.list").write_text("deb ...\n")  # a new source
    assert _concrete_package("linux-image-cloud-amd64") == "linux-image-6.1.0-3-cloud-amd64"
    assert _concrete_package("linux-image-cloud-amd64") == "linux-image-6.1.0-3-cloud-amd64"
    assert len(asked) == 3
