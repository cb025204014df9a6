"""Build progress: objects done of a total and the time left, on the fake kernel tree
(tests/fakelinux) and as pure functions: counting the objects a configuration asks
for, the objects a warm object directory will rebuild, the previous build's record,
the estimate, a plain line for logs and a bar for terminals."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest

from harness.build import BuildSpec, build, read_config
from harness.build.kbuild_count import count_objects, kbuild_objects, stale_objects
from harness.build.progress import (
    Plan,
    Record,
    Terminal,
    bar_line,
    load_record,
    object_of,
    plain_line,
    plan_for,
    status,
    step_of,
    time_left,
)
from harness.paths import cache_dir
from tests.test_build_fake import SAMPLE_CONFIG, SERIES, TREE, compiled, fake_spec


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(path))
    return path


def out_dir() -> Path:
    (out,) = cache_dir().glob("src/*/out-*")
    return out


def test_make_lines_name_the_objects_and_steps() -> None:
    assert object_of("  CC      kernel/fork.o") == "kernel/fork.o"
    assert object_of("  CC [M]  drivers/misc/harness_demo.o") == "drivers/misc/harness_demo.o"
    assert object_of("  AS      arch/x86/entry/entry_64.o") == "arch/x86/entry/entry_64.o"
    for other in ("  AR      init/built-in.a", "  LD      vmlinux", "  HOSTCC  scripts/kconfig/conf.o",
                  "kernel/fork.c:12:1: warning: unused", "  CC      kernel/bounds.s"):
        assert object_of(other) is None, other
    assert step_of("  LD      vmlinux") == "LD vmlinux"
    assert step_of("  CC [M]  drivers/misc/harness_demo.o") == "CC [M] drivers/misc/harness_demo.o"
    assert step_of("make[2]: Entering directory") is None


def test_objects_counted_from_the_tree_are_the_ones_the_build_compiles() -> None:
    result = build(fake_spec(), progress=lambda _: None)
    config = read_config((result.artifact / "config").read_text())
    assert sorted(kbuild_objects(TREE, config)) == sorted(compiled(result.artifact / "build.log", "build")) == [
        "drivers/misc/harness_demo.o", "init/main.o", "kernel/dma/swiotlb.o"]
    # An option off, an object less; ifdef blocks and composite objects are read as kbuild reads them.
    assert count_objects(TREE, {**config, "CONFIG_HARNESS_DEMO": "n"}) == 2


def test_kbuild_reading_conditions_lists_and_composites(tmp_path: Path) -> None:
    (tmp_path / "Kbuild").write_text("obj-y += a/\nobj-$(CONFIG_B) += b/\nobj-$(CONFIG_OFF) += off/\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "Makefile").write_text(
        "# comment\nobj-y := one.o \\\n\ttwo_$(BITS).o\nmmu-y := nommu.o\nmmu-$(CONFIG_MMU) := gup.o mmap.o\n"
        "obj-y += $(mmu-y)\nifdef CONFIG_B\nobj-y += withb.o\nelse\nobj-y += withoutb.o\nendif\n"
        "ifneq ($(CONFIG_MMU),y)\nobj-y += nommu-only.o\nendif\n"
        "ifeq ($(SOMETHING_ELSE),1)\nobj-y += unknown-condition.o\nendif\n"
        "obj-y += combo.o\ncombo-y := c1.o c2.o\ncombo-$(CONFIG_B) += c3.o\nlib-y += lib1.o\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Kbuild").write_text("obj-$(CONFIG_B) += b.o\nobj-m += mod.o\n")
    config = {"CONFIG_64BIT": "y", "CONFIG_B": "y", "CONFIG_MMU": "y"}
    assert sorted(kbuild_objects(tmp_path, config)) == [
        "a/c1.o", "a/c2.o", "a/c3.o", "a/gup.o", "a/lib1.o", "a/mmap.o", "a/one.o", "a/two_64.o",
        "a/unknown-condition.o", "a/withb.o", "b/b.o"]
    assert "b/mod.o" in kbuild_objects(tmp_path, {**config, "CONFIG_MODULES": "y"})
    assert sorted(kbuild_objects(tmp_path, {"CONFIG_64BIT": "y"})) == [
        "a/c1.o", "a/c2.o", "a/lib1.o", "a/nommu-only.o", "a/nommu.o", "a/one.o", "a/two_64.o",
        "a/unknown-condition.o", "a/withoutb.o"]


def test_a_warm_object_directory_counts_what_make_will_rebuild(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for patch in sorted((SERIES / "sample").glob("0*.patch")):
        (series / patch.name).write_bytes(patch.read_bytes())
    first = build(fake_spec(series), progress=lambda _: None)
    out = out_dir()
    tree = out.parent / "src"
    assert stale_objects(tmp_path / "empty") is None
    # After the build the tree is reset to the pristine source: the two files the series
    # patched came back with new mtimes, so without the series their objects are stale.
    assert stale_objects(out) == 2
    time.sleep(0.01)
    os.utime(tree / "init" / "main.c")
    assert stale_objects(out) == 3
    assert stale_objects(out, started=time.time() - 3600) == 3, "objects make wrote since it started count too"
    # The series edited (not a cache hit): make compiles main.o and the two again, then the
    # reset leaves the two stale again.
    patch = series / "0002-harness_demo-name-the-series-when-loaded.patch"
    patch.write_text(patch.read_text().replace("sample series v1", "sample series v1b"))
    build(fake_spec(series), progress=lambda _: None)
    assert stale_objects(out) == 2
    config = read_config((first.artifact / "config").read_text())
    plan = plan_for(tree, out, config, None, cold=False, started=time.time())
    assert (plan.total, plan.source, plan.cold) == (2, "to rebuild", False)


def test_the_previous_cold_build_of_a_configuration_is_the_next_ones_total() -> None:
    first = build(fake_spec(), progress=lambda _: None)
    (record_file,) = (cache_dir() / "build-history").glob("*.json")
    record = load_record(record_file)
    assert record is not None and record.objects == 3 and len(record.curve) == 21
    assert record.curve[0] == 0 and record.curve[-1] <= record.seconds
    config = read_config((first.artifact / "config").read_text())
    plan = plan_for(TREE, out_dir(), config, record, cold=True, started=time.time())
    assert (plan.total, plan.source) == (3, "last build")
    assert plan_for(TREE, out_dir(), config, None, cold=True, started=time.time()).source == "counted"
    # Another configuration has its own record; an incremental build writes none.
    other = BuildSpec(source=str(TREE), configs=[SAMPLE_CONFIG, str(Path(SAMPLE_CONFIG).with_name("dropped.config"))])
    build(other, allow_dropped=True, progress=lambda _: None)
    assert len(list((cache_dir() / "build-history").glob("*.json"))) == 2
    before = record_file.read_text()
    build(BuildSpec(source=str(TREE), series=str(SERIES / "sample"), configs=[SAMPLE_CONFIG]),
          progress=lambda _: None)
    assert record_file.read_text() == before
    assert json.loads(before)["objects"] == 3


def test_a_record_knows_when_the_link_at_the_end_takes_its_time() -> None:
    # 100 objects in 80 s at an even pace, then 40 s of linking.
    record = Record.of([0.8 * (i + 1) for i in range(100)], 120.0)
    assert record is not None
    assert record.objects == 100 and record.curve[10] == pytest.approx(40.0)
    assert record.tail == pytest.approx(40.0) and record.per_object == pytest.approx(0.8)
    assert record.at(50) == pytest.approx(40.0) and record.at(0) == 0
    assert Record.of([], 10.0) is None
    cold = Plan(100, "last build", record, cold=True)
    # Half way at the recorded pace: 40 s of objects and the 40 s link are left.
    assert time_left(cold, 50, 40.0) == pytest.approx(80.0)
    # Twice as slow as last time (a loaded machine): twice the time left.
    assert time_left(cold, 50, 80.0) == pytest.approx(160.0)
    # All objects done at the recorded pace, the link running for 2 s: the rest of the record's link.
    assert time_left(cold, 100, 82.0, last=80.0) == pytest.approx(38.0)
    assert time_left(cold, 100, 130.0, last=80.0) == 0
    # An incremental build: its objects at the recorded pace, then the link.
    assert time_left(Plan(5, "to rebuild", record, cold=False), 0, 1.0) == pytest.approx(44.0)
    # Counted from the tree, no record: the pace so far, once there is one.
    counted = Plan(200, "counted")
    assert time_left(counted, 2, 2.0) is None
    assert time_left(counted, 50, 25.0) == pytest.approx(75.0)
    assert time_left(counted, 50, 30.0, last=25.0) == pytest.approx(70.0)
    assert time_left(Plan(None, ""), 50, 25.0) is None


def test_a_plain_line_for_logs_and_a_bar_for_terminals() -> None:
    record = Record.of([0.8 * (i + 1) for i in range(100)], 120.0)
    s = status("build", Plan(100, "last build", record), 25, 20.0, "CC kernel/fork.o")
    line = plain_line(s)
    assert line == "build: 25/100 objects (25%), 20s, about 1m40s left; CC kernel/fork.o"
    assert not line.startswith("build build")
    assert plain_line(status("patch 2/3", Plan(None, ""), 7, 65.0, "")) == "build patch 2/3: 7 objects, 1m05s"
    counted = plain_line(status("build", Plan(1000, "counted"), 100, 50.0, "LD vmlinux"))
    assert counted.startswith("build: 100/~1000 objects (10%), 50s, about 7m30s left")
    # More objects than the estimate: the total follows the count.
    assert plain_line(status("build", Plan(10, "counted"), 12, 50.0, "")).startswith("build: 12/~12 objects (100%)")
    bar = bar_line(s, 80)
    assert re.match(r"^build \[#####\.{15}\] 25/100 25% 20s ~1m40s left  CC kernel/fork\.o$", bar), bar
    assert len(bar_line(s, 40)) < 40


def test_the_terminal_redraws_its_bar_below_the_lines() -> None:
    stream = io.StringIO()
    term = Terminal(stream)
    term("build: importing x")
    s = status("build", Plan(10, "counted"), 5, 10.0, "CC a.o")
    term.show(s)
    term("build: warning: something")
    term.clear()
    out = stream.getvalue()
    bar = bar_line(s, 80)
    assert out == ("build: importing x\n" + "\r\033[K" + bar + "\r\033[K" + "build: warning: something\n" + bar
                   + "\r\033[K")
    assert not Terminal.wanted(io.StringIO())
