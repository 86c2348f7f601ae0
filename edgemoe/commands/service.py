"""`edgemoe service install`: the systemd units and the configuration of an appliance that runs from a venv.

    python3 -m venv /opt/edgemoe && /opt/edgemoe/bin/pip install edgemoe
    sudo /opt/edgemoe/bin/edgemoe service install

writes /etc/systemd/system/edgemoe.service and edgemoe.socket (with --cluster: edgemoe-cluster.service, the
`edgemoe cluster up` front door) from the templates shipped in the package (edgemoe/data/systemd/, = the
repository's systemd/), with ExecStart naming this interpreter, and
/etc/edgemoe/edgemoe.yaml from edgemoe/data/configs/default.yaml unless that file exists; then prints the
commands to run next. Each unit it writes starts with a checksum of the rest: a unit edited since (or not
written by it) is replaced only with --force; an existing configuration is always kept.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import sys
from dataclasses import dataclass
from importlib import resources

from ..errors import UsageError

UNITS = ("edgemoe.service", "edgemoe.socket")
CLUSTER_UNITS = ("edgemoe-cluster.service",)
STAMP = "# Written by `edgemoe service install`; replaced by it while this checksum of the rest holds: sha256:"
# A path the unit holds as is: systemd would expand % and $, and split on spaces.
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@-]*")
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # Debian's useradd NAME_REGEX, system users
# Where the unit's ProtectHome=yes and PrivateTmp=yes hide files from the service.
HIDDEN = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
          "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes"}


def setup_arg_parser(p) -> None:
    sub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    install = sub.add_parser("install", help="write the systemd units and the configuration",
                             description="Write edgemoe.service and edgemoe.socket (ExecStart: this interpreter) and "
                                         "the default configuration unless one exists, then print what to run next")
    install.add_argument("--prefix", default="/opt/edgemoe", metavar="DIR",
                         help="the venv edgemoe runs from; this command must run from it (default /opt/edgemoe)")
    install.add_argument("--config", default="/etc/edgemoe/edgemoe.yaml", metavar="FILE",
                         help="configuration the service reads; written from the packaged default when absent, "
                              "kept when present (default /etc/edgemoe/edgemoe.yaml)")
    install.add_argument("--user", default="edgemoe", metavar="NAME",
                         help="system user and group the service runs as; members of the group may use the socket "
                              "(default edgemoe)")
    install.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR",
                         help="where the units go (default /etc/systemd/system)")
    install.add_argument("--cluster", action="store_true",
                         help="write edgemoe-cluster.service instead: `edgemoe cluster up --config FILE`, the "
                              "models as Ray Serve replicas behind one endpoint (pip install 'edgemoe[cluster]')")
    install.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    install.add_argument("--force", action="store_true", help="replace units that were edited since they were written")


# What happens to a planned file: (done, with --dry-run)
SAID = {"new": ("wrote", "would write"), "update": ("updated", "would update"),
        "edited": ("replaced (it was edited)", "would replace (it was edited)"),
        "unchanged": ("unchanged:", "unchanged:"), "kept": ("kept (it exists):", "would keep (it exists):")}


@dataclass
class Planned:
    path: str
    text: str
    status: str  # "new", "unchanged", "update" (an earlier install's, unedited), "edited", "kept" (a config)


def main(args) -> int:
    python = service_python()
    _check_prefix(args.prefix)
    config = os.path.abspath(args.config)
    unit_dir = os.path.abspath(args.unit_dir)
    for what, path in (("the interpreter", python), ("--config", config), ("--unit-dir", unit_dir)):
        if not SAFE_PATH.fullmatch(path):
            raise UsageError(f"{what} {path[:200]!r} has characters a unit file would need quoted; use a path of "
                             "letters, digits and . _ / + @ -")
    if not USER_NAME.fullmatch(args.user):
        raise UsageError(f"--user {args.user[:40]!r} is not a system user name (lower-case letters, digits, _ and -, "
                         "at most 32, not starting with a digit or -)")
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for what, path in (("the interpreter", python), ("the edgemoe package", package),
                       ("--config", config)):
        hidden_by = _hidden(path)
        if hidden_by:
            print(f"edgemoe: warning: {what} is under {hidden_by[0]}, which the unit hides from the service "
                  f"({hidden_by[1]}); use a venv under /opt made by the system's python3 (python3 -m venv "
                  "/opt/edgemoe), and a configuration under /etc",
                  file=sys.stderr)

    units = CLUSTER_UNITS if args.cluster else UNITS
    plan = [_plan_unit(os.path.join(unit_dir, name), render(name, python, config, args.user)) for name in units]
    plan.append(_plan_config(config))
    edited = [p.path for p in plan if p.status == "edited"]
    if edited and not args.force:
        raise UsageError(f"{edited[0]} was edited since it was written (or not written by edgemoe service install); "
                         f"pass --force to replace it (keep local changes in `systemctl edit "
                         f"{os.path.basename(edited[0]).removesuffix('.service')}` drop-ins)")
    for p in plan:
        if p.status in ("new", "update", "edited") and not args.dry_run:
            _write(p.path, p.text)
        print(f"{SAID[p.status][args.dry_run]} {p.path}")
    if args.dry_run:
        for p in plan[:len(units)]:
            print(f"\n--- {p.path}\n{p.text}", end="")
    print()
    print(next_steps(args.user, config, python, args.dry_run, args.cluster), end="")
    return 0


def service_python() -> str:
    """The interpreter's path with symlinked directories resolved. A venv's bin/python stays as it is: resolving
    that symlink would name the base interpreter, which runs without the venv's packages."""
    exe = os.path.abspath(sys.executable)
    if sys.prefix != sys.base_prefix:
        return os.path.join(os.path.realpath(os.path.dirname(exe)), os.path.basename(exe))
    return os.path.realpath(exe)


