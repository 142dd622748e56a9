"""The ``toolkit`` command line: ``toolkit COMMAND recipe=NAME key=value ...``.

Every command takes ``recipe=NAME`` (a packaged recipe) or ``recipe=path/to.yaml`` plus dotted
``key=value`` overrides of the recipe. A few commands also take their own arguments in the same
``key=value`` form (``input=``, ``output=``, ``ckpt=`` ...); those are listed in each command's help.
User errors (bad recipe, bad input file, missing model) print one line and exit with code 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

import click

from .config import ConfigError, Recipe, list_recipes, load_recipe, to_yaml
from .io import InputError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, InputError)


def _user_errors() -> tuple[type[Exception], ...]:
    from .models import ModelLoadError

    return USER_ERRORS + (ModelLoadError,)


def split_args(args: tuple[str, ...], own: tuple[str, ...]) -> tuple[str, list[str], dict[str, str]]:
    """Split ``key=value`` arguments into (recipe name, recipe overrides, the command's own arguments)."""
    recipe, overrides, extra = None, [], {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        elif key in own:
            extra[key] = value
        else:
            overrides.append(arg)
    if recipe is None:
        raise ConfigError("recipe=NAME is required: see `toolkit recipes`")
    return recipe, overrides, extra


def _run(args: tuple[str, ...], own: tuple[str, ...], entry: Callable[..., None]) -> None:
    try:
        name, overrides, extra = split_args(args, own)
        recipe = load_recipe(name, overrides)
        entry(recipe, **extra)
    except _user_errors() as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


CONTEXT = dict(ignore_unknown_options=True, help_option_names=["-h", "--help"])


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
@click.version_option(package_name="switchkit")
def main() -> None:
    """switchkit: train switchers, run switch generation, distill and evaluate."""


def _command(name: str, target: str, own: tuple[str, ...] = (), help: str = "") -> None:
    """A ``toolkit NAME recipe=... key=value`` command that calls ``module:function(recipe, **own args)``."""
    module, func = target.split(":")

    @main.command(name=name, context_settings=CONTEXT, help=help)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        _run(args, own, lambda recipe, **kw: getattr(importlib.import_module(module), func)(recipe, **kw))


def distill_and_evaluate(recipe: Recipe) -> None:
    """Train the distilled model, then evaluate it beside the aligned model and switch generation."""
    from .distill.pipeline import distill_command
    from .eval.distilled import evaluate_distilled

    distill_command(recipe)
    evaluate_distilled(recipe)


_command(
    "generate", "switchkit.runner:generate_command", ("input", "output"),
    "Switch-generate responses: recipe=NAME input=in.jsonl output=out.jsonl [key=value ...].",
)
_command(
    "synthesize", "switchkit.data_synthesis.synthesize:synthesize_command", ("merge",),
    "Synthesize switcher training data from rollouts: recipe=NAME [synthesis.shard=i synthesis.num_shards=N] "
    "[merge=DIR1,DIR2,...].",
)
_command(
    "train-switcher", "switchkit.trainer.pipeline:train_switcher_command", (),
    "Synthesize (if needed), train and export a switcher: recipe=NAME [key=value ...].",
)
_command(
    "train-router", "switchkit.trainer.router:train_router_command", (),
    "Train the trained-router baseline on synthesis's first decisions: recipe=NAME [key=value ...].",
)
_command(
    "distill", "switchkit.cli:distill_and_evaluate", (),
    "Distill switch generation into the aligned model and evaluate it: recipe=NAME [key=value ...].",
)
_command(
    "eval", "switchkit.eval.run:eval_command", (),
    "Evaluate methods x tasks x splits: recipe=NAME [key=value ...].",
)


@main.command(context_settings=CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def report(args: tuple[str, ...]) -> None:
    """Write Markdown, PNG and JSON reports from an eval run: run=DIR."""
    try:
        extra = dict(a.split("=", 1) for a in args if "=" in a)
        if "run" not in extra or len(extra) != len(args):
            raise ConfigError("usage: toolkit report run=DIR")
        from .eval.report import report_command

        report_command(extra["run"])
    except _user_errors() as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.command(context_settings=CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def release(args: tuple[str, ...]) -> None:
    """Write a self-contained release folder with a model card: ckpt=DIR out=DIR [push_to_hub=REPO]."""
    try:
        extra = dict(a.split("=", 1) for a in args if "=" in a)
        if not {"ckpt", "out"} <= set(extra) or len(extra) != len(args):
            raise ConfigError("usage: toolkit release ckpt=DIR out=DIR [push_to_hub=REPO_ID]")
        from .trainer.release import release_command

        release_command(**extra)
    except _user_errors() as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.command()
def recipes() -> None:
    """List the packaged recipes, then the paper's 18 tasks (``source: paper:NAME``)."""
    from .suite import describe_paper_tasks

    for name in list_recipes():
        recipe = load_recipe(name)
        click.echo(f"{name:<32} {recipe.description}")
    click.echo("\nThe paper's 18 tasks (source: paper:NAME; data from $SWITCHKIT_DATA, default data/):")
    for line in describe_paper_tasks():
        click.echo("  " + line)


@main.command(name="show-recipe", context_settings=CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def show_recipe(args: tuple[str, ...]) -> None:
    """Print the resolved recipe: recipe=NAME [key=value ...]."""
    _run(args, (), lambda recipe: click.echo(to_yaml(recipe), nl=False))


@main.command(name="pool", context_settings=CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pool(args: tuple[str, ...]) -> None:
    """Load the recipe's pool and print its mode and the models' roles: recipe=NAME."""

    def show(recipe: Recipe) -> None:
        from .models import load_pool

        click.echo(load_pool(recipe.pool).describe())

    _run(args, (), show)


if __name__ == "__main__":
    main()
