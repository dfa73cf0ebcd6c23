"""`llmtrain data prepare` / `inspect` through typer's CliRunner, and the import-weight rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from llmtrain.cli.data import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import BASE_SPEC, stdlib_sample, write_docs


def job_file(tmp_path: Path, glob: str, out: Path) -> Path:
    job = {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "data-cli"},
        "spec": {
            **BASE_SPEC,
            "data": {
                "sources": [{"name": "py", "local": {"glob": glob, "textUnit": "file"}}],
                "tokenizer": {"train": {"vocabSize": 400}},
                "outputUri": str(out),
                "validationFraction": 0.2,
            },
        },
    }
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job))
    return p


def test_prepare_prints_summary_then_reuses(tmp_path: Path) -> None:
    write_docs(tmp_path / "src", stdlib_sample(20))
    job = job_file(tmp_path, str(tmp_path / "src" / "*.txt"), tmp_path / "out")
    runner = CliRunner()
    first = runner.invoke(app, ["prepare", str(job)])
    assert first.exit_code == 0, first.output
    assert "py" in first.output and "natural" in first.output and "train" in first.output
    assert (tmp_path / "out" / "manifest.json").exists()
    again = runner.invoke(app, ["prepare", str(job)])
    assert again.exit_code == 0 and "reused" in again.output
    inspect = runner.invoke(app, ["inspect", str(tmp_path / "out"), "--windows", "2", "--context", "32"])
    assert inspect.exit_code == 0, inspect.output
    assert "sha256 ok" in inspect.output and "window 1" in inspect.output


def test_prepare_bad_input_exits_nonzero_naming_the_field(tmp_path: Path) -> None:
    job = job_file(tmp_path, str(tmp_path / "missing" / "*.txt"), tmp_path / "out")
    res = CliRunner().invoke(app, ["prepare", str(job)])
    assert res.exit_code == 1
    assert "spec.data.sources[0].local.glob" in " ".join(res.output.split())
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_inspect_rejects_a_corrupt_shard(tmp_path: Path) -> None:
    write_docs(tmp_path / "src", stdlib_sample(20))
    job = job_file(tmp_path, str(tmp_path / "src" / "*.txt"), tmp_path / "out")
    assert CliRunner().invoke(app, ["prepare", str(job), "--overwrite"]).exit_code == 0
    shard = tmp_path / "out" / "validation-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "out")])
    assert res.exit_code == 1 and "truncated" in res.output


def _imported_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_cli_module_is_light() -> None:
    mods = _imported_after("import llmtrain.cli.data")
    assert not mods & {"torch", "ray", "tokenizers", "boto3", "numpy", "datasets"}


def test_loader_imports_only_torch_and_stdlib() -> None:
    mods = _imported_after("import llmtrain.runtime.data.loader")
    assert "torch" in mods
    assert not mods & {"pydantic", "ray", "boto3", "tokenizers", "datasets", "pyarrow", "yaml"}
