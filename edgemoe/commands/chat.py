"""`edgemoe chat`: talk to a model in this process, no server (as `llama-cli -cnv`, `ollama run`, `mlx_lm.chat`).

Each turn renders the whole conversation in the model's chat format (`conversation_ids`, the one place that
knows it) and runs it through the one engine (EngineCore, Request, run_to_end) on the Session `run` opens;
the reply streams token by token, then its speed. Ctrl-C stops a reply at the engine's next step (the
request is cancelled, never interrupted half-way through a step); at the prompt, a second Ctrl-C leaves.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from ..config import add_config_arguments, config_from_args
from ..errors import UsageError
from .run import add_sampling_arguments, sampling_params

HELP = """commands:
  /reset    forget the conversation (the --system message stays)
  /quit     leave (also /exit, /bye, Ctrl-D, or Ctrl-C twice at the prompt)
  /help     this text
Ctrl-C stops the reply being generated."""
PLAIN_STOPS = ["\nuser:"]  # the plain format's next turn: the reply ends there


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    p.add_argument("--system", metavar="TEXT", help="system message that starts the conversation")
    p.add_argument("-n", "--n-predict", type=int, default=512,
                   help="most tokens per reply (default 512, or what is left of the context)")
    add_sampling_arguments(p)
    add_session_arguments(p)
    add_config_arguments(p)


def conversation_ids(session, messages: list[dict]) -> tuple[list[int], frozenset[int], list[str]]:
    """(prompt ids, ids that end the reply, stop strings) of the conversation so far, ready for the reply.

    The session's chat template (edgemoe/chat: the model's own, --chat-template, or the plain format; special
    tokens parsed, its end-of-turn ids); a session without one, the plain "role: content" lines the server
    uses. The plain format has no end-of-turn token: its next "user:" line ends the reply.
    """
    template = getattr(session, "chat_template", None)
    if template is not None:
        stops = PLAIN_STOPS if getattr(template, "origin", None) == "plain" else []
        return template.encode(messages, add_generation_prompt=True), frozenset(template.stop_ids), stops
    from ..server.schemas import chat_prompt

    return session.tokenizer.encode(chat_prompt(messages)), frozenset(), PLAIN_STOPS


class Chat:
    """One conversation with the session's model."""

    def __init__(self, session, core, params, *, system: str | None = None, max_tokens: int = 512,
                 out=None, err=None):
        self.session = session
        self.core = core
        self.params = params
        self.system = system
        self.max_tokens = max_tokens
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.stopped = False  # Ctrl-C stopped the last reply
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str):
        """Add the user's turn, stream the reply and its speed; the Request (None if it could not start).
        `self.stopped`: Ctrl-C stopped the reply."""
        from ..engine.core import run_to_end
        from ..engine.request import Request
        from ..errors import EdgeMoEError

        self.stopped = False
        self.messages.append({"role": "user", "content": text})
        try:
            ids, stop_ids, stops = conversation_ids(self.session, self.messages)
        except EdgeMoEError as e:  # a template that refuses the conversation
            self.messages.pop()
            print(f"error: {e}", file=self.err)
            return None
        room = self.session.n_ctx - len(ids)
        if room < 1:
            self.messages.pop()
            print(f"(the conversation is {len(ids)} tokens, the context {self.session.n_ctx}: /reset starts a new "
                  "one, or raise --ctx)", file=self.err)
            return None
        parts: list[str] = []
        turn_ended = False  # the template's end-of-turn id came
        req = Request(ids, min(self.max_tokens, room), self.params, stops=stops)

        def emit(ev: dict) -> None:
            nonlocal turn_ended
            if ev["type"] != "token" or turn_ended:
                return
            if ev["id"] in stop_ids:  # not part of the reply; the request ends before the next step
                turn_ended = req.cancelled = True
                return
            piece = ev["text"] if parts else ev["text"].lstrip()  # "assistant:" is followed by a space
            if piece:
                parts.append(piece)
                self.out.write(piece)
                self.out.flush()

        req.emit = emit
        with _ctrl_c_cancels(req):
            run_to_end(self.core, req)
            self.stopped = req.cancelled and not turn_ended
            self.out.write(" [stopped]\n" if self.stopped else "\n")
            self.out.flush()
            if req.finish_reason == "error":
                self.messages.pop()
                print(f"error: {req.error}; the turn is dropped", file=self.err)
                return req
            self.messages.append({"role": "assistant", "content": "".join(parts).strip()})
            reused = getattr(req, "reused", 0)  # prompt tokens the prefix cache kept from the last turn
            print(f"[{len(req.tokens)} tokens, {req.decode_tok_s:.1f} tok/s | prompt {len(ids)} tokens"
                  + (f" ({reused} reused)" if reused else "") + f", {req.prefill_tok_s:.1f} tok/s]", file=self.err)
            if req.finish_reason == "length" and len(req.tokens) == room:
                print("(the context is full: /reset starts a new conversation)", file=self.err)
        return req

    def command(self, line: str) -> str | None:
        """Run a /command; "quit" for /quit."""
        word = line.split()[0]
        if word in ("/quit", "/exit", "/bye"):
            return "quit"
        if word == "/reset":
            self.reset()
            print("(conversation cleared)", file=self.err)
        elif word == "/help":
            print(HELP, file=self.err)
        else:
            print(f"unknown command {word!r}\n{HELP}", file=self.err)
        return None


@contextlib.contextmanager
def _ctrl_c_cancels(req):
    """While a reply is generated, Ctrl-C cancels the request: run_to_end ends it before the next step (a
    KeyboardInterrupt raised inside a step would leave its KV cache half-written)."""
    def cancel(signum, frame) -> None:
        req.cancelled = True

    old = signal.signal(signal.SIGINT, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def loop(chat: Chat) -> int:
    """Read lines until /quit, EOF or two Ctrl-C in a row at the prompt (a stopped reply counts as the first)."""
    interrupted = False
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=chat.err)
            return 0
        except KeyboardInterrupt:
            print(file=chat.err)
            if interrupted:
                return 0
            interrupted = True
            print("(Ctrl-C again, /quit or Ctrl-D to leave)", file=chat.err)
            continue
        interrupted = False
        if not line.strip():
            continue
        if line.startswith("/"):
            if chat.command(line.strip()) == "quit":
                return 0
            continue
        chat.say(line)
        interrupted = chat.stopped


def main(args) -> int:
    from ..engine.session import Session
    from .repl import answer_ctrl_c, use_history

    if args.n_predict < 1:
        raise UsageError(f"-n must be at least 1, got {args.n_predict}")
    cfg = config_from_args(args)
    params = sampling_params(args, cfg)
    session = Session(args, cfg)
    try:
        if session.tokenizer is None:
            raise UsageError("this model file carries no vocabulary, so it cannot chat; use a model with one, or "
                             "`edgemoe run --prompt-ids`")
        session.warm_up()  # the first reply starts at once
        chat = Chat(session, session.core(), params, system=args.system, max_tokens=args.n_predict)
        answer_ctrl_c()
        use_history()
        fmt = "its chat template" if getattr(session, "chat_template", None) is not None else "the plain chat format"
        print(f"edgemoe chat: {session.model_path} ({fmt}, context {session.n_ctx}); /help for commands, Ctrl-C "
              "stops a reply, Ctrl-D leaves", file=sys.stderr)
        return loop(chat)
    finally:
        session.close()
