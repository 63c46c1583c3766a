"""CLI subcommands, one module each (see packformer.cli)."""
