"""`edgemoe serve`: load the model once, then answer OpenAI-style requests over a UNIX socket (and loopback TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading

from ..config import add_config_arguments, config_from_args
from ..errors import UsageError
from ..server.limits import BACKLOG, MAX_CONNECTIONS, READ_TIMEOUT_S

log = logging.getLogger("edgemoe.server")


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    p.add_argument("--socket", metavar="PATH", help="UNIX socket (default: $RUNTIME_DIRECTORY/edgemoe.sock, else "
                                                     "the config's server.socket)")
    p.add_argument("--tcp", metavar="127.0.0.1:PORT", help="also listen on loopback TCP")
    p.add_argument("--grace", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests may finish before they are cancelled (default 10)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help=f"open connections at most; more are answered 503 and closed (default {MAX_CONNECTIONS}; "
                        "the open-file limit must exceed it: systemd's LimitNOFILE=)")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S, metavar="SECONDS",
                   help=f"seconds a client has to send a request's headers, and again its body; slower ones are "
                        f"closed or answered 408 (default {READ_TIMEOUT_S:g})")
    add_session_arguments(p)
    add_config_arguments(p)


def socket_path(args, cfg) -> str:
    """--socket, else $RUNTIME_DIRECTORY/edgemoe.sock (systemd's RuntimeDirectory=), else server.socket."""
    if args.socket:
        from ..config import SOCKET

        if not SOCKET.check(args.socket)[0]:
            raise UsageError(f"--socket {args.socket[:80]!r}: expected {SOCKET.what}")
        return args.socket
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return os.path.join(runtime.split(":")[0], "edgemoe.sock")
    return cfg.server.socket


def bind_unix(path: str, mode: int, backlog: int = BACKLOG) -> socket.socket:
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
    sock.listen(backlog)
    return sock


def parse_tcp(addr: str) -> tuple[str, int]:
    """"127.0.0.1:8080", "localhost:8080" or "[::1]:8080" → (host, port); UsageError for anything else."""
    shown = repr(addr) if len(addr) <= 60 else repr(addr[:57] + "...")
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:]+|[0-9A-Fa-f:.]+):([0-9]{1,5})", addr.strip())
    if m is None:
        raise UsageError(f"--tcp (server.tcp) must be HOST:PORT on loopback, such as 127.0.0.1:8080 or [::1]:8080, "
                         f"got {shown}")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(f"--tcp (server.tcp) must be a loopback address such as 127.0.0.1:8080 (the API has no "
                         f"authentication), got {shown}")
    if not 1 <= port <= 65535:
        raise UsageError(f"--tcp (server.tcp) port must be from 1 to 65535, got {port}")
    return host, port


def bind_tcp(addr: str, backlog: int = BACKLOG) -> socket.socket:
    host, port = parse_tcp(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {addr}: {e.strerror}; pass another --tcp port") from None
    sock.listen(backlog)
    return sock


def main(args) -> int:
    import uvicorn

    from ..engine.session import Session
    from ..server import sdnotify
    from ..server.app import Service, build_app
    from ..server.engine import Engine
    from ..server.limits import HttpLimits, fit_to_nofile
    from ..server.metrics import Metrics
    from ..server.noise import QuietFilter, Throttle
    from ..server.protocol import guarded_h11
    from ..server.scheduler import Scheduler

    logging.basicConfig(level=logging.INFO, format="edgemoe: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args)
    tcp = args.tcp or cfg.server.tcp
    if tcp:
        parse_tcp(tcp)  # a bad address fails before anything is bound or loaded
    if args.max_connections < 1:
        raise UsageError(f"--max-connections must be at least 1, got {args.max_connections}")
    if not 0 < args.read_timeout < 3600:
        raise UsageError(f"--read-timeout must be a number of seconds above 0 and below 3600, got {args.read_timeout}")
    limits = fit_to_nofile(HttpLimits(max_connections=args.max_connections, read_timeout_s=args.read_timeout))
    noise = Throttle(log)

    # Bind before loading so a busy socket fails fast; systemd socket activation hands us fd 3.
    fds = sdnotify.listen_fds()
    sockets: list[socket.socket] = []
    unix_path = None  # set once we own the file, so a failure never removes another server's socket
    session = engine = None
    try:
        if fds:
            sockets.append(socket.socket(fileno=fds[0]))
        else:
            sockets.append(bind_unix(socket_path(args, cfg), cfg.server.socket_mode, limits.backlog))
            unix_path = socket_path(args, cfg)
        if tcp:
            sockets.append(bind_tcp(tcp, limits.backlog))
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
                          session.n_ctx, cfg.sampling.params(), info, limits=limits, noise=noise)
        engine.start()
        # limit_concurrency: uvicorn's own 503 once a request arrives, a second fence behind the protocol's cap
        # at accept time (+1: uvicorn counts the asking connection too).
        config = uvicorn.Config(build_app(service), lifespan="off", http=guarded_h11(limits, noise),
                                log_level="warning", access_log=False, timeout_graceful_shutdown=args.grace + 5,
                                limit_concurrency=limits.max_connections + 1, backlog=limits.backlog,
                                timeout_keep_alive=limits.keep_alive_s)
        logging.getLogger("uvicorn.error").addFilter(QuietFilter(noise))
        server = _make_server(config, engine, args.grace)
        log.info("serving %s on %s (context %d, batch %d, %s, speculative %s, at most %d connections)",
                 service.model_name, where, session.n_ctx, b.max_batch, "streaming experts" if session.stream is not
                 None else "memory-mapped experts", engine.core.proposer_name, limits.max_connections)
        asyncio.run(_serve(server, sockets, engine, noise))
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


async def _serve(server, sockets, engine, noise) -> None:
    from ..server import sdnotify
    from ..server.noise import loop_exception_handler

    # accept() at the open-file limit (EMFILE) and other transport errors: one line, not a traceback a second
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler(noise, log))

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
