"""The diagnosis run of 2026-12-03 (H200, fifth session): wall time of single `mtp_decoder.generate` calls on the
healed SmolLM2 hybrid with trained heads (/tmp/mtp), 128 new tokens, 3 drafts against 0 (plain through the same
decoder), and a torch profile of one 64-token call. With NO_CUDNN=1 every call runs with cuDNN's SDPA excluded
(what hybridize does for masked attention on CUDA since this session). Run on the GPU machine:
`python probe_per_call.py` / `NO_CUDNN=1 python probe_per_call.py`."""

import os
import time

import torch
import torch.profiler as profiler
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

import hybridize  # noqa: F401  (registers the hybrid with AutoModel)

model = AutoModelForCausalLM.from_pretrained("/tmp/mtp", dtype=torch.bfloat16).cuda().eval()
decoder = model.mtp_decoder
if os.environ.get("NO_CUDNN"):
    sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]).__enter__()
gen = torch.Generator().manual_seed(0)
for length in (100, 100, 137, 137, 100):
    ids = torch.randint(100, 20000, (1, length), generator=gen).cuda()
    for drafts in (3, 0):
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.generate(ids, max_new_tokens=128, num_draft_tokens=drafts)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        s = decoder.stats
        print(length, drafts, f"{seconds * 1000:.0f} ms", f"{128 / seconds:.0f} tok/s", s["tokens_per_verify"],
              s["cuda_graph"], s["verify_steps"], flush=True)
ids = torch.randint(100, 20000, (1, 100), generator=gen).cuda()
with profiler.profile(activities=[profiler.ProfilerActivity.CPU, profiler.ProfilerActivity.CUDA]) as prof:
    decoder.generate(ids, max_new_tokens=64, num_draft_tokens=3)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
