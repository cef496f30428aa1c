import argparse
def add_commands(sub: "argparse._SubParsersAction") -> None:
    """Subcommands of this package (none yet)."""
