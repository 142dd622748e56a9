"""GPU checks (run by ``bench/gpu_check.sh`` on one CUDA GPU): the engine in bf16 against plain ``generate``, and a
DeepSpeed ZeRO-2 and ZeRO-3 training step of a small switcher, exported and reloaded with the module's probabilities.

Models are random Llamas saved to a temp dir (no hub access on the GPU machine). The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from switchkit.config import load_recipe
from switchkit.io import write_jsonl_atomic
from switchkit.prompt import build_prompt
from switchkit.testing import build_tokenizer, save_tiny_model

ROOT = Path(__file__).resolve().parent


def engine_ratio(model_dir: Path) -> dict:
    """bench/engine.py on CUDA in bf16 (HF backend): switch generation vs plain generate, and vs the naive engine."""
    cmd = [sys.executable, str(ROOT / "engine.py"), "--backend", "hf", "--model", str(model_dir), "--device", "cuda",
           "--dtype", "bfloat16", "--candidates", "3", "--batches", "8,32", "--max-new", "256", "--patch", "50"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])["hf"]


def switcher_records(count: int, n: int = 2) -> list[dict]:
    """A separable switcher set: the label is the index of the country named in the query."""
    rng, words = random.Random(0), ["France", "Canada"]
    rows = []
    for i in range(count):
        label = i % n
        utilities = [0.0] * n
        utilities[label] = 1.0
        rows.append({"prompt": build_prompt(f"What is the capital of {words[label]}?", [], n), "label": label,
                     "utilities": utilities, "n": n, "k": 4, "task": "t", "query_id": str(i), "trace": [],
                     "seed": rng.randrange(10**6), "tie": False})
    return rows


def zero_step(stage: int, root: Path, pool: list[Path], cpu: bool = False) -> dict:
    """One short ZeRO-``stage`` fit of a LoRA switcher in bf16, exported, reloaded through the engine (a LoRA adapter
    on the aligned candidate), and its decisions compared with the trained module's. ``cpu``: the same steps with
    the ``auto`` strategy in fp32 on CPU (a dry run of everything but DeepSpeed)."""
    from switchkit.config import GenerationConfig
    from switchkit.engine import SwitchEngine
    from switchkit.models import load_pool
    from switchkit.policies import load_switcher
    from switchkit.trainer.export import export_switcher
    from switchkit.trainer.pipeline import fit_switcher

    data = root / "data.jsonl"
    write_jsonl_atomic(data, switcher_records(64))
    recipe_file = root / f"zero{stage}.yaml"
    recipe_file.write_text(json.dumps({
        "name": f"zero{stage}", "run_dir": str(root / f"run{stage}"),
        "pool": {"candidates": [{"source": str(pool[0]), "role": "pretrained"},
                                {"source": str(pool[1]), "role": "aligned"}],
                 "device": "cpu" if cpu else "cuda", "dtype": "float32" if cpu else "bfloat16"},
        "train": {"strategy": "auto" if cpu else f"deepspeed_stage_{stage}",
                  "precision": "32-true" if cpu else "bf16-mixed", "devices": "1", "epochs": 1, "lr": 1e-3, "batch_size": 16, "micro_batch_size": 8, "val_fraction": 0.25, "max_length": 64,
                  "lora": {"enabled": True, "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}}))
    recipe = load_recipe(str(recipe_file))
    module, metrics, trainer = fit_switcher(recipe, [data], progress=False)
    queries = [f"What is the capital of {w}?" for w in ["France", "Canada"] * 3]
    module_probs = module.decide_probs([build_prompt(q, [], 2) for q in queries]).float().cpu()
    out = export_switcher(module, trainer, recipe, metrics, str(pool[1]), root / f"switcher{stage}")
    del module, trainer
    if not cpu:
        torch.cuda.empty_cache()
    engine = SwitchEngine(load_pool(recipe.pool), GenerationConfig())
    policy = load_switcher(engine, str(out))
    # the exported switcher, as the engine runs it, reads the same prompts the module was asked about
    reloaded = policy.logprobs(engine.start(queries, list(range(6)))).exp().float().cpu()
    diff = float((reloaded - module_probs).abs().max())
    policy.close()
    return {"max_abs_diff": round(diff, 5), "ok": diff < 2e-2, "val_loss": metrics.get("loss"),
            "exported": sorted(p.name for p in out.iterdir())}


def main() -> None:
    cpu = "--cpu-dry-run" in sys.argv  # everything but CUDA and DeepSpeed, to check the script on a CPU machine
    assert cpu or torch.cuda.is_available(), "no CUDA device"
    result = {"device": "cpu (dry run)" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(300)
        if not cpu:
            big = save_tiny_model(root / "engine-model", tok, layers=12, hidden=1024, heads=16)  # ~150M parameters
            result["engine_bf16_cuda"] = engine_ratio(big)
        pool = [save_tiny_model(root / f"m{i}", tok, hidden=128, heads=4, seed=i) for i in range(2)]
        for stage in (2, 3):
            try:
                result[f"zero{stage}"] = zero_step(stage, root, pool, cpu)
            except Exception as exc:  # report and go on to the next check
                result[f"zero{stage}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    print(json.dumps(result))
    os._exit(0 if all(result[f"zero{s}"].get("ok") for s in (2, 3)) else 1)


if __name__ == "__main__":
    main()
