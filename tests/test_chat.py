"""`edgemoe chat` through a pseudo-terminal (pexpect) on the embedded model: a reply streams and its speed
follows, /reset, Ctrl-C stops a long reply and the prompt comes back, a second Ctrl-C or /quit leaves with 0.
And the one place that knows the chat format, with stand-ins for the session and its template."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pexpect

from edgemoe.commands.chat import PLAIN_STOPS, conversation_ids
from edgemoe.server.schemas import chat_prompt

SPEED = r"\[(\d+) tokens, [0-9.]+ tok/s \| prompt (\d+) tokens"
START_S = 240  # the first expect: a cold Numba cache compiles the kernels first (~30-60 s on a slow core)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn(tmp_path, *args: str, sigint_ignored: bool = False) -> pexpect.spawn:
    """`edgemoe chat` on a pseudo-terminal; sigint_ignored: started as a background job of a script starts it,
    with SIGINT ignored (Ctrl-C must still work at its prompt)."""
    env = dict(os.environ, HOME=str(tmp_path), TERM="dumb")  # the readline history goes to tmp_path
    child = pexpect.spawn(sys.executable, ["-m", "edgemoe", "chat", *args], env=env, encoding="utf-8",
                          timeout=60, dimensions=(24, 200), preexec_fn=_ignore_sigint if sigint_ignored else None)
    child.expect("/help for commands", timeout=START_S)
    child.expect("> ")
    return child


def test_chat_reply_speed_reset_quit(tmp_path):
    c = spawn(tmp_path, "--seed", "1", "-n", "12", "--system", "Thou art a player.")
    c.sendline("Who art thou?")
    c.expect("Who art thou\\?\r\n")  # the terminal's echo
    c.expect(SPEED)
    n, prompt = int(c.match.group(1)), int(c.match.group(2))
    assert 1 <= n <= 12 and c.before.strip(), "no reply text before the speed line"
    c.expect("> ")
    c.sendline("And then?")  # the second turn's prompt carries the first turn
    c.expect(SPEED)
    assert int(c.match.group(2)) > prompt + n
    c.expect("> ")
    c.sendline("/reset")
    c.expect("conversation cleared")
    c.expect("> ")
    c.sendline("Who art thou?")
    c.expect(SPEED)
    assert int(c.match.group(2)) == prompt  # the history is gone, the system message stays
    c.expect("> ")
    c.sendline("/help")
    c.expect("/reset")
    c.expect("> ")
    c.sendline("/quit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert os.path.exists(tmp_path / ".edgemoe_history")


def test_ctrl_c_stops_the_reply_then_leaves(tmp_path):
    # Greedy on this model writes a reply that runs to the end of the context (~1000 tokens); experts streamed
    # through a 1 MB cache on one thread make that take ~8 s on a quiet core, so the Ctrl-C lands mid-reply
    c = spawn(tmp_path, "--temp", "0", "-n", "100000", "-c", "1024", "--cache-mb", "1", "--no-prefetch", "-t", "1",
              sigint_ignored=True)
    c.sendline("Speak on")
    c.expect("Speak on\r\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    c.sendintr()
    c.expect(r"\[stopped\]")
    c.expect(SPEED)
    assert int(c.match.group(1)) < 1000
    c.expect("> ")
    assert time.monotonic() - t0 < 10
    c.sendintr()  # the second Ctrl-C, at the prompt: leave
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert "Traceback" not in c.before


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]


class Session:
    tokenizer = Tokenizer()


class Template:
    origin = "model"
    stop_ids = frozenset({7})

    def encode(self, messages, add_generation_prompt=True):
        assert add_generation_prompt
        return [len(m["content"]) for m in messages]


def test_the_chat_format_comes_from_one_place():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # a session without a template: the server's plain format, the next "user:" line ends the reply
    assert conversation_ids(Session(), messages) == (Tokenizer().encode(chat_prompt(messages)), frozenset(),
                                                     PLAIN_STOPS)
    assert chat_prompt(messages).endswith("user: Hi\nassistant:")
    # the session's template: its ids and its end-of-turn ids
    s = Session()
    s.chat_template = Template()
    assert conversation_ids(s, messages) == ([9, 2], frozenset({7}), [])
    s.chat_template.origin = "plain"
    assert conversation_ids(s, messages)[2] == PLAIN_STOPS
    assert re.fullmatch(r"\n\w+:", PLAIN_STOPS[0])
