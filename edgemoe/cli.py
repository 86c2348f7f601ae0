"""`edgemoe` command-line entry point: dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import EdgeMoEError

SUBCOMMANDS = {
    "run": "Generate text from a prompt without a server",
    "chat": "Chat with a model interactively, in this process (no server)",
    "tokenize": "Print the token ids (and pieces) of a text",
    "partition": "Write an expert pack (aligned per-expert layout + manifest) from a GGUF or HF model",
    "config": "Check a configuration file or print the effective configuration",
    "bench": "Measure prefill and decode speed against the memory and disk bandwidth bound",
    "warmup": "Compile every kernel a model runs into Numba's cache (an image's or appliance's first start is then warm)",
    "serve": "Serve OpenAI-style completions over a UNIX socket (continuous batching)",
    "repl": "Chat with a running server interactively",
    "cluster": "Serve models on Ray Serve replicas across boxes behind one endpoint (edgemoe cluster up|status|down)",
    "service": "Install the systemd units and the configuration of an appliance (edgemoe service install)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemoe", description="Mixture-of-Experts inference on the CPU")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"edgemoe {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        importlib.import_module(f"edgemoe.commands.{name}").setup_arg_parser(p)
    return parser


def version() -> str:
    """The installed distribution's version; the source tree's `__version__` when it was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("edgemoe")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def run_command(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"edgemoe.commands.{args.command}")
    return module.main(args) or 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except EdgeMoEError as e:
        if args.debug:
            raise
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgemoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"edgemoe: error: internal error ({type(e).__name__}: {_short(e)}); run again with --debug for the "
              "traceback and report it", file=sys.stderr)
        return 1


def _short(e: Exception, limit: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
