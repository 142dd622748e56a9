"""Evaluation methods: the ways of answering a task's queries that ``eval.methods`` can name.

Every registered policy (:data:`switchkit.policies.POLICIES`) is a method by its own name (``random``,
``untuned``, ``forced:1,0``, a new baseline policy ...), so a baseline registered once in the core reaches
``toolkit generate``, distillation and evaluation alike. This module adds the methods that are more than one
policy: ``single`` (every candidate alone), the trained switchers (``switch``, ``switch-global``,
``switch-task``), the ``distilled`` model, and the ``oracle`` ceiling (computed, never generated).
A method that needs no policy overrides :meth:`Method.generate`::

    @register("my-method")
    class MyMethod(Method):
        def generate(self, ctx, task, queries, seeds):
            return [{"output": ..., "segments": []} for _ in queries]

Names in ``eval.methods`` are registry keys, optionally with an argument after a colon (``single:2``).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from switchkit.artifacts import META_FILE, artifact_stamp, check_switcher, distilled_model_dir, switcher_dir
from switchkit.config import CandidateConfig, ConfigError, Recipe, candidate_name
from switchkit.policies import POLICIES, check_policy, make_policy
from switchkit.registry import registrar

if TYPE_CHECKING:  # pragma: no cover
    from switchkit.engine import SwitchEngine

REGISTRY: dict[str, type["Method"]] = {}
register = registrar(REGISTRY, "kind")  # @register("kind"): the class becomes an eval.methods entry
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class Context:
    """What the methods of one eval run share: the pool's engine (loaded on first use) and one policy at a time."""

    def __init__(self, recipe: Recipe, queries: Sequence[tuple[str, str]] = ()):
        self.recipe = recipe
        self.queries = list(queries)  # (id, query) pairs checked against the models' contexts when the pool loads
        self._engine: Optional[SwitchEngine] = None
        self._held: tuple[Optional[str], object] = (None, None)

    @property
    def engine(self) -> "SwitchEngine":
        """A switch-generation engine over the recipe's pool."""
        if self._engine is None:
            from switchkit.engine import SwitchEngine
            from switchkit.models import load_pool

            self._engine = SwitchEngine(load_pool(self.recipe.pool, self.recipe.generation.backend),
                                        self.recipe.generation)
            self._engine.check_queries([q for _, q in self.queries], [i for i, _ in self.queries])
        return self._engine

    def hold(self, key: str, load: Callable[[], object]):
        """One loaded object (a policy, an engine) at a time: ``load()`` runs when ``key`` changes, and the
        previous object is closed first (a switcher's adapter is unloaded)."""
        if self._held[0] != key:
            close = getattr(self._held[1], "close", None)
            if close is not None:
                close()
            self._held = (None, None)
            self._held = (key, load())
        return self._held[1]


class Method:
    """A way to answer queries. ``ours`` marks the toolkit's own methods (compared with the best baseline);
    ``collaborative`` marks methods whose responses several pool models write (switching analyses apply);
    ``computed`` methods are derived from other methods' cells instead of generated."""

    kind: str = ""
    ours: bool = False
    collaborative: bool = True
    computed: bool = False
    makes = ""  # the command that creates the method's artifact, named in the error when it is missing
    setting = ""  # a sweep's setting, e.g. "[aligned_bias=-2]" (switchkit.eval.sweep)

    def __init__(self, recipe: Recipe, arg: Optional[str] = None):
        self.recipe = recipe
        self.arg = arg

    @property
    def name(self) -> str:
        """The method's name in results: ``kind`` or ``kind:arg``, then its sweep setting if any."""
        return (self.kind if self.arg is None else f"{self.kind}:{self.arg}") + self.setting

    @classmethod
    def expand(cls, recipe: Recipe, arg: Optional[str]) -> list["Method"]:
        """The methods one ``eval.methods`` entry stands for (one, unless a subclass expands it)."""
        return [cls(recipe, arg)]

    def artifact(self, task: str) -> Optional[Path]:
        """A file or folder this method needs for ``task`` (checked before any generation), or None."""
        return None

    def check(self, task: str) -> None:
        """Raise a :class:`ConfigError` naming the missing artifact and the command that makes it."""
        path = self.artifact(task)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"method {self.name} needs {path}, which does not exist: run `{self.makes}` first")

    def stamp(self, task: str) -> str:
        """What identifies this method's model for ``task`` in a cell's fingerprint (its artifact's content)."""
        path = self.artifact(task)
        return artifact_stamp(path) if path is not None and Path(path).exists() else ""

    def policy(self, ctx: Context, task: str):
        """The policy that answers ``task`` (methods that generate through the recipe's pool)."""
        raise NotImplementedError(f"method {self.name} defines neither policy() nor generate()")

    def generate(self, ctx: Context, task: str, queries: list[str], seeds: list[int]) -> list[dict]:
        """Generation records for ``queries`` (one per query, in order; query i drawn with ``seeds[i]``)."""
        return ctx.engine.generate(queries, self.policy(ctx, task), seeds)


class PolicyMethod(Method):
    """A registered policy by its own name (``kind[:arg]``), configured by the recipe's ``switcher`` section."""

    def __init__(self, recipe: Recipe, arg: Optional[str] = None, kind: Optional[str] = None):
        super().__init__(recipe, arg)
        self.kind = kind or self.kind

    def check(self, task: str) -> None:
        check_policy(self.recipe, self.kind, self.arg)

    def stamp(self, task: str) -> str:
        return artifact_stamp(POLICIES[self.kind].artifact(self.recipe, self.arg))

    def policy(self, ctx, task):
        return ctx.hold(f"policy:{self.name}", lambda: make_policy(self.recipe, ctx.engine, self.kind, self.arg))


