"""Evaluation methods: one small registered class per way of answering a task's queries.

A method turns queries into generation records (``{"output", "segments", "switch_probs", ...}``, the
engine's format). Most methods are a switch-generation policy over the recipe's pool, so a new one is::

    @register("my-baseline")
    class MyBaseline(Method):
        def policy(self, ctx, task):
            return MyPolicy(...)

A method that does not fit the engine (say, a weight merge) overrides :meth:`Method.generate` instead.
Names in ``eval.methods`` are registry keys, optionally with an argument after a colon (``single:2``).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from switchkit.config import CandidateConfig, ConfigError, Recipe, candidate_name, run_path
from switchkit.prompt import META_FILE

if TYPE_CHECKING:  # pragma: no cover
    from switchkit.models import Pool

REGISTRY: dict[str, type["Method"]] = {}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def register(kind: str):
    """Class decorator: make a :class:`Method` subclass available under ``kind`` in ``eval.methods``."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.kind = kind
        REGISTRY[kind] = cls
        return cls

    return wrap


class Context:
    """What the methods of one eval run share: the pool and engine (loaded once, on first use) and a switcher."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._pool: Optional[Pool] = None
        self._engine = None
        self._loaded: dict[str, object] = {}

    @property
    def pool(self) -> "Pool":
        """The recipe's pool, loaded on first use."""
        if self._pool is None:
            from switchkit.models import load_pool

            self._pool = load_pool(self.recipe.pool)
        return self._pool

    @property
    def engine(self):
        """A switch-generation engine over the pool with the recipe's generation settings."""
        if self._engine is None:
            from switchkit.engine import SwitchEngine

            self._engine = SwitchEngine(self.pool, self.recipe.generation)
        return self._engine

    def cached(self, key: str, load):
        """One extra loaded object (a switcher, a distilled model) at a time: ``load()`` runs when ``key`` changes."""
        if key not in self._loaded:
            self._loaded.clear()
            self._loaded[key] = load()
        return self._loaded[key]


class Method:
    """A way to answer queries. ``ours`` marks the toolkit's own methods (compared with the best baseline);
    ``collaborative`` marks methods whose responses several pool models write (switching analyses apply)."""

    kind: str = ""
    ours: bool = False
    collaborative: bool = True

    def __init__(self, recipe: Recipe, arg: Optional[str] = None):
        self.recipe = recipe
        self.arg = arg

    @property
    def name(self) -> str:
        """The method's name in results: ``kind`` or ``kind:arg``."""
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    @classmethod
    def expand(cls, recipe: Recipe, arg: Optional[str]) -> list["Method"]:
        """The methods one ``eval.methods`` entry stands for (one, unless a subclass expands it)."""
        if arg is not None:
            raise ConfigError(f"eval.methods: method {cls.kind!r} takes no argument, got {cls.kind}:{arg}")
        return [cls(recipe)]

    def artifact(self, task: str) -> Optional[Path]:
        """A file or folder this method needs for ``task`` (checked before any generation), or None."""
        return None

    makes = ""  # the command that creates the artifact, named in the error when it is missing

    def check(self, task: str) -> None:
        """Raise a :class:`ConfigError` naming the missing artifact and the command that makes it."""
        path = self.artifact(task)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"method {self.name} needs {path}, which does not exist: run `{self.makes}` first")

    def policy(self, ctx: Context, task: str):
        """The engine policy that answers ``task``'s queries (for engine-based methods)."""
        raise NotImplementedError(f"method {self.name} defines neither policy() nor generate()")

    def generate(self, ctx: Context, task: str, queries: list[str], seed: int) -> list[dict]:
        """Generation records for ``queries`` (one per query, in order)."""
        return ctx.engine.generate(queries, self.policy(ctx, task), seed=seed, progress=False)


def candidate_names(recipe: Recipe) -> list[str]:
    """Candidate names as the pool loader sets them (``name``, else the source's last path part)."""
    return [candidate_name(c) for c in recipe.pool.candidates]


@register("single")
class SingleModel(Method):
    """One pool candidate alone (``single`` expands to every candidate; ``single:NAME`` or ``single:INDEX``)."""

    collaborative = False

    @classmethod
    def expand(cls, recipe: Recipe, arg: Optional[str]) -> list[Method]:
        names = candidate_names(recipe)
        if arg is None:
            return [cls(recipe, name) for name in names]
        if arg in names:
            return [cls(recipe, arg)]
        if arg.lstrip("-").isdigit() and -len(names) <= int(arg) < len(names):
            return [cls(recipe, names[int(arg)])]
        raise ConfigError(f"eval.methods: single:{arg} names no candidate: allowed are {', '.join(names)} or 0..{len(names) - 1}")

    @property
    def index(self) -> int:
        """The candidate's index in the pool."""
        return candidate_names(self.recipe).index(self.arg)

    def policy(self, ctx: Context, task: str):
        from switchkit.engine import SinglePolicy

        return SinglePolicy(self.index)


