"""Kernels to boot: a bzImage path or a Debian `linux-image-*` package.

`debian:<package>` downloads the package with apt into the artifact cache,
unpacks it with its modules and runs depmod on the unpacked tree (the package's
postinst would do that on a real install). `debian:linux-image-cloud-amd64`
(a meta-package) resolves to the versioned package it depends on.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import process
from harness.errors import BadInput, InfraError
from harness.hashing import file_sha256 as file_sha256  # runner and cli import it from here
from harness.identity import BuildIdentity, distro_version, fragment_names, series_name
from harness.paths import cache_dir, memo_get, memo_put

# Debian's current cloud kernel: the prebuilt kernel tests and benches boot
# (the CLI's default is the sample build: paths.default_kernel()).
PREBUILT_KERNEL = "debian:linux-image-cloud-amd64"
_PKG_RE = re.compile(r"^linux-image-[a-z0-9.+-]+$")


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image and what is known about it."""

    spec: str
    image: Path
    release: str
    sha256: str
    modules_dir: Path | None = None
    package: str | None = None
    series: tuple[str, ...] = ()
    build: BuildIdentity | None = None

    @property
    def identity(self) -> BuildIdentity:
        """Which build this is (see harness/identity.py): the image's hash unless resolved from a build."""
        return self.build or BuildIdentity(f"image:{self.sha256}", self.release)

    def to_json(self) -> dict[str, object]:
        return {
            "spec": self.spec,
            "image": str(self.image),
            "release": self.release,
            "sha256": self.sha256,
            "modules_dir": str(self.modules_dir) if self.modules_dir else None,
            "package": self.package,
            "series": list(self.series),
            "build": self.identity.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Kernel:
        modules = data.get("modules_dir")
        build = data.get("build")
        return cls(
            spec=str(data["spec"]),
            image=Path(str(data["image"])),
            release=str(data["release"]),
            sha256=str(data["sha256"]),
            modules_dir=Path(str(modules)) if modules else None,
            package=str(data["package"]) if data.get("package") else None,
            series=tuple(str(s) for s in _as_list(data.get("series"))),
            build=BuildIdentity.from_json(build) if isinstance(build, dict) else None,
        )


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else []


def bzimage_release(path: Path) -> str:
    """The release string of a bzImage (the first word of its version string). Raises BadInput."""
    return bzimage_version(path).split()[0]


def bzimage_version(path: Path) -> str:
    """Read the version string from a bzImage's setup header.

    The header (at 0x1f1) carries the "HdrS" magic at 0x202 and, at 0x20e, a
    pointer (relative to 0x200) to the version string "6.1.0-56-cloud-amd64
    (debian-kernel@...) #1 SMP ...". Raises BadInput for anything else.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(0x10000)
    except OSError as e:
        raise BadInput(f"kernel {path}: {e.strerror}") from None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise BadInput(f"kernel {path}: not a bzImage (no HdrS setup header)")
    # The setup sectors (0x1f1; 0 means 4) and the protected-mode size in
    # 16-byte paragraphs (syssize, 0x1f4) say how long the file must be: a
    # truncated copy fails here, not as a silent QEMU exit.
    needed = ((head[0x1F1] or 4) + 1) * 512 + int.from_bytes(head[0x1F4:0x1F8], "little") * 16
    size = path.stat().st_size
    if size < needed:
        raise BadInput(f"kernel {path}: truncated bzImage ({size} bytes; its setup header says {needed})")
    ptr = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[ptr:ptr + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    if not text.strip():
        raise BadInput(f"kernel {path}: bzImage has no version string")
    return text


def resolve_kernel(spec: str) -> Kernel:
    """Turn a --kernel argument into a Kernel. Raises BadInput, InfraError or BuildFailed.

    A bzImage, a kernel build directory, a build artifact (a directory with
    harness-build.json), a build spec YAML (built, or found in the cache), or
    debian:<package>.
    """
    if spec.startswith("debian:"):
        return _debian_kernel(spec[len("debian:"):], spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadInput(f"kernel {spec}: no such file")
    if path.suffix in (".yaml", ".yml"):
        from harness.build import build, load_spec

        result = build(load_spec(path))
        return _artifact_kernel(result.artifact, spec)
    if (path / "harness-build.json").is_file():
        return _artifact_kernel(path, spec)
    if path.is_file() and (path.parent / "harness-build.json").is_file():
        # An artifact's own image (what `harness reproduce` boots) is that build, not a bare image.
        return _artifact_kernel(path.parent, spec)
    if path.is_dir():
        for candidate in (path / "arch/x86/boot/bzImage", path / "bzImage"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise BadInput(f"kernel {spec}: directory holds no bzImage")
    path = path.resolve()
    version = bzimage_version(path)
    release = version.split()[0]
    modules = None
    for guess in (path.parent / "modules" / "lib/modules" / release,
                  path.parent.parent / "lib/modules" / release,  # an unpacked Debian package
                  Path("/lib/modules") / release):
        if guess.is_dir():
            modules = guess
            break
    sha256 = file_sha256(path)
    return Kernel(spec=spec, image=path, release=release, sha256=sha256, modules_dir=modules,
                  build=BuildIdentity(f"image:{sha256}", release, version=distro_version(version)))


def _artifact_kernel(artifact: Path, spec: str) -> Kernel:
    import json

    try:
        meta = json.loads((artifact / "harness-build.json").read_text())
        release = str(meta["release"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"kernel {spec}: unreadable build record {artifact / 'harness-build.json'}: {e}") from None
    image = artifact / "bzImage"
    bzimage_release(image)  # a truncated or missing image is named before anything boots
    sha256 = file_sha256(image)
    if meta.get("image_sha256") not in (None, sha256):
        raise BadInput(f"kernel {spec}: {image} no longer matches the hash its build recorded "
                       "(damaged artifact; `harness build` of its spec rebuilds it)")
    modules = artifact / "modules" / "lib/modules" / release
    patches = meta.get("patches") or []
    # The cache names an artifact by its key; a copy elsewhere is known by its image.
    in_cache = artifact.resolve().parent == (cache_dir() / "kernels").resolve()
    build = BuildIdentity(f"artifact:{artifact.resolve().name}" if in_cache else f"image:{sha256}", release,
                          series=series_name([str(p.get("file", "")) for p in patches]), patches=len(patches),
                          fragments=fragment_names([str(f) for f in meta.get("fragments") or []]))
    return Kernel(spec=spec, image=image, release=release, sha256=sha256,
                  modules_dir=modules if modules.is_dir() else None,
                  series=tuple(p["subject"] for p in patches), build=build)


def _apt(args: list[str], what: str, cwd: str | None = None) -> str:
    try:
        proc = process.run(args, timeout=600, cwd=Path(cwd) if cwd else None)
    except InfraError as e:
        raise InfraError(f"{what}: {e} (is this a Debian host with apt?)") from None
    if not proc.ok:
        raise _AptFailed(proc.err.strip() or proc.out.strip())
    return proc.out


class _AptFailed(Exception):
    pass


def _concrete_package(package: str) -> str:
    """Follow a meta-package (linux-image-cloud-amd64) to the versioned image."""
    # A versioned image package names its release: linux-image-6.1.0-56-cloud-amd64,
    # linux-image-6.12.57+deb12-cloud-amd64; a meta-package does not.
    if re.match(r"\d+\.\d+\.\d+", package.removeprefix("linux-image-")):
        return package
    # `apt-cache depends` took 0.6-0.9 s of every run: its answer is kept for as long as
    # apt's package lists, sources and pins are the ones it was given on.
    state = _apt_state()
    kept = memo_get(RESOLVED, package, state)
    if isinstance(kept, str):
        return kept
    try:
        out = _apt(["apt-cache", "depends", package], f"package {package}")
    except _AptFailed as e:
        raise BadInput(f"package {package}: {e}") from None
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            memo_put(RESOLVED, package, state, m.group(1))
            return m.group(1)
    raise BadInput(f"package {package}: not a linux-image package apt knows")


RESOLVED = "debian/resolved.json"  # meta-packages resolved, in the cache
APT_STATE = (Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"),
             Path("/etc/apt/preferences"), Path("/etc/apt/preferences.d"))


def _apt_state() -> str:
    """What `apt-cache depends` answers from, as names, sizes and times: the package lists
    (`apt-get update` replaces them), the sources and the pins."""
    state = []
    for path in APT_STATE:
        entries = sorted(path.iterdir()) if path.is_dir() else [path]
        for entry in entries:
            if entry.name in ("lock", "partial"):
                continue  # apt's lock and its downloads in progress
            try:
                st = entry.stat()
            except OSError:
                continue
            state.append(f"{entry} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(state)


def _debian_kernel(package: str, spec: str) -> Kernel:
    if not _PKG_RE.match(package):
        raise BadInput(f"kernel {spec}: expected debian:linux-image-<version>-<flavour>")
    package = _concrete_package(package)
    root = cache_dir() / "debian" / package
    stamp = root / ".unpacked"
    if not stamp.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        # Parallel runs (pytest-xdist, two shells) must not unpack over each other.
        with open(root.parent / f".{package}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not stamp.exists():
                _download_and_unpack(package, root)
    releases = sorted(p.name for p in (root / "lib/modules").iterdir() if p.is_dir())
    if not releases:
        raise InfraError(f"package {package}: unpacked tree has no lib/modules")
    release = releases[0]
    image = root / "boot" / f"vmlinuz-{release}"
    sha256 = stamp.read_text().strip()
    return Kernel(
        spec=spec,
        image=image,
        release=release,
        sha256=sha256,
        modules_dir=root / "lib/modules" / release,
        package=package,
        build=BuildIdentity(f"image:{sha256}", release, version=distro_version(bzimage_version(image))),
    )


def _download_and_unpack(package: str, root: Path) -> None:
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".dl-") as tmp:
        # apt's sandbox user cannot write into root's private temp dirs.
        os.chmod(tmp, 0o755)
        try:
            _apt(["apt-get", "download", "-q", package], f"package {package}", cwd=tmp)
        except _AptFailed:
            # A fresh machine may have stale package lists: refresh once.
            try:
                _apt(["apt-get", "update", "-q"], "apt-get update")
                _apt(["apt-get", "download", "-q", package], f"package {package}", cwd=tmp)
            except _AptFailed as e:
                raise BadInput(f"package {package}: apt-get download failed: {e.args[0][-300:]}") from None
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise InfraError(f"package {package}: apt-get download left no .deb")
        deb = debs[-1]
        staging = Path(tmp) / "root"
        process.run(["dpkg-deb", "-x", str(deb), str(staging)], timeout=300).check(f"dpkg-deb -x {deb.name}")
        releases = [p.name for p in (staging / "lib/modules").iterdir()]
        for release in releases:
            depmod = shutil.which("depmod") or "/sbin/depmod"
            process.run([depmod, "-b", str(staging), release], timeout=300).check(f"depmod {release}")
            image = staging / "boot" / f"vmlinuz-{release}"
            (staging / ".unpacked").write_text(file_sha256(image) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
