"""The benchmark report runs end to end (tiny sizes) and writes a JSON with measured rows and a PNG."""
import json
import subprocess
import sys


def test_bench_report_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastopt.bench", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert report["device"]["name"] and report["versions"]["torch"]
    assert report["copy_bandwidth"] and report["copy_bandwidth"]["GBps"] > 0
    rows = {(r["config"], r["method"]): r for r in report["rows"]}
    for method in ("fastopt-cpu", "torch-fused", "torch-foreach", "torch-forloop"):
        ok = [r for (c, m), r in rows.items() if m == method and r["status"] == "ok"]
        assert ok, f"{method} did not run: {[r['status'] for (c, m), r in rows.items() if m == method]}"
        for r in ok:
            assert r["ms"] > 0 and r["GBps"] > 0
    assert list(tmp_path.glob("*.png"))
    assert "== bars ==" in proc.stdout
