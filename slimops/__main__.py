"""`python -m slimops <command>`: see slimops/cli.py."""
from slimops.cli import main

if __name__ == "__main__":
    main()
