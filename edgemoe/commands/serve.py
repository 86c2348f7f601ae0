"""`edgemoe serve`: load the model once, then answer OpenAI-style requests over a UNIX socket (and loopback TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading

from ..config import add_config_arguments, config_from_args
from ..errors import UsageError

log = logging.getLogger("edgemoe.server")


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    p.add_argument("--socket", metavar="PATH", help="UNIX socket (default: $RUNTIME_DIRECTORY/edgemoe.sock, else "
                                                     "the config's server.socket)")
    p.add_argument("--tcp", metavar="127.0.0.1:PORT", help="also listen on loopback TCP")
    p.add_argument("--grace", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests may finish before they are cancelled (default 10)")
    add_session_arguments(p)
    add_config_arguments(p)


def socket_path(args, cfg) -> str:
    """--socket, else $RUNTIME_DIRECTORY/edgemoe.sock (systemd's RuntimeDirectory=), else server.socket."""
    if args.socket:
        return args.socket
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return os.path.join(runtime.split(":")[0], "edgemoe.sock")
    return cfg.server.socket


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening UNIX socket at `path`; a stale socket file is replaced, a live one refused."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise UsageError(f"{path} exists and is not a socket; remove it or pass another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nothing listens there
        except OSError as e:
            raise UsageError(f"cannot check the existing socket {path}: {e}") from None
        else:
            raise UsageError(f"another server is listening on {path}; stop it or pass another --socket")
        finally:
            probe.close()
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"the socket's directory {parent} does not exist; create it or pass another --socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot bind {path}: {e.strerror}; pass another --socket") from None
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def bind_tcp(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not port.isdigit():
        raise UsageError(f"--tcp must be a loopback address such as 127.0.0.1:8080 (the API has no "
                         f"authentication), got {addr!r}")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {addr}: {e.strerror}") from None
    sock.listen(128)
    return sock


def main(args) -> int:
    import uvicorn

    from ..engine.session import Session
    from ..server import sdnotify
    from ..server.app import Service, build_app
    from ..server.engine import Engine
    from ..server.metrics import Metrics
    from ..server.scheduler import Scheduler

    logging.basicConfig(level=logging.INFO, format="edgemoe: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args)

    # Bind before loading so a busy socket fails fast; systemd socket activation hands us fd 3.
    fds = sdnotify.listen_fds()
    sockets: list[socket.socket] = []
    unix_path = None  # set once we own the file, so a failure never removes another server's socket
    tcp = args.tcp or cfg.server.tcp
    session = engine = None
    try:
        if fds:
            sockets.append(socket.socket(fileno=fds[0]))
        else:
            sockets.append(bind_unix(socket_path(args, cfg), cfg.server.socket_mode))
            unix_path = socket_path(args, cfg)
        if tcp:
            sockets.append(bind_tcp(tcp))
        where = "socket activation (fd 3)" if fds else unix_path
        sdnotify.notify(f"STATUS=loading {args.model or cfg.inference.model or 'the embedded model'}")
        session = Session(args, cfg)
        sdnotify.notify("STATUS=compiling kernels")
        session.warm_up()
        b = cfg.batching
        engine = Engine(session.core(Metrics()), Scheduler(dict(b.admission), b.max_batch, b.max_queue),
                        bind_thread=session.bind_thread)

        def info() -> dict:
            return {"threads": engine.threads, "layout": session.layout(),
                    "streaming": session.stream is not None, "speculative": engine.core.proposer_name,
                    **{k: v for k, v in session.stream_figures().items() if k == "thermal"}}

        service = Service(engine, session.tokenizer, os.path.basename(session.model_path.rstrip("/")),
                          session.n_ctx, cfg.sampling.params(), info)
        engine.start()
        config = uvicorn.Config(build_app(service), lifespan="off", http="h11", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=args.grace + 5)
        server = _make_server(config, engine, args.grace)
        log.info("serving %s on %s (context %d, batch %d, %s, speculative %s)", service.model_name, where,
                 session.n_ctx, b.max_batch, "streaming experts" if session.stream is not None else
                 "memory-mapped experts", engine.core.proposer_name)
        asyncio.run(_serve(server, sockets, engine))
    finally:
        for s in sockets:
            s.close()
        if unix_path is not None:  # systemd's socket unit owns an activated socket's file
            with contextlib.suppress(OSError):
                os.unlink(unix_path)
        if engine is not None:
            engine.join(args.grace + 5)
        if session is not None:
            session.close()
    log.info("stopped")
    return 0


async def _serve(server, sockets, engine) -> None:
    from ..server import sdnotify

    async def watchdog() -> None:
        interval = sdnotify.watchdog_interval()
        while interval:
            if engine.is_alive():  # a dead engine thread stops the pings: systemd restarts us
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    task = asyncio.create_task(watchdog())
    try:
        await server.serve(sockets=sockets)
    finally:
        task.cancel()


def _make_server(config, engine, grace_s: float):
    """A uvicorn.Server whose SIGTERM/SIGINT first tell systemd and the engine (and never re-raise the signal)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                from ..server import sdnotify

                sdnotify.notify("READY=1")
                sdnotify.notify("STATUS=ready")

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                if sig == signal.SIGINT:
                    self.force_exit = True
                return
            self.should_exit = True
            from ..server import sdnotify

            sdnotify.notify("STOPPING=1")
            sdnotify.notify("STATUS=stopping: finishing running requests")
            # Not from inside the signal handler: the engine lock may be held by this very thread.
            threading.Thread(target=engine.shutdown, args=(grace_s,), daemon=True).start()

    return Server(config)
