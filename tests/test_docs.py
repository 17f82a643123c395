"""The commands README.md and docs/*.md show run as written: in their fenced code blocks, every command of
`finetune.py`, `inference.py`, `scripts/*.py` or `scripts/*.sh` names a script that exists, passes only --flags
that its entry point's parser has, and gives a scripts/*.sh only VAR=... that the script (or one it runs) reads.

The parsers are the real ones, taken in-process: each entry point runs as `python X` would run it, with argparse's
parse_known_args replaced by one that hands back the parser it was called on (so nothing past parsing runs, and
the test follows the entry points wherever their code moves). Where an entry point parses nothing, its --help
output is read instead. About 10 s, most of it importing torch and transformers once."""

from __future__ import annotations

import argparse
import functools
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^(?:finetune\.py|inference\.py|scripts/[\w.-]+\.(?:py|sh))$")
ENV = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})([\w+-]*)\s*$")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
# read by finetune.py before its argument parser sees the command line (--config's YAML, the full help)
BEFORE_PARSER = {"finetune.py": {"--config", "--help_all", "--help", "-h"}}


@dataclass
class Command:
    where: str  # FILE:LINE
    text: str
    script: str  # finetune.py, inference.py, scripts/X.py, scripts/X.sh
    flags: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    stage: str = "sft"  # finetune.py --stage


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every fenced block in a shell language or none."""
    blocks, lines, start, fence, lang = [], text.splitlines(), 0, None, ""
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang, start, body = match.group(1), match.group(2).lower(), number + 1, []
        elif fence is not None and line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
            if lang in SHELL_BLOCKS:
                blocks.append((start, body))
            fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def logical_lines(first: int, lines: list[str]) -> list[tuple[int, str]]:
    """Lines joined over backslash continuations, each with the number of its first line."""
    joined, pending, at = [], "", first
    for number, line in enumerate(lines, first):
        if not pending:
            at = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((at, pending + line))
        pending = ""
    if pending:
        joined.append((at, pending))
    return joined


def split_line(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ;, &&, ||, |), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def commands_in(text: str, name: str) -> list[Command]:
    """Every command of an entry point in the text's shell blocks; a line that mentions one but cannot be split
    into words (an unbalanced quote) is returned with script '' so that the test reports it."""
    found = []
    for first, body in code_blocks(text):
        for number, line in logical_lines(first, body):
            where = f"{name}:{number}"
            try:
                segments = split_line(line)
            except ValueError:
                if any(ENTRY.match(word) for word in line.split()):
                    found.append(Command(where, line.strip(), ""))
                continue
            for words in segments:
                at = next((i for i, w in enumerate(words) if ENTRY.match(w)), None)
                if at is None:
                    continue
                env = []
                for word in words:
                    match = ENV.match(word)
                    if not match:
                        break
                    env.append(match.group(1))
                command = Command(where, " ".join(words), words[at], env=env)
                args = [w.strip("[]") for w in words[at + 1 :]]
                command.flags = [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]
                for i, arg in enumerate(args):
                    if arg == "--stage" and i + 1 < len(args):
                        command.stage = args[i + 1]
                    elif arg.startswith("--stage="):
                        command.stage = arg.split("=", 1)[1]
                found.append(command)
    return found


def all_commands() -> list[Command]:
    return [c for path in doc_files() for c in commands_in(path.read_text(encoding="utf-8"), path.name)]


class Captured(BaseException):  # not an Exception: an entry point's own `except Exception` must not stop it
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@functools.cache
def parser_flags(script: str, stage: str = "sft") -> frozenset[str]:
    """The option strings of the parser that `python SCRIPT [--stage STAGE]` parses its command line with."""
    argv = ["--stage", stage] if script == "finetune.py" and stage != "sft" else []

    def capture(self, *args, **kwargs):
        raise Captured(self)

    saved = argparse.ArgumentParser.parse_known_args, sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [str(ROOT / script), *argv]
    sys.path.insert(0, str(ROOT))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except Captured as got:
        flags = {o for action in got.parser._actions for o in action.option_strings}
        return frozenset(flags | BEFORE_PARSER.get(script, set()))
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_known_args, sys.argv, sys.path[:] = saved
    return help_flags(script, argv)


def help_flags(script: str, argv: list[str]) -> frozenset[str]:
    """The --flags that `python SCRIPT --help` (and --help_all, where --help offers it) prints."""
    flags: set[str] = set()
    for ask in ("--help", "--help_all"):
        if ask == "--help_all" and "--help_all" not in flags:
            break
        out = subprocess.run(
            [sys.executable, script, *argv, ask], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout
        flags |= set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", out))
    return frozenset(flags)


def shell_text(script: str, seen: set[str] | None = None) -> str:
    """A shell script's text and that of every scripts/*.sh it sources or runs (they see its environment)."""
    seen = set() if seen is None else seen
    if script in seen or not (ROOT / script).is_file():
        return ""
    seen.add(script)
    text = (ROOT / script).read_text(encoding="utf-8")
    for other in re.findall(r"\b(?:scripts/)?([\w-]+\.sh)\b", text):
        text += "\n" + shell_text(f"scripts/{other}", seen)
    return text


