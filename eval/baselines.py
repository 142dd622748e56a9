"""The paper's collaboration baselines that are eval methods (its appendix B "Baseline Details").

The routing baselines choose a writer, so they are policies (:mod:`switchkit.routers`): ``prompt-route`` is a
method by its policy's name, and ``trained-router`` is registered here only to check that the router exists.
The others are not a choice of writer:

- ``text-collaborate`` (the "cooperate" protocol of Feng et al., 2024b): the aligned model answers; in each of
  ``baselines.rounds`` rounds every other model reviews the current answer and the aligned model revises it
  with that feedback.
- ``debate`` (Du et al., 2023): every model answers; in each round every model reads the others' latest answers
  and updates its own. The answer is the aligned model's last one.
- ``logit-merge`` (weights 1/n) and ``proxy-tuning`` (best + (best - worst)): token-level mixtures over a pool
  that shares one tokenizer, policies of :mod:`switchkit.mixing`; here proxy-tuning ranks its best and worst
  on each task's dev split unless the recipe names them.
- ``greedy-soup`` (Wortsman et al., 2022; per task: rank the candidates on the dev split, start from the best,
  add each next one whose uniform soup does not lower the dev score) and ``dare-ties`` (every other candidate's
  task vector onto the base, uniform weights, ``baselines.merge_density``): weight merges through mergekit,
  cached under ``<run_dir>/merged/`` and evaluated as a single model.

The text exchanges run batched per round and model through the engine, so each model reads every prompt through
its own chat template (or the plain template), and their cost sums every round. Dev rankings are eval cells of the
single models on the dev split (``<eval dir>/ranking/``), cached and resumable like any cell; what a ranking or a
soup's selection cost is not charged to the test cells (they record the cost of answering).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from switchkit.artifacts import META_FILE, artifact_stamp, eval_dir, merged_dir, router_dir
from switchkit.config import ConfigError, NotApplicable, Recipe, TaskConfig, aligned_index
from switchkit.cost import combine
from switchkit.engine import SwitchEngine, derive_seed
from switchkit.mixing import ProxyTuning, check_shared_tokenizer, proxy_pair, proxy_weights
from switchkit.policies import SinglePolicy
from switchkit.runner import generation_fingerprint, item_seed, run_items, scored, task_items
from switchkit.tasks import Task, content_hash, load_task

from . import merges
from .methods import Context, Method, PolicyMethod, SingleModel, register

# ---------------------------------------------------------------- routing


@register("trained-router")
class TrainedRouterMethod(PolicyMethod):
    """The ``trained-router`` policy, checked for its router (``<run_dir>/router``, or ``trained-router:PATH``)."""

    @property
    def makes(self) -> str:
        return f"toolkit train-router recipe={self.recipe.name}"

    def artifact(self, task: str) -> Path:
        return (Path(self.arg) if self.arg else router_dir(self.recipe)) / META_FILE

    def check(self, task: str) -> None:
        Method.check(self, task)  # the router exists, before any model loads
        super().check(task)

    def stamp(self, task: str) -> str:
        return artifact_stamp(self.artifact(task).parent)  # a retrained router makes new cells


# ---------------------------------------------------------------- text exchange


def debate_prompt(query: str, own: str, others: list[str]) -> str:
    """A debate turn: the question, this model's last answer and the others' answers; asks for an update."""
    listed = "\n".join(f"- {text.strip()}" for text in others)
    return (f"You and other assistants are answering the same question together.\n\nQuestion: {query}\n\n"
            f"Your answer so far: {own.strip()}\n\nThe other assistants answered:\n{listed}\n\n"
            "Treat their answers as extra advice: check the reasoning of each, then give your updated answer to "
            "the question.")


def feedback_prompt(query: str, answer: str) -> str:
    """A review turn: the question and a proposed answer; asks for feedback on it."""
    return (f"Review a proposed answer to a question.\n\nQuestion: {query}\n\nProposed answer: {answer.strip()}\n\n"
            "Is the proposed answer correct and complete? Give brief, specific feedback.")


def revise_prompt(query: str, answer: str, feedback: list[str]) -> str:
    """A revision turn: the question, the answer so far and the reviewers' feedback; asks for the final answer."""
    listed = "\n".join(f"- {text.strip()}" for text in feedback)
    return (f"Question: {query}\n\nYour answer so far: {answer.strip()}\n\nFeedback from reviewers:\n{listed}\n\n"
            "Use the feedback where it is right and give your final answer to the question.")


