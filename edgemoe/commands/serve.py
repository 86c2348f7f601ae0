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
    p.add_argument("-m", "--model", help="GGUF file or HF checkpoint directory (default: config's inference.model, "
                                         "else the embedded model)")
    p.add_argument("--socket", metavar="PATH", help="UNIX socket (default: $RUNTIME_DIRECTORY/edgemoe.sock, else "
                                                     "the config's server.socket)")
    p.add_argument("--tcp", metavar="127.0.0.1:PORT", help="also listen on loopback TCP")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="stream experts from the file into a RAM cache of this many MB (default: memory-map all)")
    p.add_argument("--stream", action="store_true", help="stream experts with the config's cache tiers")
    p.add_argument("--no-prefetch", action="store_true", help="with streaming: do not prefetch predicted experts")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: min(model's, 4096))")
    p.add_argument("--grace", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests may finish before they are cancelled (default 10)")
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

    from .. import kernels
    from ..loader import load_model
    from ..server import sdnotify
    from ..server.app import Service, build_app
    from ..server.engine import Engine
    from ..server.metrics import Metrics
    from ..server.scheduler import Scheduler
    from .run import apply_dispatch

    logging.basicConfig(level=logging.INFO, format="edgemoe: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args)
    apply_dispatch(cfg)
    threads = args.threads or cfg.threads
    if threads is not None:
        kernels.set_threads(threads)
    model_path = args.model or cfg.inference.model
    if model_path is None:
        from ..default_model import default_model_path

        model_path = default_model_path()
    stream = None
    if args.cache_mb is not None or args.stream:
        from ..experts.setup import StreamOptions

        stream = StreamOptions.from_config(cfg, args.cache_mb, prefetch=not args.no_prefetch)

    # Bind before loading so a busy socket fails fast; systemd socket activation hands us fd 3.
    fds = sdnotify.listen_fds()
    sockets: list[socket.socket] = []
    unix_path = None  # set once we own the file, so a failure never removes another server's socket
    tcp = args.tcp or cfg.server.tcp
    try:
        if fds:
            sockets.append(socket.socket(fileno=fds[0]))
        else:
            sockets.append(bind_unix(socket_path(args, cfg), cfg.server.socket_mode))
            unix_path = socket_path(args, cfg)
        if tcp:
            sockets.append(bind_tcp(tcp))
        where = "socket activation (fd 3)" if fds else unix_path
        sdnotify.notify(f"STATUS=loading {model_path}")
        loaded = load_model(model_path, stream)
        n_ctx = args.ctx or cfg.context_length or min(loaded.args.max_position_embeddings, 4096)
        if n_ctx < 2:
            raise UsageError(f"--ctx must be at least 2, got {n_ctx}")
        sdnotify.notify("STATUS=compiling kernels")
        _warm_up(loaded.model)
        b = cfg.batching
        engine = Engine(loaded.model, loaded.tokenizer, Scheduler(dict(b.admission), b.max_batch, b.max_queue),
                        Metrics(), prefill_chunk=b.prefill_chunk)
        service = Service(engine, loaded.tokenizer, os.path.basename(model_path.rstrip("/")), n_ctx,
                          cfg.sampling.params())
        engine.start()
        config = uvicorn.Config(build_app(service), lifespan="off", http="h11", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=args.grace + 5)
        server = _make_server(config, engine, args.grace)
        log.info("serving %s on %s (context %d, batch %d)", service.model_name, where, n_ctx, b.max_batch)
        asyncio.run(_serve(server, sockets, engine))
    finally:
        for s in sockets:
            s.close()
        if unix_path is not None:  # systemd's socket unit owns an activated socket's file
            with contextlib.suppress(OSError):
                os.unlink(unix_path)
    engine.join(args.grace + 5)
    loaded.model.experts.close()
    log.info("stopped")
    return 0


def _warm_up(model) -> None:
    """Compile (or load from Numba's cache) every kernel before READY, so the first request is not slow."""
    import numpy as np

    cache = model.new_cache(3)
    model.forward(np.zeros(2, dtype=np.int64), cache)  # matrix kernels (prompts, batched steps)
    model.forward(np.zeros(1, dtype=np.int64), cache)  # vector kernels (one token)


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
