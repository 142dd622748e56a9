"""Routing baselines (the paper's API-level collaboration): one model writes the whole response, chosen once.

Both are policies (:data:`switchkit.policies.POLICIES`), so they work with ``toolkit generate``, distillation and
``toolkit eval`` alike. Each reads its decision like a switcher: one forward pass, the logits of the model-id
tokens, a softmax over those n; then the most likely model writes every patch (no aligned-first/last rule, since
the router names the writer of the whole response).

- ``prompt-route``: the aligned candidate reads a routing prompt (the paper's: an instruction and the n
  candidates described by their role; which one fulfils it best?), in its chat template when it has one.
- ``trained-router``: RouteLLM's "causal LLM classifier": an LM trained with the switcher trainer on the query
  alone (``toolkit train-router``, from synthesis's first decisions), exported to ``<run_dir>/router``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .artifacts import router_dir
from .config import ConfigError
from .policies import SwitcherPolicy, _resolve_format, load_switcher, register_policy
from .prompt import build_prompt

if TYPE_CHECKING:  # pragma: no cover
    from .engine import SwitchSequence

ROLE_TEXT = {"pretrained": "a pretrained base model", "finetuned": "a supervised fine-tuned model",
             "aligned": "an aligned (preference-tuned) model", "expert": "a domain expert model"}


def routing_prompt(query: str, roles: list[str]) -> str:
    """The prompt-route text: the instruction, the candidates by role, and a question that ends where the model
    id goes (the same ending as the switcher prompt, so the id tokens are read the same way)."""
    n = len(roles)
    models = "; ".join(f"model {i} is {ROLE_TEXT.get(role, role)}" for i, role in enumerate(roles))
    return (f"Here is an instruction, and {n} candidate language models that could respond to it ({models}). "
            f"Pick the model that is most likely to fulfil the instruction well.\n\nInstruction: {query}\n\n"
            f"Which model should write the response? Please respond with a number from 0 to {n - 1}. "
            "The answer is model ")


class RouterPolicy(SwitcherPolicy):
    """Decides once per sequence (argmax of the id-token distribution) and keeps that model to the end."""

    explicit = True

    def choose(self, engine, seqs):
        undecided = [s for s in seqs if ("route", self) not in s.states]
        if undecided:
            for seq, probs in zip(undecided, self.logprobs(undecided).softmax(-1)):
                seq.states[("route", self)] = (int(probs.argmax()), probs.tolist())
        return [s.states[("route", self)] for s in seqs]


@register_policy("prompt-route")
class PromptRoute(RouterPolicy):
    """The aligned candidate, asked with a routing prompt which model should write the whole response."""

    def selector_text(self, seq: "SwitchSequence") -> str:
        return routing_prompt(seq.query, [c.role for c in self.engine.pool.candidates])

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        if arg is not None:
            raise ConfigError(f"policy prompt-route takes no argument, got prompt-route:{arg}")
        aligned = engine.pool[engine.pool.aligned_index]
        fmt = _resolve_format(recipe.switcher.prompt_format, None, aligned.tokenizer, aligned.name)
        return cls(engine, aligned.index, aligned.tokenizer, fmt, greedy=True)


@register_policy("trained-router")
class TrainedRouter(RouterPolicy):
    """A query-level classifier trained by ``toolkit train-router`` (``arg``: another router folder)."""

    def selector_text(self, seq: "SwitchSequence") -> str:
        return build_prompt(seq.query, [], self.n)

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        path = Path(arg).expanduser() if arg else router_dir(recipe)
        if not path.exists():
            raise ConfigError(f"router {path} does not exist: run `toolkit train-router recipe={recipe.name}`"
                              + ("" if arg else " or name another with trained-router:PATH"))
        return load_switcher(engine, str(path), prompt_format=recipe.switcher.prompt_format, greedy=True,
                             policy_class=cls)
