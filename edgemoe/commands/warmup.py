"""`edgemoe warmup`: compile every kernel a model runs into Numba's cache (or find it there), then exit.

Without it, the first start after an install runs its steps kernel by kernel until a background worker has
compiled the fused blocks (`compute.fused_compile`). An appliance image or a provisioning script runs this
once instead, so that every start is warm: for the systemd unit, as the service's user and with its
NUMBA_CACHE_DIR (`/var/cache/edgemoe/numba`), on the CPU that will run it (the cache is per CPU model).
"""

from __future__ import annotations

import os
import time

from ..config import add_config_arguments, config_from_args


def setup_arg_parser(p) -> None:
    from ..engine.session import add_session_arguments

    add_session_arguments(p)
    add_config_arguments(p)


def main(args) -> int:
    from ..engine.session import Session

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    session = Session(args, cfg, compile_wait=True)
    try:
        session.warm_up(separate=True)  # fused and separate kernels of the model and its draft
        session.core()  # a self-draft's, which its first timed round compiles
    finally:
        session.close()
    where = os.environ.get("NUMBA_CACHE_DIR") or "next to the package's modules (__pycache__)"
    print(f"edgemoe: the kernels of {os.path.basename(session.model_path.rstrip('/'))} are in Numba's cache "
          f"({where}); {time.perf_counter() - t0:.1f} s")
    return 0
