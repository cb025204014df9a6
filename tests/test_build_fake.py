"""`harness build` on the fake kernel tree (tests/fakelinux), in seconds: the cache,
an edited patch, the per-patch report, dropped options, patches that do not
apply, each kind of source, a build spec. The fake tree's make answers the
targets the build uses (its README says how). The inputs' parsers are tested in
test_build_inputs.py; what only a real kernel shows, in test_build.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.build import BuildFailed, BuildSpec, build, import_tree, load_series, resolve_source
from harness.errors import BadInput
from harness.hashing import file_sha256
from harness.kernel import bzimage_release, resolve_kernel
from harness.paths import cache_dir
from tests.conftest import REPO, Cli

FAKE = REPO / "tests" / "fakelinux"
TREE = FAKE / "tree"
SERIES = FAKE / "series"
SAMPLE_CONFIG = str(FAKE / "kconfigs" / "sample.config")
RELEASE = "6.12.0-fake"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test its own artifact cache (the `cli` subprocess inherits it too)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(path))
    return path


def fake_spec(series: Path = SERIES / "sample") -> BuildSpec:
    return BuildSpec(source=str(TREE), series=str(series), configs=[SAMPLE_CONFIG])


def cached_trees_are_clean() -> None:
    """Every cached source tree is back at its pristine import: no patch left applied
    (nothing left in its journal; a tree imported from a directory has that directory's
    files, byte for byte, and no others)."""
    trees = list((cache_dir() / "src").glob("*/src"))
    assert trees, "no cached tree at all"
    for tree in trees:
        touched = tree.parent / "pristine" / "touched.json"
        assert not touched.exists() or json.loads(touched.read_text())["files"] == {}, f"{tree} left patched"
        if not (tree.parent / "imported.json").exists():
            # Imported by an earlier harness as a git repository (still used as it is): clean = no change.
            assert (tree / ".git" / "harness-imported").exists(), f"{tree}: neither kind of import"
            status = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True, text=True)
            assert status.stdout == "", f"{tree} left dirty: {status.stdout[:200]}"
            continue
        spec = Path(json.loads((tree.parent / "imported.json").read_text())["spec"])
        if spec.is_dir() and not (spec / ".git").exists():
            diff = subprocess.run(["diff", "-r", "--no-dereference", str(spec), str(tree)], capture_output=True,
                                  text=True)
            assert diff.returncode == 0, f"{tree} differs from {spec}: {diff.stdout[:300]}"


def compiled(log: Path, section: str) -> list[str]:
    """The objects make compiled in one section (`### build: make ...`) of a build.log."""
    text = log.read_text()
    start = text.index(f"\n### {section}: ")
    end = text.find("\n### ", start + 1)
    return re.findall(r"^  CC(?: \[M\])?\s+(\S+)$", text[start:end if end > 0 else None], re.M)


def report_rows(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"patch\s+\d+\s+(ok|FAILED)\s", line)]


# -- the cache ------------------------------------------------------------------------


def test_identical_inputs_are_a_cache_hit_without_make(cli: Cli) -> None:
    said: list[str] = []
    first = build(fake_spec(), progress=said.append)
    assert not first.cached and first.release == RELEASE
    assert said[0] == f"build: importing {TREE}" and said[-1].startswith(f"build: {RELEASE} in ")
    art = first.artifact
    assert sorted(p.name for p in art.iterdir()) == ["System.map", "build.log", "bzImage", "config",
                                                     "harness-build.json", "modules"]
    assert bzimage_release(art / "bzImage") == RELEASE
    meta = json.loads((art / "harness-build.json").read_text())
    assert [p["subject"] for p in meta["patches"]] == ["swiotlb: announce the fake series at boot",
                                                       "harness_demo: name the series when loaded"]
    assert meta["source"]["identity"].startswith("dir:") and meta["fragments"] == [SAMPLE_CONFIG]
    assert (art / "modules/lib/modules" / RELEASE / "kernel/drivers/misc/harness_demo.ko").is_file()
    # Identical inputs again, through the command: a cache hit, no make at all.
    proc = cli("build", "--source", str(TREE), "--series", str(SERIES / "sample"), "--config", SAMPLE_CONFIG,
               "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)[0]
    assert result["cached"] is True and result["artifact"] == str(art) and result["release"] == RELEASE
    assert proc.stderr == "" and result["seconds"] < 1
    again: list[str] = []
    assert build(fake_spec(), progress=again.append).cached and again == []
    # The artifact directory is a kernel too, with its series and modules.
    kernel = resolve_kernel(str(art))
    assert kernel.release == RELEASE and kernel.sha256 == file_sha256(art / "bzImage")
    assert kernel.series == tuple(p["subject"] for p in meta["patches"])
    assert kernel.modules_dir == art / "modules/lib/modules" / RELEASE
    cached_trees_are_clean()


def test_an_edited_patch_rebuilds_incrementally(tmp_path: Path) -> None:
    series = tmp_path / "series"
    shutil.copytree(SERIES / "sample", series)
    first = build(fake_spec(series), progress=lambda _: None)
    assert sorted(compiled(first.artifact / "build.log", "build")) == [
        "drivers/misc/harness_demo.o", "init/main.o", "kernel/dma/swiotlb.o"]
    patch = series / "0002-harness_demo-name-the-series-when-loaded.patch"
    original = patch.read_text()
    patch.write_text(original.replace("sample series v1", "sample series v1b"))
    edited = build(fake_spec(series), progress=lambda _: None)
    assert not edited.cached and edited.artifact != first.artifact
    # The cached tree kept the mtimes of files no patch touches: init/main.c is not compiled again.
    assert sorted(compiled(edited.artifact / "build.log", "build")) == [
        "drivers/misc/harness_demo.o", "kernel/dma/swiotlb.o"]
    # Nor is the configuration made again: the same source and options gave it last time.
    log = (edited.artifact / "build.log").read_text()
    # ccache: off for the first compile in the O= directory (all misses), on for the later one.
    assert "  CCACHE  disabled" in (first.artifact / "build.log").read_text() and "  CCACHE  on" in log
    assert "\n### tinyconfig: " in (first.artifact / "build.log").read_text()
    assert "\n### tinyconfig: " not in log and "\n### olddefconfig: " not in log and "\n### configure: " in log
    assert (edited.artifact / "config").read_text() == (first.artifact / "config").read_text()
    ko = f"modules/lib/modules/{RELEASE}/kernel/drivers/misc/harness_demo.ko"
    assert (edited.artifact / ko).read_bytes() != (first.artifact / ko).read_bytes()
    # The first artifact is still there: undoing the edit is a hit again.
    patch.write_text(original)
    back = build(fake_spec(series), progress=lambda _: None)
    assert back.cached and back.artifact == first.artifact
    cached_trees_are_clean()


def test_a_comment_edit_in_a_fragment_is_still_a_cache_hit(tmp_path: Path) -> None:
    first = build(fake_spec(), progress=lambda _: None)
    fragment = tmp_path / "sample.config"
    fragment.write_text(Path(SAMPLE_CONFIG).read_text().replace("# printk,", "# printk (reworded),"))
    again = build(BuildSpec(source=str(TREE), series=str(SERIES / "sample"), configs=[str(fragment)]),
                  progress=lambda _: None)
    assert again.cached and again.artifact == first.artifact
    # An option is what makes a different kernel.
    fragment.write_text(Path(SAMPLE_CONFIG).read_text().replace("CONFIG_HARNESS_DEMO=m", "CONFIG_HARNESS_DEMO=y"))
    other = build(BuildSpec(source=str(TREE), series=str(SERIES / "sample"), configs=[str(fragment)]),
                  progress=lambda _: None)
    assert not other.cached and other.artifact != first.artifact


def test_a_damaged_artifact_is_rebuilt_with_a_line_saying_so(cli: Cli) -> None:
    first = build(fake_spec(), progress=lambda _: None)
    image = first.artifact / "bzImage"
    intact = image.read_bytes()
    # Same size, one byte changed: only the recorded hash tells.
    image.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))
    proc = cli("run", "--kernel", str(first.artifact), "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert f"kernel {first.artifact}: {image} no longer matches the hash its build recorded" in proc.stderr
    # Truncated: the setup header tells, naming the image.
    image.write_bytes(intact[: len(intact) // 2])
    proc = cli("run", "--kernel", str(first.artifact), "--dry-run")
    assert proc.returncode == 2 and f"kernel {image}: truncated bzImage" in proc.stderr, proc.stderr
    said: list[str] = []
    again = build(fake_spec(), progress=said.append)
    assert not again.cached and again.artifact == first.artifact
    assert said[0] == f"build: cached artifact {first.artifact} is damaged (image hash or metadata): building it again"
    assert image.read_bytes() == intact
    assert build(fake_spec(), progress=lambda _: None).cached


def test_two_identical_builds_at_once_build_once(cli: Cli) -> None:
    argv = cli.argv("build", "--source", str(TREE), "--series", str(SERIES / "sample"), "--config", SAMPLE_CONFIG,
                    "--json")
    procs = [subprocess.Popen(argv, env=cli.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    results = [json.loads(o[0])[0] for o in outs]
    assert results[0]["artifact"] == results[1]["artifact"]
    # One of them built; the other waited for the tree and found the artifact.
    assert sorted(r["cached"] for r in results) == [False, True]
    assert not list(Path(results[0]["artifact"]).parent.glob(".*")), "staging or old entries left behind"
    cached_trees_are_clean()


def test_a_build_killed_half_way_does_not_poison_the_cache(cli: Cli) -> None:
    """SIGKILL (no `finally` runs): no artifact is published, the next identical
    build builds and publishes a complete one, and sweeps what the killed one left."""
    argv = cli.argv("build", "--source", str(TREE), "--series", str(SERIES / "sample"), "--config", SAMPLE_CONFIG,
                    "--json")
    env = dict(cli.env(), FAKEKBUILD_SLOW="2")
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kernels = cache_dir() / "kernels"
    deadline = time.monotonic() + 60
    while not list(kernels.glob(".art-*/build.log")):
        assert time.monotonic() < deadline and proc.poll() is None, "the build never started compiling"
        time.sleep(0.05)
    time.sleep(1.0)
    proc.kill()
    proc.wait(10)
    assert not [p for p in kernels.iterdir() if not p.name.startswith(".")], "a killed build published something"
    # The killed make's compilers die with it or finish alone; the next build takes the lock when they are gone.
    again = cli(*argv[3:], timeout=120)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)[0]
    assert result["cached"] is False and bzimage_release(Path(result["image"])) == RELEASE
    assert not list(kernels.glob(".*")), "the killed build's staging was not swept"
    assert build(fake_spec(), progress=lambda _: None).cached
    cached_trees_are_clean()


def test_two_different_builds_of_one_source_at_once_take_turns(cli: Cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    shutil.copytree(SERIES / "sample", other)
    patch = other / "0002-harness_demo-name-the-series-when-loaded.patch"
    patch.write_text(patch.read_text().replace("sample series v1", "sample series v2"))
    procs = [subprocess.Popen(cli.argv("build", "--source", str(TREE), "--series", str(series), "--config",
                                       SAMPLE_CONFIG, "--json"),
                              env=dict(cli.env(), FAKEKBUILD_SLOW="0.3"), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for series in (SERIES / "sample", other)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    results = [json.loads(o[0])[0] for o in outs]
    assert results[0]["artifact"] != results[1]["artifact"]
    cached_trees_are_clean()
    # Each artifact holds its own series: the shared tree was locked, not raced. The
    # same builds made one after the other in a cache of their own give the same module.
    ko = f"modules/lib/modules/{RELEASE}/kernel/drivers/misc/harness_demo.ko"
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "alone"))
    for result, series in zip(results, (SERIES / "sample", other), strict=True):
        alone = build(fake_spec(series), progress=lambda _: None)
        assert (Path(result["artifact"]) / ko).read_bytes() == (alone.artifact / ko).read_bytes()
    assert (Path(results[0]["artifact"]) / ko).read_bytes() != (Path(results[1]["artifact"]) / ko).read_bytes()


# -- per-patch -----------------------------------------------------------------------------


def test_per_patch_names_the_patch_that_breaks_the_build_and_new_warnings(cli: Cli, private_cache: Path) -> None:
    proc = cli("build", "--source", str(TREE), "--series", str(SERIES / "breaks-at-2"), "--config", SAMPLE_CONFIG,
               "--per-patch")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "patch 2 ('swiotlb: report a pool size that does not exist') breaks the build" in proc.stderr
    assert 'kernel/dma/swiotlb.c:20:1: error: #error "no header defines HARNESS_POOL_SIZE"' in proc.stderr
    report = report_rows(proc.stderr)
    assert [row.split()[:3] for row in report] == [["patch", "0", "ok"], ["patch", "1", "ok"],
                                                  ["patch", "2", "FAILED"]]
    assert '  1 new warning(s): kernel/dma/swiotlb.c: warning: #warning "the default pool size is a guess' in report[1]
    assert "new warning" not in report[0] and "#error" in report[2]
    # Never published (that would be a cache hit); the log is kept and named.
    assert not list((private_cache / "kernels").glob("*/harness-build.json"))
    kept = re.search(r"\(log (\S+-failed\.log)\)", proc.stderr)
    assert kept and "no header defines HARNESS_POOL_SIZE" in Path(kept.group(1)).read_text()
    cached_trees_are_clean()


def test_per_patch_report_of_a_good_series_is_kept_with_the_artifact() -> None:
    result = build(fake_spec(), per_patch=True, progress=lambda _: None)
    assert [(s.index, s.status, s.new_warnings) for s in result.steps] == [(0, "ok", []), (1, "ok", []),
                                                                           (2, "ok", [])]
    assert result.steps[2].subject == "harness_demo: name the series when loaded"
    hit = build(fake_spec(), per_patch=True, progress=lambda _: None)
    assert hit.cached and hit.steps == result.steps
    # Per-patch and plain builds of the same inputs are different artifacts.
    assert build(fake_spec(), progress=lambda _: None).artifact != result.artifact


# -- configuration ------------------------------------------------------------------------


def test_dropped_options_say_unmet_dependency_or_no_such_symbol(cli: Cli) -> None:
    dropped = str(FAKE / "kconfigs" / "dropped.config")
    args = ("build", "--source", str(TREE), "--config", SAMPLE_CONFIG, "--config", dropped)
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CONFIG_SEV_GUEST: requested y, got not set (probably an unmet dependency)" in proc.stderr
    assert "CONFIG_HARNESS_NO_SUCH_OPTION: requested y, got not set (no such option" in proc.stderr
    assert "(--allow-dropped to build anyway)" in proc.stderr
    anyway = cli(*args, "--allow-dropped", "--json")
    assert anyway.returncode == 0, anyway.stderr[-2000:]
    assert json.loads(anyway.stdout)[0]["dropped"] == [
        "CONFIG_SEV_GUEST: requested y, got not set (probably an unmet dependency)",
        "CONFIG_HARNESS_NO_SUCH_OPTION: requested y, got not set (no such option in this tree's Kconfig)"]
    assert "build: warning: CONFIG_SEV_GUEST: requested y" in anyway.stderr


LOUD_CONFIG = str(FAKE / "kconfigs" / "loud.config")


def test_a_fragment_may_ask_for_an_option_the_series_adds(cli: Cli) -> None:
    spec = BuildSpec(source=str(TREE), series=str(SERIES / "new-option"), configs=[SAMPLE_CONFIG, LOUD_CONFIG])
    result = build(spec, progress=lambda _: None)
    assert result.dropped == []
    assert "CONFIG_HARNESS_DEMO_LOUD=y" in (result.artifact / "config").read_text()
    assert "drivers/misc/harness_demo_loud.o" in compiled(result.artifact / "build.log", "build")
    # Without the series the tree has no such option: dropped, and said so.
    proc = cli("build", "--source", str(TREE), "--config", SAMPLE_CONFIG, "--config", LOUD_CONFIG)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CONFIG_HARNESS_DEMO_LOUD: requested y, got not set (no such option in this tree's Kconfig)" in proc.stderr
    cached_trees_are_clean()


def test_per_patch_configures_again_after_a_patch_that_changes_kconfig() -> None:
    spec = BuildSpec(source=str(TREE), series=str(SERIES / "new-option"), configs=[SAMPLE_CONFIG, LOUD_CONFIG])
    result = build(spec, per_patch=True, progress=lambda _: None)
    assert [(s.index, s.status) for s in result.steps] == [(0, "ok"), (1, "ok"), (2, "ok")] and result.dropped == []
    log = result.artifact / "build.log"
    # The base has no such option yet (not a dropped option: the series adds it); patch 1
    # adds it, the configuration is made again and its object compiled; patch 2 changes C only.
    assert "harness_demo_loud.o" not in " ".join(compiled(log, "base"))
    # (The fake kbuild compiles everything again after a configuration change; kbuild, what
    # depends on the options that changed.)
    assert "drivers/misc/harness_demo_loud.o" in compiled(log, "patch 1/2")
    assert compiled(log, "patch 2/2") == ["drivers/misc/harness_demo.o"]
    assert log.read_text().count("\n### tinyconfig: ") == 2
    assert "CONFIG_HARNESS_DEMO_LOUD=y" in (result.artifact / "config").read_text()
    # Both configurations are kept: the same per-patch build elsewhere makes neither again.
    shutil.rmtree(result.artifact)
    again = build(spec, per_patch=True, progress=lambda _: None)
    text = (again.artifact / "build.log").read_text()
    assert "\n### tinyconfig: " not in text and text.count("\n### configure: ") == 2
    cached_trees_are_clean()


def test_a_series_that_changes_kconfig_is_a_new_key_and_one_that_does_not_keeps_its_key() -> None:
    from harness.build.pipeline import _cache_key

    source = resolve_source(str(TREE))
    plain = load_series(str(SERIES / "sample"), Path("/nonexistent"))
    kconfig = load_series(str(SERIES / "new-option"), Path("/nonexistent"))
    tools = {"cc": "gcc"}
    key = json.dumps({"format": "build-v2", "source": source.identity, "patches": [p.sha256 for p in plain],
                      "options": [], "base": "tinyconfig", "tools": tools, "per_patch": False, "arch": "x86_64"},
                     sort_keys=True)
    # The key a series that touches no Kconfig had before configure moved after the series.
    assert _cache_key(source, plain, [], "tinyconfig", tools, False) == hashlib.sha256(key.encode()).hexdigest()[:24]
    before = json.loads(key) | {"patches": [p.sha256 for p in kconfig]}
    assert _cache_key(source, kconfig, [], "tinyconfig", tools, False) != hashlib.sha256(
        json.dumps(before, sort_keys=True).encode()).hexdigest()[:24]


def test_the_first_named_base_is_configured(tmp_path: Path) -> None:
    frag = tmp_path / "defconfig.config"
    frag.write_text("# harness-base: defconfig\n# the fake defconfig enables modules; printk stays on\n"
                    "CONFIG_PRINTK=y\n")
    result = build(BuildSpec(source=str(TREE), configs=[str(frag)]), progress=lambda _: None)
    config = (result.artifact / "config").read_text()
    assert "CONFIG_HARNESS_DEMO=m" in config and "# CONFIG_CC_OPTIMIZE_FOR_SIZE is not set" in config
    tiny = build(BuildSpec(source=str(TREE), configs=[SAMPLE_CONFIG]), progress=lambda _: None)
    assert "CONFIG_CC_OPTIMIZE_FOR_SIZE=y" in (tiny.artifact / "config").read_text()


# -- patches ----------------------------------------------------------------------------------


def test_patch_that_does_not_apply_is_bad_input_and_leaves_the_tree_clean(cli: Cli) -> None:
    proc = cli("build", "--source", str(TREE), "--series", str(SERIES / "does-not-apply"), "--config", SAMPLE_CONFIG)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "patch 1" in line and "0001-swiotlb-tweak-a-line-that-is-not-there.patch" in line
    assert "'swiotlb: tweak a line that is not there'" in line and "kernel/dma/swiotlb.c" in line
    cached_trees_are_clean()


def test_a_later_patch_that_does_not_apply_undoes_the_earlier_ones(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(SERIES / "sample" / "0001-swiotlb-announce-the-fake-series-at-boot.patch", series)
    shutil.copy(SERIES / "does-not-apply" / "0001-swiotlb-tweak-a-line-that-is-not-there.patch",
                series / "0002-swiotlb-tweak-a-line-that-is-not-there.patch")
    with pytest.raises(BadInput, match=r"^patch 2 \S+/0002-swiotlb-tweak-a-line-that-is-not-there\.patch "
                                       r"\('swiotlb: tweak a line that is not there'\) does not apply: "
                                       r"patch failed: kernel/dma/swiotlb\.c:17$"):
        build(fake_spec(series), progress=lambda _: None)
    cached_trees_are_clean()


def test_missing_inputs_are_bad_input(cli: Cli, tmp_path: Path) -> None:
    proc = cli("build", "--source", str(TREE), "--series", str(tmp_path / "nope.mbox"))
    assert proc.returncode == 2 and f"series {tmp_path / 'nope.mbox'}: no such file or directory" in proc.stderr
    proc = cli("build", "--source", str(tmp_path / "linux"))
    assert proc.returncode == 2 and f"source {tmp_path / 'linux'}: no such file or directory" in proc.stderr
    (tmp_path / "notes").mkdir()
    proc = cli("build", "--source", str(tmp_path / "notes"))
    assert proc.returncode == 2 and "not a kernel tree (no Makefile and Kconfig)" in proc.stderr
    (tmp_path / "notes.tar").write_text("not a tarball")
    proc = cli("build", "--source", str(tmp_path / "notes.tar"))
    assert proc.returncode == 2 and "not a tarball" in proc.stderr


def test_an_mbox_builds_like_its_directory(tmp_path: Path) -> None:
    mbox = tmp_path / "sample.mbox"
    mbox.write_bytes(b"".join(p.read_bytes() for p in sorted((SERIES / "sample").glob("*.patch"))))
    from_mbox = build(fake_spec(mbox), progress=lambda _: None)
    patches = json.loads((from_mbox.artifact / "harness-build.json").read_text())["patches"]
    assert [p["file"] for p in patches] == [f"{mbox}#1", f"{mbox}#2"]
    # Same patches, same bytes: the same kernel (the key is the patches' hashes, not their files).
    assert build(fake_spec(), progress=lambda _: None).artifact == from_mbox.artifact


# -- sources ---------------------------------------------------------------------------------


def test_a_tarball_source_is_known_by_its_hash(tmp_path: Path) -> None:
    shutil.copytree(TREE, tmp_path / "linux-fake")
    tarball = tmp_path / "linux-fake.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(tmp_path), "linux-fake"], check=True)
    source = resolve_source(str(tarball))
    assert source.kind == "tarball" and source.identity == "tar:" + file_sha256(tarball)
    result = build(BuildSpec(source=str(tarball), series=str(SERIES / "sample"), configs=[SAMPLE_CONFIG]),
                   progress=lambda _: None)
    assert result.release == RELEASE
    # The same tree as a directory is another source, but the same kernel inside.
    assert bzimage_release(build(fake_spec(), progress=lambda _: None).artifact / "bzImage") == RELEASE


def test_a_git_source_builds_its_uncommitted_changes_and_is_never_modified(tmp_path: Path) -> None:
    linux = tmp_path / "linux"
    shutil.copytree(TREE, linux)
    git = ["git", "-C", str(linux), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "fake 6.12"]):
        subprocess.run([*git, *args], check=True)
    main_c = linux / "init" / "main.c"
    main_c.write_text(main_c.read_text() + '#warning "an uncommitted change"\n')
    before = [subprocess.run([*git, *args], capture_output=True, text=True, check=True).stdout
              for args in (["status", "--porcelain"], ["diff", "--cached"], ["stash", "list"])]
    dirty = build(BuildSpec(source=str(linux), configs=[SAMPLE_CONFIG]), progress=lambda _: None)
    line = len(main_c.read_text().splitlines())
    log = (dirty.artifact / "build.log").read_text()
    assert f'init/main.c:{line}:1: warning: #warning "an uncommitted change"' in log
    identity = json.loads((dirty.artifact / "harness-build.json").read_text())["source"]["identity"]
    assert re.fullmatch(r"git:[0-9a-f]{40}\+[0-9a-f]{16}", identity)
    committed = build(BuildSpec(source=f"{linux}@HEAD", configs=[SAMPLE_CONFIG]), progress=lambda _: None)
    assert committed.artifact != dirty.artifact
    assert "uncommitted" not in (committed.artifact / "build.log").read_text()
    after = [subprocess.run([*git, *args], capture_output=True, text=True, check=True).stdout
             for args in (["status", "--porcelain"], ["diff", "--cached"], ["stash", "list"])]
    assert after == before == [" M init/main.c\n", "", ""]
    with pytest.raises(BadInput, match="no-such-branch is not a commit in"):
        resolve_source(f"{linux}@no-such-branch")


def test_missing_toolchain_is_infrastructure(cli: Cli, tmp_path: Path) -> None:
    env = cli.env()
    env["PATH"] = str(tmp_path)  # no gcc, make, flex... on this PATH
    proc = subprocess.run(cli.argv("build", "--source", str(TREE)), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "kernel build toolchain incomplete: missing gcc, make" in proc.stderr


def test_a_build_that_fails_without_per_patch_names_the_first_errors(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match=r"^kernel does not compile: kernel/dma/swiotlb\.c:20:1: error: "
                                          r"#error \"no header defines HARNESS_POOL_SIZE\" \| .*"
                                          r"\(log \S+-failed\.log\)$") as failed:
        build(fake_spec(SERIES / "breaks-at-2"), progress=lambda _: None)
    assert failed.value.exit_code == 1 and failed.value.steps == []
    cached_trees_are_clean()


# -- build specs ------------------------------------------------------------------------------


def test_a_build_spec_builds_with_paths_relative_to_it(tmp_path: Path, cli: Cli) -> None:
    shutil.copytree(TREE, tmp_path / "src" / "linux")
    shutil.copytree(SERIES / "sample", tmp_path / "specs" / "series")
    shutil.copy(SAMPLE_CONFIG, tmp_path / "specs" / "sample.config")
    spec_file = tmp_path / "specs" / "fake.yaml"
    spec_file.write_text("source: ../src/linux\nseries: series\nconfigs: [sample.config]\n")
    proc = cli("build", str(spec_file), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)[0]
    assert result["release"] == RELEASE
    meta = json.loads((Path(result["artifact"]) / "harness-build.json").read_text())
    assert meta["source"]["spec"] == str(tmp_path / "src" / "linux")
    assert meta["fragments"] == [str(tmp_path / "specs" / "sample.config")]


def test_reset_puts_back_what_a_series_added_removed_renamed_and_changed(tmp_path: Path) -> None:
    """The cached tree is not a git repository: the files a patch touches are saved before
    it applies and written back after the build. Files no patch touched keep their mtimes
    (the O= directory's objects stay valid); the ones put back get new ones (make sees them)."""
    series = tmp_path / "series"
    series.mkdir()
    work = tmp_path / "work"
    shutil.copytree(TREE, work)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fake"], check=True)
    (work / "drivers/misc/new").mkdir()
    (work / "drivers/misc/new/added.c").write_text("/* a file the series adds, in a new directory */\n")
    subprocess.run([*git, "rm", "-q", "drivers/virt/coco/sev-guest.c"], check=True)
    subprocess.run([*git, "mv", "init/main.c", "init/start.c"], check=True)
    (work / "kernel/dma/swiotlb.c").write_text((work / "kernel/dma/swiotlb.c").read_text() + "/* changed */\n")
    (work / "scripts/fakekbuild.py").chmod(0o755)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fake: add, remove, rename, change, chmod"], check=True)
    patch = subprocess.run([*git, "format-patch", "-M", "-1", "--stdout"], check=True, capture_output=True).stdout
    (series / "0001-everything.patch").write_bytes(patch)
    # Import, apply and reset as a build does, without compiling (the fake Kbuild names main.c).
    root = cache_dir() / "src" / "by-hand"
    root.mkdir(parents=True)
    tree = import_tree(resolve_source(str(TREE)), root)
    before = {p: p.stat().st_mtime_ns for p in tree.path.rglob("*") if p.is_file()}
    time.sleep(0.01)
    for i, p in enumerate(load_series(str(series), tmp_path), 1):
        tree.apply(p, i)
    assert (tree.path / "drivers/misc/new/added.c").is_file() and (tree.path / "init/start.c").is_file()
    assert not (tree.path / "init/main.c").exists() and not (tree.path / "drivers/virt/coco/sev-guest.c").exists()
    assert os.access(tree.path / "scripts/fakekbuild.py", os.X_OK)
    tree.reset()
    diff = subprocess.run(["diff", "-r", str(TREE), str(tree.path)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    assert not (tree.path / "drivers/misc/new").exists(), "a directory the series made is gone again"
    assert not os.access(tree.path / "scripts/fakekbuild.py", os.X_OK)
    after = {p: p.stat().st_mtime_ns for p in tree.path.rglob("*") if p.is_file()}
    touched = {tree.path / r for r in ("init/main.c", "drivers/virt/coco/sev-guest.c", "kernel/dma/swiotlb.c",
                                       "scripts/fakekbuild.py")}
    assert after.keys() == before.keys()
    assert {p for p in after if after[p] != before[p]} == touched
    tree.reset()   # nothing to do: a second reset changes nothing
    assert {p: p.stat().st_mtime_ns for p in tree.path.rglob("*") if p.is_file()} == after