def _check_prefix(prefix: str) -> None:
    here = os.path.realpath(sys.prefix)
    if os.path.realpath(prefix) != here:
        raise UsageError(f"this edgemoe runs from {here}, not from --prefix {prefix}: install it there first "
                         f"(python3 -m venv {prefix} && {prefix}/bin/pip install edgemoe) and run "
                         f"{prefix}/bin/edgemoe service install, or pass --prefix {here}")


def _hidden(path: str) -> tuple[str, str] | None:
    real = os.path.realpath(path)
    for top, directive in HIDDEN.items():
        if real == top or real.startswith(top + "/"):
            return top, directive
    return None


def render(name: str, python: str, config: str, user: str) -> str:
    """The packaged template `name` for this interpreter, configuration and user, stamped with its checksum."""
    text = resources.files("edgemoe").joinpath("data", "systemd", name).read_text()
    if name.endswith(".service"):
        command = "cluster up" if name == "edgemoe-cluster.service" else "serve"
        text = _set(text, "ExecStart", f"{python} -m edgemoe {command} --config {config}")
        text = _set(text, "User", user)
        text = _set(text, "Group", user)
    else:
        text = _set(text, "SocketGroup", user)
    return stamped(text)


def _set(text: str, key: str, value: str) -> str:
    out, n = re.subn(rf"^{key}=.*$", lambda _: f"{key}={value}", text, flags=re.M)
    assert n == 1, f"the packaged template has {n} {key}= lines"
    return out


def stamped(text: str) -> str:
    return f"{STAMP}{_digest(text)}\n{text}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plan_unit(path: str, text: str) -> Planned:
    existing = _read(path)
    if existing is None:
        return Planned(path, text, "new")
    if existing == text:
        return Planned(path, text, "unchanged")
    first, _, rest = existing.partition("\n")
    return Planned(path, text, "update" if first == STAMP + _digest(rest) else "edited")


def _plan_config(path: str) -> Planned:
    text = resources.files("edgemoe").joinpath("data", "configs", "default.yaml").read_text()
    existing = _read(path)
    if existing is None:
        return Planned(path, text, "new")
    return Planned(path, text, "unchanged" if existing == text else "kept")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); run this as root (sudo)") from None


def _write(path: str, text: str) -> None:
    """`text` into `path` (0644) through a temporary file, so a unit is never seen half-written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # whatever the umask
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UsageError(f"cannot write {path} ({e.strerror}); run this as root (sudo)") from None


def next_steps(user: str, config: str, python: str, dry_run: bool, cluster: bool = False) -> str:
    lines = ["then, as root:" if not dry_run else "after writing them, as root:"]
    if not _exists(pwd.getpwnam, user):
        group = f"--gid {user}" if _exists(grp.getgrnam, user) else "--user-group"
        lines.append(f"  useradd --system {group} --home-dir /var/lib/edgemoe --no-create-home "
                     f"--shell /usr/sbin/nologin {user}")
    elif not _exists(grp.getgrnam, user):
        lines.append(f"  groupadd --system {user}")
    lines += [f"  usermod -aG {user} YOUR_USER    # who may use the socket (log in again to take effect)",
              f"  # set inference.model in {config} to a model under /srv/edgemoe that {user} may read "
              "(null: the embedded model), then:",
              f"  {python} -m edgemoe config check {config}",
              "  systemctl daemon-reload"]
    if cluster:
        lines += [f"  {python} -m pip install 'edgemoe[cluster]'    # Ray Serve, unless installed",
                  "  # cluster.address in the configuration: the Ray cluster to join (none: a local one), then:",
                  "  systemctl enable --now edgemoe-cluster.service",
                  "  curl --unix-socket /run/edgemoe/edgemoe-cluster.sock http://localhost/health"]
    else:
        lines += ["  systemctl enable --now edgemoe.socket",
                  "  curl --unix-socket /run/edgemoe/edgemoe.sock http://localhost/health    # starts the service"]
    return "\n".join(lines) + "\n"


def _exists(lookup, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True
