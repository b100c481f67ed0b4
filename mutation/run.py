"""``make mutation``: mutmut over the modules that hold the relay's promises, one module at a
time with the tests that pin it, a score per module, and every survivor listed.

Each module is mutated in its own scratch copy under ``var/mutation/<name>/`` (mutmut reads
its settings from the working directory's setup.cfg and keeps its ``mutants/`` there), so
the source tree is never touched and modules can be run alone. A survivor passes only if
``accepted.toml`` names it (by module, function and the mutated line) with a reason; the run
fails when a module scores under its target or (the full run) a survivor is unexplained.
mutmut 3 was chosen over cosmic-ray: it forks per mutant and runs only the tests that reach
the mutated function (cosmic-ray starts the test command afresh per mutant: minutes more per
module here), filters with mypy, and works with this flat package on Python 3.11; it mutates
inside functions only, so module-level tables are pinned by table tests instead.

    python mutation/run.py                 # every module of scope.toml
    python mutation/run.py --quick         # the pure-logic modules (what CI runs)
    python mutation/run.py limits dedup    # these modules only
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "mutation"
WORK = ROOT / "var" / "mutation"
REPORT = WORK / "report.txt"
SURVIVORS = WORK / "survivors.txt"
# What mutmut copies into mutants/ besides the package (tests read docs and configs).
ALSO_COPY = ("tests", "README.md", "docs", "systemd", "examples", "pyproject.toml")

# accepted.toml's key for its ``[[sql_case]]`` explanations, and what looks like SQL (written
# in capitals here)
SQL_CASE = "only the letter case of SQL"
_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|FROM|SET|AND|ORDER BY|PRAGMA|BEGIN|"
                  r"COMMIT)\b")
_LITERAL = re.compile(r"'[^']*'")

# What counts as a kill: a test failed, a test hung past mutmut's timeout (the suite did not
# pass), or mypy --strict (part of `make test`) refused the mutant.
KILLED = frozenset({"killed", "timeout", "caught by type check"})

# Runs inside a scratch copy (mutmut reads its config at import, from the working directory):
# every mutant's status, and the diff of those that were not killed, as JSON on stdout.
_EXPORT = r"""
import json, sys
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files
out = []
for path in walk_mutatable_files():
    m = SourceFileMutationData(path=path)
    m.load()
    for name, code in m.exit_code_by_key.items():
        status = status_by_exit_code[code]
        # (a diff for what the judge may explain: not for what a test or mypy caught)
        diff = ("" if status in ("killed", "caught by type check")
                else get_diff_for_mutant(name, path=m.path))
        out.append({"name": name, "status": status, "diff": diff})
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    tests: tuple[str, ...]
    quick_tests: tuple[str, ...]  # the tests of the quick (CI) run: ``tests`` unless narrowed
    functions: tuple[str, ...]  # only these ("classify", "TwilioProvider.classify"); (): all
    quick: bool
    target: float
    batch: str  # modules of one batch are mutated in one mutmut run (same tests, functions)
    timeout_constant: float  # mutmut's: a mutant's tests are cut at 5 x (their time + this)

    @property
    def dotted(self) -> str:
        """``hapsms_relay/providers/aliyun.py`` -> ``hapsms_relay.providers.aliyun``."""
        return self.path.removesuffix(".py").replace("/", ".")

    def patterns(self) -> list[str]:
        """mutmut's mutant-name globs for ``functions``."""
        return [f"{self.dotted}.x{'ǁ' + f.replace('.', 'ǁ') if '.' in f else '_' + f}__mutmut_*"
                for f in self.functions]