@register("random")
class RandomSwitching(Method):
    """Uniform random choice of the next writer at every patch."""

    def policy(self, ctx: Context, task: str):
        from switchkit.engine import RandomPolicy

        return RandomPolicy()


@register("untuned")
class UntunedSwitcher(Method):
    """The aligned candidate's own model, not fine-tuned, used as the switcher (weights shared with the pool),
    or the model at ``switcher.path`` when ``switcher.policy`` is ``untuned``."""

    def policy(self, ctx: Context, task: str):
        from switchkit.engine import make_policy

        cfg = self.recipe.switcher
        path = cfg.path if cfg.policy == "untuned" else None
        recipe = replace(self.recipe, switcher=replace(cfg, policy="untuned", path=path))
        return ctx.cached(f"untuned:{path}", lambda: make_policy(recipe, ctx.pool))


class TrainedSwitcher(Method):
    """A switcher trained by ``toolkit train-switcher`` (global at ``<run_dir>/switcher``, per task below it)."""

    ours = True
    per_task = False

    @property
    def makes(self) -> str:
        return f"toolkit train-switcher recipe={self.recipe.name}" + (" train.per_task=true" if self.per_task else "")

    def root(self) -> Path:
        """The trained global switcher (``switcher.path`` when ``switcher.policy`` is ``trained``)."""
        cfg = self.recipe.switcher
        if cfg.policy == "trained" and cfg.path:
            return Path(cfg.path)
        return run_path(self.recipe, self.recipe.train.output, "switcher")

    def switcher_path(self, task: str) -> str:
        """Where the switcher for ``task`` lives."""
        return str(self.root() / task if self.per_task else self.root())

    def policy(self, ctx: Context, task: str):
        from switchkit.engine import load_switcher

        path = self.switcher_path(task)
        cfg = self.recipe.switcher
        return ctx.cached(f"switcher:{path}", lambda: load_switcher(
            path, ctx.pool, top_p=cfg.top_p, greedy=cfg.greedy, allow_n_mismatch=cfg.allow_n_mismatch))

    def artifact(self, task: str) -> Optional[Path]:
        path = self.switcher_path(task)
        if self.recipe.switcher.policy == "trained" and self.recipe.switcher.path:
            # a given path: a local folder must exist; a hub id (owner/name) is checked when it loads
            return None if HUB_ID.match(path) and not Path(path).exists() else Path(path)
        return Path(path) / META_FILE


@register("switch-global")
class GlobalSwitcher(TrainedSwitcher):
    """The switcher trained on all tasks."""


@register("switch-task")
class TaskSwitcher(TrainedSwitcher):
    """The switcher trained on this task only (``<switcher dir>/<task>``)."""

    per_task = True


@register("switch")
class Switch(TrainedSwitcher):
    """The recipe's trained switcher: per task when ``train.per_task`` is set, else global."""

    @property
    def per_task(self) -> bool:  # type: ignore[override]
        return self.recipe.train.per_task


@register("distilled")
class Distilled(Method):
    """The aligned model fine-tuned on switch-generation outputs, answering alone with the same settings."""

    ours = True
    collaborative = False

    @property
    def makes(self) -> str:
        return f"toolkit distill recipe={self.recipe.name}"

    def path(self) -> Path:
        """The distilled model's HF folder."""
        return run_path(self.recipe, self.recipe.distill.output, "distilled")

    def artifact(self, task: str) -> Path:
        return self.path() / "config.json"

    def generate(self, ctx: Context, task: str, queries: list[str], seed: int) -> list[dict]:
        from switchkit.engine import SinglePolicy, SwitchEngine
        from switchkit.models import load_pool

        def load():
            pool_cfg = replace(self.recipe.pool, candidates=[
                CandidateConfig(source=str(self.path()), role="aligned", name="distilled")])
            return SwitchEngine(load_pool(pool_cfg), self.recipe.generation)

        engine = ctx.cached(f"distilled:{self.path()}", load)
        return engine.generate(queries, SinglePolicy(0), seed=seed, progress=False)


def build_methods(recipe: Recipe, names: Optional[list[str]] = None) -> list[Method]:
    """The methods ``names`` (default ``eval.methods``) stand for; an unknown name is a :class:`ConfigError`."""
    methods: list[Method] = []
    for entry in recipe.eval.methods if names is None else names:
        kind, _, arg = entry.partition(":")
        if kind not in REGISTRY:
            raise ConfigError(f"eval.methods: unknown method {entry!r}: registered are {', '.join(sorted(REGISTRY))}")
        for method in REGISTRY[kind].expand(recipe, arg or None):
            if method.name not in {m.name for m in methods}:
                methods.append(method)
    if not methods:
        raise ConfigError("eval.methods is empty: name at least one of " + ", ".join(sorted(REGISTRY)))
    return methods
