"""The CLI teaches: choices in --help (from the modules that define them), a description for
every command, and the logging flags accepted (and validated) after every command."""

import os
import subprocess
import sys

import pytest

from shm.layout import ON_FULL_CODES
from ucxx_transport import cli, engine


def help_of(*args) -> str:
    env = dict(os.environ, COLUMNS="1000")  # no wrapping: a hyphenated choice stays whole
    r = subprocess.run([sys.executable, "-m", "ucxx_transport", *args, "--help"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def commands() -> dict:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "cmd")
    return sub.choices


def test_serve_help_lists_every_choice_of_on_full_and_progress_mode():
    out = help_of("serve")
    for choice in (*ON_FULL_CODES, *engine.PROGRESS_MODES):
        assert choice in out, choice
    assert "one of " + ", ".join(ON_FULL_CODES) in out
    assert "one of " + ", ".join(engine.PROGRESS_MODES) in out


@pytest.mark.parametrize("cmd, says", [("status", "--watch [SECONDS] refreshes a live view"),
                                       ("doctor", "Lines start with PROBLEM")])
def test_status_and_doctor_have_descriptions(cmd, says):
    assert commands()[cmd].description
    assert says in help_of(cmd)


def test_every_option_of_every_command_has_help():
    for name, p in commands().items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


BASE_ARGS = {"serve": ["--ring", "r"]}


@pytest.mark.parametrize("cmd", ["serve", "status", "doctor", "bench"])
def test_log_flags_accepted_after_every_command(cmd):
    assert set(commands()) == {"serve", "status", "doctor", "bench"}
    a = cli.build_parser().parse_args([cmd, *BASE_ARGS.get(cmd, []), "--log-level", "debug", "--log-format", "JSON"])
    assert (a.log_level, a.log_format) == ("DEBUG", "json")
    # the flag after the command wins over the one before it
    a = cli.build_parser().parse_args(["--log-level", "ERROR", cmd, *BASE_ARGS.get(cmd, []), "--log-level", "info"])
    assert a.log_level == "INFO"


@pytest.mark.parametrize("cmd", ["serve", "status", "doctor", "bench"])
@pytest.mark.parametrize("flag, value, says", [("--log-level", "LOUD", "invalid log_level 'LOUD'"),
                                               ("--log-format", "yaml", "invalid log_format 'yaml'")])
def test_log_flags_validated_after_every_command(cmd, flag, value, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([cmd, *BASE_ARGS.get(cmd, []), flag, value])
    assert e.value.code == cli.ExitCode.USAGE
    assert says in capsys.readouterr().err


def test_quick_start_rings_are_laptop_sized_and_their_memory_is_stated():
    import pathlib
    import re

    from shm.layout import segment_size
    from ucxx_transport.units import parse_size

    ops = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md").read_text()
    for where, text in (("ucxx-transport --help", cli.build_parser().epilog), ("docs/OPERATIONS.md", ops)):
        m = re.search(r"ucxx-transport serve [^\n]*--slots (\d+) --slot-bytes (\S+)", text)
        total = segment_size(int(m[1]), parse_size(m[2]))[0]
        assert total <= 256 << 20, f"{where}: the first serve example takes {total >> 20} MiB of /dev/shm"
        assert f"{round(total / 2**20)} MiB" in text, where
    assert "not there yet" not in ops
