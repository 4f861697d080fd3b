"""The commands and links the README and docs/*.md show still work.

A command is read out of the Markdown as a user would copy it — shell code blocks line by line,
inline code spans, figure captions (image alt texts) — and checked without running it: a
``python -m accdiffusion…`` module must exist and its parser (``build_parser()``) must accept the
arguments shown; other ``python -m`` modules (pytest, venv) must be installed; ``python -c`` code
must compile; scripts named (``bash tools/….sh``, ``python docs/….py``) must exist. The README
once named ``python -m accdiffusion.toy`` long after the toy had moved to ``accdiffusion.lab.toy``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
LOOKS_LIKE_COMMAND = re.compile(r"\bpython[\d.]*\s+(-m|-c)\s|\bpython[\d.]*\s+\S+\.py\b|^bash\s")
PYTHON = re.compile(r"python(\d+(\.\d+)?)?")


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    tokens: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.tokens)}"


def tokenize(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(tokens: list[str]) -> list[list[str]]:
    """``a && b | c; d`` → [a], [b], [c], [d]; leading ``NAME=value`` assignments dropped."""
    commands, current = [], []
    for token in tokens + [";"]:
        if token and all(c in "();<>|&" for c in token):
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands


def line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def commands_in(text: str, doc: str) -> list[Command]:
    found: list[tuple[int, list[str]]] = []
    pieces: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        first = line_of(text, block.start(2))
        if block.group(1).lower() not in SHELL_LANGUAGES:
            if not block.group(1):  # plain text (a layout, an infotext): only lines that look like commands
                pieces += [(first + i, line) for i, line in enumerate(block.group(2).splitlines())]
            continue
        pending, start = "", first
        for offset, line in enumerate(block.group(2).splitlines()):
            if not pending:
                start = first + offset
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            try:
                tokens = tokenize(pending)
            except ValueError:  # a quote still open: the command goes on on the next line
                continue
            found.append((start, tokens))
            pending = ""
        assert not pending, f"{doc}:{start}: unbalanced quotes in a code block"
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    pieces += [(line_of(prose, m.start()), m.group(1)) for m in SPAN.finditer(prose)
               if "\n\n" not in m.group(1)]
    # a figure's caption may name the command that drew it
    pieces += [(line_of(prose, m.start()), m.group(1)[m.group(1).find("python"):])
               for m in IMAGE.finditer(prose) if "python" in m.group(1)]
    for line, piece in pieces:
        piece = " ".join(piece.split())
        if LOOKS_LIKE_COMMAND.search(piece):
            found.append((line, tokenize(piece)))
    return [Command(doc, line, tuple(command)) for line, tokens in found
            for command in simple_commands(tokens) if is_checked(command)]


def is_checked(command: list[str]) -> bool:
    program = Path(command[0]).name
    return bool(PYTHON.fullmatch(program)) or program == "bash" and len(command) > 1


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands_in(doc.read_text(), str(doc.relative_to(ROOT)))]


def problem(command: Command) -> str | None:
    """Why ``command`` would not run as shown, or None."""
    program, *rest = command.tokens
    if Path(program).name == "bash":
        script = rest[0]
        return None if (ROOT / script).is_file() else f"no script {script}"
    if not rest:
        return None
    if rest[0] == "-c":
        try:
            compile(rest[1], str(command), "exec")
        except SyntaxError as error:
            return f"python -c code does not compile: {error}"
        return None
    if rest[0] != "-m":
        script = rest[0]
        return None if (ROOT / script).is_file() else f"no script {script}"
    module, args = rest[1], rest[2:]
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return f"no module {module}"
    if not module.split(".")[0] == "accdiffusion":
        return None  # pytest, venv, pip: installed is all we can ask
    entry = f"{module}.__main__" if spec.submodule_search_locations is not None else module
    try:
        build_parser = importlib.import_module(entry).build_parser
    except (ImportError, AttributeError) as error:
        return f"{entry} has no build_parser() to check the arguments against ({error})"
    parser = build_parser()
    if not args:
        return None  # names the tool (``python -m accdiffusion.lab.toy``, whose commands follow in the text)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as exit_:
        if exit_.code:
            return f"{module} refuses {shlex.join(args)}: {errors.getvalue().strip().splitlines()[-1]}"
    return None


COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_shown_runs_as_shown(command):
    assert problem(command) is None, f"{command}: {problem(command)}"


def test_the_docs_show_the_lab_commands():
    """The reader finds the commands where they are: a regex that stopped matching would pass the
    test above vacuously."""
    shown = {(c.doc, c.tokens[1:4]) for c in COMMANDS if len(c.tokens) > 3}
    assert ("README.md", ("-m", "accdiffusion.lab.toy", "demo")) in shown  # a figure caption's
    assert ("README.md", ("-m", "pytest", "-q")) in shown  # a code block's
    assert ("docs/development.md", ("-m", "accdiffusion.lab.bench", "--device")) in shown
    modules = {c.tokens[2] for c in COMMANDS if c.tokens[1:2] == ("-m",)}
    assert {"accdiffusion.lab.toy", "accdiffusion.lab.bench", "pytest", "venv"} <= modules
    assert any(Path(c.tokens[0]).name == "bash" for c in COMMANDS)
    assert any(c.tokens[1:2] == ("-c",) for c in COMMANDS)  # the API example's reader
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("shown, why", [
    ("`python -m accdiffusion.toy demo --seed 3`", "no module accdiffusion.toy"),
    ("`python -m accdiffusion.lab.toy demo --seeds 3`", "unrecognized arguments: --seeds 3"),
    ("`python -m accdiffusion.lab.toy dmeo`", "invalid choice: 'dmeo'"),
    ("`python -m accdiffusion.lab.bench --probe`", "unrecognized arguments: --probe"),  # no abbreviations
    ("`python -m accdiffusion.lab.bench --steps`", "expected one argument"),  # its value is missing
    ("`python -m accdiffusion.lab.toy demo --model unet3`", "invalid choice: 'unet3'"),
    ("`python -m accdiffusion.method.settings`", "has no build_parser()"),
    ("`python -m no_such_tool`", "no module no_such_tool"),
    ("```bash\nbash tools/device_check_old.sh --cpu-smoke\n```", "no script tools/device_check_old.sh"),
    ("```bash\nOMP_NUM_THREADS=1 .venv/bin/python docs/make_tile_map.py\n```", "no script docs/make_tile_map.py"),
    ("```\ncurl -s x | python3 -c \"import sys; print(sys.argv\"\n```", "does not compile"),
    ("![a figure, python -m accdiffusion.toy demo --seed 3](x.png)", "no module accdiffusion.toy"),
    ("(`python -m accdiffusion.toy\ndemo`, wrapped)", "no module accdiffusion.toy"),
    ("```bash\necho 'a\nb' && python -m accdiffusion.toy demo  # 'comment'\n```", "no module accdiffusion.toy"),
])
def test_a_stale_command_is_caught(shown, why):
    [command] = commands_in(shown, "stale.md")
    assert why in (problem(command) or "")


@pytest.mark.parametrize("shown", [
    "`python -m accdiffusion.lab.toy demo --model flow --caption \"a red disk\" --seed 3 --scale 3`",
    "```bash\nOMP_NUM_THREADS=1 .venv/bin/python -m accdiffusion.lab.bench --t5-cost   # 39 s\n```",
    "`python3 -m venv .venv`",
])
def test_a_good_command_passes(shown):
    [command] = commands_in(shown, "good.md")
    assert problem(command) is None


def test_the_toy_figure_caption_names_a_command_that_parses():
    """The demo picture writes its own command into the image, where no Markdown reader sees it."""
    from accdiffusion.lab.toy.evaluate import demo_command

    for model in ("unet", "flow"):
        [command] = commands_in(f"`{demo_command(model, 3, 3)}`", "toy-demo.png")
        assert command.tokens[2] == "accdiffusion.lab.toy"
        assert problem(command) is None


def test_ci_runs_the_readme_test_commands():
    """`.ci/run` sets up and runs the tests exactly as the README's Development section says."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development"):]
    block = FENCE.search(section).group(2)
    shown = [c for line in block.splitlines() for c in simple_commands(tokenize(line))]
    ci = [c for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")
          for c in simple_commands(tokenize(line))]
    assert shown == [c for c in ci if c[0] not in ("set", "cd", "export")]
    assert "export OMP_NUM_THREADS=1" in (ROOT / ".ci" / "run").read_text()
    assert "OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests" in block


