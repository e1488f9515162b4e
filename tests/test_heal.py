"""`hybridize heal`: the stage plan, the 1:1 distill flags, a whole run, resume after a crash, one-line mistakes."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hybridize import heal as heal_module
from hybridize.cli import build_parser, main
from hybridize.errors import HybridizeError
from hybridize.heal import HealConfig, HealJob, distill_argv, training_stages
from hybridize.train.config import DistillConfig
from hybridize.train.models import load_language_model
from hybridize.train.run import run_eval
from hybridize.transfer.config import CrossArchTransferConfig

TINY = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--eval-tokens", "512",
        "--save-every", "4", "--no-progress"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import build_tiny_source

    root = tmp_path_factory.mktemp("heal")
    build_tiny_source(root / "teacher", family="qwen3")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 200), ("val.jsonl", 30)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(f"w{rng.randint(0, 60)}" for _ in range(rng.randint(5, 80)))})
                        + "\n")
    return root


def _job(**heal) -> HealJob:
    return HealJob(source="s", out=Path("o"), data=["d"], transfer=CrossArchTransferConfig(),
                   distill=DistillConfig(seq_len=512, batch_size=16, grad_accum=2), heal=HealConfig(**heal))


def test_stage_plan_defaults_and_long_context_keeps_tokens_per_step():
    assert [s.name for s in training_stages(_job(tokens=1_000_000))] == ["align", "kd"]  # plain init: align 5%
    calibrated = _job(tokens=1_000_000)
    calibrated.transfer = CrossArchTransferConfig(calibrate_data=["d"])
    assert [s.name for s in training_stages(calibrated)] == ["kd"]  # calibration already aligned the layers
    align, kd = training_stages(_job(tokens=1_000_000))
    assert (align.name, align.config.tokens, align.config.align_only, align.config.train) == \
        ("align", 50_000, True, "linear")
    assert (kd.name, kd.config.tokens, kd.config.align_only, kd.config.train) == ("kd", 1_000_000, False, "all")
    assert kd.config.lr == DistillConfig().lr and align.config.lr == HealConfig().align_lr

    stages = training_stages(_job(tokens=1000, align_tokens=0, long_context_tokens=2000, long_seq_len=2048, gpus=2))
    assert [s.name for s in stages] == ["kd", "long"]
    long = stages[1].config
    assert long.seq_len == 2048 and long.tokens == 2000 and long.lr == pytest.approx(DistillConfig().lr / 10)
    assert long.tokens_per_step == 16 * 512  # the KD stage's tokens per step
    micro = long.batch_size // (long.grad_accum * 2)
    assert micro * 2048 == (16 // (2 * 2)) * 512  # and per micro-step on each GPU
    assert long.batch_size % (long.grad_accum * 2) == 0


@pytest.mark.parametrize("mtp", [{}, {"mtp_weight": 0.25, "mtp_depths": 3}])
def test_distill_argv_rebuilds_the_same_config(mtp):
    from dataclasses import fields

    from hybridize.cli import _resolve_mtp

    config = DistillConfig(seq_len=64, batch_size=8, grad_accum=2, tokens=12_345, lr=1e-3, align_only=True,
                           train="linear", grad_checkpointing=True, eval_every=3, dtype="float32", seed=7,
                           sharding="fsdp", **mtp)
    argv = distill_argv("T", Path("S"), ["a.jsonl"], Path("R"), config, ["v.jsonl"], resume=True, override=False,
                        progress=False)
    args = build_parser().parse_args(argv)
    _resolve_mtp(args)  # what cmd_distill does: --mtp-weight alone turns the heads on
    rebuilt = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    assert rebuilt == config
    assert args.resume and not args.override and args.no_progress and args.eval_data == ["v.jsonl"]


def test_mtp_heads_join_after_the_alignment_stage():
    """heal --mtp: the alignment stage trains the DeltaNet layers alone; the KD and long stages train the heads."""
    job = _job(tokens=1_000_000, long_context_tokens=1000)
    job.distill = replace(job.distill, mtp_weight=0.3, mtp_depths=2)
    align, kd, long = training_stages(job)
    assert (align.config.mtp_weight, align.config.mtp_depths) == (0.0, None)
    assert (kd.config.mtp_weight, kd.config.mtp_depths) == (long.config.mtp_weight, long.config.mtp_depths) == (0.3, 2)


def _heal(ws: Path, out: Path, *extra) -> int:
    return main(["heal", str(ws / "teacher"), str(out), "--data", str(ws / "train.jsonl"), "--eval-data",
                 str(ws / "val.jsonl"), *TINY, *map(str, extra)])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_heal_runs_every_stage_and_brings_the_hybrid_closer(workspace, tmp_path, capsys):
    out = tmp_path / "healed"
    stages = ["--tokens", "3072", "--align-tokens", "1024", "--long-context-tokens", "1024", "--long-seq-len", "64",
              "--no-calibrate", "--select-layers", "none"]  # the zero init of the 3:1 pattern leaves a gap to close
    # (calibration and layer selection have their own tests below)
    assert _heal(workspace, out, *stages) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stages"] == ["convert", "align", "kd", "long", "final", "eval"]
    state = json.loads((out / "heal.json").read_text())
    assert list(state["done"]) == summary["stages"]
    steps = {name: state["done"][name]["steps"] for name in ("align", "kd", "long")}
    assert steps == {"align": 8, "kd": 24, "long": 8}  # tokens / (4 x 32) per step
    for name in ("align", "kd", "long"):
        assert (out / name / "curves.png").is_file() and (out / name / "final" / "config.json").is_file()
    assert json.loads((out / "long" / "checkpoints" / "step_00000008" / "trainer_state.json").read_text()
                      )["config"]["seq_len"] == 64
    # the align stage trained only the DeltaNet layers
    hybrid, aligned = _weights(out / "hybrid"), _weights(out / "align" / "final")
    moved = {n for n in hybrid if not torch.equal(hybrid[n], aligned[n])}
    assert moved and all(".linear_attn." in n for n in moved)
    # OUT/final is the last stage's model, a normal folder
    final = _weights(out / "final")
    assert all(torch.equal(final[n], t) for n, t in _weights(out / "long" / "final").items())
    assert load_language_model(out / "final", torch.float32).config.model_type == "hybridize"
    # the evaluation is run_eval's, and healing closed part of the gap to the teacher
    evaluation = state["done"]["eval"]["data"][str(workspace / "val.jsonl")]
    fresh = run_eval(str(out / "hybrid"), [str(workspace / "val.jsonl")], str(workspace / "teacher"), seq_len=32,
                     max_tokens=512, progress=False)
    assert evaluation["kl"] < 0.7 * fresh["kl"], (evaluation["kl"], fresh["kl"])
    assert state["done"]["eval"]["fresh"][str(workspace / "val.jsonl")]["kl"] == pytest.approx(fresh["kl"], rel=1e-5)
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(state["done"]["eval"]))
    assert summary["eval"][str(workspace / "val.jsonl")]["ratio"] == pytest.approx(
        evaluation["perplexity"] / evaluation["teacher_perplexity"], rel=1e-3)
    # the benchmark's report reads the same numbers: fresh KL at 0 tokens, the final row per eval path
    import subprocess
    import sys

    report = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "heal_report.py"),
                             str(out), "--milestones", "0,1k", "--plot", str(tmp_path / "kl.png")],
                            capture_output=True, text=True, check=True).stdout
    assert f"{evaluation['perplexity'] / evaluation['teacher_perplexity']:9.3f}" in report
    assert f"{fresh['kl']:8.3f}" in report.splitlines()[-1]
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_a_crash_gives_the_same_model(workspace, tmp_path, monkeypatch, capsys):
    stages = ["--tokens", "2048", "--align-tokens", "512"]
    assert _heal(workspace, tmp_path / "straight", *stages) == 0

    real = heal_module._run_stage
    calls = []

    def crash_in_kd(job, stage, *args):
        calls.append(stage.name)
        if stage.name == "kd":  # dies after the first checkpoint of the KD stage
            short = replace(stage, config=replace(stage.config, stop_at=4))
            real(job, short, *args)
            raise RuntimeError("machine lost")
        return real(job, stage, *args)

    monkeypatch.setattr(heal_module, "_run_stage", crash_in_kd)
    assert _heal(workspace, tmp_path / "crashed", *stages) != 0
    assert calls == ["align", "kd"] and not (tmp_path / "crashed" / "final").exists()
    monkeypatch.setattr(heal_module, "_run_stage", lambda *a: (calls.append(a[1].name), real(*a))[1])
    capsys.readouterr()
    assert _heal(workspace, tmp_path / "crashed", *stages, "--resume") == 0
    assert calls[2:] == ["kd"]  # align was not run again; kd continued from its step-4 checkpoint
    straight, resumed = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "crashed" / "final")
    assert straight.keys() == resumed.keys()
    assert max((straight[n].float() - resumed[n].float()).abs().max().item() for n in straight) == 0.0


def test_resume_when_a_stage_died_before_its_run_started(workspace, tmp_path, monkeypatch):
    """A stage folder that holds only its tokenized data (killed while tokenizing) is started, not 'resumed'."""
    real = heal_module._run_stage

    def dies_early(job, stage, student, run_dir, *args):
        (run_dir / "data").mkdir(parents=True)
        raise HybridizeError("killed while tokenizing")

    stages = ["--tokens", "256", "--no-calibrate"]
    monkeypatch.setattr(heal_module, "_run_stage", dies_early)
    assert _heal(workspace, tmp_path / "out", *stages) == 2
    monkeypatch.setattr(heal_module, "_run_stage", real)
    assert _heal(workspace, tmp_path / "out", *stages, "--resume") == 0
    assert (tmp_path / "out" / "final" / "config.json").is_file()


def test_calibrates_on_the_training_text_unless_told_not_to(workspace, tmp_path, capsys):
    from hybridize.transfer.convert import convert_to_folder

    plain = tmp_path / "plain"
    convert_to_folder(str(workspace / "teacher"), plain, progress=False)
    stages = ["--tokens", "128", "--align-tokens", "0", "--eval-tokens", "64", "--select-layers", "none"]  # one KD
    # step, on the layout of the plain conversion
    assert _heal(workspace, tmp_path / "zero", *stages, "--no-calibrate") == 0
    assert _heal(workspace, tmp_path / "cal", *stages, "--calibrate-tokens", "2k", "--calibrate-seq-len", "64") == 0
    reference = _weights(plain)
    zero, cal = _weights(tmp_path / "zero" / "hybrid"), _weights(tmp_path / "cal" / "hybrid")
    assert all(torch.equal(zero[n], t) for n, t in reference.items())  # --no-calibrate: the plain conversion
    changed = {n for n, t in reference.items() if not torch.equal(cal[n], t)}
    assert changed and all(".linear_attn." in n for n in changed)  # calibration touches DeltaNet layers only
    transfer = json.loads((tmp_path / "cal" / "heal.json").read_text())["settings"]["transfer"]
    assert transfer["calibrate_data"] == [str(workspace / "train.jsonl")] and transfer["calibrate_tokens"] == 2000


@pytest.mark.parametrize("case", ["exists", "nothing_to_resume", "changed", "missing_data", "hybrid_source",
                                  "torchrun", "contradiction"])
def test_user_mistakes_are_one_line(workspace, tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "out"
    args = ["--tokens", "256", "--align-tokens", "0"]
    if case in ("exists", "changed"):
        assert _heal(workspace, out, *args) == 0
        capsys.readouterr()
    if case == "exists":
        code = _heal(workspace, out, *args)
    elif case == "nothing_to_resume":
        code = _heal(workspace, out, *args, "--resume")
    elif case == "changed":
        code = _heal(workspace, out, "--tokens", "512", "--align-tokens", "0", "--resume")
    elif case == "missing_data":
        code = main(["heal", str(workspace / "teacher"), str(out), "--data", str(tmp_path / "nope.jsonl")])
    elif case == "hybrid_source":
        assert main(["convert", str(workspace / "teacher"), str(tmp_path / "h")]) == 0
        assert main(["export", str(tmp_path / "h"), str(tmp_path / "q35")]) == 0
        capsys.readouterr()
        code = main(["heal", str(tmp_path / "q35"), str(out), "--data", str(workspace / "train.jsonl")])
    elif case == "contradiction":
        code = _heal(workspace, out, *args, "--no-calibrate", "--calibrate-tokens", "4k")
    else:
        monkeypatch.setenv("RANK", "0")
        code = _heal(workspace, out, *args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("hybridize: error:") and "\n" not in err, err
    expected = {"exists": "--resume", "nothing_to_resume": "nothing to resume", "changed": "--override",
                "missing_data": "does not exist", "hybrid_source": "already a hybrid", "torchrun": "without torchrun",
                "contradiction": "contradict"}
    assert expected[case] in err
    if case in ("nothing_to_resume", "missing_data", "hybrid_source", "torchrun", "contradiction"):
        assert not out.exists()


def test_resume_during_the_evaluation_keeps_its_finished_pieces(workspace, tmp_path, monkeypatch):
    """Killed after the first evaluation piece (the healed model on val), a resumed run evaluates only the fresh
    conversion, and its eval.json equals an uninterrupted run's evaluation of the same model."""
    from hybridize.train import run as run_module

    real, calls = run_module.run_eval, []

    def dies_on_second(model, *args, **kwargs):
        calls.append(Path(model).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, *args, **kwargs)

    monkeypatch.setattr(run_module, "run_eval", dies_on_second)
    stages = ["--tokens", "256", "--no-calibrate"]
    out = tmp_path / "out"
    assert _heal(workspace, out, *stages) != 0
    state = json.loads((out / "heal.json").read_text())
    assert "eval" not in state["done"] and list(state["eval_in_progress"]["result"]["data"]) == [
        str(workspace / "val.jsonl")]
    monkeypatch.setattr(run_module, "run_eval", lambda model, *a, **k: (calls.append(Path(model).name),
                                                                       real(model, *a, **k))[1])
    assert _heal(workspace, out, *stages, "--resume") == 0
    assert calls == ["final", "hybrid", "hybrid"]  # the healed model's piece was not computed again
    state = json.loads((out / "heal.json").read_text())
    assert "eval_in_progress" not in state
    val = str(workspace / "val.jsonl")
    again = real(str(out / "final"), [val], str(workspace / "teacher"), seq_len=32, max_tokens=512, progress=False)
    assert state["done"]["eval"]["data"][val]["kl"] == pytest.approx(again["kl"], rel=1e-6)
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(state["done"]["eval"]))