class TextExchange(Method):
    """Models exchange whole responses for ``baselines.rounds`` rounds; the aligned model's last one is the answer."""

    def stamp(self, task: str) -> str:
        return f"rounds={self.recipe.baselines.rounds}"

    @staticmethod
    def ask(ctx: Context, model: int, prompts: list[str], seeds: list[int], *tag) -> list[dict]:
        """Model ``model`` answers every prompt (one batched engine call)."""
        return ctx.engine.generate(prompts, SinglePolicy(model), [derive_seed(s, *tag, model) for s in seeds])

    @staticmethod
    def assemble(queries: list[str], seeds: list[int], final: list[dict], turns: list[list[tuple[int, str, list[dict]]]]) -> list[dict]:
        """Records: the final answer (its writer's segments), every turn's text in ``exchange``, the summed cost."""
        records = []
        for j, (query, seed) in enumerate(zip(queries, seeds)):
            records.append({
                "input": query, "output": final[j]["output"], "segments": final[j]["segments"],
                "switch_probs": final[j]["switch_probs"], "seed": seed,
                "cost": combine(recs[j]["cost"] for rnd in turns for _, _, recs in rnd),
                "exchange": [[{"model": m, "role": role, "output": recs[j]["output"]} for m, role, recs in rnd]
                             for rnd in turns],
            })
        return records


@register("debate")
class Debate(TextExchange):
    """Du et al. (2023): every model answers, then updates its answer after reading the others', for r rounds."""

    def generate(self, ctx, task, queries, seeds):
        n, aligned = len(ctx.engine.pool), ctx.engine.pool.aligned_index
        latest = [self.ask(ctx, m, queries, seeds, "debate", 0) for m in range(n)]
        turns = [[(m, "answer", latest[m]) for m in range(n)]]
        for r in range(1, self.recipe.baselines.rounds + 1 if n > 1 else 1):
            latest = [self.ask(ctx, m, [debate_prompt(q, latest[m][j]["output"],
                                                      [latest[o][j]["output"] for o in range(n) if o != m])
                                        for j, q in enumerate(queries)], seeds, "debate", r) for m in range(n)]
            turns.append([(m, "answer", latest[m]) for m in range(n)])
        return self.assemble(queries, seeds, latest[aligned], turns)


@register("text-collaborate")
class TextCollaborate(TextExchange):
    """Feng et al. (2024b), "cooperate": the aligned model answers; each round the other models review the answer
    and the aligned model revises it with their feedback."""

    def generate(self, ctx, task, queries, seeds):
        pool = ctx.engine.pool
        aligned = pool.aligned_index
        reviewers = [m for m in range(len(pool)) if m != aligned]
        answer = self.ask(ctx, aligned, queries, seeds, "collaborate", 0, "answer")
        turns = [[(aligned, "answer", answer)]]
        for r in range(1, self.recipe.baselines.rounds + 1 if reviewers else 1):
            feedback = {m: self.ask(ctx, m, [feedback_prompt(q, answer[j]["output"]) for j, q in enumerate(queries)],
                                    seeds, "collaborate", r, "feedback") for m in reviewers}
            answer = self.ask(ctx, aligned, [revise_prompt(q, answer[j]["output"], [feedback[m][j]["output"]
                                                                                    for m in reviewers])
                                             for j, q in enumerate(queries)], seeds, "collaborate", r, "answer")
            turns.append([(m, "feedback", feedback[m]) for m in reviewers] + [(aligned, "answer", answer)])
        return self.assemble(queries, seeds, answer, turns)


# ---------------------------------------------------------------- dev rankings


