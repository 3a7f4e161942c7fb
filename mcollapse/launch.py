"""The `mcollapse` command's entry point: routes Ctrl-C to a request before the heavy imports
(torch, transformers, Hydra), so an interrupt at any moment ends in one line and exit 130; and
refuses, in one line, a run directory that cannot be written, before Hydra tries to create it."""

import sys

from mcollapse.interrupt import install


def main() -> None:
    install()
    from mcollapse.cli import config_dir
    from mcollapse.cli import main as cli_main
    from mcollapse.errors import UserError
    from mcollapse.run_dir import check_writable, planned_run_dir

    run_dir = planned_run_dir(sys.argv[1:], config_dir())
    try:
        if run_dir is not None:
            check_writable(run_dir)
    except UserError as error:
        print(f"mcollapse: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    cli_main()
