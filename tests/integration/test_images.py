"""The images built by ``make images`` (tools/images.sh), checked in their archives.

What a node imports (``ctr -n k8s.io images import``) is the docker-archive under
``${LLMTRAIN_CACHE:-~/.cache/llmtrain}/images``; these tests read those files, so what is
checked is what the node runs:

* each archive names exactly the image the chart (values.yaml + appVersion) or the spec
  (``spec.resources.image``'s default) uses, so neither needs test-only values;
* the config: uid 65532, HOME, the venv first on PATH, the entrypoints, the ports;
* the layers: torch at the Makefile's pin in the runtime image, none in the operator's;
  the project's own layer small and last (a Python-only change rebuilds that alone);
  nothing root-owned in the user's home; no build-time mount left behind;
* run as the pods will, through buildah: ``ray --version``, torch and llmtrain.runtime
  import, ``llmtrain --help``/``llmtrain operator --help`` as uid 65532, HOME writable.

Skipped, with the reason, when the archives are missing (``make images`` builds them).
Each checker returns its problems and has a negative control (the wrong archive for a
name must be reported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LLMTRAIN_CACHE", Path.home() / ".cache" / "llmtrain"))
IMAGES = CACHE / "images"
SCRIPT = ROOT / "tools" / "images.sh"
UID = "65532"
# The project's own layer (its wheel): far below this, while the dependency layers are
# hundreds of MB. A change to the layer order that merged them would blow past it.
PROJECT_LAYER_MAX = 20 * 1024 * 1024


def chart_image() -> str:
    chart = yaml.safe_load((ROOT / "charts" / "llmtrain" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "llmtrain" / "values.yaml").read_text())
    return f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"


def spec_image() -> str:
    from llmtrain.api.spec import ResourcesSpec

    return str(ResourcesSpec.model_fields["image"].default)


def makefile_torch_version() -> str:
    m = re.search(r"^TORCH\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH := torch==X line"
    return m.group(1)


def script_names() -> dict[str, str]:
    text = SCRIPT.read_text()
    return {k: re.search(rf"^{k}=(\S+)$", text, re.M).group(1) for k in ("OPERATOR", "RUNTIME")}  # type: ignore[union-attr]


@dataclass
class Layer:
    size: int
    # path (no leading ./ or /) -> (uid, is a directory)
    entries: dict[str, tuple[int, bool]] = field(default_factory=dict)


@dataclass
class Archive:
    repo_tags: list[str]
    config: dict[str, Any]
    layers: list[Layer]


@cache
def read_archive(path: Path) -> Archive:
    """The manifest, the image config and every layer's file list. Layers are uncompressed
    tars inside the archive: tarfile seeks over file data, so a 5 GB archive is read in
    seconds."""
    with tarfile.open(path, "r:") as outer:

        def member(name: str) -> Any:
            f = outer.extractfile(name)
            assert f is not None, f"{path}: {name} is not a file"
            return f

        manifest = json.load(member("manifest.json"))
        assert len(manifest) == 1, f"{path}: {len(manifest)} images in one archive"
        config = json.load(member(manifest[0]["Config"]))
        layers = []
        for name in manifest[0]["Layers"]:
            layer = Layer(size=outer.getmember(name).size)
            with tarfile.open(fileobj=member(name), mode="r:") as inner:
                for m in inner:
                    layer.entries[m.name.removeprefix("./").lstrip("/")] = (m.uid, m.isdir())
            layers.append(layer)
    return Archive(manifest[0].get("RepoTags") or [], config, layers)


def common_problems(a: Archive, name: str) -> list[str]:
    problems: list[str] = []
    if a.repo_tags != [name]:
        problems.append(f"names {a.repo_tags}, not [{name!r}]")
    cfg = a.config.get("config", {})
    if cfg.get("User") != f"{UID}:{UID}":
        problems.append(f"runs as {cfg.get('User')!r}, not {UID}:{UID}")
    env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    if env.get("HOME") != "/home/llmtrain":
        problems.append(f"HOME is {env.get('HOME')!r}")
    if not env.get("PATH", "").startswith("/opt/llmtrain/bin:"):
        problems.append(f"the venv is not first on PATH: {env.get('PATH')!r}")
    home = [
        (p, uid)
        for layer in a.layers
        for p, (uid, _) in layer.entries.items()
        if (p == "home/llmtrain" or p.startswith("home/llmtrain/")) and str(uid) != UID
    ]
    if home:
        problems.append(f"not owned by {UID} in its HOME: {home[:5]}")
    # tools/images.sh bind-mounts the host's CA bundle over the image's for RUN steps; a
    # mount point created for a file the image lacks would stay behind as an empty file.
    leftovers = [
        p for layer in a.layers for p in layer.entries if p in ("etc/pip.conf", "var/cache/wheelhouse")
    ]
    if leftovers:
        problems.append(f"build mounts left in a layer: {leftovers}")
    return problems


def dist_infos(a: Archive, project: str) -> list[tuple[int, str]]:
    """(layer index, version) of every ``<project>-<version>.dist-info`` in the venv."""
    pat = re.compile(rf"opt/llmtrain/lib/python3\.\d+/site-packages/{project}-([^/]+)\.dist-info$")
    return [(i, m.group(1)) for i, layer in enumerate(a.layers) for p in layer.entries if (m := pat.match(p))]


def operator_problems(a: Archive, name: str) -> list[str]:
    problems = common_problems(a, name)
    cfg = a.config.get("config", {})
    if cfg.get("Entrypoint") != ["llmtrain"] or cfg.get("Cmd") != ["operator"]:
        problems.append(f"entrypoint {cfg.get('Entrypoint')} {cfg.get('Cmd')}, not llmtrain operator")
    if dist_infos(a, "torch") or dist_infos(a, "ray"):
        problems.append("torch or ray in the operator image")
    if not dist_infos(a, "kopf"):
        problems.append("no kopf in the operator image")
    problems += project_layer_problems(a)
    return problems


def runtime_problems(a: Archive, name: str) -> list[str]:
    problems = common_problems(a, name)
    cfg = a.config.get("config", {})
    if cfg.get("Entrypoint") not in (None, []) or cfg.get("Cmd") != ["ray", "--help"]:
        problems.append(
            f"entrypoint {cfg.get('Entrypoint')} {cfg.get('Cmd')}: the pods' command must stand alone"
        )
    if "6379/tcp" not in cfg.get("ExposedPorts", {}):
        problems.append("the Ray GCS port is not exposed")
    torch = dist_infos(a, "torch")
    pin = makefile_torch_version()
    if [v.split("+")[0] for _, v in torch] != [pin]:
        problems.append(f"torch {torch}, the Makefile pins {pin}")
    ray = dist_infos(a, "ray")
    if not ray:
        problems.append("no ray in the runtime image")
    problems += project_layer_problems(a)
    # torch alone, below the other dependencies: a dependency change keeps its layer.
    if torch and ray and torch[0][0] >= ray[0][0]:
        problems.append("torch is not in a layer below the other dependencies")
    return problems


def project_layer_problems(a: Archive) -> list[str]:
    own = dist_infos(a, "llmtrain")
    if len(own) != 1:
        return [f"llmtrain installed {len(own)} times: {own}"]
    i = own[0][0]
    problems = []
    # Only metadata (USER, ENV...) may follow the project's layer, which add empty layers.
    if any(layer.entries for layer in a.layers[i + 1 :]):
        problems.append("files are added above the project's layer (rebuilt on every code change)")
    if a.layers[i].size > PROJECT_LAYER_MAX:
        problems.append(
            f"the project's layer is {a.layers[i].size >> 20} MiB: dependencies are installed with it, "
            "so a Python-only change reinstalls them"
        )
    return problems


# ----------------------------------------------------------------------------------- tests


def test_script_builds_the_default_images() -> None:
    """The names tools/images.sh builds are the chart's and the spec's defaults."""
    assert script_names() == {"OPERATOR": chart_image(), "RUNTIME": spec_image()}


def archive(target: str) -> Path:
    path = IMAGES / f"{target}.tar"
    if not path.is_file():
        pytest.skip(f"{path} missing: run `make images` (tools/images.sh)")
    return path


def test_operator_archive() -> None:
    a = read_archive(archive("operator"))
    assert operator_problems(a, chart_image()) == []
    # Negative control: the runtime image under the operator's name is reported.
    rt = read_archive(archive("runtime"))
    assert {p.split(" ")[0] for p in operator_problems(rt, chart_image())} >= {"names", "entrypoint", "torch"}


def test_runtime_archive() -> None:
    a = read_archive(archive("runtime"))
    assert runtime_problems(a, spec_image()) == []
    op = read_archive(archive("operator"))
    assert {p.split(" ")[0] for p in runtime_problems(op, spec_image())} >= {"names", "entrypoint", "torch"}


def test_archive_ids_match() -> None:
    """Each archive's ``.id`` (the node re-imports on change) is the image config's digest."""
    for target in ("operator", "runtime"):
        path = archive(target)
        with tarfile.open(path, "r:") as t:
            f = t.extractfile("manifest.json")
            assert f is not None
            config_name = json.load(f)[0]["Config"]
        digest = re.sub(r"^(blobs/)?(sha256[:/])?", "", config_name).removesuffix(".json")
        assert (IMAGES / f"{target}.id").read_text().strip() == digest


@pytest.mark.slow
def test_images_run_as_the_pods_will() -> None:
    """`tools/images.sh check`: each image run through buildah as uid 65532."""
    archive("operator")
    archive("runtime")
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("needs root and buildah (make images installs it)")
    r = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"uid={UID}(llmtrain)" in out
    assert f"torch {makefile_torch_version()}" in out
    assert "HOME and /tmp writable" in out and "no torch: ok" in out
