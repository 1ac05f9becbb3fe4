"""`python -m megatron_ext.eval`: see cli.py."""

from megatron_ext.eval.cli import main

if __name__ == "__main__":
    main()