# --- links -----------------------------------------------------------------------------------------

def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: rendered text, lower case, punctuation dropped, spaces → -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = anchor(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def links() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), doc.read_text())
        for pattern in (LINK, IMAGE):
            for m in pattern.finditer(text):
                target = m.group(m.lastindex)
                if not re.match(r"[a-z]+:", target):
                    found.append((str(doc.relative_to(ROOT)), line_of(text, m.start()), target))
    return found


@pytest.mark.parametrize("doc, line, target", links(), ids=lambda v: str(v))
def test_every_local_link_and_figure_exists(doc, line, target):
    path, _, fragment = target.partition("#")
    file = (ROOT / doc).parent / path if path else ROOT / doc
    assert file.exists(), f"{doc}:{line}: {target}: no file {file.relative_to(ROOT)}"
    if fragment:
        assert fragment in anchors(file), f"{doc}:{line}: {target}: no heading #{fragment}"


def test_anchor_follows_github():
    assert anchor("The probe pass's noise levels") == "the-probe-passs-noise-levels"
    assert anchor("X/Y/Z plot") == "xyz-plot"
    assert anchor("Tests (`tests/test_toy.py`, on the committed weights)") == \
        "tests-teststest_toypy-on-the-committed-weights"
    assert anchor("txt2img (hires fix)") == "txt2img-hires-fix"
