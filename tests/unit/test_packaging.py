"""Packaging traps of the package-dir mapping (llmtrain.operator <- operator/, llmtrain.runtime <- runtime/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"llmtrain": "llmtrain", "operator": "llmtrain.operator", "runtime": "llmtrain.runtime"}


def package_dirs() -> set[str]:
    found = set()
    for src, pkg in ROOTS.items():
        for init in (REPO / src).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / src)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    return found


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == package_dirs(), "add the new package to [tool.setuptools] packages"
    assert config["package-dir"] == {
        "llmtrain": "llmtrain",
        "llmtrain.operator": "operator",
        "llmtrain.runtime": "runtime",
    }
    # Never a top-level `operator` package: it would shadow the standard library's.
    assert not (REPO / "operator" / "__init__.py").read_text().startswith("from operator")
    import operator

    assert operator.__file__ is not None and "site-packages" not in operator.__file__
    assert Path(operator.__file__).parent == Path(sysconfig.get_paths()["stdlib"])


def _installed_recipe(venv: Path) -> list[str]:
    """The commands `make` runs to create the virtualenv, for a venv at `venv` (dry run)."""
    out = subprocess.run(
        ["make", "-n", "-B", f"VENV={venv}", f"{venv}/.installed"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return [line for line in out.splitlines() if "python" in line]


def test_make_bootstraps_a_fresh_venv_from_the_repo_root(tmp_path: Path) -> None:
    """CI's first command on a clean clone: create the venv and run pip from the repo root.

    Nothing in a fresh venv has imported the standard library's `operator` before `python -m`
    puts the working directory on sys.path, so the repo's operator/ folder shadows it and
    pip dies ("cannot import name 'eq' from 'operator'"). The Makefile runs Python with -P.
    """
    venv = tmp_path / "venv"
    recipe = _installed_recipe(venv)
    create = next(line for line in recipe if " -m venv " in line)
    pip_lines = [line for line in recipe if " -m pip " in line]
    assert pip_lines, recipe
    # Build the venv exactly as the recipe does (its `[ -x ... ] ||` guard included).
    subprocess.run(["bash", "-c", create], check=True, cwd=REPO)
    for line in pip_lines:
        # The same interpreter and flags, asking pip for its version instead of installing.
        probe = line.split(" -m pip ")[0] + " -m pip --version"
        proc = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, (probe, proc.stderr[-600:])
        assert "pip " in proc.stdout
    # Negative control: the same venv without -P, from the same directory, is broken.
    bare = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert bare.returncode != 0 and "operator" in bare.stderr


@pytest.mark.slow
def test_wheel_installs_every_module(tmp_path: Path) -> None:
    """A non-editable install must contain every subpackage and a working entry point."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("llmtrain-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
    # Nothing but llmtrain itself at the top level: no `operator` shadowing the stdlib's.
    assert tops == {"llmtrain", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    venv = tmp_path / "venv"
    # cwd=tmp_path, never the repo root: there, `python -m` puts the repo's operator/ folder
    # on sys.path ahead of the standard library's `operator` module.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=tmp_path)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    # Third-party dependencies come from the project's environment (read-only, via a .pth
    # path line: .pth files *inside* it, such as the editable finder, are not processed).
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = textwrap.dedent(f"""
        import importlib, importlib.util, pkgutil, llmtrain
        names = ["llmtrain"] + [m.name for m in pkgutil.walk_packages(llmtrain.__path__, "llmtrain.")]
        for name in names:
            if name.endswith(".__main__"):  # importing it would run the program: find it only
                origin = importlib.util.find_spec(name).origin
            else:
                origin = importlib.import_module(name).__file__
            assert origin.startswith({site!r}), (name, origin)
        print("\\n".join(sorted(names)))
    """)
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stdout.split())
    assert package_dirs() <= imported
    expected_modules = {
        f"{ROOTS[src]}.{'.'.join(p.relative_to(REPO / src).with_suffix('').parts)}".replace(
            f"{ROOTS[src]}.{ROOTS[src]}", ROOTS[src]
        )
        for src in ROOTS
        for p in (REPO / src).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert expected_modules <= imported, sorted(expected_modules - imported)
    help_out = subprocess.run(
        [str(venv / "bin" / "llmtrain"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert help_out.returncode == 0, help_out.stderr
    assert "validate" in help_out.stdout


def _typecheck(root: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "typecheck.py"),
            "--root",
            str(root),
            "--cache-dir",
            str(cache),
        ],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_mypy_checks_all_three_roots_and_catches_runtime_errors(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for part in ("llmtrain", "operator", "runtime"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    cache = REPO / ".mypy_cache"
    clean = _typecheck(root, cache)
    n_files = sum(1 for src in ROOTS for p in (root / src).rglob("*.py"))
    assert f"mypy checked {n_files} files; the package roots hold {n_files} .py files" in clean.stdout, (
        clean.stdout
    )
    # Plant a type error in runtime/ (what `mypy -p llmtrain` alone would never see).
    (root / "runtime" / "_planted.py").write_text('count: int = "not an int"\n')
    planted = _typecheck(root, cache)
    assert planted.returncode != 0
    assert "_planted.py" in planted.stdout and "incompatible types" in planted.stdout.lower()
