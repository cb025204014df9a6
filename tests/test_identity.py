"""A kernel's build identity and its name: what tells two builds of one release apart.

The series and builds here are the shipped ones (kernels/coco-sample and
tests/data/series/warn-on-read, whose series file lists the sample's patches
from their own directory) and real Debian images; an artifact directory is
made by hand in a private cache from a copy of a real image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.identity import BuildIdentity, distro_version, fragment_names, names_by_key, series_name, unique_names
from harness.kernel import Kernel, resolve_kernel
from harness.rundir import KernelRecord, ProfileRecord, RunRecord, read_run, write_run
from tests.conftest import REPO, write_meta_json

SAMPLE = REPO / "kernels" / "coco-sample"
WARN = REPO / "tests" / "data" / "series" / "warn-on-read"


def patch_files(series: Path) -> list[str]:
    """The file of each patch as a build records it: the series directory joined with each entry."""
    names = [line for line in (series / "series").read_text().splitlines() if line and not line.startswith("#")]
    return [str(series / name) for name in names]


def test_a_series_is_named_after_the_directory_it_was_given_as() -> None:
    assert series_name(patch_files(SAMPLE)) == "coco-sample"
    # warn-on-read lists the sample's three patches from kernels/coco-sample, then its own.
    assert series_name(patch_files(WARN)) == "warn-on-read"
    assert series_name(["/tmp/fixes.mbox#1", "/tmp/fixes.mbox#2"]) == "fixes"
    assert series_name([str(WARN / "0004-swiotlb-warn-when-harness_series-is-read.patch")]) == "warn-on-read"
    assert series_name(["/tmp/0001-swiotlb-fix-the-pool.patch"]) == "swiotlb-fix-the-pool"
    assert series_name([]) is None
    assert fragment_names(["/x/kconfigs/base.config", "/y/debug.config"]) == ("base", "debug")
    assert distro_version("6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC "
                          "Debian 6.1.192-2 (2026-11-16)") == "Debian 6.1.192-2"
    assert distro_version("6.12.117+ (harness@harness) #1 SMP Thu Jan  1 00:00:00 UTC 2026") is None


def test_builds_of_one_release_get_names_that_tell_them_apart() -> None:
    sample = BuildIdentity("artifact:d1d1", "6.12.117+", "coco-sample", 3, ("base",))
    warn = BuildIdentity("artifact:466c", "6.12.117+", "warn-on-read", 4, ("base",))
    assert unique_names([(sample, None), (warn, None)]) == ["6.12.117+ coco-sample (3 patches)",
                                                            "6.12.117+ warn-on-read (4 patches)"]
    # Only what differs is added, and only to the builds that need it.
    debug = BuildIdentity("artifact:77aa", "6.12.117+", "coco-sample", 3, ("base", "debug"))
    assert unique_names([(sample, None), (debug, None), (warn, None)]) == [
        "6.12.117+ coco-sample (3 patches) [base]", "6.12.117+ coco-sample (3 patches) [base+debug]",
        "6.12.117+ warn-on-read (4 patches)"]
    one = BuildIdentity("image:aaaa1111aaaa1111", "6.1.0-56-cloud-amd64", version="Debian 6.1.192-2")
    two = BuildIdentity("image:bbbb2222bbbb2222", "6.1.0-56-cloud-amd64", version="Debian 6.1.193-1")
    assert unique_names([(one, None), (two, None)]) == ["6.1.0-56-cloud-amd64 (Debian 6.1.192-2)",
                                                        "6.1.0-56-cloud-amd64 (Debian 6.1.193-1)"]
    same = BuildIdentity("image:cccc3333cccc3333", "6.1.0-56-cloud-amd64", version="Debian 6.1.192-2")
    assert unique_names([(one, None), (same, None)]) == ["6.1.0-56-cloud-amd64 (Debian 6.1.192-2) image:aaaa1111aaaa",
                                                         "6.1.0-56-cloud-amd64 (Debian 6.1.192-2) image:cccc3333cccc"]
    # A label names the build; one label on two builds gets each build's key.
    assert unique_names([(sample, "base"), (warn, "patched")]) == ["base", "patched"]
    assert unique_names([(sample, "x"), (warn, "x")]) == ["x artifact:d1d1", "x artifact:466c"]
    # Runs of one build are one build, whatever their labels.
    assert names_by_key([(sample, "base"), (warn, None), (sample, "again"), (sample, "base")]) == {
        "artifact:d1d1": "base, again", "artifact:466c": "6.12.117+ warn-on-read (4 patches)"}


def test_the_identity_is_recorded_and_read_back(tmp_path: Path) -> None:
    build = BuildIdentity("artifact:466cc815580f7de6e32d43da", "6.12.117+", "warn-on-read", 4, ("base",))
    record = RunRecord(run_id="r", profile=ProfileRecord("emulated", "emulated"),
                       kernel=KernelRecord(release="6.12.117+", sha256="ab" * 32, build=build, label="patched"))
    write_run(tmp_path, record)
    data = json.loads((tmp_path / "meta.json").read_text())["kernel"]
    assert data["build"]["key"] == build.key and data["label"] == "patched"
    again = read_run(tmp_path).kernel
    assert again.identity() == build and again.name() == "patched"
    # A record of an older harness has no build: its image hash, or its release on its target.
    write_meta_json(tmp_path, {"run_id": "r", "profile": {"requested": "emulated", "effective": "emulated"},
                               "kernel": {"release": "6.12.117+", "sha256": "ab" * 32}})
    assert read_run(tmp_path).kernel.identity().key == "image:" + "ab" * 32
    assert KernelRecord(release="6.1.0-9").identity("ssh://lab1").key == "release:6.1.0-9@ssh://lab1"
    write_meta_json(tmp_path, {"run_id": "r", "profile": {"requested": "emulated", "effective": "emulated"},
                               "kernel": {"release": "6.12.117+", "build": {"release": "x"}}})
    with pytest.raises(Exception, match="kernel.build: not a build identity"):
        read_run(tmp_path)


def test_an_artifact_is_its_cache_key_and_its_image_resolves_as_it(debian_kernel: Kernel, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    artifact = tmp_path / "cache" / "kernels" / "0123456789abcdef01234567"
    artifact.mkdir(parents=True)
    shutil.copy2(debian_kernel.image, artifact / "bzImage")
    meta = {"release": debian_kernel.release, "fragments": ["/r/kconfigs/base.config"],
            "patches": [{"file": f, "subject": f"patch {i}", "sha256": "0"} for i, f in enumerate(patch_files(WARN))]}
    (artifact / "harness-build.json").write_text(json.dumps(meta))
    for spec in (artifact, artifact / "bzImage"):
        kernel = resolve_kernel(str(spec))
        assert kernel.identity == BuildIdentity("artifact:0123456789abcdef01234567", debian_kernel.release,
                                                "warn-on-read", 4, ("base",))
        assert kernel.series == ("patch 0", "patch 1", "patch 2", "patch 3")
        assert Kernel.from_json(kernel.to_json()) == kernel
    # A copy outside the cache is known by its image; a bare image by its hash and its Debian version.
    copy = tmp_path / "elsewhere"
    shutil.copytree(artifact, copy)
    assert resolve_kernel(str(copy)).identity.key == f"image:{debian_kernel.sha256}"
    assert debian_kernel.identity.key == f"image:{debian_kernel.sha256}"
    assert (debian_kernel.identity.version or "").startswith("Debian 6.")
