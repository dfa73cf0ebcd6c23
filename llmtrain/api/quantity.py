"""Kubernetes quantities as numbers (``500m`` → 0.5, ``16Gi`` → 17179869184).

Here, in the API, because both sides read them: the operator sizes pods and ``ray start``
from ``spec.resources``, and the driver gives each training worker its pod's CPUs. Standard
library only.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_SUFFIX: dict[str, int | Decimal] = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def parse_quantity(value: str) -> Decimal:
    """A Kubernetes quantity as a number (``500m`` → 0.5, ``16Gi`` → 17179869184)."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    return Decimal(m.group(1)) * Decimal(str(_SUFFIX[m.group(2) or ""]))


def ray_num_cpus(cpu: str) -> int:
    """Ray's logical CPUs for a pod's CPU limit: rounded up, like KubeRay (500m → 1)."""
    return max(1, math.ceil(parse_quantity(cpu)))