@dataclass(frozen=True)
class Mutant:
    name: str
    status: str
    diff: str

    @property
    def function(self) -> str:
        """``hapsms_relay.limits.xǁLimiterǁcheck__mutmut_12`` -> ``Limiter.check``."""
        tail = self.name.rpartition(".")[2].rpartition("__mutmut_")[0]
        return tail.removeprefix("x_").removeprefix("xǁ").replace("ǁ", ".")

    @property
    def sql_case_only(self) -> bool:
        """Whether the mutant only changes the letter case of SQL (``UPDATE messages`` to
        ``update messages``): SQL's keywords and SQLite's and PostgreSQL's unquoted names
        are case-insensitive, so it is the same statement."""
        lines = self.diff.splitlines()
        old = [x[1:] for x in lines if x.startswith("-") and not x.startswith("---")]
        new = [x[1:] for x in lines if x.startswith("+") and not x.startswith("+++")]
        # (a quoted SQL literal, 'receipt', is a value whose case counts: it must not change)
        return (old != new and [x.lower() for x in old] == [x.lower() for x in new]
                and any(_SQL.search(x) for x in old)
                and [_LITERAL.findall(x) for x in old] == [_LITERAL.findall(x) for x in new])

    @property
    def change(self) -> str:
        """The mutated line(s), stripped: what ``accepted.toml`` matches on; a mutant that
        only deletes says ``removed:`` and the deleted line(s)."""
        lines = self.diff.splitlines()
        added = [x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++")]
        if added:
            return " / ".join(added)
        return "removed: " + " / ".join(x[1:].strip() for x in lines
                                        if x.startswith("-") and not x.startswith("---"))


def load_scope() -> tuple[list[Module], float]:
    doc = tomllib.loads((HERE / "scope.toml").read_text(encoding="utf-8"))
    target = float(doc["target"])
    modules = [
        Module(name, m["path"], tuple(m["tests"]), tuple(m.get("quick_tests", m["tests"])),
               tuple(m.get("functions", ())), bool(m.get("quick", False)),
               float(m.get("target", target)), m.get("batch", name),
               float(m.get("timeout_constant", 10)))
        for name, m in doc["modules"].items()
    ]
    for b in {m.batch for m in modules}:
        group = [m for m in modules if m.batch == b]
        if len(group) > 1 and (len({(m.tests, m.quick_tests, m.timeout_constant) for m in group}) > 1
                               or not all(m.functions for m in group)):
            sys.exit(f"mutation: the modules of batch {b!r} need the same tests, timeout_constant "
                     "and functions lists")
    return modules, target


def load_accepted() -> dict[tuple[str, str, str], str]:
    """(module, function, mutated line) -> why that survivor is harmless; a module's
    ``[[sql_case]]`` stands for all its mutants that only change the case of SQL, under
    (module, "*", SQL_CASE)."""
    doc = tomllib.loads((HERE / "accepted.toml").read_text(encoding="utf-8"))
    accepted = {(a["module"], a["function"], a["change"]): a["reason"]
                for a in doc.get("survivor", [])}
    accepted.update({(a["module"], "*", SQL_CASE): a["reason"] for a in doc.get("sql_case", [])})
    return accepted


def explanation(module: Module, m: Mutant,
                accepted: dict[tuple[str, str, str], str]) -> tuple[str, str, str] | None:
    """The key of ``accepted`` that explains ``m``, if one does."""
    for key in ((module.name, m.function, m.change), (module.name, "*", SQL_CASE)):
        if key in accepted and (key[1] != "*" or m.sql_case_only):
            return key
    return None


# what mutmut reads on a def's header line: leave that whole function unmutated
NO_MUTATE = "# pragma: no mutate block"


def out_of_scope(source: str, functions: tuple[str, ...]) -> str:
    """``source`` with every top-level function and method not named in ``functions``
    marked ``# pragma: no mutate block`` on its header's last line (the one ending in
    ``:``). mutmut would otherwise make (and type-check, and parse again) the mutants of
    the whole file, though the run tests only those of ``functions``: for the provider
    modules that was 2.5 minutes of a 5-minute run. Only comments are added, and only at
    the end of lines that hold no string, so line numbers and behaviour are unchanged."""
    tree = ast.parse(source)
    defs: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defs.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            defs.extend((f"{node.name}.{m.name}", m) for m in node.body
                        if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef))
    skip = {node.lineno for name, node in defs if name not in functions}
    if missing := set(functions) - {name for name, _ in defs}:
        sys.exit(f"mutation: scope.toml names functions that are not there: {sorted(missing)}")
    lines = source.splitlines(keepends=True)
    depth, header = 0, False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string == "def" and tok.start[0] in skip:
            header, depth = True, 0
        elif header and tok.type == tokenize.OP:
            depth += tok.string in "([{"
            depth -= tok.string in ")]}"
            if tok.string == ":" and depth == 0:  # the header's own colon
                row = tok.start[0] - 1
                body = lines[row].rstrip("\r\n")
                lines[row] = f"{body}  {NO_MUTATE}{lines[row][len(body):]}"
                header = False
    return "".join(lines)


