"""``python -m dsrewrite``: the same as the ``dsrewrite`` command."""

from .cli import main

main()
