"""``python -m streammerge`` runs the CLI."""

from .cli import main

main()
