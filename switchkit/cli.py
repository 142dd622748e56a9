"""The ``toolkit`` command line: ``toolkit COMMAND recipe=NAME key=value ...``.

Every command takes ``recipe=NAME`` (a packaged recipe) or ``recipe=path/to.yaml`` plus dotted
``key=value`` overrides of the recipe. A few commands also take their own arguments in the same
``key=value`` form (``input=``, ``output=``, ``ckpt=`` ...); those are listed in each command's help. Every
command that writes takes ``overwrite=true`` to replace an existing output that is not its own resumable work
(:func:`switchkit.io.check_output`).

One error boundary (:class:`ToolkitGroup`): a user error (bad recipe, bad input file, missing model, an output
that exists) prints one line and exits with code 2; an unexpected exception prints one line with the path of a
log file holding the traceback and exits with code 1.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import click

from .config import ConfigError, Recipe, list_recipes, load_recipe, to_yaml
from .io import InputError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, InputError)


def _user_errors() -> tuple[type[Exception], ...]:
    from .models import ModelLoadError

    return USER_ERRORS + (ModelLoadError,)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def crash_log(exc: BaseException) -> Path:
    """Write ``exc``'s traceback to ``<cache>/logs/`` (the system temp folder if that fails); return the file."""
    from .models import default_cache_dir

    name = f"toolkit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"toolkit {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc))
    for folder in (default_cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return Path("(no writable folder for the log)")


def report_error(exc: BaseException) -> int:
    """Print one line for ``exc`` and return the exit code: 2 for user errors, 1 (plus a log file) otherwise."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()
        return exc.exit_code
    if isinstance(exc, click.ClickException):
        message, code = f"{exc.format_message()} (see `toolkit --help`)", 2
    elif isinstance(exc, (click.Abort, KeyboardInterrupt)):
        message, code = "interrupted: rerun the same command to resume", 130
    elif isinstance(exc, _user_errors()):
        message, code = str(exc), 2
    elif isinstance(exc, OSError) and exc.filename:
        message, code = f"{exc.filename}: {exc.strerror or exc}", 2
    else:
        log = crash_log(exc)
        message, code = f"unexpected {type(exc).__name__}: {str(exc).strip() or '(no message)'} (traceback in {log}; " \
                        "please attach it to a bug report)", 1
    click.echo(f"error: {_one_line(message)}", err=True)
    return code


class ToolkitGroup(click.Group):
    """The command group with the CLI's one error boundary (see :func:`report_error`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes one line
            code = report_error(exc)
        if standalone_mode:
            sys.exit(code)
        return code


def parse_bool(key: str, value: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``) as a bool; anything else is a :class:`ConfigError`."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"{key}={value!r} is not allowed: use {key}=true or {key}=false")


def split_args(args: tuple[str, ...], own: tuple[str, ...]) -> tuple[str, list[str], dict]:
    """Split ``key=value`` arguments into (recipe name, recipe overrides, the command's own arguments)."""
    recipe, overrides, extra = None, [], {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        elif key in own:
            extra[key] = parse_bool(key, value) if key == "overwrite" else value
        else:
            overrides.append(arg)
    if recipe is None:
        raise ConfigError("recipe=NAME is required: see `toolkit recipes`")
    return recipe, overrides, extra


def own_args(args: tuple[str, ...], allowed: tuple[str, ...], required: tuple[str, ...], usage: str) -> dict:
    """The ``key=value`` arguments of a command that takes no recipe; an unknown or missing one is a usage error."""
    extra = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in allowed:
            raise ConfigError(f"argument {arg!r} is not allowed: usage: {usage}")
        extra[key] = parse_bool(key, value) if key == "overwrite" else value
    missing = [key for key in required if key not in extra]
    if missing:
        raise ConfigError(f"{missing[0]}= is required: usage: {usage}")
    return extra


def _run(args: tuple[str, ...], own: tuple[str, ...], entry: Callable[..., None]) -> None:
    name, overrides, extra = split_args(args, own)
    recipe = load_recipe(name, overrides)
    entry(recipe, **extra)


CONTEXT = dict(ignore_unknown_options=True, help_option_names=["-h", "--help"])


@click.group(cls=ToolkitGroup, context_settings=dict(help_option_names=["-h", "--help"]))
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


def distill_and_evaluate(recipe: Recipe, overwrite: bool = False) -> None:
    """Train the distilled model, then evaluate it beside the aligned model and switch generation."""
    from .distill.pipeline import distill_command
    from .eval.distilled import evaluate_distilled

    distill_command(recipe, overwrite=overwrite)
    evaluate_distilled(recipe, overwrite=overwrite)


OVERWRITE = "overwrite=true replaces an existing output that is not this job's own work."

_command(
    "generate", "switchkit.runner:generate_command", ("input", "output", "overwrite"),
    "Switch-generate responses: recipe=NAME input=in.jsonl output=out.jsonl [overwrite=true] [key=value ...]. "
    + OVERWRITE,
)
_command(
    "synthesize", "switchkit.data_synthesis.synthesize:synthesize_command", ("merge", "overwrite"),
    "Synthesize switcher training data from rollouts: recipe=NAME [synthesis.shard=i synthesis.num_shards=N] "
    "[merge=DIR1,DIR2,...] [overwrite=true]. " + OVERWRITE,
)
_command(
    "train-switcher", "switchkit.trainer.pipeline:train_switcher_command", ("overwrite",),
    "Synthesize (if needed), train and export a switcher: recipe=NAME [overwrite=true] [key=value ...]. " + OVERWRITE,
)
_command(
    "train-router", "switchkit.trainer.router:train_router_command", ("overwrite",),
    "Train the trained-router baseline on synthesis's first decisions: recipe=NAME [overwrite=true] "
    "[key=value ...]. " + OVERWRITE,
)
_command(
    "distill", "switchkit.cli:distill_and_evaluate", ("overwrite",),
    "Distill switch generation into the aligned model and evaluate it: recipe=NAME [overwrite=true] "
    "[key=value ...]. " + OVERWRITE,
)
_command(
    "eval", "switchkit.eval.run:eval_command", ("overwrite",),
    "Evaluate methods x tasks x splits: recipe=NAME [overwrite=true] [key=value ...]. " + OVERWRITE,
)
_command(
    "serve", "switchkit.serve:serve_command", ("switcher", "host", "port"),
    "Serve switch generation behind an OpenAI-compatible API: recipe=NAME [switcher=DIR] [host=127.0.0.1] "
    "[port=8000] [key=value ...].",
)


@main.command(context_settings=CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def report(args: tuple[str, ...]) -> None:
    """Write Markdown, PNG and JSON reports from an eval run: run=DIR [overwrite=true]; or the answer of several
    runs of one recipe, each and pooled: runs=DIR,DIR,... out=DIR [overwrite=true]."""
    usage = "toolkit report run=DIR [overwrite=true] | toolkit report runs=DIR,DIR,... out=DIR [overwrite=true]"
    extra = own_args(args, ("run", "runs", "out", "overwrite"), (), usage)
    from .eval.report import pooled_report_command, report_command

    if "runs" in extra and "out" in extra and "run" not in extra:
        pooled_report_command(extra["runs"], extra["out"], overwrite=extra.get("overwrite", False))
    elif "run" in extra and not {"runs", "out"} & set(extra):
        report_command(extra["run"], overwrite=extra.get("overwrite", False))
    else:
        raise ConfigError(f"give run=DIR, or runs=DIR,DIR,... with out=DIR: usage: {usage}")


@main.command(context_settings=CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def release(args: tuple[str, ...]) -> None:
    """Write a self-contained release folder with a model card: ckpt=DIR out=DIR [push_to_hub=REPO] [overwrite=true]."""
    extra = own_args(args, ("ckpt", "out", "push_to_hub", "overwrite"), ("ckpt", "out"),
                     "toolkit release ckpt=DIR out=DIR [push_to_hub=REPO_ID] [overwrite=true]")
    from .trainer.release import release_command

    release_command(**extra)


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

        click.echo(load_pool(recipe.pool, recipe.generation.backend).describe())

    _run(args, (), show)


if __name__ == "__main__":
    main()
