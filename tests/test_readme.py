"""README.md is a contract: its Python examples run as written (CPU, offline), and the names,
paths, flags, tables and numbers it quotes match the code and the committed results."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
CODE_SPANS = re.findall(r"`([^`\n]+)`", TEXT)


def _section(title: str) -> str:
    """The README text under the heading ``title`` up to the next heading of any level."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", TEXT + "\n# end", re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _table_rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows[1:]  # without the header


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, f"README.md python block {index}", "exec"), scope)
    if "images" in scope:  # the sampling examples end in uint8 images
        assert scope["images"].dtype == torch.uint8 and scope["images"].ndim == 4


def test_readme_paths_exist():
    paths = set()
    for span in CODE_SPANS:  # `path`, `python path --flags`, `bash path`
        for word in span.split():
            if re.match(r"^(benchmarks|tests|tools|fastdiff|docs|csrc)/", word):
                paths.add(word)
    paths |= set(re.findall(r"\]\((docs/[^)]+)\)", TEXT))  # images
    assert len(paths) >= 10
    for p in paths:
        assert list(ROOT.glob(p)), f"README names {p}, which does not exist"


def _resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_readme_fastdiff_names_resolve():
    names = set()
    for span in CODE_SPANS:
        for m in re.finditer(r"\bfastdiff(?:\.[A-Za-z_]\w*)+", span):
            names.add(m.group(0))
    assert len(names) >= 15
    for name in sorted(names):
        _resolve(name)  # raises on a stale name


def _cli_parser():
    from fastdiff.cli import build_parser

    return build_parser()


def _subparser(parser, words: list[str]):
    for w in words:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[w]
    return parser


def test_readme_cli_table_commands_parse():
    """Each command of "The `fastdiff` command" table parses, and each flag it shows exists."""
    rows = _table_rows(_section("The `fastdiff` command"))
    assert len(rows) >= 7
    parser = _cli_parser()
    for row in rows:
        cmd = row[0].strip("`").replace("\\|", "|")
        words = shlex.split(re.sub(r"\[[^\]]*\]", "", cmd))
        assert words[0] == "fastdiff"
        parser.parse_args(words[1:])  # SystemExit on an unknown flag or bad value
        sub_words = [w for w in words[1:3] if not w.startswith("-")]
        sub = _subparser(parser, sub_words)
        known = {o for a in sub._actions for o in a.option_strings}
        for flag in re.findall(r"(--[a-z][a-z-]*)", cmd):
            assert flag in known, f"README shows `{flag}` for `fastdiff {' '.join(sub_words)}`"


def test_readme_quickstart_flags_exist():
    """The flags named in the paragraph under "Two commands on a fresh machine"."""
    text = _section("Two commands on a fresh machine")
    (cmd,) = re.findall(r"pip install \. && (fastdiff sample [^\n`]+)", text)
    parser = _cli_parser()
    parser.parse_args(shlex.split(cmd)[1:])
    known = {o for a in _subparser(parser, ["sample"])._actions for o in a.option_strings}
    flags = set(re.findall(r"`(--[a-z-]+)", text))
    assert {"--label", "--guidance", "--seed", "--device", "--backend"} <= flags
    assert flags <= known


def test_readme_sampler_classes_exist():
    """The samplers table's classes, where README says they live, with the documented step()."""
    text = _section("Samplers")
    assert "`fastdiff.samplers`" in text
    rows = _table_rows(text)
    from fastdiff import NoiseSchedule, samplers

    # every registered sampler class, once
    assert {r[1].strip("`") for r in rows} == {c.__name__ for c in samplers.SAMPLERS.values()}
    assert len(rows) == len(set(samplers.SAMPLERS.values()))
    for row in rows:
        cls = getattr(samplers, row[1].strip("`"))
        params = list(inspect.signature(cls.step).parameters)
        assert params[:5] == ["self", "model_output", "i", "x", "noise"]
        # a flow or EDM model has no VP noise schedule
        # (flow Heun and the flow inversion are FlowMatchEulerSampler subclasses)
        flow = issubclass(cls, (samplers.FlowMatchEulerSampler, samplers.EDMEulerSampler,
                                samplers.EDMDPMSolverSampler,
                                samplers.ConsistencyModelSampler,
                                samplers.IPNDMSampler))  # fmt: skip
        smp = cls(None if flow else NoiseSchedule("linear"), 10)
        two_stage = (samplers.HeunSampler, samplers.DPM2Sampler, samplers.DPM2AncestralSampler,
                     samplers.FlowMatchHeunSampler, samplers.DPMSolverSDESampler)  # fmt: skip
        calls = 19 if cls in two_stage else 10  # Heun, DPM2, DPM++ SDE: 2N - 1 model calls
        calls += 9 * (cls is samplers.PNDMSampler)  # PNDM (3 Runge-Kutta steps): N + 9
        assert len(smp.timesteps) == len(smp) == calls


