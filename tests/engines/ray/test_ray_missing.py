"""Without Ray installed, `--engine ray` fails with the install hint (exit 2), through the real code path.

Ray is made unimportable the way a missing package is: `sys.modules["ray"] = None` set by a
sitecustomize shim on PYTHONPATH, so `import ray` raises ImportError inside the CLI process.
"""

from __future__ import annotations

from tests.conftest import ROOT, run_rerank


def test_engine_ray_without_ray_names_the_extra(tmp_path, pairs_parquet, ce_model):
    shim = tmp_path / "no_ray"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    out = tmp_path / "out.parquet"
    proc = run_rerank("score", str(pairs_parquet), "-o", str(out), "-m", ce_model, "--engine", "ray",
                      env={"PYTHONPATH": f"{shim}:{ROOT}"})
    assert proc.returncode == 2
    assert proc.stderr.decode() == (
        "error: --engine ray needs Ray, which is not installed: pip install 'rerank-cli[ray]'\n")
    assert proc.stdout == b""
    assert not out.exists()


def test_local_engine_does_not_need_ray(tmp_path, pairs_parquet, ce_model):
    shim = tmp_path / "no_ray"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    proc = run_rerank("score", str(pairs_parquet), "-o", str(tmp_path / "out.jsonl"), "-m", ce_model, "-q",
                      env={"PYTHONPATH": f"{shim}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr.decode()