@register("single")
class SingleModel(PolicyMethod):
    """One pool candidate alone (``single`` expands to every candidate; ``single:NAME`` or ``single:INDEX``)."""

    collaborative = False

    @classmethod
    def expand(cls, recipe: Recipe, arg: Optional[str]) -> list[Method]:
        names = [candidate_name(c) for c in recipe.pool.candidates]
        if arg is None:
            return [cls(recipe, name) for name in names]
        if arg in names:
            return [cls(recipe, arg)]
        if arg.lstrip("-").isdigit() and -len(names) <= int(arg) < len(names):
            return [cls(recipe, names[int(arg)])]
        raise ConfigError(f"eval.methods: single:{arg} names no candidate: allowed are {', '.join(names)} "
                          f"or 0..{len(names) - 1}")


class TrainedSwitcher(Method):
    """A switcher trained by ``toolkit train-switcher`` (:func:`switchkit.artifacts.switcher_dir`), or
    ``switcher.path`` (per task: ``switcher.path/<task>``) when ``switcher.policy`` is ``trained``."""

    ours = True
    per_task = False

    @property
    def makes(self) -> str:
        return f"toolkit train-switcher recipe={self.recipe.name}" + (" train.per_task=true" if self.per_task else "")

    def switcher_path(self, task: str) -> Path:
        """Where the switcher for ``task`` lives."""
        cfg = self.recipe.switcher
        if cfg.policy == "trained" and cfg.path:
            return Path(cfg.path) / task if self.per_task else Path(cfg.path)
        return switcher_dir(self.recipe, task if self.per_task else None)

    def artifact(self, task: str) -> Optional[Path]:
        path = self.switcher_path(task)
        cfg = self.recipe.switcher
        if cfg.policy == "trained" and cfg.path:
            # a given path: a local folder must exist; a hub id (owner/name) is checked when it loads
            return None if HUB_ID.match(str(path)) and not path.exists() else path
        return path / META_FILE

    def check(self, task: str) -> None:
        super().check(task)
        path = self.switcher_path(task)
        if path.exists():
            check_switcher(path, len(self.recipe.pool.candidates), self.recipe.switcher.allow_n_mismatch)

    def stamp(self, task: str) -> str:
        return artifact_stamp(self.switcher_path(task))

    def policy(self, ctx, task):
        path = str(self.switcher_path(task))
        return ctx.hold(f"switcher:{path}:{self.recipe.switcher}",
                        lambda: make_policy(self.recipe, ctx.engine, "trained", path))


@register("switch-global")
class GlobalSwitcher(TrainedSwitcher):
    """The switcher trained on all tasks."""


@register("switch-task")
class TaskSwitcher(TrainedSwitcher):
    """The switcher trained on this task only."""

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

    def artifact(self, task: str) -> Path:
        return distilled_model_dir(self.recipe) / "config.json"

    def stamp(self, task: str) -> str:
        return artifact_stamp(distilled_model_dir(self.recipe))

    def generate(self, ctx, task, queries, seeds):
        from switchkit.engine import SwitchEngine
        from switchkit.models import load_pool
        from switchkit.policies import SinglePolicy

        def load():
            pool_cfg = replace(self.recipe.pool, candidates=[
                CandidateConfig(source=str(distilled_model_dir(self.recipe)), role="aligned", name="distilled")])
            return SwitchEngine(load_pool(pool_cfg, self.recipe.generation.backend), self.recipe.generation)

        engine = ctx.hold(f"distilled:{distilled_model_dir(self.recipe)}", load)
        return engine.generate(queries, SinglePolicy(0), seeds)


@register("oracle")
class Oracle(Method):
    """Per example, the best score among the single models' cells: the ceiling of choosing one model per query.

    An upper bound, not a method one can run: it is computed from the ``single`` cells of the same run, shown
    beside the others, and never counted as a baseline.
    """

    collaborative = False
    computed = True

    @classmethod
    def expand(cls, recipe: Recipe, arg: Optional[str]) -> list[Method]:
        return SingleModel.expand(recipe, None) + [cls(recipe, arg)]

    @staticmethod
    def combine(cells: list[list[dict]]) -> list[dict]:
        """Oracle rows from the single models' rows of one cell: per example, a row with the best score."""
        return [dict(max(rows, key=lambda r: r["score"]), method="oracle") for rows in zip(*cells)]


def build_methods(recipe: Recipe, names: Optional[list[str]] = None) -> list[Method]:
    """The methods ``names`` (default ``eval.methods``) stand for; an unknown name is a :class:`ConfigError`."""
    methods: list[Method] = []
    for entry in recipe.eval.methods if names is None else names:
        kind, _, arg = entry.partition(":")
        if kind in REGISTRY:
            expanded = REGISTRY[kind].expand(recipe, arg or None)
        elif kind in POLICIES:
            expanded = [PolicyMethod(recipe, arg or None, kind)]
        else:
            raise ConfigError(f"eval.methods: unknown method {entry!r}: registered are "
                              f"{', '.join(sorted(set(REGISTRY) | set(POLICIES)))}")
        for method in expanded:
            if method.name not in {m.name for m in methods}:
                methods.append(method)
    if not methods:
        raise ConfigError("eval.methods is empty: name at least one of " + ", ".join(sorted(set(REGISTRY) | set(POLICIES))))
    return methods


from . import baselines  # noqa: E402,F401  (registers the paper's collaboration baselines)