def task_config(recipe: Recipe, task: str) -> TaskConfig:
    """The config of the eval task named ``task``."""
    for cfg in recipe.eval.tasks or recipe.tasks:
        if cfg.name == task:
            return cfg
    raise ConfigError(f"task {task!r} is not in eval.tasks")


def dev_task(recipe: Recipe, task: str) -> Task:
    """``task``'s dev split, limited to ``baselines.dev_limit`` examples."""
    return load_task(task_config(recipe, task), split="dev", limit=recipe.baselines.dev_limit,
                     trust_remote_code=recipe.pool.trust_remote_code)


def dev_scores(ctx: Context, task: str) -> list[float]:
    """Each candidate's mean score alone on ``task``'s dev split (cached cells under ``<eval dir>/ranking``)."""
    from .run import cell_fingerprint, cell_path  # run imports this module's registry

    recipe, dev = ctx.recipe, dev_task(ctx.recipe, task)
    seed = recipe.eval.seeds[0]
    scores = []
    for method in SingleModel.expand(recipe, None):
        def run(items, seeds, method=method):
            return method.generate(ctx, dev.name, [it.query for it in items], seeds)

        rows = run_items(cell_path(eval_dir(recipe) / "ranking", method.name, dev.name, dev.split, seed),
                         task_items(dev), scored(dev, run), seed=seed, batch_size=recipe.generation.batch_size,
                         expected=cell_fingerprint(recipe, method, dev, seed))
        scores.append(statistics.fmean(r["score"] for r in rows))
    return scores


def ranking(scores: list[float]) -> list[int]:
    """Candidate indices from the best dev score to the worst (ties: the earlier candidate first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


# ---------------------------------------------------------------- token mixtures


@register("proxy-tuning")
class ProxyTuningMethod(PolicyMethod):
    """The ``proxy-tuning`` policy; unless ``proxy-tuning:BEST,WORST`` or ``baselines.proxy_models`` names its
    models, the best and worst are ranked by the candidates' dev scores on each task (``logit-merge`` needs no
    ranking: it is a method by its policy's name)."""

    def __init__(self, recipe: Recipe, arg=None):
        super().__init__(recipe, arg, "proxy-tuning")
        self._ranked: dict[str, list[int]] = {}

    def check(self, task: str) -> None:
        proxy_pair(self.recipe, self.arg)  # named models must be candidates; unnamed ones are ranked on dev
        if len(self.recipe.pool.candidates) < 2:
            raise NotApplicable("method proxy-tuning needs at least 2 candidates (a best and a worst)")
        check_shared_tokenizer(self.recipe.pool, self.kind)

    def stamp(self, task: str) -> str:
        pair = proxy_pair(self.recipe, self.arg)
        return f"models={list(pair)}" if pair else f"dev_limit={self.recipe.baselines.dev_limit}"

    def policy(self, ctx, task):
        if proxy_pair(self.recipe, self.arg) is not None:
            return super().policy(ctx, task)
        if task not in self._ranked:
            self._ranked[task] = ranking(dev_scores(ctx, task))
        order = self._ranked[task]
        return ProxyTuning(proxy_weights(order[0], order[-1]))


# ---------------------------------------------------------------- weight merges


def merged_engine(recipe: Recipe, folder: Path, name: str) -> SwitchEngine:
    """A one-model engine over a merged folder, with the recipe's pool settings and generation."""
    from switchkit.models import load_pool

    pool = replace(recipe.pool, candidates=[merges.merged_candidate(folder, name)])
    return SwitchEngine(load_pool(pool), recipe.generation)


