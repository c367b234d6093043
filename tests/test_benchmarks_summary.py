"""benchmarks/summarize_conversions.py turns training logs + diagnostics into one Markdown summary."""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_conversions.py"


def test_summary_tables(tmp_path, capsys, monkeypatch):
    log = {"stages": {"transfer": {"steps_done": 12, "tokens": 49152, "initial_val_loss": 4.0, "final_val_loss": 3.0,
                                   "tokens_per_s": 74.0, "wall_s": 673.0, "peak_rss_mb": 1663.0}},
           "val_loss_by_mode": {"hybrid": 4.8, "swa_only": 4.7, "linear_only": 5.4},
           "kernels": {"auto@cpu": "kernels/chunked.py (PyTorch chunked, autograd)"}}
    (tmp_path / "hedgecats.json").write_text(json.dumps(log))
    (tmp_path / "diag_hedgecats").mkdir()
    diag = {"runs": ["hybrid", "swa_only"], "model": "m", "window": 64, "limit": 50,
            "tasks": {"piqa": {"hybrid": 0.68, "swa_only": 0.66}},
            "perplexity": {"hybrid": {"inside": 34.7, "beyond": 78.3}, "swa_only": {"inside": 34.7, "beyond": 51.2}},
            "probes": {"passkey@256": {"n": 4, "hybrid": 0.5, "swa_only": 0.25}},
            "linear_share_per_layer": [0.4, 0.8],
            "headline": {"piqa": {"metric": "acc", "hybrid_minus_swa_only": 0.02, "hybrid_minus_linear_only": 0.1}}}
    (tmp_path / "diag_hedgecats" / "diagnostics.json").write_text(json.dumps(diag))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(tmp_path)])
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "| hedgecats | transfer | 12 | 49152 | 4.000 → 3.000 | 74 | 673 | 1663 |" in out
    assert "| hedgecats | 4.800 | 4.700 | 5.400 | auto@cpu: kernels/chunked.py" in out
    assert "| piqa | 0.680 | 0.660 |" in out and "| ppl beyond w | 78.30 | 51.20 |" in out
    assert "| passkey@256 (n=4) | 0.50 | 0.25 |" in out and "Mean LA share of the normaliser (hybrid): 0.600" in out
    assert "| piqa | acc | +0.020 | +0.100 |" in out
