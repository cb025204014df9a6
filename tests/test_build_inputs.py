"""The build's inputs, read without building: patch series, config fragments, the
dropped-option check, build specs; and the one helper every build program runs
through. Builds on the fake kernel tree are in test_build_fake.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from harness.build import BuildSpec, Patch, dropped_options, load_fragment, load_series, load_spec, parse_fragment
from harness.build.kconfig import kconfig_input, symbols_added
from harness.errors import BadInput, InfraError
from harness.process import run
from tests.conftest import REPO, Cli

# -- series ---------------------------------------------------------------------------------


def test_series_directory_follows_its_series_file(tmp_path: Path) -> None:
    patches = load_series(str(REPO / "kernels" / "coco-sample"), tmp_path)
    assert [p.subject for p in patches] == [
        "swiotlb: announce the CoCo harness sample series at boot",
        "swiotlb: add a read-only harness_series attribute to debugfs",
        "swiotlb: report the pool size in harness_series",
    ]
    (tmp_path / "s").mkdir()
    for p in sorted((REPO / "kernels" / "coco-sample").glob("*.patch")):
        (tmp_path / "s" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "s" / "series").write_text("# reversed\n0003-swiotlb-report-the-pool-size-in-harness_series.patch\n")
    assert [p.subject for p in load_series(str(tmp_path / "s"), tmp_path)] == [
        "swiotlb: report the pool size in harness_series"]
    (tmp_path / "s" / "series").write_text("0009-missing.patch\n")
    with pytest.raises(BadInput, match="lists 0009-missing.patch"):
        load_series(str(tmp_path / "s"), tmp_path)


def test_mbox_is_split_into_its_patches(tmp_path: Path) -> None:
    mbox = tmp_path / "series.mbox"
    mbox.write_bytes(b"".join(p.read_bytes() for p in sorted((REPO / "kernels" / "coco-sample").glob("*.patch"))))
    patches = load_series(str(mbox), tmp_path / "w")
    assert len(patches) == 3 and patches[1].subject.startswith("swiotlb: add a read-only")


def test_series_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        load_series(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(BadInput, match="b4 is not installed|b4 could not fetch"):
        load_series("20261121.12345-1-dev@example.org", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no \\*.patch files and no series file"):
        load_series(str(tmp_path / "empty"), tmp_path)


# -- fragments ------------------------------------------------------------------------------


def test_fragments_parse_and_name_their_base() -> None:
    text = "# harness-base: defconfig\n# why\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n"
    base, options = parse_fragment(text)
    assert base == "defconfig" and options == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}
    for name in ("base", "coco-guest", "debug", "dma-bench"):
        frag = load_fragment(name)
        # every option carries a comment line saying why it is there
        lines = frag.text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("CONFIG_"):
                assert any(x.startswith("#") for x in lines[max(0, i - 6):i]), (name, line)
    with pytest.raises(BadInput, match="not a file and not in kconfigs/"):
        load_fragment("no-such-fragment")


@pytest.mark.parametrize(("line", "ok"), [
    ("CONFIG_A=y", True), ("CONFIG_A=m", True), ("CONFIG_A=n", True), ("CONFIG_NR_CPUS=64", True),
    ("CONFIG_X=0x1000", True), ('CONFIG_CMDLINE="console=ttyS0 a=\\"b c\\""', True), ('CONFIG_S=""', True),
    ("# CONFIG_A is not set", True), ("   ", True), ("# any comment", True),
    ("this is not kconfig", False), ("CONFIG_FOO", False), ("CONFIG_FOO=maybe", False), ("CONFIG_FOO=y y", False),
    ('CONFIG_S="unclosed', False), ("config FOO", False),
])
def test_fragments_are_parsed_strictly(line: str, ok: bool) -> None:
    text = f"# harness-base: tinyconfig\nCONFIG_BASE=y\n{line}\n"
    if ok:
        parse_fragment(text, "x.config")
        return
    with pytest.raises(BadInput) as e:
        parse_fragment(text, "x.config")
    assert str(e.value).startswith(f"config fragment x.config:3: not a Kconfig line: {line!r}")


def test_a_fragment_with_a_non_kconfig_line_is_exit_2_before_any_build(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.config"
    bad.write_text("# harness-base: tinyconfig\n# why\nCONFIG_PRINTK=y\nCONFIG_FOO\n")
    proc = cli("build", "--source", "/usr/src/linux-source-6.12.tar.xz", "--config", str(bad), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"harness: config fragment {bad}:4: not a Kconfig line: 'CONFIG_FOO' "
        '(expected CONFIG_X=y|m|n|number|"string" or # CONFIG_X is not set)']


def test_fragment_errors(tmp_path: Path) -> None:
    (tmp_path / "a.config").write_text("# harness-base: allyesconfig\nCONFIG_A=y\n")
    with pytest.raises(BadInput, match="harness-base 'allyesconfig' must be tinyconfig, defconfig or allnoconfig"):
        load_fragment(str(tmp_path / "a.config"))
    (tmp_path / "b.config").write_text("# only words\n")
    with pytest.raises(BadInput, match="no CONFIG_ options"):
        load_fragment(str(tmp_path / "b.config"))


def test_dropped_options_is_pure_and_asks_only_about_dropped_ones(tmp_path: Path) -> None:
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n")
    later = tmp_path / "g.config"
    later.write_text("CONFIG_A=m\n")
    asked: list[str] = []

    def has_symbol(name: str) -> bool:
        asked.append(name)
        return name != "D"

    final = {"CONFIG_A": "m", "CONFIG_B": "y", "CONFIG_C": "n"}
    dropped = dropped_options([load_fragment(str(frag)), load_fragment(str(later))], final, has_symbol)
    assert [str(d) for d in dropped] == [
        "CONFIG_B: requested m, got y (probably an unmet dependency)",
        "CONFIG_D: requested \"x\", got not set (no such option in this tree's Kconfig)"]
    assert asked == ["B", "D"]  # a later fragment wins (A=m holds), a missing one is "not set"


# -- build specs ----------------------------------------------------------------------------


def test_build_spec_paths_are_relative_to_the_spec(tmp_path: Path) -> None:
    spec_file = tmp_path / "specs" / "fake.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text("source: ../src/linux\nseries: series\nconfigs: [base, sample.config]\n")
    assert load_spec(spec_file) == BuildSpec(source=str(tmp_path / "src" / "linux"),
                                             series=str(tmp_path / "specs" / "series"),
                                             configs=["base", str(tmp_path / "specs" / "sample.config")])
    # Absolute paths, git refs and message-ids are taken as they are.
    spec_file.write_text("source: /usr/src/linux@v6.12\nseries: 20261121.12345-1-dev@example.org\n")
    assert load_spec(spec_file) == BuildSpec(source="/usr/src/linux@v6.12",
                                             series="20261121.12345-1-dev@example.org", configs=["base"])


@pytest.mark.parametrize(("text", "error"), [
    ("series: x\n", "needs a 'source' key"),
    ("source: x\nconfig: [base]\n", "unknown key 'config'"),
    ("source: x\nconfigs: base\n", "key 'configs' must be a list"),
    ("source: [x\n", "malformed YAML"),
])
def test_build_spec_errors(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(BadInput, match=re.escape(error)):
        load_spec(tmp_path / "spec.yaml")


# -- what a patch changes ------------------------------------------------------------------


def test_a_patch_names_its_files_and_the_kconfig_symbols_it_adds() -> None:
    new_option = REPO / "tests/fakelinux/series/new-option"
    first, second = load_series(str(new_option), Path("/nonexistent"))
    assert first.paths == {"drivers/misc/Kbuild", "drivers/misc/Kconfig", "drivers/misc/harness_demo_loud.c"}
    assert second.paths == {"drivers/misc/harness_demo.c"}
    assert symbols_added(first.data) == {"HARNESS_DEMO_LOUD"} and symbols_added(second.data) == set()
    renamed = Patch("r", "s", "h", b"diff --git a/x/Kconfig b/y/Kconfig\nsimilarity index 100%\n"
                    b"rename from x/Kconfig\nrename to y/Kconfig\n"
                    b"diff --git a/gone.c b/gone.c\ndeleted file mode 100644\n--- a/gone.c\n+++ /dev/null\n"
                    b"@@ -1 +0,0 @@\n-int x;\n")
    assert renamed.paths == {"x/Kconfig", "y/Kconfig", "gone.c"}
    assert symbols_added(b"+menuconfig PCI_TSM\n+\tconfig TSM_GUEST\n-config OLD\n+ default y\n") == {
        "PCI_TSM", "TSM_GUEST"}


@pytest.mark.parametrize(("path", "changes_config"), [
    ("drivers/virt/coco/Kconfig", True), ("arch/x86/Kconfig.cpu", True), ("Kconfig", True),
    ("kernel/configs/tiny.config", True), ("arch/x86/configs/x86_64_defconfig", True),
    ("scripts/kconfig/confdata.c", True), ("scripts/Kconfig.include", True), ("Makefile", True),
    ("drivers/pci/Makefile", False), ("kernel/dma/swiotlb.c", False), ("Documentation/configs.rst", False),
])
def test_which_files_change_what_the_config_targets_write(path: str, changes_config: bool) -> None:
    assert kconfig_input(path) is changes_config


# -- the one door to other programs -------------------------------------------------------


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that may never reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_commands_have_a_deadline_that_takes_their_process_group_down(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(InfraError, match=r"still running after 0s, killed"):
        run(["sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], timeout=0.3)
    assert time.monotonic() - start < 5
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the background sleep outlived the deadline"
    lines: list[str] = []
    done = run(["sh", "-c", "echo one; echo two >&2; exit 3"], on_line=lines.append)
    assert done.status == 3 and lines == ["one", "two"] and done.stdout == b""
    with pytest.raises(InfraError, match="no-such-program: not found"):
        run(["no-such-program"])
