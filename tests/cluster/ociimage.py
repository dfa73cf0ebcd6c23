"""Write a one-layer OCI image archive from local files, without a registry or a builder.

The real test node (``node.py``) has no route to any registry, so its sandbox ("pause")
image is made here from the statically linked ``pause`` binary that ``build.sh node``
compiles out of the Kubernetes source: a layer tar, an image config, a manifest and an
``index.json`` whose ``io.containerd.image.name`` annotation names the image, packed as an
OCI archive that ``ctr -n k8s.io images import`` accepts.

The archive is reproducible (fixed mtimes, uid/gid 0, sorted entries, gzip mtime 0), so a
rebuild gives the same digest and containerd keeps the image it already has.

usage::

    python3 tests/cluster/ociimage.py --name registry.k8s.io/pause:3.10.1 \\
        --file /path/to/pause:/pause --entrypoint /pause --user 65535:65535 out.tar

Standard library only (``build.sh`` runs it before the project's virtualenv may exist).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# A fixed timestamp: the same inputs give the same digests.
EPOCH = 0


@dataclass(frozen=True)
class ImageFile:
    """One regular file of the layer: `src` on this machine, `dest` (absolute) in the image."""

    src: Path
    dest: str
    mode: int = 0o755


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, *, size: int = 0, mode: int = 0o644, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    info.mode = mode
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def layer_tar(files: list[ImageFile]) -> bytes:
    """The uncompressed layer: each file's parent directories, then the files, sorted."""
    dirs: set[str] = set()
    for f in files:
        parts = f.dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_info(d + "/", mode=0o755, directory=True), None) for d in sorted(dirs)
    ]
    for f in sorted(files, key=lambda f: f.dest):
        data = f.src.read_bytes()
        members.append((_info(f.dest.strip("/"), size=len(data), mode=f.mode), data))
    return _tar_bytes(members)


def image_config(
    diff_id: str,
    *,
    entrypoint: list[str],
    cmd: list[str] | None = None,
    user: str = "",
    env: list[str] | None = None,
    arch: str = "amd64",
) -> dict[str, Any]:
    config: dict[str, Any] = {"Entrypoint": entrypoint, "Env": env or ["PATH=/"]}
    if cmd:
        config["Cmd"] = cmd
    if user:
        config["User"] = user
    return {
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/cluster/ociimage.py"}],
    }


def oci_archive(
    name: str,
    files: list[ImageFile],
    *,
    entrypoint: list[str],
    cmd: list[str] | None = None,
    user: str = "",
    arch: str = "amd64",
) -> bytes:
    """The bytes of an OCI image-layout tar holding one image named `name` (e.g. ``repo/x:tag``)."""
    raw = layer_tar(files)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer_digest, layer = _blob(gzip.compress(raw, mtime=EPOCH))
    cfg_digest, cfg = _blob(
        json.dumps(
            image_config(diff_id, entrypoint=entrypoint, cmd=cmd, user=user, arch=arch), sort_keys=True
        ).encode()
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": cfg_digest, "size": len(cfg)},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer_digest, "size": len(layer)}],
    }
    man_digest, man = _blob(json.dumps(manifest, sort_keys=True).encode())
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": man_digest,
                "size": len(man),
                "platform": {"architecture": arch, "os": "linux"},
                # containerd's importer names the image after this annotation.
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    blobs = sorted({d: b for d, b in ((layer_digest, layer), (cfg_digest, cfg), (man_digest, man))}.items())
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_info("blobs/", mode=0o755, directory=True), None),
        (_info("blobs/sha256/", mode=0o755, directory=True), None),
    ]
    for digest, data in blobs:
        members.append((_info("blobs/sha256/" + digest.split(":", 1)[1], size=len(data)), data))
    for fname, obj in (("index.json", index), ("oci-layout", {"imageLayoutVersion": "1.0.0"})):
        data = json.dumps(obj, sort_keys=True).encode()
        members.append((_info(fname, size=len(data)), data))
    return _tar_bytes(members)


def _parse_file(spec: str) -> ImageFile:
    src, sep, dest = spec.rpartition(":")
    if not sep or not src or not dest.startswith("/"):
        raise argparse.ArgumentTypeError(f"--file wants SRC:/DEST, got {spec!r}")
    return ImageFile(Path(src), dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="image reference, e.g. registry.k8s.io/pause:3.10.1")
    ap.add_argument("--file", type=_parse_file, action="append", required=True, help="SRC:/DEST")
    ap.add_argument("--entrypoint", required=True, help="the image's entrypoint (one path)")
    ap.add_argument("--user", default="", help="the image's default user, e.g. 65535:65535")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    data = oci_archive(args.name, args.file, entrypoint=[args.entrypoint], user=args.user, arch=args.arch)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"{args.out}: {args.name} ({len(data)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
