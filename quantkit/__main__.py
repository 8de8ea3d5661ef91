"""``python -m quantkit``: the CLI of this checkout (the console script may point elsewhere)."""

from quantkit.cli.main import main

main()
