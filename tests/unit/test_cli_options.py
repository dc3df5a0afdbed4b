"""The CLI's options as a user meets them: bad values, help, suggestions; and the table they come from."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env
from wan_spmd import options
from wan_spmd.params import FIELDS, PARAM_KEYS, Limits

# Each kind of bad flag value, with what its one line must say.
BAD_VALUES = {
    "choice": (["generate", "--vae-dtype", "fp16", "--prompt", "x"], "--vae-dtype must be one of fp32, bf16"),
    "syntax": (["generate", "--warmup-shapes", "832x480", "--prompt", "x"], "is not WIDTHxHEIGHTxFRAMES"),
    "below its least": (["serve", "--max-work", "0"], "--max-work must be >= 1, got 0"),
    "degree 0": (["generate", "--tp", "0", "--prompt", "x"], "--tp must be >= 1, got 0"),
    "not an integer": (["serve", "--tp", "two"], "--tp must be an integer, got 'two'"),
    "port out of range": (["serve", "--port", "70000"], "--port must be within 0..65535, got 70000"),
    "port not a number": (["serve", "--port", "http"], "--port must be an integer"),
    "seconds not > 0": (["batch", "r.jsonl", "--output-dir", "o", "--stop-grace", "0"], "--stop-grace must be > 0"),
    "seconds not finite": (["serve", "--job-deadline", "nan"], "--job-deadline must be a finite number"),
    "socket mode": (["serve", "--uds-mode", "0400"], "--uds-mode must be octal permissions"),
    "device": (["serve", "--device", "gpu"], "--device must be one of auto, cuda, cpu"),
    "attention kernel": (["serve", "--attention", "bogus"], "--attention must be one of auto, sdpa, fa3, fa3-fp8"),
    "quantization": (["generate", "--quant", "int4", "--prompt", "x"], "--quant must be one of none, fp8"),
    "send timeout": (["serve", "--send-timeout", "0"], "--send-timeout must be > 0 seconds, got 0"),
    "job lease": (["serve", "--job-lease", "-1"], "--job-lease must be > 0 seconds, got -1"),
    "gpu memory": (["serve", "--gpu-memory", "-1"], "--gpu-memory must be a positive number, got '-1'"),
    "gpu memory text": (["batch", "r.jsonl", "--output-dir", "o", "--gpu-memory", "48GB"], "--gpu-memory must be"),
    "offload": (["serve", "--offload", "cpu"], "--offload must be one of auto, none, text-encoder, experts"),
    "cache size": (["serve", "--prompt-cache", "-1"], "--prompt-cache must be >= 0 entries, got -1"),
    "step cache backend": (["serve", "--cache-backend", "cache_dit"], "--cache-backend cache_dit is not offered"),
    "step cache config": (["serve", "--cache-config", "[1]"], "--cache-config must be a JSON object"),
    "unknown flag": (["generate", "--steps", "4"], "No such option: --steps (did you mean --num-inference-steps"),
    "missing value": (["serve", "--port"], "requires an argument"),
}

# Runs each command line through main() in one fresh interpreter (as `python -m wan_spmd` would,
# one after the other), records its exit status and stderr, and finally which heavy modules got imported.
PROBE = """
import contextlib, io, json, sys
from wan_spmd.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "stderr": err.getvalue()})
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(json.dumps({"results": results, "heavy": heavy}))
"""


def test_every_bad_flag_value_is_one_line_and_exit_2_before_torch(tmp_path):
    """Issue 26: a bad flag value exits 2 with one line, without importing torch or diffusers (it
    took 4 s when the checks ran after the engine's import). An empty cache makes any model
    resolution (building `tiny`) import torch, so a check that ran too late is seen here."""
    argvs = [argv for argv, _ in BAD_VALUES.values()]
    env = cli_env(XDG_CACHE_HOME=str(tmp_path / "empty-cache"))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for (case, (_, message)), result in zip(BAD_VALUES.items(), report["results"], strict=True):
        lines = result["stderr"].splitlines()
        assert result["code"] == 2 and len(lines) == 1, (case, result)
        assert lines[0].startswith("error: ") and message in lines[0], (case, result)
    assert report["heavy"] == []


def test_a_misspelt_flag_is_pointed_at_the_flag_that_holds_its_words():
    """Issue 34: `--steps` got `--fps, --max-steps, --tp` (near spellings); the request flag comes
    first, a flag only another command takes is never offered, and plain typos still get a guess."""
    assert options.suggest("generate", "--steps") == ["--num-inference-steps", "--max-steps"]
    assert options.suggest("serve", "--steps") == ["--max-steps"]
    assert options.suggest("generate", "--promt") == ["--prompt"]
    assert options.suggest("generate", "--guidance") == ["--guidance-scale", "--guidance-scale-2"]
    assert options.suggest("serve", "--colour") == []


def _help(command: str) -> str:
    """`wan_spmd COMMAND --help` on a wide terminal (one line per option), without colour."""
    env = cli_env(COLUMNS="400", NO_COLOR="1", TERMINAL_WIDTH="400")
    proc = subprocess.run(
        [sys.executable, "-m", "wan_spmd", command, "--help"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)


@pytest.mark.parametrize("command", sorted(options.RUN))
def test_help_lists_each_option_in_its_panel_with_its_type_and_help(command):
    """Issue 34: request flags first, then model, parallel, server, limits; real types and choices
    (never typer's `<str>`); a default that comes from the model says so. If this fails, an option
    lost its help, its panel or its kind (once `--output-dir` silently became an argument)."""
    text = _help(command)
    assert "<str>" not in text and "<int>" not in text and "<float>" not in text
    titles = [t for t in re.findall(r"─ (\w+) ─", text) if t in options.PANELS]
    own = [o for o in options.options_of(command) if not o.argument]
    assert titles == list(dict.fromkeys(o.panel for o in own)), titles
    lines = text.splitlines()
    for o in options.options_of(command):
        name = o.flag
        line = next((ln for ln in lines if re.match(rf"\W*{re.escape(name)}\s", ln)), None)
        assert line is not None, f"{command} --help has no {name}"
        assert " ".join(o.help.split()[:4]) in line, (name, line)
        if not o.argument and o.type is not bool:
            assert o.shown_type in line, (name, line)
        if o.request and o.default_text == options.MODEL_DEFAULT:
            assert "model's default" in line, (name, line)
    if command == "generate":
        assert re.search(r"--vae-dtype\s+fp32\|bf16", text) and re.search(r"--num-inference-steps\s+INTEGER", text)


def test_a_required_option_is_an_option():
    """`batch REQUESTS` without --output-dir is refused as a missing option (not an argument)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wan_spmd", "batch", "r.jsonl"], capture_output=True, text=True, env=cli_env()
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: Missing option '--output-dir'.", proc.stderr


def test_request_fields_are_the_schema_fields_and_json_keys():
    """params.FIELDS (the HTTP form, the JSONL keys) is the table's request rows, in order."""
    rows = [o for o in options.OPTIONS if o.request]
    assert list(FIELDS) == rows and PARAM_KEYS == tuple(o.name for o in rows)
    assert all(options.GENERATE in o.commands and o.panel == options.REQUEST for o in rows)


def test_each_option_is_one_row_per_command_and_feeds_a_real_field():
    """The table's own consistency: if this fails, a flag is declared twice for one command, sits in
    a panel help does not list, or feeds a dataclass field that does not exist (it would fail only
    when the command runs)."""
    from wan_spmd.engine import EngineOptions
    from wan_spmd.serve import ServeOptions
    from wan_spmd.server.options import HttpOptions

    seen = set()
    for o in options.OPTIONS:
        assert o.panel in options.PANELS and o.commands <= options.RUN, o.name
        for command in o.commands:
            assert (o.name, command) not in seen, (o.name, command)
            seen.add((o.name, command))
    targets = {"limits": Limits, "http": HttpOptions, "serve": ServeOptions, "engine": EngineOptions}
    for o in options.OPTIONS:
        if o.feeds is not None:
            fields = {f.name: f for f in dataclasses.fields(targets[o.feeds])}
            field = fields.get(o.field or o.name)
            assert field is not None, (o.name, o.feeds)
            assert field.default == o.parsed_default(), (o.name, field.default)


def test_values_parse_to_their_types_and_build_the_option_dataclasses():
    values = options.parse("serve", {"port": "0", "uds_mode": "660", "job_ttl": "2.5", "compile": False})
    assert values.port == 0 and values.uds_mode == 0o660 and values.job_ttl == 2.5 and values.compile is False
    assert values.max_work == Limits().max_work and values.output_dir.name == "outputs"
    limits = values.into(Limits, "limits", max_width=64)
    assert limits == Limits(max_width=64)
    with pytest.raises(AttributeError, match="serve has no option 'prompt'"):
        values.prompt  # noqa: B018
    generate = options.parse("generate", {"prompt": "a kite", "num_frames": "9", "seed": None})
    assert generate.request == {"prompt": "a kite", "num_frames": "9"}  # text: params.resolve_params reads it


def test_choices_repeated_without_torch_agree_with_their_owners():
    """options.py repeats the attention kernels and the offload placements so that it never imports
    torch (kernels.py) or the planner (memory.py); if this fails, one side gained a choice the
    other would refuse (a flag value accepted, then failing after the model loaded, or never offered)."""
    from wan_spmd.kernels import ATTENTION_CHOICES
    from wan_spmd.memory import OFFLOAD_CHOICES

    assert options.ATTENTION_CHOICES == ATTENTION_CHOICES
    assert options.OFFLOAD_CHOICES == tuple(OFFLOAD_CHOICES)
    assert options.option("attention").default == "auto" and options.option("quant").default == "none"