def test_kl_passkey_selection_is_the_default_unless_a_layout_or_none_is_given(workspace, tmp_path, monkeypatch,
                                                                              capsys):
    """heal selects its attention layers with kl+passkey by default (kl, with a note, when --data is only .npy
    tokens: the passkey prompts need text); `--select-layers none` or a layout flag keeps the layout; --resume
    keeps what the run recorded (runs from before the default recorded none)."""
    import hybridize.heal as heal

    jobs = []
    monkeypatch.setattr(heal, "run_heal", lambda job, **kw: jobs.append(job) or {})

    def chosen(*extra):
        assert _heal(workspace, tmp_path / "out", *extra) == 0
        return jobs[-1].heal.select_layers, jobs[-1].transfer.hybrid_attention.attention_layers

    assert chosen() == ("kl+passkey", None)
    assert "note" not in capsys.readouterr().err
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(2000, dtype=np.uint16) % 100)
    assert main(["heal", str(workspace / "teacher"), str(tmp_path / "o_npy"), "--data", str(tokens)]) == 0
    assert (jobs[-1].heal.select_layers, jobs[-1].data) == ("kl", [str(tokens)])
    assert "selects its attention layers with kl alone" in capsys.readouterr().err
    assert chosen("--select-layers", "none") == (None, None)
    assert chosen("--attention-layers", "1") == (None, [1])
    assert chosen("--select-layers", "proxy") == ("proxy", None)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "heal.json").write_text(json.dumps({"settings": {"heal": {"select_layers": None}}}))
    assert chosen("--resume") == (None, None)
    assert chosen() == ("kl+passkey", None)  # a new run in the same place is run_heal's to refuse
    from hybridize.heal import check_job
    from hybridize.transfer.config import HybridAttentionConfig

    job = jobs[-1]  # from Python: a default HealConfig with an explicit layout is a contradiction, not an override
    job.transfer = CrossArchTransferConfig(hybrid_attention=HybridAttentionConfig(attention_layers=[1]))
    with pytest.raises(HybridizeError, match=r"select_layers='kl\+passkey' would replace the layout"):
        check_job(job)
    with pytest.raises(HybridizeError, match="must be one of kl, passkey, kl\\+passkey, proxy or none"):
        HealConfig(select_layers="knn")


