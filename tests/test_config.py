import subprocess
import sys

import pytest

from switchkit.config import ConfigError, Recipe, list_recipes, load_recipe, to_yaml


def test_every_packaged_recipe_loads():
    names = list_recipes()
    assert "demo" in names
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_demo_recipe_values_and_overrides():
    r = load_recipe("demo", ["generation.patch_size=12", "pool.candidates.0.name=base", "generation.stop=[a, b]"])
    assert r.generation.patch_size == 12
    assert r.pool.candidates[0].name == "base"
    assert r.generation.stop == ["a", "b"]
    assert r.run_dir == "runs/demo"
    assert [c.role for c in r.pool.candidates] == ["pretrained", "aligned"]
    assert "patch_size: 12" in to_yaml(r)


def test_recipe_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\npool:\n  candidates:\n    - {source: some/dir, role: aligned}\n")
    r = load_recipe(str(p))
    assert r.name == "mine" and r.run_dir == "runs/mine"
    assert r.generation.patch_size == 50 and r.generation.max_new_tokens == 512 and r.switcher.top_p == 0.7


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("no.such.key=1", "unknown key 'no.such.key'"),
        ("pool.bogus=1", "allowed keys under 'pool' are candidates"),
        ("pool.candidates.0.bogus=1", "allowed keys under 'pool.candidates.0' are source, role"),
        ("generation.patch_size=abc", "bad value for 'generation.patch_size'"),
        ("generation.patch_size=0", "generation.patch_size=0 is out of range"),
        ("generation.top_p=1.5", "generation.top_p=1.5 is out of range"),
        ("pool.dtype=int8", "expected one of ['auto', 'float32', 'bfloat16', 'float16']"),
        ("pool.candidates.0.role=teacher", "expected one of ['pretrained', 'finetuned', 'aligned', 'expert']"),
        ("switcher.forced=[0,5]", "switcher.forced.1=5 is out of range: allowed is 0..1"),
        ("synthesis.shard=3", "synthesis.shard=3 is out of range"),
        ("tasks.0.limit=0", "tasks.0.limit=0 is out of range"),
        ("justaword", "is not key=value"),
    ],
)
def test_bad_override_is_one_line_error(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation:\n  patch_size: [1\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_recipe(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("generation:\n  patchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'generation.patchsize'"):
        load_recipe(str(unknown))
    many = tmp_path / "many.yaml"
    many.write_text("pool:\n  candidates:\n" + "".join(f"    - {{source: m{i}}}\n" for i in range(11)))
    with pytest.raises(ConfigError, match="at most 10"):
        load_recipe(str(many))


def _toolkit(*args):
    return subprocess.run([sys.executable, "-m", "switchkit.cli", *args], capture_output=True, text=True)


def test_cli_help_lists_every_command():
    out = _toolkit("--help").stdout
    for cmd in ["train-switcher", "synthesize", "generate", "distill", "eval", "report", "release", "recipes",
                "show-recipe"]:
        assert cmd in out


def test_cli_show_recipe_and_error_exit_code():
    ok = _toolkit("show-recipe", "recipe=demo")
    assert ok.returncode == 0 and "name: demo" in ok.stdout and "patch_size:" in ok.stdout
    bad = _toolkit("show-recipe", "recipe=demo", "no.such.key=1")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "no.such.key" in bad.stderr
    missing = _toolkit("show-recipe")
    assert missing.returncode == 2 and "recipe=NAME is required" in missing.stderr
