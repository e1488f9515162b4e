"""Why does a calibrated hybrid (`convert --calibrate`) start healing with gradient norms of 40-120 where the zero
init (`--no-calibrate`, DeltaNet layers as no-ops) shows <= 12?

Loads the teacher and one or more converted students, computes the KD loss (KL teacher||student, T=1, mean per
token, exactly the trainer's loss) on the same batch, and prints

1. per parameter group (name pattern) the gradient norm and weight norm of each student,
2. per layer the DeltaNet gradient norm and a few activation statistics (rms of the DeltaNet core output o before
   its RMSNorm, silu(z), the DeltaNet layer output, the attention output of the teacher is not needed),
3. a few AdamW steps with the recipe's optimizer (betas 0.9/0.95, wd 0.01 on matrices, linear warmup, clip 1.0):
   loss and pre-clip grad norm per step.

Students are given as NAME=FOLDER; optional transforms of a loaded student (fixes under test) as NAME=FOLDER:FIX.

    PYTHONPATH=src python benchmarks/calibrate_grad_probe.py --teacher T.gguf zero=/tmp/gp/zero cal=/tmp/gp/cal \
        --windows 4 --seq-len 256 --steps 8
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections import defaultdict

import numpy as np
import torch

from hybridize.train.losses import distillation_sums, next_token_targets
from hybridize.train.models import load_language_model
from hybridize.train.objective import final_hidden
from hybridize.train.trainer import _param_groups

GROUPS = [
    ("embed/lm_head", r"embed_tokens|lm_head"),
    ("final norm", r"^model\.norm\."),
    ("layernorms", r"input_layernorm|post_attention_layernorm"),
    ("mlp", r"\.mlp\."),
    ("attention", r"self_attn\."),
    ("la.in_proj_qkv", r"linear_attn\.in_proj_qkv"),
    ("la.in_proj_z", r"linear_attn\.in_proj_z"),
    ("la.in_proj_a", r"linear_attn\.in_proj_a"),
    ("la.in_proj_b", r"linear_attn\.in_proj_b"),
    ("la.conv1d", r"linear_attn\.conv1d"),
    ("la.A_log", r"linear_attn\.A_log"),
    ("la.dt_bias", r"linear_attn\.dt_bias"),
    ("la.norm.weight", r"linear_attn\.norm\.weight"),
    ("la.out_proj", r"linear_attn\.out_proj"),
]


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name):
            return g
    return "other"


def layer_of(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def batches(path: str, n_batches: int, windows: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    tokens = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(tokens) // seq_len, size=n_batches * windows, replace=False) * seq_len
    ids = np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts])
    return list(torch.from_numpy(ids).view(n_batches, windows, seq_len))


@torch.no_grad()
def teacher_states(teacher, batch):
    final, _ = final_hidden(teacher, batch, None, None, False)
    return final


def kd_loss(student, teacher, batch, t_final):
    targets = next_token_targets(batch)
    s_final, _ = final_hidden(student, batch, None, None, False)
    out = distillation_sums(s_final, student.lm_head.weight, targets, t_final, teacher.lm_head.weight, 1.0)
    return out["loss_sum"] / out["count"]


def norms_by_group(student, attr: str) -> dict[str, float]:
    acc = defaultdict(float)
    seen = set()
    for n, p in student.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.grad if attr == "grad" else p.detach()
        if t is None:
            continue
        acc[group_of(n)] += t.float().pow(2).sum().item()
    return {g: math.sqrt(v) for g, v in acc.items()}


def linear_layers(student):
    return [(i, layer.linear_attn) for i, layer in enumerate(student.model.layers)
            if getattr(layer, "linear_attn", None) is not None]


def activation_stats(student, batch):
    """Per DeltaNet layer: rms of the core output o (before the gated RMSNorm), mean silu(z), rms of the layer
    output, and rms of the layer's input x."""
    stats, hooks = {}, []
    for i, gdn in linear_layers(student):
        def norm_hook(m, args, out, i=i):
            o, z = args
            stats.setdefault(i, {})["rms_o"] = o.float().pow(2).mean().sqrt().item()
            stats[i]["silu_z"] = torch.nn.functional.silu(z.float()).mean().item()
            stats[i]["z_std"] = z.float().std().item()
        def out_hook(m, args, out, i=i):
            stats.setdefault(i, {})["rms_in"] = args[0].float().pow(2).mean().sqrt().item()
            stats[i]["rms_out"] = out.float().pow(2).mean().sqrt().item()
        hooks += [gdn.norm.register_forward_hook(norm_hook), gdn.register_forward_hook(out_hook)]
    try:
        with torch.no_grad():
            student.model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


