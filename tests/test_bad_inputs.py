"""Bad inputs through the CLI: each case exits with code 2, prints one line naming the culprit, and leaves every
file as it was (nothing new, nothing changed). Cases run in-process through click's CliRunner; one runs as a
real subprocess. The cases are grouped by category (see the ids)."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from switchkit.artifacts import load_records
from switchkit.cli import main
from switchkit.config import load_recipe
from switchkit.data_synthesis.plan import plan
from switchkit.data_synthesis.store import manifest
from switchkit.eval.run import eval_command
from switchkit.io import write_json_atomic, write_jsonl_atomic
from switchkit.prompt import build_prompt
from switchkit.runner import generate_command
from switchkit.tasks import load_tasks
from switchkit.trainer.pipeline import switcher_plan

PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")
QA = [("What is the capital of France?", ["Paris"]), ("What is the capital of Peru?", ["Lima"]),
      ("What is the capital of Kenya?", ["Nairobi"]), ("What is the capital of Chile?", ["Santiago"])]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pool_dirs):
    """A recipe over the tiny pool with a finished `toolkit generate` output, a finished eval cell, training
    records and a switcher-like folder (the aligned model with a switchkit.json)."""
    w = tmp_path_factory.mktemp("world")
    (w / "qa.jsonl").write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QA))
    cands = "\n".join(f"    - {{source: '{d}', role: {r}, name: {n}}}" for d, r, n in
                      zip(tiny_pool_dirs, ["pretrained", "finetuned", "aligned"], ["base", "sft", "aligned"]))
    (w / "recipe.yaml").write_text(f"""name: bad
run_dir: {w / 'run'}
pool:
  candidates:
{cands}
  device: cpu
  cache_dir: {w / 'cache'}
generation: {{patch_size: 3, max_new_tokens: 6, temperature: 0.7, batch_size: 4}}
switcher: {{policy: random}}
tasks: [{{name: qa, type: f1_match, source: '{w / 'qa.jsonl'}'}}]
synthesis: {{k: 2, records_per_task: 4, chunk_size: 2}}
train: {{lora: {{enabled: false}}, epochs: 1, batch_size: 4, micro_batch_size: 4}}
eval: {{methods: ['single:aligned'], splits: [test]}}
""")
    recipe = load_recipe(str(w / "recipe.yaml"))
    (w / "in.jsonl").write_text("".join(json.dumps({"input": q}) + "\n" for q, _ in QA[:3]))
    generate_command(recipe, input=str(w / "in.jsonl"), output=str(w / "gen.jsonl"))
    eval_command(recipe)
    write_jsonl_atomic(w / "records.jsonl", [
        {"prompt": build_prompt(q, [], 3), "label": i % 3, "utilities": [float(j == i % 3) for j in range(3)],
         "query_id": str(i)} for i, (q, _) in enumerate(QA * 3)])
    sw = w / "switcher"
    shutil.copytree(tiny_pool_dirs[-1], sw)
    meta = {"prompt_format": "v1", "n": 3, "adapter": False, "base_model": None, "model_id_tokens": [1, 2, 3],
            "max_length": 64, "metrics": {"accuracy": 0.5}, "recipe": {}, "format_version": 2,
            "candidates": [{"index": i, "name": n, "source": str(d), "role": r} for i, (d, r, n) in enumerate(
                zip(tiny_pool_dirs, ["pretrained", "finetuned", "aligned"], ["base", "sft", "aligned"]))]}
    (sw / "switchkit.json").write_text(json.dumps(meta))
    return w


def _switcher_copy(change=None, drop=(), text=None):
    """A setup: a copy of the world's switcher folder whose switchkit.json is changed by ``change(meta)`` or
    replaced by ``text``, without the files in ``drop``."""
    def setup(w, t):
        sw = t / "sw"
        shutil.copytree(w / "switcher", sw)
        if change:
            meta = json.loads((sw / "switchkit.json").read_text())
            change(meta)
            (sw / "switchkit.json").write_text(json.dumps(meta))
        if text is not None:
            (sw / "switchkit.json").write_text(text)
        for name in drop:
            (sw / name).unlink()
    return setup


def _write(name, text):
    """A setup that writes ``text`` to the case folder's ``name`` (bytes are written as is)."""
    def setup(w, t):
        path = t / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.format(w=w, t=t).encode())
    return setup


