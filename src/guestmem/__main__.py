"""`python -m guestmem`: the same command line as the `guestmem` script."""

from guestmem.cli import main

if __name__ == "__main__":
    main()
