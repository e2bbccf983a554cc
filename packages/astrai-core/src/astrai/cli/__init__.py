"""The `astrai` command (`astrai.cli.main:main`, also `python -m astrai.cli`). Sub-commands come from the
`astrai.commands` entry-point group, so each distribution adds its own (astrai-serve adds `astrai serve`)
without this package knowing about it."""
