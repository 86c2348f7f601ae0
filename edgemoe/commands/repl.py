"""`edgemoe repl`: chat with a running server; tokens stream as they come, Ctrl-C stops a reply.

A server that goes away (killed, crashed, stopped) ends the repl with one line and exit code 1; a connection
that broke while the server still answers drops the reply and returns to the prompt.
"""

from __future__ import annotations

import os
import sys

from ..errors import EdgeMoEError

HELP = """commands:
  /stats                 server figures (tokens/s, queue, batch)
  /set NAME VALUE        sampling setting for the next replies, e.g. /set temperature 0.7
  /unset NAME            back to the server's default
  /settings              show the settings in force
  /reset                 forget the conversation
  /quit                  leave (also Ctrl-D)
Ctrl-C stops the reply being generated."""

SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
            "seed": int, "max_tokens": int}


class ServerGone(EdgeMoEError):
    """The server stopped answering: nothing more can be said in this repl."""

    exit_code = 1


def setup_arg_parser(p) -> None:
    p.add_argument("--socket", metavar="PATH", help="server socket (default: $RUNTIME_DIRECTORY/edgemoe.sock, "
                                                     "else /run/edgemoe/edgemoe.sock)")
    p.add_argument("--url", help="talk to http://127.0.0.1:PORT instead of a socket")
    p.add_argument("--system", help="system message that starts every conversation")


def main(args) -> int:
    from ..client import DEFAULT_SOCKET, Client

    path = args.socket or (os.path.join(os.environ["RUNTIME_DIRECTORY"], "edgemoe.sock")
                           if os.environ.get("RUNTIME_DIRECTORY") else DEFAULT_SOCKET)
    client = Client(socket=path, base_url=args.url)
    client.health()  # fail now, with the client's clear message, if nothing listens
    answer_ctrl_c()
    use_history()
    session = Session(client, args.system, where=args.url or path)
    print(f"connected to {args.url or path}; /help for commands", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if session.command(line.strip()) == "quit":
                return 0
            continue
        session.say(line)


def answer_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt at the prompt even when this process started with SIGINT ignored (as
    every job a non-interactive shell puts in the background does, and its children inherit): Python installs
    its handler only over the default disposition."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)


def use_history() -> None:
    """Line editing (readline) with the history kept in ~/.edgemoe_history (`repl` and `chat`)."""
    try:
        import atexit
        import readline
    except ImportError:  # no readline on this platform: plain input()
        return
    path = os.path.join(os.path.expanduser("~"), ".edgemoe_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save(readline, path))


def _save(readline, path: str) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


class Session:
    """The conversation and settings of one repl."""

    def __init__(self, client, system: str | None = None, out=sys.stdout, where: str = "the server"):
        self.client = client
        self.system = system
        self.where = where  # the socket or URL, for messages
        self.settings: dict = {}
        self.out = out
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> str | None:
        """Run a /command; returns "quit" for /quit."""
        from ..errors import EdgeMoEError

        word, *rest = line.split()
        if word in ("/quit", "/exit"):
            return "quit"
        if word == "/help":
            print(HELP, file=self.out)
        elif word == "/reset":
            self.reset()
            print("(conversation cleared)", file=self.out)
        elif word == "/settings":
            print(self.settings or "(server defaults)", file=self.out)
        elif word == "/stats":
            try:
                h = self.client.health()
            except EdgeMoEError as e:
                print(f"error: {e}", file=self.out)
                return None
            print(f"{h['tokens_per_second']:.2f} tok/s, {h['tokens_generated']} tokens generated, "
                  f"{h['running']} running, {h['queue_length']} waiting, requests {h['requests']}", file=self.out)
            spec, eng = h.get("speculative") or {}, h.get("engine") or {}
            if eng.get("speculative", "off") != "off":
                print(f"speculative {eng['speculative']}: {spec.get('accepted_tokens', 0)}/"
                      f"{spec.get('draft_tokens', 0)} draft tokens accepted "
                      f"({spec.get('acceptance_rate', 0.0):.0%})", file=self.out)
        elif word == "/set" and len(rest) == 2 and rest[0] in SETTINGS:
            try:
                self.settings[rest[0]] = SETTINGS[rest[0]](rest[1])
            except ValueError:
                print(f"{rest[0]} takes a {SETTINGS[rest[0]].__name__}, got {rest[1]!r}", file=self.out)
        elif word == "/unset" and len(rest) == 1:
            self.settings.pop(rest[0], None)
        else:
            print(f"unknown command {line!r}; settings are {', '.join(SETTINGS)}\n{HELP}", file=self.out)
        return None

    def say(self, text: str) -> str:
        """Send a user turn and stream the reply; Ctrl-C keeps what came so far and cancels the rest."""
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = self.client.stream_chat(self.messages, **self.settings)
        try:
            for chunk in stream:
                piece = chunk["choices"][0].get("delta", {}).get("content") or ""
                parts.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        except EdgeMoEError as e:
            self._check_alive(e, mid_reply=bool(parts))
            self.out.write(f"\nerror: {e}")
            if "context" in str(e):
                self.out.write(" (/reset starts a new conversation)")
            self.messages.pop()
            self.out.write("\n")
            return ""
        finally:
            stream.close()  # closes the connection: the server cancels the request at its next step
        self.out.write("\n")
        reply = "".join(parts)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _check_alive(self, e: EdgeMoEError, mid_reply: bool) -> None:
        """After a failed reply: ServerGone if the connection was lost and the server no longer answers."""
        from ..client import ServerError

        if isinstance(e, ServerError):  # the server answered (an error status): it is there
            return
        try:
            self.client.health()
        except EdgeMoEError:
            self.out.write("\n")
            self.out.flush()
            cause = str(e).split(": ", 1)[-1]  # the client's "lost the server at PATH: <transport error>"
            raise ServerGone(f"the server at {self.where} went away {'mid-reply' if mid_reply else 'before replying'}"
                             f" ({cause}); start it again (edgemoe serve, or systemctl start edgemoe) and run "
                             "edgemoe repl again") from None