def test_readme_dispatch_table_is_the_code():
    from fastdiff import _dispatch

    rows = _table_rows(_section("Backends"))
    seen = set()
    for row in rows:
        ops = re.findall(r"`(\w+)`", row[0])
        cuda = [b.strip() for b in row[1].split(",")]
        cpu = [re.sub(r"\s*\(.*?\)", "", b).strip() for b in row[2].split(",")]
        for op in ops:
            assert tuple(cuda) == _dispatch.CUDA_PREFERENCE[op], op
            assert tuple(cpu) == _dispatch.CPU_PREFERENCE[op], op
            seen.add(op)
    assert seen == set(_dispatch.IMPLEMENTED)


def test_readme_build_options_are_what_setup_reads():
    rows = _table_rows(_section("Install"))
    documented = {re.match(r"`([A-Z_]+)", r[0]).group(1) for r in rows}
    setup_src = (ROOT / "setup.py").read_text()
    read = set(re.findall(r"env(?:iron)?\.get\(\"([A-Z_]+)\"", setup_src))
    assert read and documented == read
    default = re.search(r"default `([^`]+)`", rows[1][1]).group(1)
    assert f'DEFAULT_ARCHS = "{default}"' in setup_src
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(FASTDIFF_CUDA_ARCHS "{default}"' in cmake


def test_readme_sample_options_are_the_signature():
    import fastdiff
    from fastdiff import samplers

    rows = _table_rows(_section("Options of `fastdiff.sample`"))
    documented = {n for r in rows for n in re.findall(r"`(\w+)`", r[0])}
    params = set(inspect.signature(fastdiff.sample).parameters) - {"model", "sampler_options"}
    assert documented == params
    opts_row = next(r for r in rows if "sampler options" in r[0])
    sampler_opts = set(re.findall(r"`(\w+)`", opts_row[2]))
    sampler_opts -= {"epsilon", "v_prediction", "sample", "leading", "trailing", "linspace"}
    accepted = set()
    for cls in set(samplers.SAMPLERS.values()):
        accepted |= set(inspect.signature(cls.__init__).parameters)
    assert sampler_opts and sampler_opts <= accepted


def test_readme_presets_exist():
    text = _section("Models and `fastdiff.optimize`")
    presets = re.findall(r'"([a-z0-9-]+)"', text[text.index("Presets:") : text.index("summary()")])
    assert {"ddpm-cifar10", "adm-64", "adm-256", "tiny", "digits"} <= set(presets)
    from fastdiff.models.presets import PRESETS

    assert set(presets) <= set(PRESETS)


def test_readme_h100_numbers_are_the_committed_json():
    """Every ms/step and ratio in the H100 table is in benchmarks/results/h100-e2e-*.json."""
    text = _section("Performance")
    m = re.search(r"`benchmarks/results/(h100-e2e-[\d-]+)\.\*`", text)
    data = json.loads((ROOT / "benchmarks/results" / f"{m.group(1)}.json").read_text())
    ms = [c["time_us"] / 1000 / 50 for c in data["cases"]]
    ratios = [c["speedup_vs_eager"] for c in data["cases"] if "speedup_vs_eager" in c]
    table = text[text.index("| model | eager |") : text.index("Read honestly")]
    rows = _table_rows(table)
    assert len(rows) == 4
    for row in rows:
        for cell in row[1:]:
            for num in re.findall(r"(?<![\w.])(\d+\.\d+)(x?)", cell):
                value, is_ratio = float(num[0]), num[1] == "x"
                digits = len(num[0].split(".")[1])
                pool = ratios if is_ratio else ms
                assert any(round(v, digits) == value or f"{v:.3g}" == num[0] for v in pool), (
                    f"README H100 table: {num[0]}{num[1]} is not in the committed JSON"
                )


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    """CI installs exactly as README says and runs README's test command (the brief's rule)."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    test_cmd = "TRITON_INTERPRET=1 pytest tests -q"
    assert f'pip install ".[test]" && {test_cmd}' in readme
    assert re.search(rf"^{re.escape(test_cmd)}$", ci, re.M), "CI's test line differs from README"
    assert "pip install torch==2.13.0" in readme
    assert re.search(r"^pip install -q torch==2\.13\.0$", ci, re.M)
    assert re.search(r'^pip install -q "\.\[test\]"$', ci, re.M)
