"""`python -m hubexport` and the `hubexport` console script: under torchrun, ranks the work does not need leave
before the CLI imports torch."""

import sys

from hubexport.launch import solo_if_small


def main() -> None:
    solo_if_small(sys.argv[1:])
    from hubexport.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
