"""CLI subcommands, one module each; see mergesmith.cli."""
