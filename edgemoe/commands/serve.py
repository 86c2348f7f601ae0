"""`edgemoe serve`: load the model once, then answer OpenAI-style requests over a UNIX socket and/or TCP.

Where it listens: --socket / server.socket and --tcp / server.tcp, as many as are given; with neither, a UNIX
socket in a place this user can write (`default_socket`). A TCP address other than loopback needs an API key
(--api-key-file / server.api_key_file, or --api-key), checked by edgemoe/server/auth.py.
"""

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
from ..server.limits import BACKLOG, MAX_CONNECTIONS, READ_TIMEOUT_S

log = logging.getLogger("edgemoe.server")


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    p.add_argument("--socket", metavar="PATH",
                   help="UNIX socket (default: the config's server.socket; when neither it nor --tcp is given, "
                        "$RUNTIME_DIRECTORY/edgemoe.sock under systemd, else $XDG_RUNTIME_DIR/edgemoe.sock, else "
                        "~/.cache/edgemoe/edgemoe.sock)")
    p.add_argument("--tcp", metavar="HOST:PORT",
                   help="listen on TCP, e.g. 127.0.0.1:8080 (without --socket: TCP only); an address other than "
                        "loopback, e.g. 0.0.0.0:8080, needs --api-key-file or --api-key")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="every request but GET /health must send 'Authorization: Bearer KEY' with the key in FILE "
                        "(one line; the file must not be readable by other users); config: server.api_key_file")
    p.add_argument("--api-key", metavar="KEY",
                   help="as --api-key-file, with the key itself (other local users can see it in the process "
                        "list: prefer --api-key-file)")
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


def socket_path(args, cfg, tcp: str | None) -> str | None:
    """--socket, else server.socket, else None when a TCP address is given, else `default_socket()`."""
    if args.socket:
        from ..config import SOCKET

        if not SOCKET.check(args.socket)[0]:
            raise UsageError(f"--socket {args.socket[:80]!r}: expected {SOCKET.what}")
        return args.socket
    if cfg.server.socket is not None:
        return cfg.server.socket
    return None if tcp else default_socket()


def default_socket(env=os.environ, create: bool = True) -> str:
    """$RUNTIME_DIRECTORY/edgemoe.sock (systemd's RuntimeDirectory=), else $XDG_RUNTIME_DIR/edgemoe.sock (the
    login session's), else edgemoe.sock in $XDG_CACHE_HOME/edgemoe or ~/.cache/edgemoe, created 0700 when
    `create` (a client looking for the server passes False)."""
    runtime = env.get("RUNTIME_DIRECTORY")
    if runtime:
        return os.path.join(runtime.split(":")[0], "edgemoe.sock")
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        # effective_ids: what bind() will be allowed (plain access() asks for the real uid, without capabilities)
        if os.path.isabs(xdg) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK, effective_ids=True):
            return os.path.join(xdg, "edgemoe.sock")
        # e.g. after `su`, the variable names the other user's directory
        log.warning("XDG_RUNTIME_DIR=%s is not a directory this user may write; using the per-user cache "
                    "directory", xdg[:200])
    cache = env.get("XDG_CACHE_HOME")
    if not cache or not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(cache, "edgemoe")
    try:
        if create:
            os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {directory} for the socket ({e.strerror}); set XDG_RUNTIME_DIR, or pass "
                         "--socket PATH or --tcp 127.0.0.1:PORT") from None
    return os.path.join(directory, "edgemoe.sock")


