"""`edgemoe config check FILE` (prints ok, or every problem with exit code 2) and `edgemoe config show`.

`check` refuses whatever `run` and `serve` would refuse of the settings at start-up, on this machine (RAM,
CPUs, kernel variants); only the model file and the socket's directory are left to them.
"""

from __future__ import annotations


def setup_arg_parser(p) -> None:
    from ..config import add_config_arguments

    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a configuration file", description="Validate a configuration file")
    check.add_argument("file", help="YAML configuration file")
    show = sub.add_parser("show", help="print the effective configuration as YAML",
                          description="Print the effective configuration (defaults, file, --set overrides) as YAML")
    add_config_arguments(show)


def main(args) -> int:
    import yaml

    from ..config import config_from_args, load_config

    if args.config_command == "check":
        load_config(args.file, kernels=True)  # raises ConfigError listing every problem; the CLI prints it, exit 2
        print("ok")
        return 0
    cfg = config_from_args(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0
