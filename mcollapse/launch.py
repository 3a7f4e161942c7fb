"""The `mcollapse` command's entry point: routes Ctrl-C to a request before the heavy imports
(torch, transformers, Hydra), so an interrupt at any moment ends in one line and exit 130."""

from mcollapse.interrupt import install


def main() -> None:
    install()
    from mcollapse.cli import main as cli_main

    cli_main()
