"""Generation on a GPU: the export/import mapping and sampling on CUDA, and decode speed (issue 6).

    python bench/generate_gpu.py [--small] [--out result.json]

Runs where only torch is installed (the lent GPU machine): ``llmtrain`` is aliased onto the
source tree, and nothing here needs safetensors, tokenizers or transformers.

Checks (exit 1 on failure):
* CUDA weights → HF names → our names (the export/import mapping) → a CUDA model: logits
  equal the CPU fp32 model's within 1e-3 at every position (heads 12 / kvHeads 4).
* Greedy decoding on CUDA equals greedy decoding on the CPU (fp32), token for token.
* Seeded sampling on CUDA (temperature 0.8, top-k 50, top-p 0.95) is reproducible.

Measures: new tokens per second with the KV cache (fp32, bf16) and, side by side, without it
(fp32; each token re-runs the window), for a GPT-2-small-shaped model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _alias_source_tree() -> None:
    """``import llmtrain.runtime.*`` from the checkout without installing it (package-dir map)."""
    sys.path.insert(0, str(ROOT))
    import llmtrain

    if "llmtrain.runtime" not in sys.modules:
        runtime = types.ModuleType("llmtrain.runtime")
        runtime.__path__ = [str(ROOT / "runtime")]
        sys.modules["llmtrain.runtime"] = runtime
        llmtrain.__dict__["runtime"] = runtime  # the attribute a regular import would set


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a tiny model (CPU smoke run)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    _alias_source_tree()
    import torch
    from llmtrain.runtime.export import to_hf_state_dict
    from llmtrain.runtime.generate import Sampling, generate
    from llmtrain.runtime.hf_import import copy_full_weights, from_hf_state_dict
    from llmtrain.runtime.model import GPT

    from llmtrain.api.config import ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.small:
        cfg = ModelConfig(
            vocab_size=512,
            n_layers=2,
            d_model=64,
            n_heads=4,
            n_kv_heads=2,
            context_length=128,
            ffn_hidden_size=128,
            rope_theta=50_000.0,
        )
        new_tokens = 16
    else:
        cfg = ModelConfig(
            vocab_size=50_304,
            n_layers=12,
            d_model=768,
            n_heads=12,
            n_kv_heads=4,
            context_length=1024,
            ffn_hidden_size=2048,
            rope_theta=50_000.0,
        )
        new_tokens = 256
    torch.manual_seed(0)
    cpu = GPT(cfg)
    with torch.no_grad():
        for name, p in cpu.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p)
            )
    cpu.eval()

    # Through the mapping, from device tensors, into a meta-built model materialised on the device.
    hf = to_hf_state_dict({k: v.to(device) for k, v in cpu.state_dict().items()}, cfg)
    with torch.device("meta"):
        gpu = GPT(cfg)
    gpu.materialize(device)
    copy_full_weights(gpu, from_hf_state_dict(hf, cfg))
    gpu.eval()

    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (gpu(ids.to(device)).float().cpu() - cpu(ids)).abs().max().item()
    prompt = ids[0, :16].tolist()
    greedy = Sampling(max_new_tokens=32, temperature=0)
    cpu_ids, gpu_ids = generate(cpu, prompt, greedy), generate(gpu, prompt, greedy)
    sampled = Sampling(max_new_tokens=32, temperature=0.8, top_k=50, top_p=0.95, seed=3)
    reproducible = generate(gpu, prompt, sampled) == generate(gpu, prompt, sampled)

    class WindowOnly(torch.nn.Module):
        """The same GPT without its KV cache: generate() re-encodes the window for every token."""

        def __init__(self, gpt: GPT) -> None:
            super().__init__()
            self.gpt, self.cfg = gpt, gpt.cfg

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.gpt(ids)

    def speed(model: GPT, dtype: torch.dtype, cache: bool = True) -> float:
        model = model.to(dtype)
        if not cache:
            model = WindowOnly(model)  # type: ignore[assignment]
        generate(model, prompt, Sampling(max_new_tokens=4, temperature=0))  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, Sampling(max_new_tokens=new_tokens, temperature=0.8, top_k=50, seed=0))
        return len(out) / (time.perf_counter() - t0)  # generate() syncs once per token (.item)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": {"params": cpu.num_params(), **cfg.__dict__},
        "max_abs_logit_diff_device_vs_cpu": diff,
        "greedy_equal": cpu_ids == gpu_ids,
        "greedy_first_mismatch": next(
            (i for i, (a, b) in enumerate(zip(cpu_ids, gpu_ids, strict=False)) if a != b), None
        ),
        "sampling_reproducible": reproducible,
        "new_tokens": new_tokens,
        "tokens_per_s_fp32_no_kv_cache": speed(gpu, torch.float32, cache=False),
        "tokens_per_s_fp32": speed(gpu, torch.float32),
        "tokens_per_s_bf16": speed(gpu, torch.bfloat16),
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    ok = diff < 1e-3 and result["greedy_equal"] and reproducible
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
