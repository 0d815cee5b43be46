"""The README and the docs/ pages name only what exists: every ``imagefork`` command (and the options written
right after it) is in the CLI's parser, every environment variable is read by the code, every ``make`` target is
in the Makefile, and every repository path and link leads to a file (and a named test to its function).

Fast: reads text, builds the argparse parser, nothing else. Each failure is one line: page:line: what is wrong."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import re
import tomllib
from pathlib import Path

import pytest

from streams.cli import build_parser
from streams.config import Topics

ROOT = Path(__file__).resolve().parents[2]

# the pages written by hand; the bench reports (docs/bench.md, docs/scale.md, ...) are written by bench/*.py
PAGES = ["README.md"] + [f"docs/{name}.md" for name in (
    "contract", "imaging", "failure-semantics", "configuration", "operations", "security", "docker",
    "performance", "troubleshooting", "development")]

# pages that describe the test suite and the benches: their variables may be read there instead
SUITE_PAGES = {"docs/development.md": ("streams", "tests", ".ci", "bench")}


def lines_of(page: str) -> list[str]:
    return (ROOT / page).read_text().splitlines()


def code_of(page: str) -> list[tuple[int, str]]:
    """(line number, text) of what is written as code: each line of a fenced block, each `span` elsewhere."""
    out, fenced = [], False
    for number, line in enumerate(lines_of(page), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append((number, line))
        else:
            out.extend((number, span) for span in re.findall(r"`([^`]+)`", line))
    return out


def test_pages_exist_and_say_what_they_cover():
    problems = [f"{page}: missing" for page in PAGES if not (ROOT / page).is_file()]
    for page in PAGES[1:]:
        if (ROOT / page).is_file() and not lines_of(page)[0].startswith("# "):
            problems.append(f"{page}:1: does not start with a title line")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --- (a) imagefork commands ----------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _takes_value(parser: argparse.ArgumentParser, option: str) -> bool | None:
    """None when ``parser`` has no such option."""
    for action in parser._actions:
        if option in action.option_strings:
            return action.nargs != 0
    return None


def _positional_choices(parser: argparse.ArgumentParser) -> list | None:
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            return list(action.choices) if action.choices else None
    return None


def command_problem(words: list[str], parser: argparse.ArgumentParser) -> str | None:
    """What is wrong with ``imagefork <words>``, or None. Placeholders (UPPER, <x>, [..]) are not checked."""
    path = ["imagefork"]
    positional_seen = False
    i = 0
    while i < len(words):
        word = words[i].strip("[]")
        i += 1
        if not word or word in ("...", "-"):
            continue
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            takes = _takes_value(parser, option)
            if takes is None:
                return f"`{' '.join(path)}` has no option {option}"
            if takes and "=" not in word:
                i += 1  # its value
            continue
        subs = _subcommands(parser)
        if subs:
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                return None  # a placeholder for the command
            if word not in subs:
                return f"`{' '.join(path)}` has no command {word!r} (it has: {', '.join(subs)})"
            parser = subs[word]
            path.append(word)
            continue
        if not positional_seen:
            positional_seen = True
            choices = _positional_choices(parser)
            if choices and re.fullmatch(r"[a-z][a-z-]*", word) and word not in choices:
                return f"`{' '.join(path)}` takes one of {', '.join(choices)}, not {word!r}"
            path.append(word)
    return None


COMMAND = re.compile(r"(?<![\w./=-])imagefork((?:[ \t]+[^\s`'\"|;&#()<>,]+|[ \t]+<[^>\s]+>)*)")


def test_every_imagefork_command_written_exists():
    parser, problems = build_parser(), []
    for page in PAGES:
        for number, code in code_of(page):
            for match in COMMAND.finditer(code):
                words = [w.rstrip(":.") for w in match.group(1).split()]
                if not words or not re.match(r"\[?(-|[a-z])", words[0]):
                    continue  # prose: "imagefork Kafka", "imagefork's"
                problem = command_problem(words, parser)
                if problem:
                    problems.append(f"{page}:{number}: `imagefork {' '.join(words)}`: {problem}")
    if problems:
        pytest.fail("commands the CLI does not have:\n" + "\n".join(problems), pytrace=False)


# --- (b) environment variables ---------------------------------------------------------------------------

PREFIXES = r"(?:IMAGEFORK|KAFKA|S3|AWS)_"
BRACES = re.compile(rf"(?<!\w)({PREFIXES}[A-Z0-9_]*_)\{{([A-Z0-9_,]+)\}}")  # IMAGEFORK_TOPIC_{A,B}
VARIABLE = re.compile(rf"(?<!\w)({PREFIXES}[A-Z0-9_]*[A-Z0-9])((?:\|[A-Z0-9_]+)*)(?![\w*])")  # X_CAFILE|CERTFILE


def variables(line: str) -> list[str]:
    """The variable names a line writes, each alternative spelled out; wildcards (KAFKA_*) are not names."""
    names = [stem + part for stem, parts in BRACES.findall(line) for part in parts.split(",")]
    for name, alternatives in VARIABLE.findall(BRACES.sub(" ", line)):
        stem = name.rsplit("_", 1)[0] + "_"
        names += [name] + [stem + part for part in alternatives.split("|") if part]
    return names


def _source_text(roots: tuple[str, ...]) -> str:
    parts = []
    for root in roots:
        base = ROOT / root
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()
                                                and p.suffix in (".py", ".html", "")
                                                and "__pycache__" not in p.parts]
        parts.extend(p.read_text(errors="replace") for p in files)
    return "\n".join(parts)


def _read_by_pattern(name: str, text: str) -> bool:
    """Names the code builds: IMAGEFORK_TOPIC_<FIELD> (an f-string) for each field of config.Topics."""
    prefix = "IMAGEFORK_TOPIC_"
    return (name.startswith(prefix) and prefix + "{" in text
            and name[len(prefix):].lower() in {f.name for f in dataclasses.fields(Topics)})


def test_every_variable_named_is_read_by_the_code():
    texts: dict[tuple[str, ...], str] = {}
    problems = []
    for page in PAGES:
        roots = SUITE_PAGES.get(page, ("streams",))
        text = texts.setdefault(roots, _source_text(roots))
        for number, line in enumerate(lines_of(page), 1):
            for name in variables(line):
                if not re.search(rf"\b{re.escape(name)}\b", text) and not _read_by_pattern(name, text):
                    problems.append(f"{page}:{number}: {name} is not read anywhere in {', '.join(roots)}/")
    if problems:
        pytest.fail("variables the code does not read:\n" + "\n".join(problems), pytrace=False)


# --- (c) make targets --------------------------------------------------------------------------------------

def test_every_make_target_named_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, re.M))
    problems = []
    for page in PAGES:
        for number, code in code_of(page):
            for target in re.findall(r"(?<![\w-])make[ \t]+([a-z][\w-]*)", code):
                if target not in targets:
                    problems.append(f"{page}:{number}: `make {target}`: no such target in the Makefile")
    if problems:
        pytest.fail("make targets the Makefile lacks:\n" + "\n".join(problems), pytrace=False)


# --- (d) paths and links ---------------------------------------------------------------------------------

TOP = ("streams", "tests", "bench", "docs", "schemas", "scripts", "examples", "docker", ".ci")
PATH = re.compile(r"(?<![\w./~$:-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./*{},-]*"
                  r"(?:::\w+)?)")
TEST_NAME = re.compile(r"(?<![\w/.-])(test_\w+\.py)(?:::(\w+))?")


def _package_dirs() -> dict[str, str]:
    """streams/schemas -> schemas: folders the wheel maps (pyproject.toml's package-dir)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {package.replace(".", "/"): folder for package, folder in mapping.items()}


def _exists(path: str) -> bool:
    path = path.rstrip(".,")
    for package, folder in _package_dirs().items():
        if path == package or path.startswith(package + "/"):
            path = folder + path[len(package):]
    braces = re.search(r"\{([^}]*)\}", path)
    if braces:
        return all(_exists(path[:braces.start()] + part + path[braces.end():])
                   for part in braces.group(1).split(","))
    if "*" in path:
        return bool(glob.glob(str(ROOT / path)))
    return (ROOT / path).exists()


def _defines(file: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async )?def {re.escape(name)}\(", file.read_text(), re.M) is not None


def _slug(heading: str) -> str:
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The headings' anchors, as GitHub makes them (a `# comment` in a fenced block is not a heading)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)$", line)):
            anchors.add(_slug(heading.group(1)))
    return anchors


def test_every_path_and_link_leads_somewhere():
    tests: dict[str, list[Path]] = {}
    for file in sorted((ROOT / "tests").rglob("test_*.py")):
        tests.setdefault(file.name, []).append(file)
    problems = []
    for page in PAGES:
        here = (ROOT / page).parent
        for number, code in code_of(page):
            for path in PATH.findall(code):
                file, _, function = path.partition("::")
                if not _exists(file):
                    problems.append(f"{page}:{number}: {file} does not exist")
                elif function and not _defines(ROOT / file, function):
                    problems.append(f"{page}:{number}: {file} has no function {function}")
            for name, function in TEST_NAME.findall(code):
                if name not in tests:
                    problems.append(f"{page}:{number}: no test file {name} under tests/")
                elif function and not any(_defines(file, function) for file in tests[name]):
                    problems.append(f"{page}:{number}: no function {function} in "
                                    f"{' or '.join(str(f.relative_to(ROOT)) for f in tests[name])}")
        for number, line in enumerate(lines_of(page), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                file, _, anchor = target.partition("#")
                resolved = (here / file).resolve() if file else ROOT / page
                if not resolved.exists():
                    problems.append(f"{page}:{number}: link {target}: {file} does not exist")
                elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                    problems.append(f"{page}:{number}: link {target}: no heading #{anchor} in "
                                    f"{resolved.relative_to(ROOT)}")
    if problems:
        pytest.fail("paths and links that lead nowhere:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("words, expected", [
    (["stack", "up", "--brokers", "3"], None),
    (["dlq", "replay", "--id", "ID", "[...]"], None),
    (["demo", "--keep-stack"], None),
    (["dlq", "purge"], "has no command 'purge'"),
    (["stack", "sideways"], "takes one of up, down, env"),
    (["get", "<workflowId>", "--color"], "has no option --color"),
])
def test_the_command_check_itself(words, expected):
    problem = command_problem(words, build_parser())
    assert (problem is None) if expected is None else (expected in problem), problem
