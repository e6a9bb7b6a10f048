"""fastopt.gpucheck, the prepared GPU check, on this machine (no GPU): its plan, its JSON, its parts."""
import json
import subprocess
import sys

import pytest
import torch

from fastopt import gpucheck


def test_dry_run_writes_the_json_with_every_stage(tmp_path):
    assert gpucheck.main(["--dry-run", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpucheck-*.json")
    result = json.loads(path.read_text())
    assert result["schema"] == 1 and set(result["stages"]) == {"build", "tests", "bench"}
    assert all(s["status"] == "dry run" for s in result["stages"].values())
    assert result["environment"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_to_test_without_a_gpu(tmp_path, capsys):
    assert gpucheck.main(["--out", str(tmp_path), "--stages", "tests"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpucheck.main(["--out", str(tmp_path), "--stages", "nonsense"])


def test_junit_summary_counts_and_names_the_failures(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    junit = tmp_path / "j.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    str(tmp_path / "test_x.py")], capture_output=True)
    summary = gpucheck._junit_summary(junit)
    assert (summary["tests"], summary["failures"], summary["errors"]) == (2, 1, 0)
    assert [f["test"].split("::")[-1] for f in summary["failed"]] == ["test_bad"]


def test_a_stage_past_its_limit_is_stopped_and_reported():
    code, seconds, _ = gpucheck._run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert code == "timeout" and seconds < 25
