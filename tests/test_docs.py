"""The READMEs run as written: every fenced block of README.md and examples/README.md is
Python (run as a script), shell commands (run one after another, at small settings) or text
(a diagram, run by nobody), and says which."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "examples/README.md")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
# What the tests change in a command: the training examples run a few steps of a small
# batch (set where the command gives no value), not a training run.
SMALL = {"--steps": "2", "--batch": "4"}
TRAINING = ("examples/train_dcgan.py", "examples/ddp_train.py")
# How the READMEs' programs are reached from here.
PROGRAMS = {".venv/bin/python": [sys.executable], "python": [sys.executable],
            ".venv/bin/zeroskip": [sys.executable, "-m", "zeroskip.cli"],
            "zeroskip": [sys.executable, "-m", "zeroskip.cli"],
            ".venv/bin/torchrun": [sys.executable, "-m", "torch.distributed.run"]}


def blocks() -> list[tuple[str, str, str]]:
    """``(where, language, text)`` of every fenced block, ``where`` as 'README.md:34'."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for match in FENCE.finditer(text):
            indent = match.group(1)
            body = "".join(line[len(indent):] if line.startswith(indent) else line
                           for line in match.group(3).splitlines(keepends=True))
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc}:{line}", match.group(2), body))
    return found


def commands(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """``(environment, argv)`` of each command of a shell block (comments dropped, lines
    continued with a backslash joined)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if words:
            found.append((env, words))
    return found


def small(argv: list[str]) -> list[str]:
    if not any(script in argv for script in TRAINING):
        return argv
    found = [SMALL[argv[i - 1]] if i and argv[i - 1] in SMALL else word
             for i, word in enumerate(argv)]
    return found + [word for flag, value in SMALL.items() if flag not in argv
                    for word in (flag, value)]


def make_target(target: str) -> list[str]:
    """The command the Makefile's ``target`` runs (one line)."""
    recipe = re.search(rf"^{target}:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, f"the Makefile has no target {target!r}"
    return recipe.group(1).split()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("TRITON_INTERPRET", "ZEROSKIP_BUNDLE", "ZEROSKIP_BACKEND", "ZEROSKIP_STRICT"):
        env.pop(name, None)
    return {**env, **extra}


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


BLOCKS = blocks()


def test_every_block_says_what_it_is():
    assert len(BLOCKS) >= 8
    for where, language, _ in BLOCKS:
        assert language in ("sh", "python", "text"), f"{where}: fence it as sh, python or text"


@pytest.mark.parametrize("where, language, text",
                         [b for b in BLOCKS if b[1] in ("sh", "python")],
                         ids=[b[0] for b in BLOCKS if b[1] in ("sh", "python")])
def test_block_runs(where, language, text, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    if language == "python":
        run([sys.executable, "-c", text], tmp_path, child_env())
        return
    for env, argv in commands(text):
        if argv[0] == "make":
            recipe = make_target(argv[1])
            if argv[1] == "test":           # this suite itself
                assert recipe[1:4] == ["-m", "pytest", "-q"], recipe
                continue
            argv = [Path(recipe[0]).name] + recipe[1:]     # $(VENV)/bin/zeroskip demo
        program = PROGRAMS.get(argv[0])
        assert program, f"{where}: no way to run {argv[0]!r} here"
        run(program + small(argv[1:]), tmp_path, child_env(**env))
