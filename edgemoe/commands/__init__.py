"""One module per `edgemoe` subcommand, each with setup_arg_parser(parser) and main(args)."""
