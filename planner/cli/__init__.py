"""One module per `podplan` subcommand; each exports `register(subparsers)`."""
