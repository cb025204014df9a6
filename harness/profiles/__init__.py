"""QEMU launch profiles: `qemu_cmdlines/<name>.yaml` loaded into frozen objects.

A profile may `extends:` another; its keys replace the parent's, except keys
written `+key:` whose list is appended to the parent's (`+cmdline: [swiotlb=force]`).
Unknown keys, wrong types and unknown names are BadInput naming the file and key.

The confidential-guest object is data too (`object:`), so that optional
properties (`object_params:`) appear only when their parameter is set, and the
object switches to QEMU's JSON `-object` form when a property is structured
(TDX's `quote-generation-socket` is a SocketAddress, which the key=value form
cannot carry).

The parts: `model` (the Profile record, its timeouts and `-object` arguments),
`load` (the YAML schema, `extends:` and loading), `params` (templates,
parameters and the objects they add).
"""

from harness.profiles.load import KNOWN_KEYS, available, load_profile
from harness.profiles.model import BUILTIN_PARAMS, COCO_KINDS, NEEDS, Profile, Timeouts, size_mib
from harness.profiles.params import IGVM_ID, IOMMUFD_ID, VFIO_BACKENDS, apply_params, socket_address

__all__ = [
    "BUILTIN_PARAMS", "COCO_KINDS", "IGVM_ID", "IOMMUFD_ID", "KNOWN_KEYS", "NEEDS", "VFIO_BACKENDS", "Profile",
    "Timeouts", "apply_params", "available", "load_profile", "size_mib", "socket_address",
]
