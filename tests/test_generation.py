"""The generation path on the CPU preset: ``sparvar generate`` with the dense and the default
(sparse) plan, the same tokens for the same seed, scale skipping, and clear errors."""

import pytest
import torch

from sparvar.cli import main
from sparvar.pipeline import build_pipeline


def run(tmp_path, capsys, *args, name="out.pt"):
    out = tmp_path / name
    assert main(["generate", "--model", "tiny", "--out", str(out), *args]) == 0, capsys.readouterr().err
    return torch.load(out, weights_only=True), capsys.readouterr().out


def test_generate_dense_and_sparse_on_the_cpu_preset(tmp_path, capsys):
    dense, text = run(tmp_path, capsys, "--plan", "dense", "--seed", "3", name="a.pt")
    assert "dense attention at every step" in text and "interpreter" in text
    again, _ = run(tmp_path, capsys, "--plan", "dense", "--seed", "3", name="b.pt")
    assert len(dense["tokens"]) == 6
    assert all(torch.equal(a, b) for a, b in zip(dense["tokens"], again["tokens"]))
    sparse, text = run(tmp_path, capsys, "--seed", "3", name="c.pt")
    assert "cs4a_decide" in text and "csla" in text
    assert [t.shape for t in sparse["tokens"]] == [t.shape for t in dense["tokens"]]
    skipped, _ = run(tmp_path, capsys, "--seed", "3", "--skip-last", "2", name="d.pt")
    assert len(skipped["tokens"]) == 4 and skipped["features"].shape == sparse["features"].shape


def test_dense_cli_tokens_equal_the_python_api(tmp_path, capsys):
    cli, _ = run(tmp_path, capsys, "--plan", "dense", "--seed", "5")
    pipe = build_pipeline("tiny", plan="dense", seed=5)
    result = pipe.generator.generate(pipe.condition(5), seed=5, cfg=3.0, top_k=900, top_p=0.97)
    assert all(torch.equal(a, b) for a, b in zip(cli["tokens"], result.tokens))


def test_a_plan_file_is_used(tmp_path, capsys):
    pipe = build_pipeline("tiny", plan="default")
    path = tmp_path / "plan.json"
    path.write_text(pipe.plan.to_json())
    _, text = run(tmp_path, capsys, "--plan", str(path))
    assert f"plan file {path}" in text


@pytest.mark.parametrize("args, message", [
    (["--skip-last", "6"], "skip_last must be an int in [0, 5], got 6"),
    (["--skip-last", "-1"], "--skip-last must be >= 0"),
    (["--plan", "nope.json"], "--plan must be dense, default or a plan/config file"),
    (["--out", "x.png"], "no image decoder is available here"),
    (["--weights", "missing.safetensors"], "--weights missing.safetensors: no such file"),
])
def test_generate_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_weights_in_the_official_names_load(tmp_path, capsys):
    """A checkpoint of the network (safetensors) drives generation: the tokens of a network built
    from other seeded weights plus that file equal those of the network it came from."""
    from safetensors.torch import save_file

    source = build_pipeline("tiny", plan="dense", seed=9)
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    cli, _ = run(tmp_path, capsys, "--plan", "dense", "--seed", "1", "--weights", str(tmp_path / "w.safetensors"))
    want = source.generator.generate(source.condition(1), seed=1, cfg=3.0, top_k=900, top_p=0.97)
    assert all(torch.equal(a, b) for a, b in zip(cli["tokens"], want.tokens))


@pytest.mark.slow
def test_end_to_end_benchmark_runs_every_row_on_the_cpu(tmp_path, monkeypatch):
    """``sparvar bench e2e --smoke``: the official Infinity model plain, patched and accelerated,
    and the project's four paths, then the official VAR model plain, patched and accelerated
    (dense and default plan), in one run (small models; the times mean nothing on the CPU)."""
    import json

    import upstream  # points SPARVAR_UPSTREAM at the official sources

    upstream.infinity_modules()  # skips, with the reason, where they are missing
    upstream.var_modules()
    assert main(["bench", "e2e", "--smoke", "--out", str(tmp_path)]) == 0
    infinity, var = json.loads(next(tmp_path.rglob("e2e.json")).read_text())["runs"]
    assert [r["impl"] for r in infinity["rows"]] == [
        "ours_dense", "ours_sparse", "ours_sparse_skip2", "ceiling_sparse_noop", "official_eager", "official_patched",
        "official_accelerated"]
    assert [r["impl"] for r in var["rows"]] == ["official_eager", "official_patched", "official_accelerated_dense",
                                                "official_accelerated"]
    assert all(r["ms"] > 0 for r in infinity["rows"] + var["rows"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_follow_the_generators_dispatcher():
    """With CUDA graphs, generations with another dispatcher run that dispatcher's attention
    (a captured graph replays the attention it captured), equal to the same generation without
    graphs; a recording dispatcher is never captured."""
    from sparvar.analysis import RecordingAttention
    from sparvar.dispatch import StepDispatcher

    pipe = build_pipeline("tiny", plan="default", device="cuda", graphs=True)
    eager = build_pipeline("tiny", plan="default", device="cuda", graphs=False)
    cond = pipe.condition(0)
    dense_disp = StepDispatcher(None, pipe.schedule)
    outs = {}
    for name, gen in (("graphs", pipe.generator), ("eager", eager.generator)):
        sparse_disp = gen.dispatcher
        first = gen.generate(cond, seed=3).features
        gen.dispatcher = dense_disp
        dense = gen.generate(cond, seed=3).features
        gen.dispatcher = sparse_disp
        again = gen.generate(cond, seed=3).features
        outs[name] = (first, dense, again)
    assert not torch.equal(outs["graphs"][0], outs["graphs"][1])
    for a, b in zip(outs["graphs"], outs["eager"]):
        torch.testing.assert_close(a, b)
    recorder = RecordingAttention(pipe.schedule, range(pipe.schedule.num_scales))
    pipe.generator.dispatcher = recorder
    pipe.generator.generate(cond, seed=3)
    assert len(recorder.inputs) == pipe.schedule.num_scales * pipe.preset.depth
