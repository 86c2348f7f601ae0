"""Where `edgemoe run` takes its prompt (-p, -p -, -f, piped stdin, the default), the short flags and --version
of llama.cpp/ollama habits, and the progress shown on stderr for slow starts (never on stdout).

Oracle for the prompt: the ids `run -p TEXT --json` reports for the same text. Runs on the embedded model.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest

from edgemoe.cli import build_parser, main
from edgemoe.commands.run import DEFAULT_PROMPT, read_prompt
from edgemoe.progress import Phases

TEXT = "The king said"


class Stdin:
    """sys.stdin as a pipe (or, tty=True, a terminal) holding `data`."""

    def __init__(self, data: bytes = b"", tty: bool = False):
        self.buffer = io.BytesIO(data)
        self.tty = tty
        self.closed = False

    def isatty(self) -> bool:
        return self.tty


def prompt_ids(capsys, monkeypatch, *argv: str, stdin: Stdin | None = None) -> tuple[list[int], str]:
    """(prompt ids, stderr) of `run ARGV -n 1 --json` with `stdin`."""
    monkeypatch.setattr(sys, "stdin", stdin if stdin is not None else Stdin(tty=True))
    code = main(["run", *argv, "-n", "1", "--temp", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["prompt_ids"], err


@pytest.fixture(scope="module")
def want() -> list[int]:
    """The ids of TEXT, as -p TEXT tokenizes it."""
    from edgemoe.default_model import default_model_path
    from edgemoe.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path()).encode(TEXT)


def test_piped_stdin_is_the_prompt(want):
    """A real pipe, no prompt flag: the text is the prompt, its trailing newline dropped; stdout is JSON only."""
    r = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-n", "1", "--temp", "0", "--json"],
                       input=f"{TEXT}\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_ids"] == want


def test_dash_p_and_file_read_the_prompt(capsys, monkeypatch, tmp_path, want):
    # -p - reads stdin even on a terminal (typed, then Ctrl-D)
    assert prompt_ids(capsys, monkeypatch, "-p", "-", stdin=Stdin(f"{TEXT}\n".encode(), tty=True))[0] == want
    (tmp_path / "dos.txt").write_bytes(f"{TEXT}\r\n".encode())
    assert prompt_ids(capsys, monkeypatch, "--file", str(tmp_path / "dos.txt"))[0] == want
    # a flag wins over piped input, which is left unread
    pipe = Stdin(b"something else")
    assert prompt_ids(capsys, monkeypatch, "-p", TEXT, stdin=pipe)[0] == want
    assert pipe.buffer.tell() == 0


def test_one_trailing_newline_is_dropped():
    for data, text in ((b"a b\n", "a b"), (b"a b\r\n", "a b"), (b"a b", "a b"), (b"a\n\n", "a\n"),
                       (b"\xc3\xa9t\xc3\xa9\n", "\u00e9t\u00e9")):
        assert read_prompt(data, "the prompt") == text, data


def test_no_prompt_on_a_terminal_continues_the_default(capsys, monkeypatch):
    ids, err = prompt_ids(capsys, monkeypatch, stdin=Stdin(tty=True))
    want, _ = prompt_ids(capsys, monkeypatch, "-p", DEFAULT_PROMPT)
    assert ids == want
    assert "no prompt given" in err and "-p TEXT" in err


def test_unreadable_prompts_are_one_line_exit_2(capsys, monkeypatch, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    cases = {
        "missing file": (["-f", str(tmp_path / "nope.txt")], None, "cannot read the prompt file"),
        "directory": (["-f", str(tmp_path)], None, "cannot read the prompt file"),
        "not UTF-8 file": (["-f", str(tmp_path / "latin1.txt")], None, "not UTF-8"),
        "empty file": (["-f", str(tmp_path / "empty.txt")], None, "is empty"),
        "not UTF-8 stdin": ([], Stdin(b"\xff\xfe"), "the prompt on stdin is not UTF-8"),
        "empty stdin": ([], Stdin(b""), "the prompt on stdin is empty"),
        "newline only": (["-p", "-"], Stdin(b"\n"), "is empty"),
    }
    for name, (argv, stdin, needle) in cases.items():
        monkeypatch.setattr(sys, "stdin", stdin if stdin is not None else Stdin(tty=True))
        code = main(["run", *argv, "-n", "1"])
        out, err = capsys.readouterr()
        # a load slower than a second says what it is doing first (edgemoe.progress): that line is not the error
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("edgemoe: loading ")]
        assert code == 2 and out == "", name
        assert len(lines) == 1 and lines[0].startswith("edgemoe: error:") and needle in lines[0], (name, err)


def test_a_bad_prompt_file_fails_before_the_model_loads(capsys, monkeypatch, tmp_path):
    """The file is read first: its error comes even when the model is missing too."""
    monkeypatch.setattr(sys, "stdin", Stdin(tty=True))
    assert main(["run", "-m", str(tmp_path / "none.gguf"), "-f", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read the prompt file" in capsys.readouterr().err


def test_prompt_sources_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "-p", "x", "-f", "y"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_short_flags_of_llama_cpp():
    for command in ("run", "chat", "bench", "serve"):
        args = build_parser().parse_args([command, "-t", "3", "-c", "256"])
        assert (args.threads, args.ctx) == (3, 256), command


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgemoe {version('edgemoe')}"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_for_fast_phases():
    for f in (io.StringIO(), Terminal()):
        with Phases("loading", delay_s=5.0, file=f) as phase:
            phase("reading the index")
            phase("laying out the weights")
        assert f.getvalue() == ""


def test_progress_names_slow_phases():
    log = io.StringIO()  # not a terminal: one line per slow phase
    with Phases("warming up", delay_s=0.0, file=log) as phase:
        phase("prompt kernels")
        time.sleep(0.6)
        phase("one-token kernels")
        time.sleep(0.6)
    assert log.getvalue().splitlines() == ["edgemoe: warming up: prompt kernels...",
                                           "edgemoe: warming up: one-token kernels..."]
    tty = Terminal()  # a terminal: a status line that ticks, erased at the end
    with Phases("warming up", delay_s=0.0, file=tty) as phase:
        phase("prompt kernels")
        time.sleep(0.6)
    shown = tty.getvalue()
    assert "warming up: prompt kernels [0 s]" in shown and "\n" not in shown
    assert shown.endswith("\r")  # tqdm's leave=False clears the line
    off = Terminal()
    with Phases("loading", enabled=False, delay_s=0.0, file=off) as phase:
        phase("reading the index")
        time.sleep(0.4)
    assert off.getvalue() == ""
