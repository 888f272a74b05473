"""``python tests/gpu_check.py``: its checks, run on CPU tensors here.

On a GPU machine the same script checks pinned buffers, CUDA builds and the
torn-snapshot guard on CUDA tensors; here ``--cpu`` runs that logic on CPU
tensors, in an interpreter that cannot import Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gpu_check
import pytest
from test_no_ray import run_without_ray

from asyncsync.buckets import Bucket

SCRIPT = str(Path(gpu_check.__file__).resolve())


def test_gpu_check_runs_its_checks_on_cpu_tensors_without_ray() -> None:
    result = run_without_ray(
        """
        import runpy
        sys.argv = ["gpu_check", "--cpu", "--mib", "32", "--reps", "2"]
        runpy.run_path(SCRIPT, run_name="__main__")
        """.replace("SCRIPT", repr(SCRIPT))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for what in ("shared buffer:", "builds:", "torn guard:", "bandwidth:"):
        assert f"ok   {what}" in out, out
    assert "FAIL" not in out
    assert out.count("GB/s") == 3
    assert out.strip().endswith("all checks passed")


def test_gpu_check_without_cuda_says_so_and_passes() -> None:
    result = run_without_ray(
        """
        import runpy
        import torch
        if torch.cuda.is_available():
            print("CUDA is not available")  # the GPU suite covers this machine
            sys.exit(0)
        sys.argv = ["gpu_check"]
        runpy.run_path(SCRIPT, run_name="__main__")
        """.replace("SCRIPT", repr(SCRIPT))
    )
    assert result.returncode == 0, result.stderr
    assert "CUDA is not available" in result.stdout


def test_gpu_check_fails_on_a_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_pack = gpu_check.pack

    def off_by_one(named: Any, bucket_bytes: int) -> list[Bucket]:
        return [Bucket(b.buffer, b.index, b.checksum ^ 1) for b in real_pack(named, bucket_bytes)]

    monkeypatch.setattr(gpu_check, "pack", off_by_one)
    assert gpu_check.main(["--cpu", "--mib", "8", "--reps", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL builds: step 0: checksums differ from pack() of the CPU tensors" in out
    assert out.strip().endswith("1 check(s) failed")