def bind_unix(path: str, mode: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening UNIX socket at `path`; a stale socket file is replaced, a live one refused."""
    from ..config import SUN_PATH_MAX

    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise UsageError(f"the socket path {path[:200]} is longer than a UNIX socket's {SUN_PATH_MAX} bytes; pass a "
                         "shorter --socket")
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
    """"127.0.0.1:8080", "0.0.0.0:8080", "localhost:8080" or "[::1]:8080" → (host, port); UsageError for anything
    else (config.split_tcp: the host is an IP address or localhost)."""
    from ..config import split_tcp

    shown = repr(addr) if len(addr) <= 60 else repr(addr[:57] + "...")
    host, _, port = addr.rpartition(":")
    if host and port.isascii() and port.isdigit() and not 1 <= int(port) <= 65535:
        raise UsageError(f"--tcp (server.tcp) port must be from 1 to 65535, got {int(port)}")
    parsed = split_tcp(addr)
    if parsed is None:
        raise UsageError(f"--tcp (server.tcp) must be HOST:PORT with an IP address or localhost, such as "
                         f"127.0.0.1:8080 (loopback) or 0.0.0.0:8080 (every interface, with an API key), got {shown}")
    return parsed


def api_key(args, cfg, tcp: str | None) -> str | None:
    """The key clients must send: --api-key, else the file's (--api-key-file, folded into server.api_key_file).
    A TCP address other than loopback without one is refused here, before anything is bound or loaded."""
    from ..config import is_loopback
    from ..server.auth import check_key, read_key_file

    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("pass --api-key or --api-key-file, not both")
    key = None
    if args.api_key is not None:
        key = check_key(args.api_key, "--api-key")
    elif cfg.server.api_key_file is not None:
        source = "--api-key-file" if args.api_key_file is not None else "server.api_key_file"
        key = read_key_file(cfg.server.api_key_file, source)
    if tcp and key is None and not is_loopback(parse_tcp(tcp)[0]):
        flag = "--tcp" if args.tcp else "server.tcp"
        raise UsageError(f"{flag} {tcp} is not a loopback address: anyone who reaches it could use the model; "
                         "add an API key clients must send: --api-key-file FILE (one line, chmod 600; "
                         "server.api_key_file in a config) or --api-key KEY")
    return key


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

    from ..server import sdnotify
    from ..server.app import build_app
    from ..server.limits import HttpLimits, fit_to_nofile
    from ..server.noise import QuietFilter, Throttle
    from ..server.protocol import guarded_h11

    logging.basicConfig(level=logging.INFO, format="edgemoe: %(message)s", stream=sys.stderr)
    cfg = config_from_args(args)
    tcp = args.tcp or cfg.server.tcp
    if tcp:
        parse_tcp(tcp)  # a bad address fails before anything is bound or loaded
    key = api_key(args, cfg, tcp)
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
            path = socket_path(args, cfg, tcp)
            if path is not None:
                sockets.append(bind_unix(path, cfg.server.socket_mode, limits.backlog))
                unix_path = path
        if tcp:
            sockets.append(bind_tcp(tcp, limits.backlog))
        listeners = ["socket activation (fd 3)"] if fds else [unix_path] if unix_path is not None else []
        where = " and ".join(listeners + ([f"http://{tcp}"] if tcp else []))
        log.info("listening on %s%s", where, "; every request but GET /health needs the API key" if key else "")
        session, engine, service = build_service(args, cfg, limits, noise)
        b = cfg.batching
        engine.start()
        # limit_concurrency: uvicorn's own 503 once a request arrives, a second fence behind the protocol's cap
        # at accept time (+1: uvicorn counts the asking connection too).
        config = uvicorn.Config(build_app(service, key), lifespan="off", http=guarded_h11(limits, noise),
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


def build_service(args, cfg, limits, noise):
    """The model's session (loaded and warmed up), its engine (not started) and the Service the routes answer from,
    as `serve` builds them; a cluster replica (edgemoe/cluster/replica.py) builds its own the same way."""
    from ..engine.session import Session
    from ..kernels import compile_ahead
    from ..server import sdnotify
    from ..server.app import Service
    from ..server.engine import Engine
    from ..server.metrics import Metrics
    from ..server.scheduler import Scheduler

    model = args.model or cfg.inference.model or "the embedded model"
    log.info("loading %s", model)  # one log line per phase: loading, warming up, serving
    sdnotify.notify(f"STATUS=loading {model}")
    session = Session(args, cfg, progress=False)
    try:
        log.info("warming up: compiling the kernels (the first run after an install takes ~%s)",
                 "40 s" if session.compile_wait else "10 s; the fused decode kernels compile in the background")
        sdnotify.notify("STATUS=compiling kernels")
        session.warm_up()
        pid, left = compile_ahead.pending()
        if left:
            log.info("the fused decode kernels (%s) are compiling in a background process (pid %d, ~30-40 s); "
                     "until then steps run kernel by kernel", ", ".join(left), pid)
        b = cfg.batching
        engine = Engine(session.core(Metrics()), Scheduler(dict(b.admission), b.max_batch, b.max_queue),
                        bind_thread=session.bind_thread)
    except BaseException:
        session.close()
        raise

    def info() -> dict:
        threads = engine.threads if session.threads is not None else session.thread_figures(engine.core)
        return {"threads": threads, "layout": session.layout(), "kv_cache": session.cache_type,
                "streaming": session.stream is not None, "speculative": engine.core.proposer_name,
                **{k: v for k, v in session.stream_figures().items() if k == "thermal"}}

    service = Service(engine, session.tokenizer, os.path.basename(session.model_path.rstrip("/")),
                      session.n_ctx, cfg.sampling.params(), info, limits=limits, noise=noise,
                      chat_template=session.chat_template)
    log.info("chat requests use %s (%s)", session.chat_template.label, session.chat_template.origin)
    return session, engine, service