# ------------------------------------------------------------------------------------------------ fixes under test
def fix_none(student, arg):
    return student


def fix_lr_groups(student, arg):
    """No weight change: marks the calibrated DeltaNet tensors for a smaller lr (handled in `optimizer`)."""
    student._lr_scale = float(arg or 0.1)
    return student


def fix_zridge(student, arg):
    """Refit every DeltaNet in_proj_z to z = 2 by ridge on the student's own layer inputs with a larger penalty
    (rel = ARG x mean diag of x^T x; the calibration uses 1e-3): smaller in_proj_z, z less constant."""
    from hybridize.transfer.calibrate import ridge

    rel = float(arg or 1.0)
    ids = batches(ARGS.tokens, 1, 4, ARGS.seq_len, ARGS.seed + 1000)[0]
    seen, hooks = {}, []
    for i, gdn in linear_layers(student):
        hooks.append(gdn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        student.model(input_ids=ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, gdn in linear_layers(student):
            flat = seen[i].reshape(-1, seen[i].shape[-1]).float()
            w = ridge(flat, torch.full((flat.shape[0], 1), 2.0), rel=rel)
            gdn.in_proj_z.weight.copy_(w.expand_as(gdn.in_proj_z.weight))
    return student


def fix_rescale(student, arg):
    """Function-preserving: scale a DeltaNet layer's input norm (1 + w) by s = 1 / rms(its mixer input) and divide
    the mixer's input projections (qkv, z, a, b: linear, no bias; the conv is linear too) by s, so the mixer sees
    inputs of rms 1 and its projections have ordinary sizes. ARG: comma-separated layers [default: 0]."""
    layers = [int(i) for i in (arg or "0").split(",")]
    ids = batches(ARGS.tokens, 1, 4, ARGS.seq_len, ARGS.seed + 1000)[0]
    stats = activation_stats(student, ids)
    with torch.no_grad():
        for i in layers:
            layer = student.model.layers[i]
            gdn, s = layer.linear_attn, 1.0 / stats[i]["rms_in"]
            layer.input_layernorm.weight.copy_(s * (1.0 + layer.input_layernorm.weight.float()) - 1.0)
            for proj in (gdn.in_proj_qkv, gdn.in_proj_z, gdn.in_proj_a, gdn.in_proj_b):
                proj.weight.div_(s)
            print(f"  rescale layer {i}: s = {s:.2f}", flush=True)
    return student


FIXES = {"none": fix_none, "lrla": fix_lr_groups, "zridge": fix_zridge, "rescale": fix_rescale}


def optimizer(student, lr):
    scale = getattr(student, "_lr_scale", None)
    groups = _param_groups(student, 0.01)
    if scale is not None:  # DeltaNet tensors in their own groups at lr * scale
        la = {id(p) for n, p in student.named_parameters() if "linear_attn" in n}
        new = []
        for g in groups:
            for sel, mult in ((lambda p: id(p) in la, scale), (lambda p: id(p) not in la, 1.0)):
                ps = [p for p in g["params"] if sel(p)]
                if ps:
                    new.append({"params": ps, "weight_decay": g["weight_decay"], "lr_mult": mult})
        groups = new
    for g in groups:
        g.setdefault("lr_mult", 1.0)
        g["lr"] = lr * g["lr_mult"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("students", nargs="+", help="NAME=FOLDER[:FIX[=ARG]]")
    ap.add_argument("--teacher", default="~/.cache/hybridize-models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--tokens", default="/work/carry/train_tokens.npy")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    args = ap.parse_args()
    global ARGS
    ARGS = args
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import os

    teacher = load_language_model(os.path.expanduser(args.teacher), torch.float32, progress=False)
    teacher.requires_grad_(False)
    data = batches(args.tokens, max(1, args.steps), args.windows, args.seq_len, args.seed)
    t_finals = [teacher_states(teacher, b) for b in data]

    specs = []
    for spec in args.students:
        name, rest = spec.split("=", 1)
        folder, _, fix = rest.partition(":")
        fix_name, _, fix_arg = fix.partition("=")
        specs.append((name, folder, fix_name or "none", fix_arg))

    results = {}
    for name, folder, fix_name, fix_arg in specs:
        student = load_language_model(folder, torch.float32, progress=False)
        student = FIXES[fix_name](student, fix_arg)
        student.train()
        student.requires_grad_(True)
        loss = kd_loss(student, teacher, data[0], t_finals[0])
        loss.backward()
        grads, weights = norms_by_group(student, "grad"), norms_by_group(student, "weight")
        total = math.sqrt(sum(v * v for v in grads.values()))
        per_layer = defaultdict(float)
        per_layer_group = defaultdict(float)
        for n, p in student.named_parameters():
            if p.grad is not None and layer_of(n) is not None:
                per_layer[layer_of(n)] += p.grad.pow(2).sum().item()
                per_layer_group[(layer_of(n), group_of(n))] += p.grad.pow(2).sum().item()
        stats = activation_stats(student, data[0])
        results[name] = dict(loss=loss.item(), total=total, grads=grads, weights=weights,
                             per_layer={k: math.sqrt(v) for k, v in per_layer.items()},
                             plg={k: math.sqrt(v) for k, v in per_layer_group.items()}, stats=stats)
        print(f"[{name}] KD {loss.item():.4f}  grad norm {total:.2f}", flush=True)

        # a few AdamW steps, the trainer's recipe
        student.zero_grad(set_to_none=True)
        opt = optimizer(student, args.lr)
        trace = []
        for step in range(args.steps):
            lr = args.lr * (step + 1) / args.warmup if step < args.warmup else args.lr
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            t0 = time.perf_counter()
            loss = kd_loss(student, teacher, data[step], t_finals[step])
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                after = kd_loss(student, teacher, data[0], t_finals[0]).item()
            trace.append((step, loss.item(), gn.item(), after))
            print(f"  [{name}] step {step} lr {lr:.2e} loss {loss.item():.4f} grad_norm {gn.item():.2f} "
                  f"KD(batch0) after {after:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        results[name]["trace"] = trace
        del student

    names = list(results)
    print("\n## Gradient norm / weight norm by parameter group (batch 0, before any step)\n")
    print("| group | " + " | ".join(f"grad {n}" for n in names) + " | " + " | ".join(f"|W| {n}" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for g, _ in GROUPS:
        row = [results[n]["grads"].get(g, 0.0) for n in names] + [results[n]["weights"].get(g, 0.0) for n in names]
        print(f"| {g} | " + " | ".join(f"{v:.3g}" for v in row) + " |")
    print("| **total** | " + " | ".join(f"{results[n]['total']:.3g}" for n in names) + " |" + " |" * len(names))
    print("| KD loss | " + " | ".join(f"{results[n]['loss']:.3f}" for n in names) + " |" + " |" * len(names))

    if not args.no_layers:
        print("\n## Per layer (grad norm of the whole layer; top DeltaNet groups; activation stats)\n")
        layers = sorted(set().union(*(results[n]["per_layer"] for n in names)))
        for n in names:
            print(f"\n### {n}\n")
            print("| layer | grad | la.in_proj_qkv | la.in_proj_z | la.out_proj | la.norm.weight | mlp | attention "
                  "| rms x | rms o | mean silu(z) | std z | rms out |")
            print("|---" * 13 + "|")
            r = results[n]
            for i in layers:
                s = r["stats"].get(i, {})
                cells = [r["per_layer"].get(i, 0.0)] + [r["plg"].get((i, g), 0.0) for g in (
                    "la.in_proj_qkv", "la.in_proj_z", "la.out_proj", "la.norm.weight", "mlp", "attention")]
                cells += [s.get(k, float("nan")) for k in ("rms_in", "rms_o", "silu_z", "z_std", "rms_out")]
                print(f"| {i} | " + " | ".join(f"{v:.3g}" for v in cells) + " |")

    print("\n## AdamW steps (loss on the step's batch, pre-clip grad norm, KD on batch 0 after the step)\n")
    print("| step | " + " | ".join(f"loss {n} | gn {n} | KD0 {n}" for n in names) + " |")
    print("|---" * (1 + 3 * len(names)) + "|")
    for s in range(args.steps):
        cells = []
        for n in names:
            _, l, g, a = results[n]["trace"][s]
            cells += [f"{l:.3f}", f"{g:.2f}", f"{a:.3f}"]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