class WeightMerge(Method):
    """A merge of same-architecture candidates, evaluated as a single model."""

    _checked = False

    def __init__(self, recipe: Recipe, arg=None):
        super().__init__(recipe, arg)
        self._folders: dict[str, Path] = {}  # task -> its merged model, found or made once

    def check(self, task: str) -> None:
        """The candidates must share one architecture: checked from their configs, before any model loads."""
        if self._checked:
            return
        if len(self.recipe.pool.candidates) < 2:
            raise NotApplicable(f"method {self.name} merges weights: it needs at least 2 candidates")
        sources, names = merges.pool_sources(self.recipe.pool)
        merges.check_architectures(self.name, sources, names, self.recipe.pool.trust_remote_code)
        self._checked = True

    def folder(self, ctx: Context, task: str) -> Path:
        """The merged model for ``task`` (made on first use)."""
        raise NotImplementedError

    def generate(self, ctx, task, queries, seeds):
        if task not in self._folders:
            self._folders[task] = self.folder(ctx, task)
        folder = self._folders[task]
        engine = ctx.hold(f"merged:{folder}", lambda: merged_engine(self.recipe, folder, self.kind))
        return engine.generate(queries, SinglePolicy(0), seeds)

    def device(self) -> str:
        from switchkit.models import resolve_device

        return str(resolve_device(self.recipe.pool.device))


@register("dare-ties")
class DareTies(WeightMerge):
    """Every other candidate's task vector (minus the base) merged onto the base with DARE-TIES, uniform weights."""

    def stamp(self, task: str) -> str:
        b = self.recipe.baselines
        return f"density={b.merge_density},base={b.merge_base}"

    def folder(self, ctx, task):
        pool = self.recipe.pool
        sources, names = merges.pool_sources(pool)
        base = merges.base_index([c.role for c in pool.candidates], names, self.recipe.baselines.merge_base)
        config = merges.dare_ties_config(sources[base], [s for i, s in enumerate(sources) if i != base],
                                         self.recipe.baselines.merge_density, merges.merge_dtype(pool))
        key = {"mergekit": config, "seed": self.recipe.generation.seed}
        return merges.merge(config, merged_dir(self.recipe, self.kind), sources[_aligned(self.recipe)], key=key,
                            seed=self.recipe.generation.seed, device=self.device())


def _aligned(recipe: Recipe) -> int:
    return aligned_index([c.role for c in recipe.pool.candidates])


@register("greedy-soup")
class GreedySoup(WeightMerge):
    """Per task: rank the candidates on the dev split, start the soup with the best and add each next one whose
    uniform soup scores at least as well on dev; the final soup answers the test split."""

    def stamp(self, task: str) -> str:
        return f"dev_limit={self.recipe.baselines.dev_limit}"

    def folder(self, ctx, task):
        recipe = self.recipe
        sources, names = merges.pool_sources(recipe.pool)
        dev = dev_task(recipe, task)
        out = merged_dir(recipe, self.kind, task)
        key = {"sources": sources, "dev": content_hash(dev), "seed": recipe.eval.seeds[0],
               "generation": generation_fingerprint(recipe)}
        if merges.cached_merge(out, key) is not None:
            return out
        dtype, aligned = merges.merge_dtype(recipe.pool), sources[_aligned(recipe)]
        scores = dev_scores(ctx, task)
        order = ranking(scores)
        soup, best = [order[0]], scores[order[0]]
        for candidate in order[1:]:
            trial = soup + [candidate]
            with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
                folder = merges.merge(merges.linear_config([sources[i] for i in trial], dtype), Path(tmp) / "soup",
                                      aligned, seed=recipe.generation.seed, device=self.device())
                score = self.dev_score(folder, dev)
            print(f"greedy-soup {task}: soup of {', '.join(names[i] for i in trial)} scores {score:.4f} on dev "
                  f"(best so far {best:.4f})")
            if score >= best:
                soup, best = trial, score
        return merges.merge(merges.linear_config([sources[i] for i in soup], dtype), out, aligned, key=key,
                            seed=recipe.generation.seed, device=self.device())

    def dev_score(self, folder: Path, dev: Task) -> float:
        """The mean dev score of the model in ``folder`` (generated in memory, not cached)."""
        engine = merged_engine(self.recipe, folder, self.kind)
        seed = self.recipe.eval.seeds[0]
        records = engine.generate([e.query for e in dev.examples], SinglePolicy(0),
                                  [item_seed(seed, i) for i in range(len(dev))])
        return statistics.fmean(dev.score(dev.examples, [r["output"] for r in records]))
