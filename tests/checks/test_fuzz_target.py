"""A bounded run of the atheris target (fuzz/fuzz_frames.py) on its generated seed
corpus: the seeds and ~15 s of mutations must leave the relay without an internal
error (the target raises on `drop_internal_error` or a logged error, and libFuzzer
then exits non-zero with the crashing input). A run of fixed length, so it sits with
the checks rather than in the fast unit lane."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"


def test_fuzz_frames_bounded_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(FUZZ / "make_corpus.py"), str(corpus)], env=env,
                   check=True, capture_output=True)
    seeds = list(corpus.iterdir())
    assert len(seeds) > 50 and sum(p.stat().st_size for p in seeds) < 200 << 10
    run = subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_frames.py"), str(corpus), "-max_total_time=15",
         "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    executed = [line for line in run.stderr.splitlines()
                if line.startswith("stat::number_of_executed_units:")]
    assert executed and int(executed[0].split()[-1]) > len(seeds), run.stderr[-2000:]