def test_select_layers_chooses_the_attention_layers_before_converting(workspace, tmp_path, capsys):
    """`heal --select-layers proxy` converts with the layers `select-layers` picks on the training text (the
    default count of the 3:1 pattern), records the selection in heal.json; combining it with a layout flag, or
    giving the passkey method only .npy tokens (its prompts need text), is a one-line error."""
    from hybridize.transfer.select import SelectConfig, select_attention_layers

    out = tmp_path / "out"
    assert _heal(workspace, out, "--tokens", "256", "--no-calibrate", "--select-layers", "proxy") == 0
    state = json.loads((out / "heal.json").read_text())
    chosen = state["done"]["convert"]["selection"]["attention_layers"]
    expected = select_attention_layers(str(workspace / "teacher"), SelectConfig(
        method="proxy", data=[str(workspace / "train.jsonl")]), progress=False)["attention_layers"]
    assert chosen == expected and len(chosen) == 1  # 4 layers: the 3:1 pattern keeps one
    assert chosen != [3]  # not what the pattern would have kept: the selection decided
    layer_types = json.loads((out / "hybrid" / "config.json").read_text())["layer_types"]
    assert [i for i, t in enumerate(layer_types) if t == "full_attention"] == chosen
    capsys.readouterr()
    assert _heal(workspace, tmp_path / "o2", "--select-layers", "kl", "--attention-layers", "1") == 2
    assert "not both" in capsys.readouterr().err
    tokens = tmp_path / "tokens.npy"

    np.save(tokens, np.arange(2000, dtype=np.uint16) % 100)
    code = main(["heal", str(workspace / "teacher"), str(tmp_path / "o3"), "--data", str(tokens), "--no-calibrate",
                 "--select-layers", "passkey", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "reads text from --data" in err and "\n" not in err, err
