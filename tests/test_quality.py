"""``sparvar analyze`` and ``sparvar eval``: the measures and image metrics on constructed cases with
known answers, and both commands on the CPU preset (files with the expected fields)."""

import json

import torch

from sparvar.analysis import attention_probs, locality, recall, scale_similarity, sink_mass
from sparvar.cli import main
from sparvar.reference import Schedule


S = Schedule([(1, 1), (2, 2), (3, 3)])  # 1 + 4 + 9 = 14 tokens


def test_measures_on_constructed_attention():
    # All mass on the first token: the sinks hold everything.
    p = torch.zeros(1, 1, 9, 14, dtype=torch.float64)
    p[..., 0] = 1
    assert sink_mass(p, S, 1) == 1.0 and sink_mass(p, S, 0) == 0.0
    # A pattern that keeps every key keeps all the mass; one that keeps none keeps nothing.
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 14, 8)
    p = attention_probs(q, k, 0.5)
    assert abs(recall(p, torch.ones(9, 14, dtype=torch.bool)) - 1.0) < 1e-12
    assert recall(p, torch.zeros(9, 14, dtype=torch.bool)) == 0.0
    # Uniform attention over the last scale: the same probability for a key at every distance.
    p = torch.zeros(1, 1, 9, 14, dtype=torch.float64)
    p[..., 5:] = 1 / 9
    assert all(abs(x - 1 / 9) < 1e-12 for x in locality(p, S, 2, 2))
    assert locality(p, S, 2, 3)[3] is None  # a 3x3 grid has no key 3 away
    # Each query on itself only: all the probability at distance 0.
    p = torch.zeros(1, 1, 9, 14, dtype=torch.float64)
    p[0, 0, torch.arange(9), 5 + torch.arange(9)] = 1
    assert locality(p, S, 2, 2) == [1.0, 0.0, 0.0]
    # Two scales attending alike over the keys they share are similar; disjoint profiles are not.
    a = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    a[..., 0] = 1
    b = torch.zeros(1, 1, 9, 14, dtype=torch.float64)
    b[..., 0] = 0.5
    b[..., 13] = 0.5
    assert abs(scale_similarity(a, b, S, 1) - 1.0) < 1e-12
    b = torch.zeros(1, 1, 9, 14, dtype=torch.float64)
    b[..., 3] = 1
    assert scale_similarity(a, b, S, 1) == 0.0


def test_analyze_writes_the_measures_and_plots(tmp_path, capsys):
    assert main(["analyze", "--model", "tiny", "--out", str(tmp_path), "--queries", "16"]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert {"sinks", "similarity", "locality", "recall", "steps", "sink_scales"} <= set(result)
    assert len(result["sinks"]) == 4 and result["steps"] == [1, 2, 3, 4, 5]
    recalls = [x for layer in result["recall"].values() for x in layer.values()]
    assert recalls and all(0.0 <= x <= 1.0 + 1e-12 for x in recalls)
    assert all((tmp_path / f).stat().st_size > 0
               for f in ("sinks.png", "similarity.png", "locality.png", "attention_maps.png"))
    assert "recall" in capsys.readouterr().out
    # Locality at every scale (queries sampled), and maps of the last scale's sparse layers: each
    # a distribution over the scale's grid (with the rest of the mass on earlier scales) and the
    # pattern's allowed keys there.
    assert all(str(s) in result["locality"]["0"] for s in result["steps"])
    h, w = result["schedule"][-1]
    assert result["maps"] and {m["step"] for m in result["maps"]} == {5}
    for m in result["maps"]:
        probs = torch.tensor(m["probs"], dtype=torch.float64)
        assert probs.shape == (h, w) and (probs >= 0).all()
        assert abs(probs.sum().item() + m["mass_elsewhere"] - 1) < 1e-3
        assert {v for row in m["allowed"] for v in row} <= {0, 1} and 0 <= m["query"] < h * w


def test_analyze_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", "--model", "tiny", "--plan", "dense", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--plan dense has no sparse pattern" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_image_metrics_on_known_cases():
    from sparvar.evaluation import psnr, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    assert psnr(a, a) == float("inf") and abs(ssim(a, a) - 1.0) < 1e-12
    b = a + 0.1  # every pixel 0.1 off: MSE 0.01, 20 dB
    assert abs(psnr(a, b) - 20.0) < 1e-9
    noisy = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert ssim(a, noisy) < ssim(a, (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1)) < 1.0


def test_eval_writes_every_row(tmp_path, capsys):
    from sparvar.cli import main as cli

    assert cli(["eval", "--model", "tiny", "--seeds", "0", "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "eval.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "default", "csla_only", "cs4a_only", "windows_smaller", "windows_larger",
                          "dense_skip_last_1", "dense_skip_last_2"]
    for name in ("default", "csla_only", "cs4a_only"):
        r = rows[name]
        assert r["compared"] == "features" and 0 < r["ssim"] <= 1 and r["psnr_db"] > 0
        assert 0 <= r["mean_recall"] <= 1 and r["mean_attention_rel_error"] >= 0
        assert r["attention_rel_error"] and r["recall"]
    assert rows["csla_only"]["plan"]["bound_layer"] == -1 and rows["cs4a_only"]["plan"]["bound_layer"] == 3
    assert (tmp_path / "grid.png").stat().st_size > 0 and "| default |" in (tmp_path / "eval.md").read_text()
