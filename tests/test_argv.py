"""Golden files of the exact QEMU argv per profile (parameters at their defaults),
and of the variants that change the argv's shape: TDX's JSON -object with a quote
socket, SNP with IGVM, TIO with legacy VFIO containers.

Regenerate with HARNESS_REGEN_GOLDEN=1 after an intended change, and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.plan import build_argv
from harness.profiles import apply_params, available, load_profile
from tests.conftest import check_golden

GOLDEN = Path(__file__).parent / "golden"
MRCONFIGID = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v"  # bytes 0..47
VARIANTS = {
    "tdx-quote": ("tdx", {"quote_socket": "vsock:2:4050", "mrconfigid": MRCONFIGID}),
    "tdx-quote-unix": ("tdx", {"quote_socket": "unix:/var/run/tdx-qgs/qgs.socket"}),
    "snp-igvm": ("snp", {"igvm": "/fw/snp.igvm", "host_data": "A" * 43 + "="}),
    "tio-container": ("tio", {"host_bdf": "0000:41:00.1", "vfio_backend": "container"}),
    "tio-bdf": ("tio", {"host_bdf": "0000:41:00.1"}),
}


def _argv(name: str, params: dict[str, str], accel: str) -> list[str]:
    profile = apply_params(load_profile(name), params)
    return build_argv("qemu-system-x86_64", profile, accel, Path("/k/bzImage"), Path("/k/initrd.cpio"),
                      "console=ttyS0", "/sock", "harness-main")


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_argv_matches_golden(name: str, accel: str) -> None:
    check_golden(_argv(name, {}, accel), GOLDEN / f"{name}-{accel}.argv.json")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_variants_match_golden(variant: str) -> None:
    name, params = VARIANTS[variant]
    profile = apply_params(load_profile(name), params)
    check_golden([*_argv(name, params, "kvm"), "#hotplug", *profile.hotplug], GOLDEN / f"{variant}.argv.json")


def test_tdx_quote_socket_uses_the_json_object_form() -> None:
    argv = _argv("tdx", {"quote_socket": "vsock:2:4050"}, "kvm")
    obj = json.loads(argv[argv.index("-object") + 1])
    assert obj == {"qom-type": "tdx-guest", "id": "tdx0", "sept-ve-disable": True,
                   "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"}}
    plain = _argv("tdx", {}, "kvm")
    assert plain[plain.index("-object") + 1] == "tdx-guest,id=tdx0,sept-ve-disable=on"


def test_tio_hotplugs_through_iommufd_by_default() -> None:
    profile = apply_params(load_profile("tio"), {"host_bdf": "0000:41:00.1", "tio_flag": "x-tio=on"})
    argv = _argv("tio", {"host_bdf": "0000:41:00.1"}, "kvm")
    assert argv[argv.index("iommufd,id=iommufd0") - 1] == "-object"
    assert profile.hotplug == ("vfio-pci,host=0000:41:00.1,iommufd=iommufd0,id=tio0,bus=hp0,x-tio=on",)
    legacy = apply_params(load_profile("tio"), {"host_bdf": "0000:41:00.1", "vfio_backend": "container"})
    assert "iommufd" not in " ".join([*legacy.object_argv(), *legacy.hotplug])


def test_argv_is_a_list_of_separate_words() -> None:
    argv = build_argv("qemu", load_profile("emulated"), "tcg", Path("/k"), Path("/i"),
                      "console=ttyS0 rdinit=/x y", "/s", "n")
    assert argv[argv.index("-append") + 1] == "console=ttyS0 rdinit=/x y"
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg"
