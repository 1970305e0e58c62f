"""`python -m jpaged`: the command line (`jpaged/cli.py`)."""

from jpaged.cli import run

if __name__ == "__main__":
    run()
