"""The dmesg rule engine on scenario logs (one per rule, written from the kernel's
message formats), the error-id normaliser, the allowlist and bad rule files."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.dmesg import describe, error_id, errors, load_allowlist, load_rules, normalise, scan
from harness.errors import BadInput

DATA = Path(__file__).parent / "data"

SCENARIOS = {
    "kasan-use-after-free.log": "kasan", "ubsan-shift.log": "ubsan", "kfence.log": "kfence",
    "lockdep-circular.log": "lockdep", "hung-task.log": "hung-task", "rcu-stall.log": "rcu-stall",
    "soft-lockup.log": "soft-lockup", "tdx-unexpected-ve.log": "tdx-unexpected-ve",
    "tdx-mmio-failed.log": "mmio-failed", "sev-vc.log": "sev-vc-error", "snp-rmp.log": "rmp-fault",
    "snp-pvalidate.log": "snp-pvalidate", "tdx-module-init-failed.log": "tdx-module-init-failed",
    "page-state-change.log": "page-state-change", "swiotlb-full.log": "swiotlb-full", "dma-api.log": "dma-api",
    "dmar-fault.log": "dmar-fault", "amd-vi-fault.log": "amd-vi-fault", "pciehp-error.log": "pciehp-error",
    "oom.log": "oom",
}


@pytest.mark.parametrize(("log", "rule"), sorted(SCENARIOS.items()))
def test_each_rule_fires_on_its_scenario(log: str, rule: str) -> None:
    hits = scan((DATA / "dmesg" / log).read_text().splitlines())
    assert rule in [h.rule for h in hits], [h.rule for h in hits]


@pytest.mark.parametrize(("log", "rules"), [
    ("panic-no-init.log", {"panic", "call-trace"}),
    ("oops-null-deref.log", {"oops"}),
    ("warning-splat.log", {"cut-here", "warning", "call-trace"}),
    ("clean-boot.log", set()),
])
def test_console_scenarios(log: str, rules: set[str]) -> None:
    assert {h.rule for h in scan((DATA / "console" / log).read_text().splitlines())} == rules


def test_every_rule_has_a_scenario() -> None:
    covered = set(SCENARIOS.values()) | {"panic", "oops", "warning", "call-trace", "cut-here"}
    untested = {r.id for r in load_rules()} - covered
    # Rules proven only on real guests or by their neighbours' scenarios:
    assert untested <= {"hard-lockup", "bad-page", "sleeping-in-atomic", "bug", "aer", "io-error"}, untested


def test_a_warn_splat_is_named_by_its_report_line_not_the_cut_here_line() -> None:
    # Every WARN/BUG starts with the same "cut here" line: an id made from it
    # would name every warning alike. The error is the report line.
    bad = errors(scan((DATA / "console" / "warning-splat.log").read_text().splitlines()))
    assert [h.rule for h in bad] == ["warning"]
    assert "msi.c" in bad[0].line and describe(bad).startswith(bad[0].error_id)


def test_same_bug_on_two_kernels_has_the_same_id() -> None:
    a = ("[    3.201100] WARNING: CPU: 0 PID: 1 at drivers/pci/msi/msi.c:888 "
         "__pci_enable_msi_range+0x1c4/0x1f0")
    b = ("[   13.900000] WARNING: CPU: 3 PID: 771 at drivers/pci/msi/msi.c:901 "
         "__pci_enable_msi_range+0x1d0/0x200")
    assert error_id("warning", a) == error_id("warning", b)
    other = "[    3.2] WARNING: CPU: 0 PID: 1 at drivers/virtio/virtio_ring.c:888 vring_map_one_sg+0x1/0x2"
    assert error_id("warning", a) != error_id("warning", other)


def test_normaliser_drops_what_changes_between_runs() -> None:
    line = ("<4>[   12.904321] [  T412] virtio-pci 0000:00:05.0: swiotlb buffer is full (sz: 266240 bytes), "
            "total 128 (slots), used 96 (slots)")
    assert normalise(line) == ("virtio-pci <n>:<n>:<n>.<n>: swiotlb buffer is full (sz: <n> bytes), "
                               "total <n> (slots), used <n> (slots)")
    assert normalise("[ 1.0] CPU: 2 PID: 33 Comm: kworker Tainted: G W 6.12.0 #1") == "CPU: <n> PID: <n> Comm: kworker"
    assert normalise("task at ffff888104a3c2e8 and 0xfffb7000") == "task at <hex> and <hex>"


def test_error_severity_and_allowlist(tmp_path: Path) -> None:
    lines = (DATA / "dmesg" / "oom.log").read_text().splitlines() + \
        (DATA / "dmesg" / "swiotlb-full.log").read_text().splitlines()
    hits = scan(lines)
    assert [h.rule for h in errors(hits)] == ["swiotlb-full"]  # oom is a warning
    (tmp_path / "allow.yaml").write_text("- rule: swiotlb-full\n  pattern: 'total 128 \\(slots\\)'\n"
                                         "  reason: a deliberately tiny pool\n")
    assert errors(scan(lines, allow=load_allowlist(tmp_path / "allow.yaml"))) == []
    assert load_allowlist(tmp_path / "missing.yaml") == ()


@pytest.mark.parametrize(("text", "message"), [
    ("- {id: x, category: c, severity: fatal, pattern: y}\n", "severity"),
    ("- {id: x, category: c, severity: error, pattern: '('}\n", "bad pattern"),
    ("- {id: x, pattern: y}\n", "needs exactly the keys"),
    ("id: x\n", "expected a list"),
])
def test_bad_rule_files_name_entry_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "rules.yaml").write_text(text)
    with pytest.raises(BadInput, match=message):
        load_rules(tmp_path / "rules.yaml")


def test_tdx_host_banners_old_and_new() -> None:
    """A healthy TDX host's banner is no error; a failed init is, in either kernel's wording."""
    assert scan(["[    3.2] virt/tdx: TDX-Module initialized"]) == []
    old = scan(["[    3.2] virt/tdx: module initialization failed (-5)"])
    assert [h.rule for h in old] == ["tdx-module-init-failed"]


def test_snp_pvalidate_line_is_claimed_by_its_rule_not_the_warning() -> None:
    hits = scan((DATA / "dmesg" / "snp-pvalidate.log").read_text().splitlines())
    assert [h.rule for h in hits] == ["cut-here", "snp-pvalidate", "warning", "call-trace"]
