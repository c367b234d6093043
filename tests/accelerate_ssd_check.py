"""Launched by tests/test_training_accelerate.py:

    ACCELERATE_USE_CPU=1 CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 \
        tests/accelerate_ssd_check.py OUT_DIR

(accelerate's `--cpu` with several processes goes through mpirun; the torchrun launcher behind
`--multi_gpu`, with ACCELERATE_USE_CPU=1 and no visible GPU, gives two CPU ranks on gloo instead.)

Each rank fine-tunes the same tiny hybrid model through `transformers.Trainer` with SSD (layer and
sample granularity, one after the other), records the SSD decisions and the modes/masks that its
attention layers actually ran with, and writes them to OUT_DIR/rank{RANK}.json together with a
checksum of the trained LoRA weights. The test then checks that both ranks agree.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

from transformers import TrainerCallback  # noqa: E402

import hf_hybrid_attn as hha  # noqa: E402
from conftest import tiny_model  # noqa: E402
from hf_hybrid_attn.training.finetune import FinetuneConfig, finetune  # noqa: E402
from hf_hybrid_attn.training.ssd import Schedule, SSDCallback  # noqa: E402


class Observed(TrainerCallback):
    """What the converted layers ran with inside each training forward (mode, swa_drop)."""

    def __init__(self):
        self.seen, self.step = {}, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        for idx, attn in hha.iter_hybrid_attention(model):
            attn.register_forward_pre_hook(self._hook(idx))

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kw):
        self.step = None

    def _hook(self, idx):
        def hook(module, args):
            if self.step is not None:
                m = [x for x in module.hybrid.modules() if isinstance(x, hha.HybridMixer)][-1]
                drop = None if m.swa_drop is None else m.swa_drop.tolist()
                self.seen.setdefault(str(self.step), []).append([idx, m.mode, drop])

        return hook


def run(granularity: str, out_dir: str) -> dict:
    torch.manual_seed(0)  # identical initial model on every rank
    model = hha.convert(tiny_model(), window=4, feature_dim=8)
    data = torch.randint(3, 99, (32, 24), generator=torch.Generator().manual_seed(1))
    ssd = SSDCallback(Schedule.stages([(0.0, 0.9), (0.5, 0.5)]), granularity=granularity, seed=4, record=True)
    observed = Observed()
    cfg = FinetuneConfig(max_steps=4, batch_size=2, grad_accum=2, eval_every=100, lr=1e-2, merge=False)
    peft_model, log = finetune(model, data, cfg, None, os.path.join(out_dir, f"trainer_{granularity}"),
                               callbacks=[ssd, observed], progress=False)
    history = {}
    for step, entry in ssd.history.items():
        e = {"p": entry["p"]}
        if "drop" in entry:
            e["drop"] = {str(k): v for k, v in entry["drop"].items()}
        else:
            e["rows"] = {f"{layer}:{micro}": rows for (layer, micro), rows in entry["rows"].items()}
        history[str(step)] = e
    lora = sum(float(p.detach().double().sum()) for n, p in peft_model.named_parameters() if "lora_" in n)
    return {"history": history, "observed": observed.seen, "lora_checksum": lora, "steps_done": log["steps_done"]}


def main() -> None:
    out_dir = sys.argv[1]
    result = {g: run(g, out_dir) for g in ("layer", "sample")}
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    result["world_size"] = torch.distributed.get_world_size() if dist else 1
    result["backend"] = torch.distributed.get_backend() if dist else None
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