def _model_copy(broken_file, content):
    def setup(w, t):
        src = Path(load_recipe(str(w / "recipe.yaml")).pool.candidates[0].source)
        shutil.copytree(src, t / "model")
        (t / "model" / broken_file).write_bytes(content)
    return setup


def _synthesis_work(chunks: bool):
    """A synthesis folder of the world recipe (manifest for synthesis.k=2); with ``chunks``, unreadable chunks."""
    def setup(w, t):
        recipe = load_recipe(str(w / "recipe.yaml"), [f"synthesis.output={t / 'syn'}"])
        tasks = load_tasks(recipe.tasks)
        expected = manifest(recipe, tasks, len(plan(recipe, [len(x.examples) for x in tasks])))
        write_json_atomic(t / "syn" / "work" / "manifest.json", expected)
        if chunks:
            for c in range(expected["chunks"]):
                (t / "syn" / "work" / f"chunk-{c:06d}.json").write_text("{not json")
    return setup


def _corrupt_checkpoint(w, t):
    """The world recipe's switcher fit, stamped with its own fingerprint, whose last.ckpt is garbage."""
    recipe = load_recipe(str(w / "recipe.yaml"), [f"run_dir={t / 'run'}", f"train.data=[{w / 'records.jsonl'}]"])
    fit = switcher_plan(recipe, load_records([w / "records.jsonl"], 3), None, t / "run" / "switcher")
    write_json_atomic(fit.ckpt_dir / "fingerprint.json", fit.expected)
    (fit.ckpt_dir / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")


def _stale_parts(w, t):
    """Saved batches of the world's generate job (same fingerprint), one of them damaged."""
    parts = t / "o.jsonl.parts"
    parts.mkdir()
    shutil.copy(w / "gen.jsonl.fingerprint.json", parts / "fingerprint.json")
    (parts / "00000.jsonl").write_text('{"id": "0", "output": \n')


R = "recipe={w}/recipe.yaml"
GEN = ["generate", R, "input={w}/in.jsonl"]
TRAIN = ["train-switcher", R, "run_dir={t}/run", "train.data=[{w}/records.jsonl]"]
CASES = [
    # --- command line
    ("cli-unknown-command", ["bogus"], None, "No such command 'bogus'"),
    ("cli-not-key-value", ["eval", R, "--fast"], None, "'--fast' is not key=value"),
    ("cli-missing-recipe", ["eval"], None, "recipe=NAME is required"),
    ("cli-report-without-run", ["report"], None, "give run=DIR, or runs=DIR,DIR,... with out=DIR"),
    ("cli-release-unknown-argument", ["release", "ckpt={w}/switcher", "out={t}/rel", "bogus=1"], None,
     "'bogus=1' is not allowed"),
    ("cli-overwrite-not-bool", GEN + ["output={t}/o.jsonl", "overwrite=maybe"], None, "overwrite='maybe'"),
    ("cli-generate-without-input", ["generate", R], None, "input=FILE.jsonl is required"),
    # --- recipes and settings
    ("recipe-unknown-name", ["show-recipe", "recipe=nope"], None, "unknown recipe 'nope'"),
    ("recipe-file-missing", ["show-recipe", "recipe={t}/missing.yaml"], None, "missing.yaml' does not exist"),
    ("recipe-yaml-syntax", ["show-recipe", "recipe={t}/r.yaml"], _write("r.yaml", "name: x\npool: [\n  - a: 1\n b: 2\n"),
     "r.yaml: line 3, column 3: did not find expected node content"),
    ("recipe-yaml-duplicate-key", ["show-recipe", "recipe={t}/r.yaml"], _write("r.yaml", "name: x\nname: y\n"),
     "line 2, column 1: found duplicate key"),
    ("recipe-not-a-mapping", ["show-recipe", "recipe={t}/r.yaml"], _write("r.yaml", "- a\n- b\n"),
     "must be a mapping"),
    ("recipe-unknown-key", ["show-recipe", "recipe={t}/r.yaml"], _write("r.yaml", "name: x\nbogus: 1\n"),
     "unknown key 'bogus'"),
    ("recipe-unknown-key-in-list-item", ["show-recipe", "recipe={t}/r.yaml"],
     _write("r.yaml", "pool:\n  candidates:\n    - {{source: a, bogus: 1}}\n"), "unknown key 'pool.candidates.0.bogus'"),
    ("recipe-wrong-type", ["show-recipe", R, "generation.patch_size=abc"], None, "'generation.patch_size'"),
    ("recipe-top-p-range", ["show-recipe", R, "generation.top_p=1.5"], None, "generation.top_p=1.5 is out of range"),
    ("recipe-distill-lr", ["show-recipe", R, "distill.lr=0"], None, "distill.lr=0.0 is out of range"),
    ("recipe-distill-batch-multiple", ["show-recipe", R, "distill.batch_size=6", "distill.micro_batch_size=4"], None,
     "distill.batch_size=6 must be a multiple"),
    ("recipe-distill-val-fraction", ["show-recipe", R, "distill.val_fraction=1"], None, "distill.val_fraction=1"),
    ("recipe-distill-min-score", ["show-recipe", R, "distill.min_score=2"], None, "distill.min_score=2"),
    ("recipe-eval-task-limit", ["show-recipe", "recipe={t}/r.yaml"],
     _write("r.yaml", "eval:\n  tasks: [{{name: a, source: a.jsonl, limit: 0}}]\n"), "eval.tasks.0.limit=0 is out of range"),
    ("recipe-unknown-strategy", ["show-recipe", R, "train.strategy=fsdp"], None, "'train.strategy'"),
    ("recipe-negative-seed", ["show-recipe", R, "generation.seed=-1"], None, "generation.seed=-1"),
    ("recipe-no-eval-seeds", ["show-recipe", R, "eval.seeds=[]"], None, "eval.seeds is empty"),
    ("recipe-unknown-policy", ["show-recipe", R, "switcher.policy=routing"], None, "switcher.policy='routing' is unknown"),
    ("recipe-shard-range", ["show-recipe", R, "synthesis.shard=2", "synthesis.num_shards=2"], None,
     "synthesis.shard=2 is out of range"),
    ("recipe-bad-devices", ["show-recipe", R, "train.devices=gpu"], None, "train.devices='gpu'"),
    # --- input files of toolkit generate
    ("input-missing", ["generate", R, "input={t}/none.jsonl"], None, "none.jsonl: file not found"),
    ("input-malformed-json", ["generate", R, "input={t}/in.jsonl"], _write("in.jsonl", '{{"input": "a"}}\n{{"input": \n'),
     "in.jsonl:2: malformed JSON"),
    ("input-missing-field", ["generate", R, "input={t}/in.jsonl"], _write("in.jsonl", '{{"text": "a"}}\n'),
     "in.jsonl:1: missing field 'input'"),
    ("input-empty-query", ["generate", R, "input={t}/in.jsonl"], _write("in.jsonl", '{{"input": "a"}}\n{{"input": " "}}\n'),
     "in.jsonl:2: field 'input' must be a non-empty string"),
    ("input-repeated-id", ["generate", R, "input={t}/in.jsonl"],
     _write("in.jsonl", '{{"input": "a", "id": 1}}\n{{"input": "b", "id": 1}}\n'), "field 'id' repeats"),
    ("input-not-utf8", ["generate", R, "input={t}/in.jsonl"], _write("in.jsonl", b'{"input": "caf\xe9"}\n'),
     "in.jsonl:1: not UTF-8 text"),
    ("input-empty-file", ["generate", R, "input={t}/in.jsonl"], _write("in.jsonl", "\n"), "in.jsonl: no lines"),
    ("input-is-a-folder", ["generate", R, "input={w}"], None, "is a folder, not a file"),
    # --- task files
    ("task-missing", ["eval", R, "tasks.0.source={t}/none.jsonl"], None, "none.jsonl: file not found"),
    ("task-empty-gold", ["eval", R, "tasks.0.source={t}/qa.jsonl"],
     _write("qa.jsonl", '{{"input": "q", "output": ["a"]}}\n{{"input": "q2", "output": []}}\n'),
     "qa.jsonl:2: field 'output' is empty"),
    ("task-malformed-jsonl", ["synthesize", R, "tasks.0.source={t}/qa.jsonl"],
     _write("qa.jsonl", '{{"input": "q", "output": "a"}}\n{{"input"\n'), "qa.jsonl:2: malformed JSON"),
    ("task-split-missing", ["eval", R, "tasks.0.source={t}/moco.json"],
     _write("moco.json", '{{"task_type": "exact_match", "dev": [{{"input": "q", "output": "a"}}]}}'),
     "no split 'test': the file has dev"),
    ("task-split-empty", ["eval", R, "tasks.0.source={t}/moco.json"],
     _write("moco.json", '{{"task_type": "exact_match", "dev": [], "test": []}}'), "split 'test' has no rows"),
    ("task-unsupported-suffix", ["eval", R, "tasks.0.source={t}/qa.csv"], _write("qa.csv", "input,output\n"),
     "unsupported file type '.csv'"),
    ("task-choice-answer", ["eval", R, "tasks.0.source={t}/mc.jsonl", "tasks.0.type=multiple_choice"],
     _write("mc.jsonl", '{{"question": "q", "choices": ["x", "y"], "answer": "C"}}\n'), "is not one of the choices"),
    ("task-corrupt-parquet", ["eval", R, "tasks.0.source={t}/qa.parquet"], _write("qa.parquet", "PAR1 not parquet"),
     "cannot read Parquet"),
    ("task-not-utf8", ["eval", R, "tasks.0.source={t}/moco.json"], _write("moco.json", b'{"test": "\xff"}'),
     "moco.json: not UTF-8 text"),
    ("task-names-repeat", ["eval", "recipe={t}/r.yaml"],
     _write("r.yaml", "tasks: [{{name: a, source: {w}/qa.jsonl}}, {{name: a, source: {w}/qa.jsonl}}]\n"),
     "task names must be unique: a repeats"),
    # --- outputs: existing, not writable, of another kind
    ("output-release-exists", ["release", "ckpt={w}/switcher", "out={t}/rel"], _write("rel/notes.txt", "mine"),
     "rel exists and is not empty: set overwrite=true"),
    ("output-parent-is-a-file", ["release", "ckpt={w}/switcher", "out={t}/file/rel"], _write("file", "x"),
     "is a file, not a folder"),
    ("output-read-only", GEN + ["output=/sys/switchkit-out.jsonl"], None, "cannot write in /sys"),
    ("output-generate-foreign-file", GEN + ["output={t}/o.jsonl"], _write("o.jsonl", "mine\n"),
     "o.jsonl exists and is a file that this job did not write"),
    ("output-generate-is-a-folder", GEN + ["output={t}"], None, "is a folder, not a file"),
    ("output-eval-foreign-folder", ["eval", R, "eval.output={t}/ev"], _write("ev/thesis.tex", "mine"),
     "ev exists and is not empty"),
    ("output-synthesis-foreign-folder", ["synthesize", R, "synthesis.output={t}/syn"], _write("syn/a.txt", "mine"),
     "syn exists and is not empty"),
    ("output-train-foreign-folder", TRAIN + ["train.output={t}/sw"], _write("sw/a.txt", "mine"),
     "sw exists and is not empty"),
    ("output-release-inside-ckpt", ["release", "ckpt={w}/switcher", "out={w}/switcher/rel"], None, "is inside ckpt"),
    # --- saved work from other settings, or damaged
    ("stale-generate-settings", GEN + ["output={w}/gen.jsonl", "generation.temperature=0.3"], None,
     "gen.jsonl was made with other settings (generation.temperature changed)"),
    ("stale-generate-input", ["generate", R, "input={t}/in.jsonl", "output={w}/gen.jsonl"],
     _write("in.jsonl", '{{"input": "What is the capital of Chad?"}}\n'), "(input changed)"),
    ("stale-eval-task-content", ["eval", R, "tasks.0.source={t}/qa.jsonl"],
     _write("qa.jsonl", "".join(json.dumps({"input": q, "output": ["X"]}) + "\n" for q, _ in QA).replace("{", "{{")
            .replace("}", "}}")), "seed0.jsonl was made with other settings (task changed)"),
    ("stale-eval-max-new-tokens", ["eval", R, "generation.max_new_tokens=9"], None,
     "(generation.max_new_tokens changed)"),
    ("stale-synthesis-work", ["synthesize", R, "synthesis.output={t}/syn", "synthesis.k=3"], _synthesis_work(False),
     "syn was made with other settings (synthesis.k changed)"),
    ("damaged-saved-batch", GEN + ["output={t}/o.jsonl"], _stale_parts, "00000.jsonl:1: malformed JSON"),
    ("damaged-synthesis-chunk", ["synthesize", R, "synthesis.output={t}/syn"], _synthesis_work(True),
     "chunk-000000.json: cannot read work chunk"),
    ("damaged-fingerprint", GEN + ["output={t}/o.jsonl"],
     lambda w, t: (shutil.copy(w / "gen.jsonl", t / "o.jsonl"), (t / "o.jsonl.fingerprint.json").write_text("{")),
     "o.jsonl.fingerprint.json is unreadable"),
    ("damaged-checkpoint", TRAIN, _corrupt_checkpoint, "last.ckpt: not a readable checkpoint"),
    # --- switchers and other artifacts
    ("switcher-release-missing", ["release", "ckpt={t}/none", "out={t}/rel"], None, "folder not found"),
    ("switcher-no-meta", ["release", "ckpt={t}/sw", "out={t}/rel"],
     _switcher_copy(drop=["switchkit.json"]), "switchkit.json is missing"),
    ("switcher-meta-malformed", ["release", "ckpt={t}/sw", "out={t}/rel"],
     _switcher_copy(text="{"), "switchkit.json: malformed JSON"),
    ("switcher-meta-version", ["release", "ckpt={t}/sw", "out={t}/rel"],
     _switcher_copy(change=lambda m: m.update(format_version=1)), "format_version=1 is unknown"),
    ("switcher-meta-inconsistent", ["release", "ckpt={t}/sw", "out={t}/rel"],
     _switcher_copy(change=lambda m: m.update(model_id_tokens=[1, 2])), "must list n=3 entries"),
    ("switcher-no-weights", GEN + ["output={t}/o.jsonl", "switcher.policy=trained", "switcher.path={t}/sw"],
     _switcher_copy(drop=["model.safetensors"]), "no .safetensors weights"),
    ("switcher-other-n", GEN + ["output={t}/o.jsonl", "switcher.policy=trained", "switcher.path={t}/sw"],
     _switcher_copy(change=lambda m: m.update(n=2, model_id_tokens=[1, 2], candidates=m["candidates"][:2])),
     "exported for n=2 models, but the pool has 3"),
    ("switcher-not-trained", GEN + ["output={t}/o.jsonl", "run_dir={t}/run", "switcher.policy=trained"], None,
     "does not exist: run `toolkit train-switcher recipe=bad`"),
    ("switcher-eval-method", ["eval", R, "run_dir={t}/run", "eval.methods=[switch]"], None,
     "method switch needs"),
    ("switcher-distill", ["distill", R, "run_dir={t}/run"], None, "distillation needs the trained switcher"),
    # --- models, training data, devices
    ("model-path-missing", ["eval", R, "pool.candidates.0.source={t}/none"], None,
     "pool.candidates.0.source='{t}/none' does not exist"),
    ("model-corrupt-weights", GEN + ["output={t}/o.jsonl", "pool.candidates.0.source={t}/model"],
     _model_copy("model.safetensors", b"\x00" * 64), "cannot load model"),
    ("model-corrupt-config", GEN + ["output={t}/o.jsonl", "pool.candidates.0.source={t}/model"],
     _model_copy("config.json", b"{ not json"), "cannot load model"),
    ("model-unknown-demo", ["eval", R, "pool.candidates.0.source=demo:nope"], None, "unknown demo model"),
    ("device-no-cuda", ["pool", R, "pool.device=cuda:0"], None, "no CUDA device is available"),
    ("device-deepspeed-without-cuda", TRAIN + ["train.strategy=deepspeed_stage_2", "train.precision=bf16-mixed"],
     None, "train.strategy=deepspeed_stage_2 needs CUDA"),
    ("long-input", GEN + ["output={t}/o.jsonl", "generation.max_new_tokens=4096", "generation.patch_size=64"], None,
     "context of 4096, leaving less than the 4096 tokens"),
    ("train-label-range", ["train-switcher", R, "run_dir={t}/run", "train.data=[{t}/rec.jsonl]"],
     _write("rec.jsonl", '{{"prompt": "p", "label": 5, "utilities": [0, 0, 1]}}\n'), "row 0: field 'label'=5"),
    ("train-data-missing", ["train-switcher", R, "run_dir={t}/run", "train.data=[{t}/none.parquet]"], None,
     "none.parquet: file not found"),
    ("distill-generations-type", ["distill", R, "run_dir={t}/run", "distill.generations={t}/g.jsonl"],
     _write("g.jsonl", '{{"input": "q", "output": 3}}\n'), "record 1: field 'output' must be a string"),
    ("distill-generations-missing", ["distill", R, "run_dir={t}/run", "distill.generations={t}/none.jsonl"], None,
     "none.jsonl: file not found"),
]


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots``: path -> content hash (new, removed or changed files all show)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots if root.exists()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, setup, culprit", [pytest.param(a, s, c, id=i) for i, a, s, c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tiny_pool_dirs, tmp_path, monkeypatch, args, setup,
                                                          culprit):
    monkeypatch.setenv("SWITCHKIT_CACHE", str(world / "cache"))
    if setup is not None:
        setup(world, tmp_path)
    roots = (world, tmp_path, *map(Path, tiny_pool_dirs))
    before = snapshot(*roots)
    result = CliRunner().invoke(main, [a.format(w=world, t=tmp_path) for a in args])
    # progress bars of loading models (only in the cases that need the models loaded) are not messages
    lines = [line for line in result.output.strip().splitlines() if line and not PROGRESS_BAR.search(line)]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert culprit.format(w=world, t=tmp_path) in lines[0]
    assert snapshot(*roots) == before


def test_the_suite_covers_forty_distinct_cases():
    assert len({i for i, *_ in CASES}) == len(CASES) >= 40
    assert len({c for *_, c in CASES}) >= 40


def test_bad_input_through_a_real_process(world):
    proc = subprocess.run([sys.executable, "-m", "switchkit.cli", "eval", f"recipe={world}/recipe.yaml",
                           "generation.top_p=2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [
        "error: generation.top_p=2.0 is out of range: allowed is a float in (0, 1]"]


def test_unexpected_error_is_one_line_with_a_log_of_the_traceback(world, monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCHKIT_CACHE", str(tmp_path))

    def broken(recipe, **kwargs):
        raise RuntimeError("something deep broke")

    monkeypatch.setattr("switchkit.eval.run.eval_command", broken)
    result = CliRunner().invoke(main, ["eval", f"recipe={world}/recipe.yaml"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: unexpected RuntimeError: something deep broke (traceback in ")
    log = Path(lines[0].split("traceback in ")[1].split(";")[0])
    assert log.parent == tmp_path / "logs" and "raise RuntimeError" in log.read_text()