def problems(commands: list[Command]) -> list[str]:
    found = []
    for c in commands:
        if not c.script:
            found.append(f"{c.where}: cannot split into words (a quote left open?): {c.text}")
            continue
        if not (ROOT / c.script).is_file():
            found.append(f"{c.where}: {c.script} does not exist: {c.text}")
            continue
        if c.script.endswith(".py"):
            known = parser_flags(c.script, c.stage)
            for flag in c.flags:
                if flag not in known:
                    stage = f" --stage {c.stage}" if c.stage != "sft" else ""
                    found.append(f"{c.where}: {c.script}{stage} has no {flag}: {c.text}")
        else:
            text = shell_text(c.script)
            for var in c.env:
                if not re.search(r"\$\{?" + var + r"\b", text):
                    found.append(f"{c.where}: {c.script} never reads {var}: {c.text}")
    return found


def test_every_documented_command_runs_as_written():
    commands = all_commands()
    wrong = problems(commands)
    assert not wrong, "commands in README.md / docs/ that would not run as written:\n" + "\n".join(wrong)


def test_the_commands_are_found():
    """The extraction itself: the README's two commands, every stage page's, and enough of them that a broken
    extractor cannot pass the test above by finding nothing."""
    commands = all_commands()
    files = {c.where.split(":")[0] for c in commands}
    readme = [c.text for c in commands if c.where.startswith("README.md:")]
    assert "bash scripts/quickstart.sh" in readme
    assert "bash scripts/run_tests.sh" in readme
    assert {"README.md", "data.md", "training.md", "inference.md", "export.md"} <= files
    assert len(commands) >= 40
    assert any(c.env for c in commands if c.script.endswith(".sh"))
    assert any(c.stage == "dpo" for c in commands)


def test_extraction_of_one_block():
    text = (
        "Prose `python finetune.py --not_in_a_block` is not read.\n"
        "```bash\n"
        "MAX_STEP=30 NUM_GPUS=2 \\\n"
        "  bash scripts/finetune_pt.sh   # a comment --not_a_flag\n"
        "bash scripts/install.sh && python scripts/check_data.py --train_file x.json [--dump out.jsonl]\n"
        "torchrun --nproc_per_node 2 finetune.py --stage=dpo --beta 0.1 --config=run.yaml ...\n"
        "head -n 8 a.jsonl > b.jsonl\n"
        "```\n"
        "```python\n"
        "subprocess.run('python finetune.py --ignored')\n"
        "```\n"
    )
    got = [(c.where, c.script, c.env, c.flags, c.stage) for c in commands_in(text, "X.md")]
    assert got == [
        ("X.md:3", "scripts/finetune_pt.sh", ["MAX_STEP", "NUM_GPUS"], [], "sft"),
        ("X.md:5", "scripts/install.sh", [], [], "sft"),
        ("X.md:5", "scripts/check_data.py", [], ["--train_file", "--dump"], "sft"),
        ("X.md:6", "finetune.py", [], ["--stage", "--beta", "--config"], "dpo"),
    ]


def test_a_wrong_command_is_reported():
    text = (
        "```bash\n"
        "python finetune.py --train_file x.json --no_such_flag 1\n"
        "python finetune.py --stage dpo --beta 0.1 --simpo_gamma 0.5\n"
        "python scripts/no_such_script.py --x 1\n"
        "NO_SUCH_VAR=1 MAX_STEP=3 bash scripts/finetune_pt.sh\n"
        "NNODES=2 bash scripts/finetune_ds.sh\n"
        "```\n"
    )
    assert problems(commands_in(text, "X.md")) == [
        "X.md:2: finetune.py has no --no_such_flag: python finetune.py --train_file x.json --no_such_flag 1",
        "X.md:3: finetune.py --stage dpo has no --simpo_gamma: python finetune.py --stage dpo --beta 0.1 "
        "--simpo_gamma 0.5",
        "X.md:4: scripts/no_such_script.py does not exist: python scripts/no_such_script.py --x 1",
        "X.md:5: scripts/finetune_pt.sh never reads NO_SUCH_VAR: NO_SUCH_VAR=1 MAX_STEP=3 bash scripts/finetune_pt.sh",
    ]