def scratch(group: list[Module], quick: bool) -> Path:
    """A fresh copy of the project for one batch of modules, with mutmut's settings in its
    setup.cfg."""
    module = group[0]
    work = WORK / module.batch
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # the project's files as git sees them (tracked, and new ones not ignored)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = ROOT / name, work / name
        if src.is_file() and not name.startswith("mutation/"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for m in group:
        if m.functions:  # mutants of the named functions only
            target = work / m.path
            target.write_text(out_of_scope(target.read_text(encoding="utf-8"), m.functions),
                              encoding="utf-8")
    settings = "\n".join([
        "", "[mutmut]",
        "source_paths = hapsms_relay",
        "only_mutate =", *(f"    {m.path}" for m in group),
        "pytest_add_cli_args_test_selection =",
        *(f"    {t}" for t in (module.quick_tests if quick else module.tests)),
        # -p no:cacheprovider: mutants must not write a shared .pytest_cache; -p gc_freeze
        # (mutation/gc_freeze.py): the fork server's warm-up out of each child's collections
        "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -p", "    gc_freeze", "    -q",
        # a mutant that slows a test down (a loop bound, a wait never woken) is cut at
        # 5 x (the tests' own time + timeout_constant), and counts as caught (the suite did not
        # pass). The tests' time leaves out their fixtures (a database each, a relay started):
        # the constant covers those on a busy machine, 10 s unless scope.toml says less for a
        # module whose tests have none (each timeout holds one of the two workers that long)
        "timeout_multiplier = 5", f"timeout_constant = {module.timeout_constant:g}",
        "use_git_change_detection = false",
        # each mutant's tests in a process that has collected the tests but run none: forked
        # from mutmut's own process, they would inherit the caches its first full pass filled
        # (number masks, normalised numbers), and a mutant of the code behind a cache would
        # never run on the inputs the tests had already used
        "process_isolation = forkserver", "forkserver_warmup = collect",
        # mypy --strict is part of `make test`: a mutant it refuses is caught without a test
        # (with one cache for every batch: the libraries' types are checked once a run)
        "type_check_command =", "    mypy", "    --output", "    json", "    --no-warn-unused-ignores",
        "    --cache-dir", f"    {WORK / '.mypy_cache'}", "    hapsms_relay",
        "also_copy =", *(f"    {n}" for n in ALSO_COPY if (work / n).exists()), "",
    ])
    (work / "setup.cfg").write_text((ROOT / "setup.cfg").read_text(encoding="utf-8") + settings,
                                    encoding="utf-8")
    return work


@contextlib.contextmanager
def in_memory_temp() -> Iterator[None]:
    """The run's temp files in memory (``TMPDIR`` under /dev/shm, when there is one): the
    tests' SQLite files and the PostgreSQL server. Their fsyncs then wait for no disk, and a
    mutant's tests for no fsync; what a test can see of durability is unchanged (the relay
    still asks for ``synchronous = FULL`` and ``synchronous_commit = on``, and still syncs).
    On this two-core machine the outbox modules' runs spent most of their time waiting for
    the disk, with the CPUs idle: this took outbox_sqlite from 255 to 201 s."""
    shm = Path("/dev/shm")  # noqa: S108 - only a mkdtemp directory of our own in it
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield
        return
    before = os.environ.get("TMPDIR")
    path = tempfile.mkdtemp(prefix="hapsms-mutation-", dir=shm)
    os.chmod(path, 0o711)  # noqa: S103 - passable (PostgreSQL runs as nobody when we are root)
    os.environ["TMPDIR"] = path
    tempfile.tempdir = None  # (its cached answer)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        tempfile.tempdir = None
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def shared_postgres() -> Iterator[dict[str, str]]:
    """One throwaway PostgreSQL server for every mutant's tests (tests/backends.py uses the
    one ``HAPSMS_TEST_PG_DIR`` names): a server started per mutant cost seconds each, and
    one whose mutant timed out was never stopped."""
    sys.path.insert(0, str(ROOT))
    from tests.pg_server import PostgresServer

    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield {"HAPSMS_TEST_PG_DIR": str(server.dir)}
    finally:
        server.cleanup()


def run_batch(group: list[Module], mutmut: Path, python: Path, children: int,
              quick: bool, extra_env: dict[str, str]) -> dict[str, list[Mutant]]:
    """Each module's mutants (of its ``functions``, if named), by module name."""
    work = scratch(group, quick)
    name = group[0].batch
    # mutmut looks the type checker up on PATH by the name "mypy"
    env = {**os.environ, **extra_env, "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": f"{mutmut.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    log = work / "mutmut.log"
    with log.open("w") as out:
        done = subprocess.run([str(mutmut), "run", "--max-children", str(children),
                               *(p for m in group for p in m.patterns())], cwd=work,
                              env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"mutation: mutmut failed on {name} (exit {done.returncode}); see {log}")
    export = subprocess.run([str(python), "-c", _EXPORT], cwd=work, env=env, capture_output=True,
                            text=True, check=False)
    if export.returncode != 0:
        sys.exit(f"mutation: reading mutmut's results for {name} failed:\n{export.stderr}")
    every = [Mutant(**m) for m in json.loads(export.stdout)]
    return {
        module.name: [m for m in every if m.name.startswith(module.dotted + ".")
                      and (not module.functions or m.function in module.functions)]
        for module in group
    }


def judge(module: Module, mutants: list[Mutant], accepted: dict[tuple[str, str, str], str],
          matched: set[tuple[str, str, str]], survivors: list[str],
          took: str) -> tuple[str, int, float]:
    """A module's report line, its unexplained survivors and its score; its survivors are
    added to ``survivors`` and the explanations they used to ``matched``."""
    def caught(m: Mutant) -> bool:
        # a mutant explained as equivalent that timed out met a busy machine, not a test: it
        # counts as the survivor it is (a score that does not depend on the load)
        return m.status in KILLED and not (
            m.status == "timeout" and explanation(module, m, accepted) is not None)

    # SQL whose letters changed case is the same statement by SQL's own rules: such mutants
    # (mutmut makes two of every SQL string) are left out of the score, and said so
    same_sql = sum(not caught(m) and explanation(module, m, accepted) == (
        module.name, "*", SQL_CASE) for m in mutants)
    killed = sum(map(caught, mutants))
    total = len(mutants) - same_sql
    score = 100.0 * killed / total if total else 100.0
    unexplained = 0
    for m in mutants:
        if caught(m):
            continue
        key = explanation(module, m, accepted)
        reason = accepted[key] if key is not None else None
        if key is None:
            unexplained += 1
        else:
            matched.add(key)
        survivors.append(f"{module.name} {m.function} [{m.status}] "
                         f"{reason or 'UNEXPLAINED: kill it with a test, or list it in accepted.toml'}\n"
                         f"    {m.name}\n    change: {m.change}\n")
    line = (f"{module.name:<15} {score:5.1f}% killed  {killed:4d}/{total:<4d} "
            f"not killed {total - killed:3d} (unexplained {unexplained})  {took}"
            + (f"  [{same_sql} SQL case changes left out]" if same_sql else ""))
    return line, unexplained, score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", help="names from scope.toml (default: all)")
    p.add_argument("--quick", action="store_true", help="only the modules marked quick")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    # stopped (kill, a CI timeout): unwind, so that the PostgreSQL server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modules, _ = load_scope()
    known = {m.name for m in modules}
    if unknown := [n for n in args.modules if n not in known]:
        p.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = [m for m in modules if (not args.modules or m.name in args.modules)
              and (m.quick or not args.quick)]
    accepted = load_accepted()
    bindir = Path(sys.executable).parent
    mutmut, python = bindir / "mutmut", Path(sys.executable)
    WORK.mkdir(parents=True, exist_ok=True)

    lines: list[str] = []
    survivors: list[str] = []
    failed: list[str] = []
    matched: set[tuple[str, str, str]] = set()
    # started whichever modules run: a test file may take a database through another
    # fixture than pg_url (the contract suite's backend), and a server is seconds
    with in_memory_temp(), shared_postgres() as extra_env:
        for batch in dict.fromkeys(mod.batch for mod in chosen):
            group = [mod for mod in chosen if mod.batch == batch]
            started = time.monotonic()
            results = run_batch(group, mutmut, python, args.max_children, args.quick, extra_env)
            seconds = f"{time.monotonic() - started:5.0f}s"
            for module in group:  # one mutmut run for a batch: its time on the batch's last line
                took = seconds if module is group[-1] else f"(with {group[-1].name})"
                line, unexplained, score = judge(module, results[module.name], accepted, matched,
                                                 survivors, took)
                print(line, flush=True)
                lines.append(line)
                if score < module.target:
                    failed.append(f"{module.name}: {score:.1f}% killed, under the {module.target:g}% target")
                if unexplained and not args.quick:  # CI's quick run gates on the score alone
                    failed.append(f"{module.name}: {unexplained} survivor(s) not in mutation/accepted.toml")

    # an explanation whose mutant no longer survives (killed, or its line rewritten) goes
    stale = [] if args.quick else sorted(
        k for k in accepted if k[0] in {m.name for m in chosen} and k not in matched)
    for module_name, function, change in stale:
        failed.append(f"{module_name}: accepted.toml explains a survivor there is no more: "
                      f"{function}: {change}")

    REPORT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    SURVIVORS.write_text("".join(survivors) or "none\n", encoding="utf-8")
    print(f"mutation: scores in {REPORT.relative_to(ROOT)}, survivors in "
          f"{SURVIVORS.relative_to(ROOT)}")
    for f in failed:
        print(f"mutation: FAIL {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
