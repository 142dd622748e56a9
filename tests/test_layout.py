"""The rooms import one way: the core imports no room; a room imports only the core and rooms upstream of it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pipeline order: a room may import the core and the rooms before it
ROOMS = ["core", "data_synthesis", "trainer", "distill", "eval"]
FOLDERS = {"switchkit": "core", "data_synthesis": "data_synthesis", "trainer": "trainer", "distill": "distill",
           "eval": "eval"}


def room_of_import(module: str, own: str) -> str:
    """The room an absolute module name (``switchkit.trainer.base``) belongs to, or None outside switchkit."""
    parts = module.split(".")
    if parts[0] != "switchkit":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS[1:] else "core"


def imports(path: Path, own: str):
    """(line, imported room) for every switchkit import of a module, relative ones resolved within its room."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, room_of_import(alias.name, own)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the room, or (from the core) a room by name
                target = (node.module or "").split(".")[0]
                yield node.lineno, target if own == "core" and target in ROOMS[1:] else own
            elif node.module:
                yield node.lineno, room_of_import(node.module, own)


def test_rooms_import_one_way():
    bad = []
    for folder, room in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "cli.py" and room == "core":
                continue  # the command line may import every room
            for line, target in imports(path, room):
                if target is not None and ROOMS.index(target) > ROOMS.index(room):
                    bad.append(f"{path.relative_to(ROOT)}:{line} ({room} imports {target})")
    assert not bad, "imports against the pipeline direction:\n" + "\n".join(bad)


def test_the_check_sees_a_wrong_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from switchkit.eval.run import eval_command\nfrom .trainer import base\n")
    assert [t for _, t in imports(module, "core")] == ["eval", "trainer"]
