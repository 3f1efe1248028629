import sys

from hubexport.launch import solo_if_small

solo_if_small(sys.argv[1:])  # before the CLI imports torch: a rank that is not needed leaves at once

from hubexport.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
