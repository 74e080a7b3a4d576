"""One module per `launch` subcommand; each exposes `register(subparsers)`."""
